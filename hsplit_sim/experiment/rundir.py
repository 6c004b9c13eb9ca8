"""The run directory: every table on disk after each round, so a crash loses nothing finished.

The tables that grow with the rounds (events, clients, plans...) go one part file per round under
`.<table>.parts/`, written once and never rewritten; a background thread appends the same rows to
`.<table>.parquet.partial` while the simulation goes on (parquet releases the interpreter's lock), and
`finish_parts` closes it and renames it to `<table>.parquet` at the end of the run, whether it completed or
failed; the small ones (rounds, resources) are rewritten whole and atomically. A run killed outright leaves its
parts, which `analysis.load` reads when the combined file is missing.
"""

import collections
import functools
import itertools
import json
import os
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

from hsplit_sim.errors import RunError, ScenarioError
from hsplit_sim.results import EVENT_COLUMNS
from hsplit_sim.sim.engine import SPLIT_KINDS, IterationShape

# The contract names the columns; their types are the writer's: a column added there without a type here fails
# on import, not in a run.
EVENT_TYPES = {"round": pa.int64(), "client": pa.int64(), "kind": pa.string(), "resource": pa.string(),
               "start_s": pa.float64(), "end_s": pa.float64(), "bytes": pa.int64(), "flops": pa.float64()}
EVENT_SCHEMA = pa.schema([(column, EVENT_TYPES[column]) for column in EVENT_COLUMNS])


EVENT_ROW = pa.struct(list(EVENT_SCHEMA))


# A compact split-iteration record (sim/engine.py: Simulation): its shape's number, round, probing, and these
# instants (the forward's end, between start and arrival, is start plus the shape's forward seconds).
INSTANTS = ("start", "arrived", "acquired", "served", "downloaded", "end")
RECORD = pa.struct([("shape", pa.int64()), ("round", pa.int64()), ("probe", pa.bool_()),
                    *((name, pa.float64()) for name in INSTANTS)])


def events_table(events: list[tuple], shapes: list[IterationShape]) -> pa.Table:
    """Event rows and compact split-iteration records, whose shapes `shapes` numbers (sim/engine.py:
    Simulation), as an Arrow table of the fixed event schema, in their order, a record giving its six rows.
    Arrow reads the tuples as structs and splits them into columns itself, about five times faster than
    transposing them in Python; numpy expands the records, most of a timing-only run's events (ten thousand
    clients make 100,000 a round)."""
    is_record = np.fromiter(map(len, events), np.int64, len(events)) != len(EVENT_COLUMNS)
    rows = pa.Table.from_arrays(pa.array(list(itertools.compress(events, ~is_record)), type=EVENT_ROW).flatten(),
                                schema=EVENT_SCHEMA)
    if not is_record.any():
        return rows
    records = {field.name: column.to_numpy(zero_copy_only=False) for field, column in zip(
        RECORD, pa.array(list(itertools.compress(events, is_record)), type=RECORD).flatten())}
    widths = np.where(is_record, len(SPLIT_KINDS), 1)
    first = np.cumsum(widths) - widths  # where each row or record's rows start
    at_rows, at_records = first[~is_record], first[is_record]
    total = int(widths.sum())

    shape_of, probe, start = records["shape"], records["probe"].astype(np.int64), records["start"]
    # activity j of a record lasts from instant j to instant j + 1
    fwd_s = np.array([shape.fwd_s for shape in shapes])
    instants = [start, start + fwd_s[shape_of], *(records[name] for name in INSTANTS[1:])]
    nbytes = np.array([shape.nbytes for shape in shapes], dtype=np.int64)
    flops = np.array([[shape.flops[p] for shape in shapes] for p in (False, True)])
    clients = np.array([shape.client for shape in shapes], dtype=np.int64)

    kind = pc.dictionary_encode(rows["kind"]).combine_chunks()
    resource = pc.dictionary_encode(rows["resource"]).combine_chunks()
    kinds = kind.dictionary.to_pylist() + list(SPLIT_KINDS)
    names = {name: i for i, name in enumerate(resource.dictionary.to_pylist())}
    shape_resources = np.array([[names.setdefault(name, len(names)) for name in shape.resources] for shape in shapes],
                               dtype=np.int32)
    columns = {"round": np.empty(total, np.int64), "client": np.empty(total, np.int64),
               "kind": np.empty(total, np.int32), "resource": np.empty(total, np.int32),
               "start_s": np.empty(total), "end_s": np.empty(total), "bytes": np.empty(total, np.int64),
               "flops": np.empty(total)}
    for name in ("round", "client", "start_s", "end_s", "bytes", "flops"):
        columns[name][at_rows] = rows[name].to_numpy()
    columns["kind"][at_rows] = kind.indices.to_numpy(zero_copy_only=False)
    columns["resource"][at_rows] = resource.indices.to_numpy(zero_copy_only=False)
    for j in range(len(SPLIT_KINDS)):
        at = at_records + j
        columns["round"][at] = records["round"]
        columns["client"][at] = clients[shape_of]
        columns["kind"][at] = len(kind.dictionary) + j
        columns["resource"][at] = shape_resources[shape_of, j]
        columns["start_s"][at] = instants[j]
        columns["end_s"][at] = instants[j + 1]
        columns["bytes"][at] = nbytes[shape_of, j]
        columns["flops"][at] = flops[probe, shape_of, j]
    strings = {"kind": kinds, "resource": list(names)}
    return pa.Table.from_arrays(
        [pa.DictionaryArray.from_arrays(columns[c], pa.array(strings[c], pa.string())).cast(pa.string())
         if c in strings else pa.array(columns[c]) for c in EVENT_COLUMNS], schema=EVENT_SCHEMA)


class WriteError(RunError):
    """A file of the run directory could not be written (a full disk, a read-only or no longer writable one)."""


def _written(method):
    """Turn an OSError of a write into a WriteError naming the file, so a full disk ends the run in one line."""
    @functools.wraps(method)
    def write(self, name, *args, **kwargs):
        try:
            return method(self, name, *args, **kwargs)
        except OSError as e:
            raise WriteError(f"cannot write {name} in {self.path}: {e.strerror or e}") from None
    return write


class RunWriter:
    # Appends to combined files queued at most (about two rounds' worth): the simulation waits beyond that, so a
    # slow disk cannot make the queue hold many rounds of tables in memory.
    QUEUED = 16

    def __init__(self, path: Path):
        self.path = path
        self.parts: dict[str, int] = {}
        self._combined: dict[str, pq.ParquetWriter] = {}  # the combined file of each part table, open
        self._thread: ThreadPoolExecutor | None = None
        self._queued: collections.deque = collections.deque()
        self._failure: WriteError | None = None  # the first append that failed (the writer thread sets it)

    @classmethod
    def create(cls, root: str, name: str) -> "RunWriter":
        """runs/<name>-<UTC timestamp>, with a counter if two runs start in the same second. An output dir that
        cannot hold it (a file, a dangling link, a name too long, no permission) is one ScenarioError line."""
        root = Path(root)
        try:
            root.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise ScenarioError(f"output.dir: {root} exists and is not a directory") from None
        except OSError as e:
            raise ScenarioError(f"output.dir: cannot create {root} ({e.strerror})") from None
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
        base = root / f"{name}-{stamp}"
        path, n = base, 1
        while True:
            try:
                path.mkdir()
                break
            except FileExistsError:  # another run started in the same second
                n += 1
                path = base.with_name(f"{base.name}-{n}")
            except OSError as e:
                raise ScenarioError(f"output.dir: cannot create {path.name} in {root} ({e.strerror})") from None
        return cls(path)

    @_written
    def _replace(self, name: str, write) -> None:
        partial = self.path / f".{name}.partial"
        write(partial)
        os.replace(partial, self.path / name)

    def write_resolved(self, resolved: dict) -> None:
        self._replace("scenario.resolved.yaml",
                      lambda p: p.write_text(yaml.safe_dump(resolved, sort_keys=False)))

    def write_table(self, name: str, rows, columns=None, csv: bool = False) -> None:
        frame = pd.DataFrame(rows, columns=columns)
        self._replace(f"{name}.parquet", lambda p: frame.to_parquet(p, index=False))
        if csv:
            self._replace(f"{name}.csv", lambda p: frame.to_csv(p, index=False))

    def write_rounds(self, rows: list[dict]) -> None:
        self.write_table("rounds", rows, csv=True)

    def append_events(self, rows: list[tuple], shapes: list[IterationShape]) -> None:
        """One more part of the events table (a round's rows and compact records, Simulation.take_events);
        nothing is rewritten."""
        if rows:
            self._append_part("events", events_table(rows, shapes))

    def append_rows(self, name: str, rows: list[dict]) -> None:
        """One more part of a table that grows every round (clients, participation, energy). Built column by
        column: for a thousand rows that is several times faster than Arrow's from_pylist."""
        if rows:
            self._append_part(name, pa.table({column: [row[column] for row in rows] for column in rows[0]}))

    def _in_background(self, name: str, write) -> None:
        """`write()` on the writer thread after everything queued before it; an OSError there becomes this
        writer's failure (a WriteError naming `name`), raised by the next call that queues or waits, and what
        was queued after it is not written."""
        self._raise_failure()

        def guarded():
            if self._failure is not None:
                return
            try:
                write()
            except OSError as e:
                self._failure = WriteError(f"cannot write {name} in {self.path}: {e.strerror or e}")

        if self._thread is None:
            self._thread = ThreadPoolExecutor(1, thread_name_prefix="run-writer")
        while self._queued and (self._queued[0].done() or len(self._queued) >= self.QUEUED):
            self._queued.popleft().result()
        self._queued.append(self._thread.submit(guarded))

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise self._failure

    def wait(self) -> None:
        """Until every background append is done; raises the first that failed."""
        while self._queued:
            self._queued.popleft().result()
        self._raise_failure()

    def close(self) -> None:
        """Waits for the background appends (a failure stays for `wait` to raise) and ends the writer thread."""
        if self._thread is not None:
            self._thread.shutdown(wait=True)
            self._thread = None
        self._queued.clear()

    @_written
    def _append_part(self, name: str, table: pa.Table) -> None:
        parts = self.path / f".{name}.parts"
        parts.mkdir(exist_ok=True)
        number = self.parts.get(name, 0)
        self.parts[name] = number + 1
        pq.write_table(table, parts / f".{number:06d}.partial")
        os.replace(parts / f".{number:06d}.partial", parts / f"{number:06d}.parquet")
        self._in_background(name, lambda: self._combine(name, number, table))

    def _combine(self, name: str, number: int, table: pa.Table) -> None:
        """On the writer thread: part `number`'s rows appended to the table's combined file (opened at the first
        part this process writes, with the parts a resumed run kept before it)."""
        combined = self._combined.get(name)
        if combined is None:
            schema = table.schema.remove_metadata()
            combined = self._combined[name] = pq.ParquetWriter(self.path / f".{name}.parquet.partial", schema)
            for file in sorted((self.path / f".{name}.parts").glob("[0-9]*.parquet"))[:number]:
                combined.write_table(pq.read_table(file).replace_schema_metadata().cast(schema))
        combined.write_table(table.replace_schema_metadata().cast(combined.schema))

    @_written
    def finish_parts(self, name: str, schema: pa.Schema | None = None) -> None:
        """<name>.parquet from a table's parts, in order (a row group each), and the parts removed: the combined
        file this process appended to, else (a run resumed that wrote none) the parts read again."""
        self.wait()
        parts = self.path / f".{name}.parts"
        partial = self.path / f".{name}.parquet.partial"
        combined = self._combined.pop(name, None)
        if combined is not None:
            combined.close()
        else:
            files = sorted(parts.glob("[0-9]*.parquet")) if parts.is_dir() else []
            if schema is None and not files:
                return
            schema = schema or pq.read_schema(files[0]).remove_metadata()
            with pq.ParquetWriter(partial, schema) as out:
                for file in files:
                    out.write_table(pq.read_table(file).replace_schema_metadata().cast(schema))
        os.replace(partial, self.path / f"{name}.parquet")
        if parts.is_dir():
            for file in parts.iterdir():
                file.unlink()
            parts.rmdir()

    @_written
    def rewind(self, name: str, parts: int, last_round: int) -> None:
        """A growing table back to where it stood at the end of round `last_round`, when its first `parts` parts
        were written: later parts go. A table already combined (a run that ended failed or interrupted) is
        authoritative, since its parts go only once it is whole: it becomes one part again, less its later rounds."""
        folder, combined = self.path / f".{name}.parts", self.path / f"{name}.parquet"
        if combined.is_file():
            table = pq.read_table(combined)
            table = table.filter(pc.field("round") <= last_round)
            if folder.is_dir():
                for file in folder.iterdir():
                    file.unlink()
            self.parts[name] = 0
            if table.num_rows:
                self._append_part(name, table)
            combined.unlink()
            return
        self.parts[name] = parts
        if folder.is_dir():
            for file in folder.iterdir():
                if not file.name[:6].isdigit() or int(file.name[:6]) >= parts:
                    file.unlink()

    @_written
    def write_durably(self, name: str, write) -> None:
        """A file that must survive a crash whole or not at all: `write(path)` writes it beside, it is flushed to
        the disk, renamed over the old one, and the rename itself flushed (a kill at any point leaves the old file
        or the new)."""
        partial = self.path / f".{name}.partial"
        write(partial)
        with open(partial, "rb+") as written:
            os.fsync(written.fileno())
        os.replace(partial, self.path / name)
        folder = os.open(self.path, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)

    def finish_events(self) -> None:
        self.finish_parts("events", EVENT_SCHEMA)

    def write_summary(self, summary: dict) -> None:
        self._replace("summary.json", lambda p: p.write_text(json.dumps(summary, indent=2, default=float) + "\n"))
