"""Numbers derived from a run's tables, shared by the sweep table and the report so both agree."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

# Waiting is not work: it counts neither as busy time nor as a device's own activity.
WAIT_KINDS = {"server_queue"}
BREAKDOWN = ("compute", "upload", "server queue", "server", "download", "idle")
ACTIVITIES = BREAKDOWN[:-1]  # what events add up to; idle is the rest
BREAKDOWN_COLUMNS = ("client", "kind", "resource", "start_s", "end_s")  # what time_breakdown reads of events
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


def time_breakdown(events: pd.DataFrame | Iterable[pa.Table], sim_time_s: float) -> pd.DataFrame:
    """Seconds per client (rows) in compute, upload, server queue, server, download and idle (columns).

    `events` is the events table, or batches of its BREAKDOWN_COLUMNS (a run's row groups: its millions of
    events need not be held at once). An event counts for the client it names: server steps done for a client
    are its "server" time, and idle is what remains of the simulated time (waiting at round barriers, or not
    selected)."""
    if isinstance(events, pd.DataFrame):
        events = [pa.Table.from_pandas(events[list(BREAKDOWN_COLUMNS)], preserve_index=False)]
    width = len(ACTIVITIES)
    busy, seen = np.zeros((0, width)), np.zeros(0, dtype=bool)
    for table in events:
        for batch in table.to_batches():
            client = batch["client"].to_numpy(zero_copy_only=False)
            mine = client >= 0
            if not mine.any():
                continue
            client = client[mine]
            n = client.max() + 1
            if n > len(busy):
                busy = np.vstack([busy, np.zeros((n - len(busy), width))])
                seen = np.r_[seen, np.zeros(n - len(seen), dtype=bool)]
            seconds = pc.subtract(batch["end_s"], batch["start_s"]).to_numpy(zero_copy_only=False)[mine]
            cells = client * width + _activities(batch["resource"], batch["kind"])[mine]
            busy[:n] += np.bincount(cells, weights=seconds, minlength=n * width).reshape(n, width)
            seen[client] = True
    table = pd.DataFrame(busy[seen], index=pd.Index(np.flatnonzero(seen), name="client"), columns=list(ACTIVITIES))
    table["idle"] = (sim_time_s - table.sum(axis=1)).clip(lower=0.0)
    return table


def _activities(resource: pa.Array, kind: pa.Array) -> np.ndarray:
    """Each event's column of ACTIVITIES, decided once per distinct resource and kind name (not per event)."""
    resource = resource if pa.types.is_dictionary(resource.type) else resource.dictionary_encode()
    kind = kind if pa.types.is_dictionary(kind.type) else kind.dictionary_encode()
    names = resource.dictionary
    per_name = np.select(
        [pc.starts_with(names, "server").to_numpy(zero_copy_only=False),
         pc.ends_with(names, ".up").to_numpy(zero_copy_only=False),
         pc.ends_with(names, ".down").to_numpy(zero_copy_only=False)],
        [ACTIVITIES.index("server"), ACTIVITIES.index("upload"), ACTIVITIES.index("download")],
        ACTIVITIES.index("compute"))
    codes = per_name[resource.indices.to_numpy(zero_copy_only=False)]
    waits = pc.is_in(kind.dictionary, pa.array(sorted(WAIT_KINDS))).to_numpy(zero_copy_only=False)
    codes[waits[kind.indices.to_numpy(zero_copy_only=False)]] = ACTIVITIES.index("server queue")
    return codes


def bytes_per_round(rounds: pd.DataFrame) -> pd.DataFrame:
    """Bytes up and down in each training round (the rounds table holds running totals)."""
    totals = rounds.sort_values("round").set_index("round")[["bytes_up", "bytes_down"]]
    per_round = totals.diff().fillna(totals)
    return per_round[per_round.index > 0]  # round 0 is the evaluation before training
