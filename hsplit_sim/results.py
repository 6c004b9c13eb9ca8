"""The run directory's contract, shared by the code that writes runs (experiment/) and the code that reads them
(analysis/): its tables and their columns, the event vocabulary, its version, and the few numbers both the sweep
table and the report derive from a run, so they agree.

`summary.json` carries `results_version`; directories written before it (version 1) have no resources table,
and `analysis.load` derives one from the resource names those versions used.

Only pandas and pyarrow are imported here: analysis reads runs without torch, SimPy or ZeroMQ.
"""

import math
from collections.abc import Iterable

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

RESULTS_VERSION = 2

# Every simulated activity is one row: which round, on behalf of which client (-1: the server's own work),
# what kind of activity, on which resource, when, and the bytes moved or FLOPs computed.
EVENT_COLUMNS = ("round", "client", "kind", "resource", "start_s", "end_s", "bytes", "flops")

# What each kind of event spends time on, in the order a split iteration spends it. "queue" is waiting, not work.
EVENT_CATEGORIES = ("compute", "upload", "queue", "server", "download")
EVENT_KINDS = {
    "client_fwd": "compute", "client_bwd": "compute", "client_step": "compute", "merge": "compute",
    "upload": "upload", "adapter_upload": "upload", "data_upload": "upload", "importance_upload": "upload",
    "download": "download", "broadcast": "download", "resplit": "download",
    "server_queue": "queue",
    "server_step": "server", "aggregate": "server", "central_step": "server", "eval": "server",
}
WAIT_KINDS = frozenset(k for k, category in EVENT_KINDS.items() if category == "queue")

# The resources of a run: a client's device and its links, the server (events name these), and each shared
# medium the links of some clients go through (system.media; their transfers are events on those links).
# `client` is the owner (-1: shared), `name` the catalog entry (device, link or medium), `group` the scenario's
# client group.
RESOURCE_COLUMNS = ("resource", "kind", "client", "name", "group")
RESOURCE_KINDS = ("device", "uplink", "downlink", "medium", "server")

ROUND_COLUMNS = ("round", "sim_time_s", "wall_time_s", "train_loss", "eval_loss", "eval_ppl", "bytes_up",
                 "bytes_down", "agg_error", "algorithm")
CLIENT_COLUMNS = ("round", "client", "device", "link", "split_layer", "rank", "adapted_weights", "adapter_params",
                  "memory_bytes", "memory_budget_bytes", "n_examples", "status")

# Who took part in each round and how it ended for each client (sim/fleet.py: Fleet.participate): reported,
# dropped (left after part of its steps), late (stopped at the deadline, or once enough updates arrived),
# offline at the end (its update lost), offline (at the round's start), not selected.
PARTICIPATION_COLUMNS = ("round", "client", "outcome", "end_s")
PARTICIPATION_OUTCOMES = ("reported", "dropped", "late", "offline at the end", "offline", "not selected")

# Seconds and joules per client and round in each power state (sim/energy.py), for devices with power figures.
ENERGY_COLUMNS = ("round", "client", "compute_s", "transmit_s", "receive_s", "idle_s", "compute_j", "transmit_j",
                  "receive_j", "idle_j", "energy_j")

# The host's measured seconds of each real operation an event stands for (a trained run's client_fwd,
# server_step, client_bwd, client_step, central_step): `step` numbers them within (round, client, kind) in the
# order the events table holds them, so the two join on (round, client, kind, step).
HOST_TIME_COLUMNS = ("round", "client", "kind", "step", "host_s")
HOST_TIMED_KINDS = ("client_fwd", "server_step", "client_bwd", "client_step", "central_step")

# Tables of a run directory: the small ones rewritten after every round, the large ones (events, clients,
# participation, energy, host_times) written as parts per round and combined when the run ends.
TABLES = ("rounds", "events", "clients", "resources", "participation", "energy", "plans", "importance",
          "generations", "host_times")

# The E2E challenge's scores of decoded test texts (summary.json's `generation`, hsplit_sim/textmetrics.py), in
# the order tables show them.
GENERATION_METRICS = ("bleu", "nist", "meteor", "rouge_l", "cider")

# What `utilisation` reads of the events table.
UTILISATION_COLUMNS = ("kind", "resource", "start_s", "end_s")


def time_to_target(rounds: pd.DataFrame, target: float) -> float:
    """Simulated time at which evaluation perplexity first reaches target; NaN if never (or no target).

    Between the last evaluation above the target and the first at or below it the time is interpolated linearly
    in log perplexity (the evaluation loss, which training lowers roughly evenly within a round), so the figure
    does not jump by whole rounds: a method whose curve crosses the target early in a round is not charged the
    whole round."""
    if rounds.empty or target is None or math.isnan(target):
        return math.nan
    evaluated = rounds.dropna(subset=["eval_ppl"]).sort_values("sim_time_s")
    times, ppls = evaluated["sim_time_s"].to_numpy(dtype=float), evaluated["eval_ppl"].to_numpy(dtype=float)
    reached = (ppls <= target).nonzero()[0]
    if not reached.size:
        return math.nan
    i = int(reached[0])
    if i == 0:
        return float(times[0])
    above, below = math.log(ppls[i - 1]), math.log(ppls[i])
    return float(times[i - 1] + (above - math.log(target)) / (above - below) * (times[i] - times[i - 1]))


def utilisation(events: Iterable[pa.Table], resources: pd.DataFrame, sim_time_s: float, accelerators: int = 1,
                n_clients: int = 0) -> dict:
    """Busy time / simulated time: the server over all its accelerators, and the mean over clients' devices
    (clients without events count as idle, so a method that leaves devices unused shows it).

    `events` are batches of UTILISATION_COLUMNS (a run's row groups: a fleet's millions of events are never held
    at once); what each resource is comes from the resources table, so a shared medium is neither."""
    busy: dict[str, float] = {}
    waits = pa.array(sorted(WAIT_KINDS))
    for table in events:
        work = table.filter(pc.invert(pc.is_in(table["kind"], value_set=waits)))
        seconds = pa.table({"resource": work["resource"], "s": pc.subtract(work["end_s"], work["start_s"])})
        summed = seconds.group_by("resource").aggregate([("s", "sum")])
        for resource, s in zip(summed["resource"].to_pylist(), summed["s_sum"].to_pylist()):
            busy[resource] = busy.get(resource, 0.0) + s
    if not busy or not sim_time_s:
        return {"server": math.nan, "clients_mean": math.nan}
    kinds = dict(zip(resources["resource"], resources["kind"]))
    server = sum(s for resource, s in busy.items() if kinds.get(resource) == "server")
    devices = [r for r, kind in kinds.items() if kind == "device"]
    n = max(n_clients, len(devices))
    clients = sum(busy.get(r, 0.0) for r in devices) / (n * sim_time_s) if n else math.nan
    return {"server": server / (accelerators * sim_time_s), "clients_mean": clients}
