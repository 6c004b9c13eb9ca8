"""The run directory: every table rewritten atomically after each round, so a crash loses nothing finished."""

import json
import os
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import yaml

from hsplit_sim.sim.engine import EVENT_COLUMNS


class RunWriter:
    def __init__(self, path: Path):
        self.path = path

    @classmethod
    def create(cls, root: str, name: str) -> "RunWriter":
        """runs/<name>-<UTC timestamp>, with a counter if two runs start in the same second."""
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
        base = Path(root) / f"{name}-{stamp}"
        path, n = base, 1
        while True:
            try:
                path.mkdir(parents=True)
                break
            except FileExistsError:
                n += 1
                path = base.with_name(f"{base.name}-{n}")
        (path / "plots").mkdir()
        return cls(path)

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

    def write_events(self, events: list[tuple]) -> None:
        self.write_table("events", events, columns=list(EVENT_COLUMNS))

    def write_clients(self, rows: list[dict]) -> None:
        self.write_table("clients", rows)

    def write_summary(self, summary: dict) -> None:
        self._replace("summary.json", lambda p: p.write_text(json.dumps(summary, indent=2, default=float) + "\n"))
