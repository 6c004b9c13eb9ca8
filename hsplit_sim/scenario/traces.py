"""Trace files a scenario may name (system.availability.trace, system.bandwidth_trace): read and checked when
the scenario loads, so a bad file is one error line before anything runs."""

import csv
import math
from pathlib import Path

from hsplit_sim.errors import ScenarioError
from hsplit_sim.scenario.catalog import MIN_MBPS


def _rows(path: str, columns: tuple[str, ...], field: str) -> list[dict[str, float]]:
    file = Path(path)
    if not file.is_file():
        raise ScenarioError(f"{field}: {path} is not a file")
    try:
        with file.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = set(columns) - set(reader.fieldnames or [])
            if missing:
                raise ScenarioError(f"{field}: {path} lacks the columns {', '.join(sorted(missing))} "
                                    f"(needs {', '.join(columns)})")
            rows = []
            for line, row in enumerate(reader, start=2):
                try:
                    values = {c: float(row[c]) for c in columns}
                except (TypeError, ValueError):
                    raise ScenarioError(f"{field}: {path} line {line}: every column needs a number") from None
                if not all(math.isfinite(v) and v >= 0 for v in values.values()):
                    raise ScenarioError(f"{field}: {path} line {line}: values must be finite and not negative")
                if values["client"] != int(values["client"]):
                    raise ScenarioError(f"{field}: {path} line {line}: client must be a client index")
                rows.append(values)
    except UnicodeDecodeError:
        raise ScenarioError(f"{field}: {path} is not UTF-8 text") from None
    return rows


def online_windows(path: str, n_clients: int) -> dict[int, list[tuple[float, float]]]:
    """client -> sorted (start_s, end_s) windows in which it is online."""
    windows: dict[int, list[tuple[float, float]]] = {}
    for row in _rows(path, ("client", "start_s", "end_s"), "system.availability.trace"):
        client = int(row["client"])
        if client >= n_clients:
            raise ScenarioError(f"system.availability.trace: client {client} does not exist "
                                f"({n_clients} clients)")
        if row["end_s"] <= row["start_s"]:
            raise ScenarioError(f"system.availability.trace: client {client}: a window must end after it starts")
        windows.setdefault(client, []).append((row["start_s"], row["end_s"]))
    return {client: sorted(spans) for client, spans in windows.items()}


def bandwidth_steps(path: str, n_clients: int) -> dict[int, list[tuple[float, float, float]]]:
    """client -> (time_s, up_mbps, down_mbps) steps in time order: the rates hold from time_s to the next step
    (before the first step, the client's link as the scenario gives it)."""
    steps: dict[int, list[tuple[float, float, float]]] = {}
    for row in _rows(path, ("client", "time_s", "up_mbps", "down_mbps"), "system.bandwidth_trace"):
        client = int(row["client"])
        if client >= n_clients:
            raise ScenarioError(f"system.bandwidth_trace: client {client} does not exist ({n_clients} clients)")
        if not (row["up_mbps"] >= MIN_MBPS and row["down_mbps"] >= MIN_MBPS):
            raise ScenarioError(f"system.bandwidth_trace: client {client}: rates must be at least {MIN_MBPS:g} Mbit/s")
        steps.setdefault(client, []).append((row["time_s"], row["up_mbps"], row["down_mbps"]))
    return {client: sorted(rows) for client, rows in steps.items()}
