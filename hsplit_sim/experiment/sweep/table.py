"""The sweep table (sweep.parquet/.csv): one row per point, read from its run directories, and rebuilt from them
on demand (refresh_table)."""

import math
import os
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import yaml

from hsplit_sim.errors import ScenarioError
from hsplit_sim.experiment.coordinator import reconcile
from hsplit_sim.experiment.sweep.sweepfile import Point, Sweep, yaml_text
from hsplit_sim.results import GENERATION_METRICS, UTILISATION_COLUMNS, time_to_target, utilisation

TABLE = "sweep"


def refresh_table(sweep_dir: str | Path) -> None:
    """Rebuild DIR's sweep.parquet/.csv from its points' run directories, running nothing: after an upgrade
    adds columns (the point ids come from DIR's own sweep.resolved.yaml, so a changed schema cannot orphan
    them), or to take in a point rerun by hand."""
    sweep_dir = Path(sweep_dir).resolve()
    resolved_file = sweep_dir / "sweep.resolved.yaml"
    if not resolved_file.is_file():
        raise ScenarioError(f"{sweep_dir}: not a sweep directory (no sweep.resolved.yaml)")
    resolved = yaml.safe_load(resolved_file.read_text())
    points = [Point(p["id"], p["values"], p["seed"], p["scenario"]) for p in resolved["points"]]
    sweep = Sweep(resolved["name"], resolved["file"], resolved["axes"], resolved["zip_axes"], points,
                  resolved.get("target_ppl"), str(sweep_dir.parent), resolved.get("overrides", []),
                  resolved.get("reference"))
    results = {point.id: point_result(sweep_dir, point) for point in points}
    write_table(sweep_dir, sweep, {k: row for k, (row, _) in results.items()},
                {k: curve for k, (_, curve) in results.items()})


def write_table(sweep_dir: Path, sweep: Sweep, rows: dict[str, dict], curves: dict[str, pd.DataFrame]) -> None:
    """sweep.parquet/.csv from each point's row and (sim_time_s, eval_ppl) curve, by point id; fills in each
    row's target and time to it, and replaces the files atomically."""
    rows = [rows[p.id] for p in sweep.points]
    finals = [r["final_eval_ppl"] for r in rows if r["status"] == "completed" and not math.isnan(r["final_eval_ppl"])]
    # Without a target in the sweep file: the worst final perplexity of the completed points, which every
    # finished point reaches, so time to target compares how fast each gets to a common quality.
    target = sweep.target_ppl or (max(finals) if finals else math.nan)
    for point, row in zip(sweep.points, rows):
        row["target_ppl"] = target
        row["time_to_target_s"] = time_to_target(curves[point.id], target)
    table = pd.DataFrame(rows, columns=_columns(sweep.axes))
    for axis in sweep.axes:
        table[axis] = _column(table[axis])
    for name, write in ((f"{TABLE}.parquet", lambda p: table.to_parquet(p, index=False)),
                        (f"{TABLE}.csv", lambda p: table.to_csv(p, index=False))):
        partial = sweep_dir / f".{name}.partial"
        write(partial)
        os.replace(partial, sweep_dir / name)


def point_result(sweep_dir: Path, point: Point) -> tuple[dict, pd.DataFrame]:
    """The table row of one point and its (sim_time_s, eval_ppl) curve, read from its run directories."""
    point_dir = sweep_dir / "points" / point.id
    row = {"point": point.id, "seed": point.seed, **point.values, "status": "pending", "trajectory": None,
           "error": None,
           "final_eval_ppl": math.nan, "best_eval_ppl": math.nan, "sim_time_s": math.nan, "wall_time_s": math.nan,
           "bytes_up": math.nan, "bytes_down": math.nan, "util_server": math.nan, "util_clients_mean": math.nan,
           "energy_j": math.nan, "reported_share": math.nan,
           **{m: math.nan for m in GENERATION_METRICS}, "run_dir": None}
    empty = pd.DataFrame({"sim_time_s": [], "eval_ppl": []})
    runs = []
    for summary_file in point_dir.glob("*/summary.json"):
        summary = reconcile(summary_file.parent)  # a point whose run was killed outright reads as crashed
        if summary is None:
            continue
        runs.append((summary.get("status") == "completed", summary.get("started_at") or "", summary_file.parent,
                     summary))
    if not runs:
        log = point_dir / "point.log"
        if log.is_file():  # it ran but made no run directory: a failure before the run started (e.g. memory)
            row.update(status="failed", error=_last_error(log.read_text(errors="replace")))
        return row, empty
    _, _, run_dir, summary = max(runs, key=lambda r: (r[0], r[1]))
    row.update({k: summary.get(k) for k in ("status", "trajectory", "error", "sim_time_s", "wall_time_s",
                                            "bytes_up", "bytes_down")})
    row.update({k: math.nan if summary.get(k) is None else summary[k] for k in ("energy_j", "reported_share")})
    row.update(final_eval_ppl=summary.get("final_eval_ppl") or math.nan,
               best_eval_ppl=summary.get("best_eval_ppl") or math.nan,
               run_dir=str(run_dir.relative_to(sweep_dir)))
    generation = summary.get("generation") or {}
    row.update({m: generation.get(m, math.nan) for m in GENERATION_METRICS})
    curve = empty
    if (run_dir / "rounds.parquet").is_file():
        curve = pd.read_parquet(run_dir / "rounds.parquet", columns=["sim_time_s", "eval_ppl"])
    resources = run_dir / "resources.parquet"  # runs before results version 2 have none: no utilisation
    if (run_dir / "events.parquet").is_file() and resources.is_file() and summary.get("sim_time_s"):
        use = utilisation(_event_batches(run_dir / "events.parquet"), pd.read_parquet(resources),
                          summary["sim_time_s"], summary.get("server_placement", {}).get(
                              "accelerators", point.scenario["server"]["accelerators"]), summary.get("n_clients", 0))
        row.update(util_server=use["server"], util_clients_mean=use["clients_mean"])
    return row, curve


def _event_batches(path: Path):
    """The columns utilisation needs, a row group (a round) at a time: a fleet's events are millions of rows."""
    reader = pq.ParquetFile(path, read_dictionary=["kind", "resource"])
    for i in range(reader.num_row_groups):
        yield reader.read_row_group(i, columns=list(UTILISATION_COLUMNS), use_threads=False)


def _columns(axes: list[str]) -> list[str]:
    return (["point", "seed"] + [a for a in axes if a != "seed"]
            + ["status", "trajectory", "error", "target_ppl", "final_eval_ppl", "best_eval_ppl", "time_to_target_s",
               "sim_time_s", "wall_time_s", "bytes_up", "bytes_down", "util_server", "util_clients_mean",
               "energy_j", "reported_share", *GENERATION_METRICS, "run_dir"])


def _column(values: pd.Series) -> pd.Series:
    """Axis values as one type per column: numbers stay numbers; anything mixed or nested becomes its YAML text."""
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return values
    if all(isinstance(v, str) for v in values) or all(isinstance(v, bool) for v in values):
        return values
    return values.map(yaml_text)


def _last_error(log: str) -> str:
    lines = [line for line in log.splitlines() if line.strip() and not line.startswith("--- ")]
    errors = [line for line in lines if line.startswith("error: ")]
    return (errors or lines or ["no output"])[-1].removeprefix("error: ")
