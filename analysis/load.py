"""Read a run directory back into memory, without the code that produced it."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from hsplit_sim.results import RESOURCE_COLUMNS

TABLES = ("rounds", "events", "clients")  # the tables a Run holds in memory, unless loaded lazily
CSV_CHUNK_ROWS = 1 << 17  # rows per chunk of a streamed CSV read: memory stays flat however long the run
# Parquet is decoded on one thread: a row group or two decode as fast that way, and each decoding thread would keep
# memory of its own (tens of MB, as much as the figures need).
READ_THREADS = False


@dataclass
class Run:
    """One run directory: its summary, its three tables (empty when absent) and its resources (what each
    resource events name is and who owns it; results.RESOURCE_COLUMNS).

    events and clients are None when loaded lazily: `read` and `batches` then take only the rows and columns
    asked for from disk, so figures of a run with millions of events need not hold them all.
    """

    path: Path
    summary: dict
    rounds: pd.DataFrame = field(default_factory=pd.DataFrame)
    events: pd.DataFrame | None = field(default_factory=pd.DataFrame)
    clients: pd.DataFrame | None = field(default_factory=pd.DataFrame)
    resources: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=list(RESOURCE_COLUMNS)))

    @property
    def name(self) -> str:
        """The run's own name, else its directory name."""
        return str(self.summary.get("name") or self.path.name)

    @property
    def algorithm(self) -> str:
        """Algorithm from the summary, else from the rounds table, else unknown."""
        if self.summary.get("algorithm"):
            return str(self.summary["algorithm"])
        if "algorithm" in self.rounds and not self.rounds.empty:
            return str(self.rounds["algorithm"].iloc[0])
        return "unknown"

    def read(self, name: str, columns: list[str] | None = None, rounds: list[int] | None = None) -> pd.DataFrame:
        """Rows of `rounds` (all when None) and those of `columns` the table has, from memory when loaded (read
        from disk, strings come as categoricals)."""
        table = getattr(self, name)
        if table is None:
            return read_table(self.path, name, columns, rounds)
        if rounds is not None and "round" in table:
            table = table[table["round"].isin(rounds)]
        return table if columns is None else table[[c for c in columns if c in table]]

    def batches(self, name: str, columns: list[str]) -> Iterator[pa.Table]:
        """The table's `columns` a batch of rows at a time, so aggregates over millions of events stay small."""
        table = getattr(self, name)
        if table is None:
            yield from table_batches(self.path, name, columns)
        elif not table.empty:
            yield pa.Table.from_pandas(table[columns], preserve_index=False)

    def round_numbers(self, name: str) -> list[int]:
        """The rounds a table has rows for, in order."""
        table = getattr(self, name)
        if table is None:
            return table_rounds(self.path, name)
        return sorted(int(r) for r in table["round"].unique()) if "round" in table else []


def _parquet_files(run_dir: Path, name: str) -> list[Path]:
    """The combined table, else the per-round parts of a run killed outright (they were never combined)."""
    parquet = run_dir / f"{name}.parquet"
    if parquet.is_file():
        return [parquet]
    if (run_dir / f"{name}.csv").is_file():
        return []
    return sorted((run_dir / f".{name}.parts").glob("[0-9]*.parquet"))


def read_table(run_dir: Path, name: str, columns: list[str] | None = None,
               rounds: list[int] | None = None) -> pd.DataFrame:
    """Rows of `rounds` (all when None) and those of `columns` the table has (all when None); empty when the
    table is absent. Parquet keeps dtypes, so it is preferred; CSV is the fallback for hand-copied runs."""
    files = _parquet_files(run_dir, name)
    if files:
        frames = [_read_parquet(file, columns, rounds) for file in files]
        return frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True)
    csv = run_dir / f"{name}.csv"
    if not csv.is_file():
        return pd.DataFrame()
    table = pd.read_csv(csv, usecols=None if columns is None else lambda c: c in columns)
    if rounds is not None and "round" in table:
        table = table[table["round"].isin(rounds)].reset_index(drop=True)
    return table


def _read_parquet(file: Path, columns: list[str] | None, rounds: list[int] | None) -> pd.DataFrame:
    """A part of a table is read the cheap way: strings as categoricals (a million events name a few thousand
    resources), and only the row groups that may hold `rounds` (a run writes each round as a row group of its
    own, so drawing two rounds of a hundred reads two; pyarrow's own filters scan slower and hold more)."""
    if columns is None and rounds is None:
        return pd.read_parquet(file)
    schema = pq.read_schema(file)
    wanted = schema.names if columns is None else [c for c in columns if c in schema.names]
    reader = pq.ParquetFile(file, read_dictionary=[c for c in wanted if pa.types.is_string(schema.field(c).type)])
    if rounds is None or "round" not in schema.names:
        return _to_pandas(reader.read(columns=wanted, use_threads=READ_THREADS))
    ranges = [(i, low, high) for i, (low, high) in enumerate(_round_ranges(reader))
              if any(low <= r <= high for r in rounds)]
    table = reader.read_row_groups([i for i, _, _ in ranges], columns=list(dict.fromkeys([*wanted, "round"])),
                                   use_threads=READ_THREADS)
    if any(low != high for _, low, high in ranges):  # a row group of several rounds holds some not asked for
        table = table.filter(pc.is_in(table["round"], pa.array(rounds, table.schema.field("round").type)))
    return _to_pandas(table.select(wanted))


def _to_pandas(table: pa.Table) -> pd.DataFrame:
    """Column by column, freeing each Arrow column once converted: faster, and the table is never held twice."""
    return table.to_pandas(split_blocks=True, self_destruct=True)


def _round_ranges(reader: pq.ParquetFile) -> list[tuple[float, float]]:
    """Each row group's lowest and highest round from its statistics; unbounded where it has none."""
    column = reader.schema_arrow.get_field_index("round")
    ranges = []
    for i in range(reader.num_row_groups):
        stats = reader.metadata.row_group(i).column(column).statistics
        ranges.append((stats.min, stats.max) if stats is not None and stats.has_min_max else (-math.inf, math.inf))
    return ranges


def table_batches(run_dir: Path, name: str, columns: list[str]) -> Iterator[pa.Table]:
    """A table's columns a row group (parquet, strings dictionary-encoded) or a chunk of rows (CSV) at a time;
    nothing when absent. Row groups read leaner and faster than pyarrow's batch iterator, which reads ahead."""
    files = _parquet_files(run_dir, name)
    for file in files:
        schema = pq.read_schema(file)
        strings = [c for c in columns if pa.types.is_string(schema.field(c).type)]
        reader = pq.ParquetFile(file, read_dictionary=strings)
        for i in range(reader.num_row_groups):  # a round each, as the run writes them
            yield reader.read_row_group(i, columns=columns, use_threads=READ_THREADS)
    csv = run_dir / f"{name}.csv"
    if not files and csv.is_file():
        for chunk in pd.read_csv(csv, usecols=columns, chunksize=CSV_CHUNK_ROWS):
            yield pa.Table.from_pandas(chunk, preserve_index=False)


def table_rounds(run_dir: Path, name: str) -> list[int]:
    """The rounds a table has rows for, in order; from the row groups' statistics where each holds one round
    (as the run writes them), so no data is read."""
    rounds = set()
    for file in _parquet_files(run_dir, name):
        reader = pq.ParquetFile(file)
        if "round" not in reader.schema_arrow.names:
            return []
        for i, (low, high) in enumerate(_round_ranges(reader)):
            if low == high:
                rounds.add(low)
            else:
                rounds.update(reader.read_row_group(i, columns=["round"]).column(0).unique().to_pylist())
    csv = run_dir / f"{name}.csv"
    if not rounds and csv.is_file():
        rounds.update(pd.read_csv(csv, usecols=lambda c: c == "round").get("round", []))
    return sorted(int(r) for r in rounds)


def _has_table(run_dir: Path, name: str) -> bool:
    return (run_dir / f"{name}.parquet").is_file() or (run_dir / f"{name}.csv").is_file()


def load_run(path: str | Path, lazy: bool = False) -> Run:
    """Load a run directory; a failed or partial run loads whatever it wrote. `lazy` leaves events and
    clients (the tables that grow with clients x rounds) on disk for `Run.read` and `Run.batches`."""
    run_dir = Path(path)
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file() and not _has_table(run_dir, "rounds"):
        raise FileNotFoundError(
            f"{run_dir} is not a run directory: it has neither summary.json "
            "nor rounds.parquet / rounds.csv"
        )
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    loaded = {name: None if lazy and name != "rounds" else read_table(run_dir, name) for name in TABLES}
    resources = read_table(run_dir, "resources") if _has_table(run_dir, "resources") else legacy_resources(run_dir)
    return Run(path=run_dir, summary=summary, resources=resources, **loaded)


_LEGACY_CLIENT = re.compile(r"client(\d+)(?:\.(up|down))?")
_LEGACY_KINDS = {None: "device", "up": "uplink", "down": "downlink"}


def legacy_resources(run_dir: Path) -> pd.DataFrame:
    """The legacy path, the one place a resource's name says what it is: runs written before results version 2
    have no resources table, so it is derived from the names those versions gave resources (`server`,
    `client<k>`, `client<k>.up`, `client<k>.down`), as the events use them. Names of another form are left out;
    catalog names and groups are unknown (None)."""
    names = set()
    for batch in table_batches(run_dir, "events", ["resource"]):
        names.update(str(name) for name in pc.unique(batch["resource"]).to_pylist())
    rows = []
    for name in sorted(names):
        match = _LEGACY_CLIENT.fullmatch(name)
        if name.startswith("server"):
            rows.append((name, "server", -1))
        elif match:
            rows.append((name, _LEGACY_KINDS[match.group(2)], int(match.group(1))))
    table = pd.DataFrame(rows, columns=["resource", "kind", "client"])
    return table.assign(name=None, group=None)[list(RESOURCE_COLUMNS)]
