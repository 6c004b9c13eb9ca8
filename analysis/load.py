"""Read a run directory back into memory, without the code that produced it."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

TABLES = ("rounds", "events", "clients")


@dataclass
class Run:
    """One run directory: its summary and its three tables (empty when absent)."""

    path: Path
    summary: dict
    rounds: pd.DataFrame = field(default_factory=pd.DataFrame)
    events: pd.DataFrame = field(default_factory=pd.DataFrame)
    clients: pd.DataFrame = field(default_factory=pd.DataFrame)

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


def _read_table(run_dir: Path, name: str) -> pd.DataFrame:
    """Parquet keeps dtypes, so prefer it; CSV is the fallback for hand-copied runs."""
    parquet = run_dir / f"{name}.parquet"
    if parquet.is_file():
        return pd.read_parquet(parquet)
    csv = run_dir / f"{name}.csv"
    if csv.is_file():
        return pd.read_csv(csv)
    parts = sorted((run_dir / f".{name}.parts").glob("[0-9]*.parquet"))
    if parts:  # a run killed outright: its per-round parts were never combined
        return pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True)
    return pd.DataFrame()


def _has_table(run_dir: Path, name: str) -> bool:
    return (run_dir / f"{name}.parquet").is_file() or (run_dir / f"{name}.csv").is_file()


def load_run(path: str | Path) -> Run:
    """Load a run directory; a failed or partial run loads whatever it wrote."""
    run_dir = Path(path)
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file() and not _has_table(run_dir, "rounds"):
        raise FileNotFoundError(
            f"{run_dir} is not a run directory: it has neither summary.json "
            "nor rounds.parquet / rounds.csv"
        )
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    tables = {name: _read_table(run_dir, name) for name in TABLES}
    return Run(path=run_dir, summary=summary, **tables)
