"""The run directory: every table on disk after each round, so a crash loses nothing finished.

The tables that grow with the rounds (events, clients, plans...) go one part file per round under
`.<table>.parts/`, written once and never rewritten, and `finish_parts` streams the parts into
`<table>.parquet` at the end of the run, whether it completed or failed; the small ones (rounds, resources)
are rewritten whole and atomically. A run killed outright leaves its parts, which `analysis.load`
reads when the combined file is missing.
"""

import functools
import json
import os
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

from hsplit_sim.errors import RunError, ScenarioError
from hsplit_sim.results import EVENT_COLUMNS

# The contract names the columns; their types are the writer's: a column added there without a type here fails
# on import, not in a run.
EVENT_TYPES = {"round": pa.int64(), "client": pa.int64(), "kind": pa.string(), "resource": pa.string(),
               "start_s": pa.float64(), "end_s": pa.float64(), "bytes": pa.int64(), "flops": pa.float64()}
EVENT_SCHEMA = pa.schema([(column, EVENT_TYPES[column]) for column in EVENT_COLUMNS])


EVENT_ROW = pa.struct(list(EVENT_SCHEMA))


def events_table(rows: list[tuple]) -> pa.Table:
    """Event rows (tuples in EVENT_COLUMNS order) as an Arrow table of the fixed event schema. Arrow reads the
    tuples as structs and splits them into columns itself, about five times faster than transposing them in
    Python (a thousand clients make 60,000 events a round)."""
    return pa.Table.from_arrays(pa.array(rows, type=EVENT_ROW).flatten(), schema=EVENT_SCHEMA)


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
    def __init__(self, path: Path):
        self.path = path
        self.parts: dict[str, int] = {}

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

    def append_events(self, rows: list[tuple]) -> None:
        """One more part of the events table (a round's rows); nothing is rewritten."""
        if rows:
            self._append_part("events", events_table(rows))

    def append_rows(self, name: str, rows: list[dict]) -> None:
        """One more part of a table that grows every round (clients, participation, energy). Built column by
        column: for a thousand rows that is several times faster than Arrow's from_pylist."""
        if rows:
            self._append_part(name, pa.table({column: [row[column] for row in rows] for column in rows[0]}))

    @_written
    def _append_part(self, name: str, table: pa.Table) -> None:
        parts = self.path / f".{name}.parts"
        parts.mkdir(exist_ok=True)
        number = self.parts.get(name, 0)
        self.parts[name] = number + 1
        pq.write_table(table, parts / f".{number:06d}.partial")
        os.replace(parts / f".{number:06d}.partial", parts / f"{number:06d}.parquet")

    @_written
    def finish_parts(self, name: str, schema: pa.Schema | None = None) -> None:
        """Stream a table's parts, in order, into <name>.parquet (a row group each) and remove them."""
        parts = self.path / f".{name}.parts"
        files = sorted(parts.glob("[0-9]*.parquet")) if parts.is_dir() else []
        if schema is None and not files:
            return
        schema = schema or pq.read_schema(files[0]).remove_metadata()
        partial = self.path / f".{name}.parquet.partial"
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
    def write_durably(self, name: str, data: bytes) -> None:
        """A file that must survive a crash whole or not at all: written beside, flushed to the disk, renamed
        over the old one, and the rename itself flushed (a kill at any point leaves the old file or the new)."""
        partial = self.path / f".{name}.partial"
        with open(partial, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
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
