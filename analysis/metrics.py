"""Numbers derived from a run's tables, shared by the sweep table and the report so both agree."""

from __future__ import annotations

import math
import re

import pandas as pd

# Waiting is not work: it counts neither as busy time nor as a device's own activity.
WAIT_KINDS = {"server_queue"}
BREAKDOWN = ("compute", "upload", "server queue", "server", "download", "idle")
# The E2E challenge's scores of decoded test texts (analysis/textmetrics.py), in the order tables show them.
GENERATION_METRICS = ("bleu", "nist", "meteor", "rouge_l", "cider")


def time_to_target(rounds: pd.DataFrame, target: float) -> float:
    """First simulated time at which evaluation perplexity is at or below target; NaN if never (or no target)."""
    if rounds.empty or target is None or math.isnan(target):
        return math.nan
    reached = rounds[rounds["eval_ppl"] <= target]
    return float(reached["sim_time_s"].min()) if not reached.empty else math.nan


def utilisation(events: pd.DataFrame, sim_time_s: float, accelerators: int = 1, n_clients: int = 0) -> dict:
    """Busy time / simulated time: the server over all its accelerators, and the mean over clients' devices
    (clients without events count as idle, so a method that leaves devices unused shows it)."""
    if events.empty or not sim_time_s:
        return {"server": math.nan, "clients_mean": math.nan}
    work = events[~events["kind"].isin(WAIT_KINDS)]
    seconds = (work["end_s"] - work["start_s"]).groupby(work["resource"].astype(str)).sum()
    server = seconds[[r for r in seconds.index if r.startswith("server")]].sum()
    devices = {int(m.group(1)): s for r, s in seconds.items() if (m := re.fullmatch(r"client(\d+)", r))}
    n = max(n_clients, max(devices, default=-1) + 1)
    clients = sum(devices.values()) / (n * sim_time_s) if n else math.nan
    return {"server": server / (accelerators * sim_time_s), "clients_mean": clients}


def time_breakdown(events: pd.DataFrame, sim_time_s: float) -> pd.DataFrame:
    """Seconds per client (rows) in compute, upload, server queue, server, download and idle (columns).

    An event counts for the client it names: server steps done for a client are its "server" time, and idle is
    what remains of the simulated time (waiting at round barriers, or not selected)."""
    mine = events[events["client"] >= 0]
    if mine.empty:
        return pd.DataFrame(columns=list(BREAKDOWN))
    resource = mine["resource"].astype(str)
    category = pd.Series("compute", index=mine.index)
    category[resource.str.endswith(".up")] = "upload"
    category[resource.str.endswith(".down")] = "download"
    category[resource.str.startswith("server")] = "server"
    category[mine["kind"].isin(WAIT_KINDS)] = "server queue"
    table = (mine["end_s"] - mine["start_s"]).groupby([mine["client"], category]).sum().unstack(fill_value=0.0)
    table = table.reindex(columns=list(BREAKDOWN), fill_value=0.0)
    table["idle"] = (sim_time_s - table.drop(columns="idle").sum(axis=1)).clip(lower=0.0)
    table.index.name = "client"
    return table


def bytes_per_round(rounds: pd.DataFrame) -> pd.DataFrame:
    """Bytes up and down in each training round (the rounds table holds running totals)."""
    totals = rounds.sort_values("round").set_index("round")[["bytes_up", "bytes_down"]]
    per_round = totals.diff().fillna(totals)
    return per_round[per_round.index > 0]  # round 0 is the evaluation before training
