"""`hsplit-sim sweep`: a base scenario plus axes to vary; every point is one `hsplit-sim run` in its own process.

Each point runs as a separate `python -m hsplit_sim.cli run` process, so a point that crashes (even hard) is
recorded as failed and the others go on, and Ctrl-C reaches each run once, which then writes its summary as
interrupted. Points are validated together before any runs; a point whose devices cannot hold its configuration
(the memory check) fails alone, because in a what-if study "does not fit" is a result, not a typo.

Trajectory reuse (on unless `--no-reuse`): points that share a training key (experiment/trajectory.py: everything
that can change training) train once. The first point of each such group trains; the others run after it as
re-timed points (`runtime.replay_from` the trained run, timing-only, accuracy columns taken from it), and train
anew only if the replay finds a different server order (SplitLoRA). The table's `trajectory` column says which
points trained and which were re-timed.
"""

import copy
import hashlib
import itertools
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq
import yaml

from hsplit_sim.errors import ScenarioError
from hsplit_sim.experiment.progress import ProgressLine
from hsplit_sim.results import GENERATION_METRICS, UTILISATION_COLUMNS, time_to_target, utilisation
from hsplit_sim.scenario import apply_override, scenario_from_dict
from hsplit_sim.scenario.load import _yaml_problem

SWEEP_KEYS = ("name", "base", "set", "grid", "zip", "seeds", "target_ppl", "reference")
TABLE = "sweep"
INTERRUPT_GRACE_S = 30


@dataclass
class Point:
    """One scenario of the sweep: its axis values and the validated scenario data it runs."""

    id: str
    values: dict[str, Any]
    seed: int
    scenario: dict


@dataclass
class Sweep:
    name: str
    file: str
    axes: list[str]
    zip_axes: list[str]
    points: list[Point]
    target_ppl: float | None
    output_dir: str
    overrides: list[str] = field(default_factory=list)
    reference: dict | None = None


def load_sweep_file(path: str | Path, overrides: list[str] = ()) -> Sweep:
    """Read a sweep file, expand grid x zip x seeds and validate every point; errors name the point."""
    path = Path(path)
    spec = _read_mapping(path)
    unknown = sorted(set(spec) - set(SWEEP_KEYS))
    if unknown:
        raise ScenarioError(f"{path}: {unknown[0]}: unknown key (known: {', '.join(SWEEP_KEYS)})")
    base = _base(path, spec.get("base"))
    for key, value in _axes(path, spec, "set", lists=False).items():
        _set(base, key, value, f"{path}: set")
    for override in overrides:
        apply_override(base, override)

    grid, zipped = _axes(path, spec, "grid"), _axes(path, spec, "zip")
    both = sorted(set(grid) & set(zipped))
    if both:
        raise ScenarioError(f"{path}: {both[0]} is an axis of both grid and zip")
    lengths = {len(v) for v in zipped.values()}
    if len(lengths) > 1:
        raise ScenarioError(f"{path}: zip: axes must have equal lengths, got "
                            + ", ".join(f"{k} ({len(v)})" for k, v in zipped.items()))
    seeds = spec.get("seeds")
    if seeds is not None:
        if not (isinstance(seeds, list) and seeds and all(isinstance(s, int) and s >= 0 for s in seeds)):
            raise ScenarioError(f"{path}: seeds: expected a non-empty list of non-negative integers")
        if "seed" in grid or "seed" in zipped:
            raise ScenarioError(f"{path}: seeds: give seeds or a seed axis, not both")
    target = spec.get("target_ppl")
    if target is not None and not (isinstance(target, (int, float)) and target > 0):
        raise ScenarioError(f"{path}: target_ppl: expected a positive number")
    algorithms = grid.get("algorithm.name") or zipped.get("algorithm.name") or []
    reference = _reference(path, spec.get("reference"), algorithms)
    name = str(spec.get("name") or path.stem)
    if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise ScenarioError(f"{path}: name: {name!r} may hold only letters, digits and . _ -")

    grid_combos = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    zip_combos = [dict(zip(zipped, values)) for values in zip(*zipped.values())] or [{}]
    points, seen = [], {}
    for g, z, seed in itertools.product(grid_combos, zip_combos, seeds or [None]):
        values = {**g, **z}
        data = copy.deepcopy(base)
        described = ", ".join(f"{k}={_text(v)}" for k, v in values.items()) or "base"
        where = f"{path}: point {described}"
        for key, value in values.items():
            _set(data, key, value, where)
        if seed is not None:
            data["seed"] = seed
            values = {**values, "seed": seed}
        try:
            scenario = scenario_from_dict(data)
        except ScenarioError as e:
            raise ScenarioError(f"{where}: {e}") from None
        resolved = scenario.model_dump(mode="json")
        point = Point(_point_id(values, resolved), values, scenario.seed, resolved)
        if point.id in seen:
            raise ScenarioError(f"{where}: runs the same scenario as point {seen[point.id]}")
        seen[point.id] = described
        points.append(point)
    axes = list(grid) + list(zipped) + (["seed"] if seeds is not None else [])
    output_dir = points[0].scenario["output"]["dir"]  # the base's: axes that move output.dir are not honoured
    return Sweep(name, str(path), axes, list(zipped), points, float(target) if target else None, output_dir,
                 list(overrides), reference)


def run_sweep(sweep: Sweep, resume: str | Path | None = None, processes: int | None = None,
              progress: bool = True, reuse: bool = True, executor: str = "local") -> Path:
    """Run every point not yet completed and write sweep.parquet/.csv; returns the sweep directory.

    Sizing: a run's workers compute one at a time (the coordinator waits on each request), so a point
    needs one worker's threads: processes = cores // 2 by default, threads = cores // processes, at least 1
    each, and processes x threads never above the cores. With the Ray executor the cores are the cluster's.
    """
    if executor == "ray":
        from hsplit_sim.experiment import ray_executor

        cores = ray_executor.start()
    else:
        cores = os.cpu_count() or 1
    processes = min(processes or max(1, cores // 2), cores)
    threads = max(1, cores // processes)
    sweep_dir = Path(resume) if resume else _new_dir(Path(sweep.output_dir), sweep.name)
    if resume and not sweep_dir.is_dir():
        raise ScenarioError(f"--resume {resume}: no such directory")
    sweep_dir = sweep_dir.resolve()
    runner = _Runner(sweep, sweep_dir, processes, threads, progress)
    runner.reuse = reuse
    runner.executor = executor
    runner.run()
    return sweep_dir


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
    runner = _Runner(sweep, sweep_dir, resolved.get("processes", 1), resolved.get("torch_threads", 1), False)
    for point in points:
        runner._record(point)
    runner._write_table()


class _Runner:
    """Schedules point processes on a thread pool (threads only wait), tracks progress and writes the table."""

    def __init__(self, sweep: Sweep, sweep_dir: Path, processes: int, threads: int, progress: bool):
        self.sweep, self.dir, self.processes, self.threads, self.progress = sweep, sweep_dir, processes, threads, progress
        self.line: ProgressLine | None = None
        self.lock = threading.Lock()
        self.running: dict[str, subprocess.Popen] = {}
        self.interrupted = False
        self.rows: dict[str, dict] = {}
        self.curves: dict[str, pd.DataFrame] = {}
        self.reuse = True
        self.executor = "local"

    def run(self) -> None:
        self._write_resolved()
        todo = []
        for point in self.sweep.points:
            self._record(point)
            if self.rows[point.id]["status"] != "completed":
                todo.append(point)
        self._write_table()
        self.done, self.failed = len(self.sweep.points) - len(todo), 0
        with ProgressLine(f"sweep {self.sweep.name}: point", len(self.sweep.points), self.done,
                          self.progress) as self.line:
            self._say(f"sweep {self.sweep.name}: {len(self.sweep.points)} points, {self.done} already completed, "
                      f"{len(todo)} to run; {self.processes} at a time x {self.threads} torch threads; {self.dir}")
            self._run_points(todo)
        self._say(f"sweep {self.sweep.name}: {self.done} completed, {self.failed} failed; "
                  f"table {self.dir / (TABLE + '.parquet')}")

    def _run_points(self, todo: list[Point]) -> None:
        groups = training_groups(self.sweep.points) if self.reuse else {}
        with ThreadPoolExecutor(self.processes) as pool:
            try:
                for batch in reuse_batches(todo, groups, self.rows):  # trainers first, then re-timed points
                    futures = {pool.submit(self._run_point, point, replay_source(point, groups, self.rows, self.dir)):
                               point for point in batch}
                    for future in as_completed(futures):
                        point, seconds = futures[future], future.result()
                        self._record(point)
                        self._write_table()
                        self._progress(point, seconds)
            except KeyboardInterrupt:
                self._interrupt(pool)
                raise
            finally:
                self._write_table()

    def _run_point(self, point: Point, replay: Path | None = None) -> float:
        """One `hsplit-sim run` in its own session, so the terminal's Ctrl-C reaches it only through us; with
        `replay`, a re-timing of that trained run (which trains anew if its server order differs)."""
        started = time.monotonic()
        point_dir = self.dir / "points" / point.id
        point_dir.mkdir(parents=True, exist_ok=True)
        scenario = dict(point.scenario, name=point.id, output={"dir": str(point_dir)})
        if replay is not None:
            scenario["runtime"] = dict(scenario["runtime"], replay_from=str(replay), replay_fallback="train")
        scenario_file = point_dir / "scenario.yaml"
        scenario_file.write_text(yaml.safe_dump(scenario, sort_keys=False))
        env = dict(os.environ, HSPLIT_SIM_TORCH_THREADS=str(self.threads),
                   HF_HUB_OFFLINE=os.environ.get("HF_HUB_OFFLINE", "1"))
        with open(point_dir / "point.log", "ab") as log:
            log.write(f"--- {datetime.now(timezone.utc).isoformat()} {scenario_file}\n".encode())
            log.flush()
            argv = [sys.executable, "-m", "hsplit_sim.cli", "run", str(scenario_file)]
            with self.lock:
                if self.interrupted:
                    return 0.0
                if self.executor == "ray":
                    from hsplit_sim.experiment import ray_executor

                    process = ray_executor.submit(argv, env, str(point_dir / "point.log"), self.threads)
                else:
                    process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                               env=env, start_new_session=True)
                self.running[point.id] = process
            self._progress_line(f"started {point.id}")
            status = ray_executor.wait(process) if self.executor == "ray" else process.wait()
            with self.lock:
                del self.running[point.id]
            log.write(f"--- exit status {status}\n".encode())
        return time.monotonic() - started

    def _interrupt(self, pool: ThreadPoolExecutor) -> None:
        """Stop scheduling, pass the interrupt on to each running point once, then wait (kill if it hangs)."""
        with self.lock:
            self.interrupted = True
            running = list(self.running.values())
        pool.shutdown(wait=False, cancel_futures=True)
        self._say(f"interrupted: stopping {len(running)} running points (resume with --resume {self.dir})")
        if self.executor == "ray":
            from hsplit_sim.experiment import ray_executor

            for ref in running:
                ray_executor.cancel(ref)
            running = []
        for process in running:
            process.send_signal(signal.SIGINT)
        for process in running:
            try:
                process.wait(INTERRUPT_GRACE_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for point in self.sweep.points:
            self._record(point)

    def _record(self, point: Point) -> None:
        """The point's row from its newest completed run directory (else its newest attempt)."""
        row, curve = point_result(self.dir, point)
        self.rows[point.id], self.curves[point.id] = row, curve

    def _write_table(self) -> None:
        rows = [self.rows[p.id] for p in self.sweep.points]
        completed = [self.rows[p.id] for p in self.sweep.points if self.rows[p.id]["status"] == "completed"]
        finals = [r["final_eval_ppl"] for r in completed if not math.isnan(r["final_eval_ppl"])]
        # Without a target in the sweep file: the worst final perplexity of the completed points, which every
        # finished point reaches, so time to target compares how fast each gets to a common quality.
        target = self.sweep.target_ppl or (max(finals) if finals else math.nan)
        for point, row in zip(self.sweep.points, rows):
            row["target_ppl"] = target
            row["time_to_target_s"] = time_to_target(self.curves[point.id], target)
        table = pd.DataFrame(rows, columns=_columns(self.sweep.axes))
        for axis in self.sweep.axes:
            table[axis] = _column(table[axis])
        for name, write in ((f"{TABLE}.parquet", lambda p: table.to_parquet(p, index=False)),
                            (f"{TABLE}.csv", lambda p: table.to_csv(p, index=False))):
            partial = self.dir / f".{name}.partial"
            write(partial)
            os.replace(partial, self.dir / name)

    def _write_resolved(self) -> None:
        resolved = {
            "name": self.sweep.name, "file": self.sweep.file, "overrides": self.sweep.overrides,
            "axes": self.sweep.axes, "zip_axes": self.sweep.zip_axes, "target_ppl": self.sweep.target_ppl,
            "reference": self.sweep.reference,
            "processes": self.processes, "torch_threads": self.threads,
            "points": [{"id": p.id, "values": p.values, "seed": p.seed, "scenario": p.scenario}
                       for p in self.sweep.points],
        }
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "sweep.resolved.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))

    def _progress(self, point: Point, seconds: float) -> None:
        row = self.rows[point.id]
        if row["status"] == "completed":
            self.done += 1
            outcome = f"completed in {seconds:.0f} s, final ppl {row['final_eval_ppl']:.2f}"
        else:
            self.failed += 1
            outcome = f"{row['status']}: {row['error']}"
        self._progress_line(f"{point.id} {outcome}", keep=True)

    def _progress_line(self, what: str, keep: bool = False) -> None:
        with self.lock:
            running = len(self.running)
        if self.line is not None:
            self.line.update(self.done + self.failed,
                             f"done {self.done}  running {running}  failed {self.failed}  | {what}", keep)

    def _say(self, line: str) -> None:
        if self.line is not None:
            self.line.say(line)


def point_result(sweep_dir: Path, point: Point) -> tuple[dict, pd.DataFrame]:
    """The table row of one point and its (sim_time_s, eval_ppl) curve, read from its run directories."""
    point_dir = sweep_dir / "points" / point.id
    row = {"point": point.id, "seed": point.seed, **point.values, "status": "pending", "trajectory": None,
           "error": None,
           "final_eval_ppl": math.nan, "best_eval_ppl": math.nan, "sim_time_s": math.nan, "wall_time_s": math.nan,
           "bytes_up": math.nan, "bytes_down": math.nan, "util_server": math.nan, "util_clients_mean": math.nan,
           **{m: math.nan for m in GENERATION_METRICS}, "run_dir": None}
    empty = pd.DataFrame({"sim_time_s": [], "eval_ppl": []})
    runs = []
    for summary_file in point_dir.glob("*/summary.json"):
        try:
            summary = json.loads(summary_file.read_text())
        except (OSError, json.JSONDecodeError):
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
                          summary["sim_time_s"], point.scenario["server"]["accelerators"], summary.get("n_clients", 0))
        row.update(util_server=use["server"], util_clients_mean=use["clients_mean"])
    return row, curve


def _event_batches(path: Path):
    """The columns utilisation needs, a row group (a round) at a time: a fleet's events are millions of rows."""
    reader = pq.ParquetFile(path, read_dictionary=["kind", "resource"])
    for i in range(reader.num_row_groups):
        yield reader.read_row_group(i, columns=list(UTILISATION_COLUMNS), use_threads=False)


def training_groups(points: list[Point]) -> dict[str, list[Point]]:
    """Points by training key, in sweep order; timing-only points train nothing and join no group."""
    from hsplit_sim.experiment.trajectory import training_key

    groups: dict[str, list[Point]] = {}
    for point in points:
        if point.scenario["runtime"].get("timing_only"):
            continue
        groups.setdefault(training_key(scenario_from_dict(point.scenario)), []).append(point)
    return groups


def _trained(rows: dict[str, dict], group: list[Point]) -> Point | None:
    return next((p for p in group if rows[p.id]["status"] == "completed" and rows[p.id]["trajectory"] == "trained"),
                None)


def reuse_batches(todo: list[Point], groups: dict[str, list[Point]], rows: dict[str, dict]) -> list[list[Point]]:
    """[points that train, points re-timed after them]: a group without a completed trained point trains its
    first point still to run; the group's other points wait for it (without reuse: one batch of everything)."""
    group_of = {p.id: key for key, group in groups.items() for p in group}
    first, later, trains = [], [], set()
    for point in todo:
        key = group_of.get(point.id)
        if key is None:
            first.append(point)
        elif _trained(rows, groups[key]) is None and key not in trains:
            trains.add(key)
            first.append(point)
        else:
            later.append(point)
    return [batch for batch in (first, later) if batch]


def replay_source(point: Point, groups: dict[str, list[Point]], rows: dict[str, dict], sweep_dir: Path) -> Path | None:
    """The run directory of the point's group's trained run, if there is one (else the point trains)."""
    for group in groups.values():
        if any(p.id == point.id for p in group):
            trained = _trained(rows, group)
            if trained is not None and trained.id != point.id and rows[trained.id]["run_dir"]:
                return sweep_dir / rows[trained.id]["run_dir"]
    return None


def _columns(axes: list[str]) -> list[str]:
    return (["point", "seed"] + [a for a in axes if a != "seed"]
            + ["status", "trajectory", "error", "target_ppl", "final_eval_ppl", "best_eval_ppl", "time_to_target_s",
               "sim_time_s", "wall_time_s", "bytes_up", "bytes_down", "util_server", "util_clients_mean",
               *GENERATION_METRICS, "run_dir"])


def _column(values: pd.Series) -> pd.Series:
    """Axis values as one type per column: numbers stay numbers; anything mixed or nested becomes its YAML text."""
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return values
    if all(isinstance(v, str) for v in values) or all(isinstance(v, bool) for v in values):
        return values
    return values.map(_text)


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).removesuffix("\n...\n").strip()


def _reference(path: Path, reference: Any, algorithms: list) -> dict | None:
    """Published figures to set beside the measured ones. `speedup` maps each baseline to how many times longer
    than `method` the source says it takes to converge (the report puts the measured ratio of times to target
    beside each); `claims` are statements the source makes that one sweep cannot check alone."""
    if reference is None:
        return None
    where = f"{path}: reference"
    keys = {"source", "method", "speedup", "claims"}
    if not isinstance(reference, dict) or not {"source", "method"} <= set(reference) <= keys \
            or not {"speedup", "claims"} & set(reference):
        raise ScenarioError(f"{where}: expected a mapping with source, method, and speedup or claims (or both)")
    if not isinstance(reference["source"], str) or not reference["source"].strip():
        raise ScenarioError(f"{where}.source: expected text saying where the figures come from")
    speedup = reference.get("speedup", {})
    if not isinstance(speedup, dict) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in speedup.values()):
        raise ScenarioError(f"{where}.speedup: expected a mapping of algorithm names to positive numbers")
    claims = reference.get("claims", [])
    if not isinstance(claims, list) or not all(isinstance(c, str) and c.strip() for c in claims):
        raise ScenarioError(f"{where}.claims: expected a list of statements")
    for name in (reference["method"], *speedup):
        if name not in algorithms:
            raise ScenarioError(f"{where}: {name!r} is not an algorithm.name of the grid "
                                f"({', '.join(map(str, algorithms)) or 'none'})")
    return {"source": reference["source"].strip(), "method": reference["method"],
            "speedup": {str(k): float(v) for k, v in speedup.items()}, "claims": [c.strip() for c in claims]}


def _point_id(values: dict, scenario: dict) -> str:
    """Readable slug of the axis values plus a hash of what the point runs, so a resumed sweep whose base
    changed never mistakes an old result for a new point."""
    what = {k: v for k, v in scenario.items() if k not in ("name", "output")}
    digest = hashlib.sha1(json.dumps(what, sort_keys=True).encode()).hexdigest()[:6]
    parts = [("s" if key == "seed" else "") + re.sub(r"[^A-Za-z0-9.]+", ".", _text(v)).strip(".")
             for key, v in values.items()]
    slug = "_".join(p for p in parts if p)[:48] or "base"
    return f"{slug}-{digest}"


def _set(data: dict, key: Any, value: Any, where: str) -> None:
    """Set one key path as `--set` does; the value goes through YAML so both read it the same way."""
    if not isinstance(key, str):
        raise ScenarioError(f"{where}: axis {key!r} must be a key path such as clients.0.count")
    try:
        apply_override(data, f"{key}={yaml.safe_dump(value, default_flow_style=True, width=10**6)}")
    except ScenarioError as e:
        raise ScenarioError(f"{where}: {str(e).removeprefix('--set ')}") from None


def _axes(path: Path, spec: dict, section: str, lists: bool = True) -> dict[str, Any]:
    axes = spec.get(section) or {}
    if not isinstance(axes, dict):
        raise ScenarioError(f"{path}: {section}: expected a mapping of key paths to "
                            + ("lists of values" if lists else "values"))
    if lists:
        for key, values in axes.items():
            if not (isinstance(values, list) and values):
                raise ScenarioError(f"{path}: {section}.{key}: expected a non-empty list of values")
    return axes


def _base(path: Path, base: Any) -> dict:
    if isinstance(base, dict):
        return copy.deepcopy(base)
    if isinstance(base, str):
        return _read_mapping(path.parent / base)
    raise ScenarioError(f"{path}: base: expected a scenario file path (relative to the sweep file) or a mapping")


def _read_mapping(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ScenarioError(f"{path}: no such file") from None
    except OSError as e:
        raise ScenarioError(f"{path}: cannot read ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise ScenarioError(f"{path}: {_yaml_problem(e)}") from None
    if not isinstance(data, dict):
        raise ScenarioError(f"{path}: the top level must be a mapping")
    return data


def _last_error(log: str) -> str:
    lines = [line for line in log.splitlines() if line.strip() and not line.startswith("--- ")]
    errors = [line for line in lines if line.startswith("error: ")]
    return (errors or lines or ["no output"])[-1].removeprefix("error: ")


def _new_dir(root: Path, name: str) -> Path:
    """<output.dir>/<sweep name>-<UTC timestamp>, with a counter if two sweeps start in the same second."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    path, n = root / f"{name}-{stamp}", 1
    while path.exists():
        n += 1
        path = root / f"{name}-{stamp}-{n}"
    path.mkdir(parents=True)
    return path
