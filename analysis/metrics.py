"""Numbers the report derives from a run's tables. The sweep table's own (time to target, utilisation) come
from hsplit_sim.results, computed when the sweep runs."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from hsplit_sim.results import EVENT_CATEGORIES, EVENT_KINDS

ACTIVITIES = EVENT_CATEGORIES  # what events add up to (results.EVENT_KINDS says which kind is which)
BREAKDOWN = (*ACTIVITIES, "idle")  # idle is the rest
BREAKDOWN_COLUMNS = ("client", "kind", "start_s", "end_s")  # what time_breakdown reads of events


def time_breakdown(events: pd.DataFrame | Iterable[pa.Table], sim_time_s: float) -> pd.DataFrame:
    """Seconds per client (rows) in each of ACTIVITIES and idle (columns).

    `events` is the events table, or batches of its BREAKDOWN_COLUMNS (a run's row groups: its millions of
    events need not be held at once). An event counts for the client it names, in its kind's category
    (results.EVENT_KINDS; a kind outside it counts for nothing): server steps done for a client are its
    "server" time, and idle is what remains of the simulated time (waiting at round barriers, or not
    selected)."""
    if isinstance(events, pd.DataFrame):
        events = [pa.Table.from_pandas(events[list(BREAKDOWN_COLUMNS)], preserve_index=False)]
    width = len(ACTIVITIES)
    busy, seen = np.zeros((0, width)), np.zeros(0, dtype=bool)
    for table in events:
        for batch in table.to_batches():
            client = batch["client"].to_numpy(zero_copy_only=False)
            activity = _activities(batch["kind"])
            mine = (client >= 0) & (activity >= 0)
            if not mine.any():
                continue
            client = client[mine]
            n = client.max() + 1
            if n > len(busy):
                busy = np.vstack([busy, np.zeros((n - len(busy), width))])
                seen = np.r_[seen, np.zeros(n - len(seen), dtype=bool)]
            seconds = pc.subtract(batch["end_s"], batch["start_s"]).to_numpy(zero_copy_only=False)[mine]
            cells = client * width + activity[mine]
            busy[:n] += np.bincount(cells, weights=seconds, minlength=n * width).reshape(n, width)
            seen[client] = True
    table = pd.DataFrame(busy[seen], index=pd.Index(np.flatnonzero(seen), name="client"), columns=list(ACTIVITIES))
    table["idle"] = (sim_time_s - table.sum(axis=1)).clip(lower=0.0)
    return table


def _activities(kind: pa.Array) -> np.ndarray:
    """Each event's column of ACTIVITIES (-1: a kind outside results.EVENT_KINDS), decided once per distinct
    kind name, not per event."""
    kind = kind if pa.types.is_dictionary(kind.type) else kind.dictionary_encode()
    per_name = np.array([ACTIVITIES.index(EVENT_KINDS[name]) if name in EVENT_KINDS else -1
                         for name in kind.dictionary.to_pylist()], dtype=np.int64)
    return per_name[kind.indices.to_numpy(zero_copy_only=False)]


def bytes_per_round(rounds: pd.DataFrame) -> pd.DataFrame:
    """Bytes up and down in each training round (the rounds table holds running totals)."""
    totals = rounds.sort_values("round").set_index("round")[["bytes_up", "bytes_down"]]
    per_round = totals.diff().fillna(totals)
    return per_round[per_round.index > 0]  # round 0 is the evaluation before training
