"""Running a sweep's points: which run when (trajectory reuse: trainers first, re-timed points after them),
resuming, progress, and stopping every point on an interrupt. Where a point runs is the executor's."""

import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import yaml

from hsplit_sim.errors import ScenarioError
from hsplit_sim.experiment import checkpoint
from hsplit_sim.experiment.progress import ProgressLine
from hsplit_sim.experiment.sweep.executors import EXECUTORS, Executor
from hsplit_sim.experiment.sweep.sweepfile import Point, Sweep
from hsplit_sim.experiment.sweep.table import TABLE, point_result, write_table
from hsplit_sim.scenario import scenario_from_dict


def run_sweep(sweep: Sweep, resume: str | Path | None = None, processes: int | None = None,
              progress: bool = True, reuse: bool = True, executor: str = "local") -> Path:
    """Run every point not yet completed and write sweep.parquet/.csv; returns the sweep directory.

    Sizing: a run's workers compute one at a time (the coordinator waits on each request), so a point
    needs one worker's threads: processes = cores // 2 by default, threads = cores // processes, at least 1
    each, and processes x threads never above the cores. With the Ray executor the cores are the cluster's.
    """
    runs_on = EXECUTORS[executor]()
    cores = runs_on.cores
    processes = min(processes or max(1, cores // 2), cores)
    threads = max(1, cores // processes)
    remote = [p.id for p in sweep.points if (p.scenario.get("runtime") or {}).get("remote_workers")]
    if remote and processes > 1:
        raise ScenarioError(f"--processes: {processes} points at a time, but point {remote[0]} trains on "
                            "runtime.remote_workers, which serve one run at a time: use --processes 1")
    sweep_dir = Path(resume) if resume else _new_dir(Path(sweep.output_dir), sweep.name)
    if resume:
        _check_resumable(sweep_dir, sweep.name)
    sweep_dir = sweep_dir.resolve()
    _Runner(sweep, sweep_dir, runs_on, processes, threads, progress, reuse).run()
    return sweep_dir


def _check_resumable(sweep_dir: Path, name: str) -> None:
    """A --resume directory must be one this sweep wrote (its sweep.resolved.yaml names it): another folder
    would be filled with point runs and a table it never held."""
    if not sweep_dir.is_dir():
        raise ScenarioError(f"--resume {sweep_dir}: no such directory")
    try:
        written = yaml.safe_load((sweep_dir / "sweep.resolved.yaml").read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        raise ScenarioError(f"--resume {sweep_dir}: not a sweep directory (no readable sweep.resolved.yaml)") from None
    if not isinstance(written, dict) or written.get("name") != name:
        found = written.get("name") if isinstance(written, dict) else None
        raise ScenarioError(f"--resume {sweep_dir}: a directory of sweep {found!r}, not of {name!r}")


def resumable_attempt(point_dir: Path) -> Path | None:
    """The run directory of a point's attempt that stopped with a checkpoint (the newest such): a completed run
    removes its checkpoint, so one left behind is a run that can continue."""
    checkpoints = sorted(point_dir.glob(f"*/{checkpoint.FILE}"), key=lambda f: f.stat().st_mtime)
    return checkpoints[-1].parent if checkpoints else None


class _Runner:
    """Schedules points on a thread pool (threads only wait for the executor), tracks progress and writes the
    table."""

    def __init__(self, sweep: Sweep, sweep_dir: Path, executor: Executor, processes: int, threads: int,
                 progress: bool, reuse: bool):
        self.sweep, self.dir, self.executor = sweep, sweep_dir, executor
        self.processes, self.threads, self.progress, self.reuse = processes, threads, progress, reuse
        self.line: ProgressLine | None = None
        self.lock = threading.Lock()
        self.running: dict[str, object] = {}  # point id -> the executor's handle
        self.interrupted = False
        self.rows: dict[str, dict] = {}
        self.curves: dict[str, pd.DataFrame] = {}

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
        """One `hsplit-sim run` on the executor; with `replay`, a re-timing of that trained run (which trains
        anew if its server order differs). A point whose earlier attempt stopped with a checkpoint continues
        it (`run --resume`), and runs anew only where that is refused."""
        started = time.monotonic()
        point_dir = self.dir / "points" / point.id
        point_dir.mkdir(parents=True, exist_ok=True)
        scenario = dict(point.scenario, name=point.id, output={"dir": str(point_dir)})
        if replay is not None:
            scenario["runtime"] = dict(scenario["runtime"], replay_from=str(replay), replay_fallback="train")
        scenario_file = point_dir / "scenario.yaml"
        scenario_file.write_text(yaml.safe_dump(scenario, sort_keys=False))
        interrupted = resumable_attempt(point_dir) if replay is None else None
        if interrupted is not None and self._execute(point, point_dir, ["run", "--resume", str(interrupted)]) != 2:
            return time.monotonic() - started
        self._execute(point, point_dir, ["run", str(scenario_file)])
        return time.monotonic() - started

    def _execute(self, point: Point, point_dir: Path, command: list[str]) -> int | None:
        """`hsplit-sim COMMAND` for a point on the executor, logged to its point.log; its exit status (None:
        the sweep was interrupted before it started)."""
        env = dict(os.environ, HSPLIT_SIM_TORCH_THREADS=str(self.threads),
                   HF_HUB_OFFLINE=os.environ.get("HF_HUB_OFFLINE", "1"))
        log = point_dir / "point.log"
        with open(log, "ab") as out:
            out.write(f"--- {datetime.now(timezone.utc).isoformat()} {' '.join(command)}\n".encode())
        argv = [sys.executable, "-m", "hsplit_sim.cli", *command]
        with self.lock:
            if self.interrupted:
                return None
            handle = self.running[point.id] = self.executor.submit(argv, env, str(log), self.threads)
        self._progress_line(f"started {point.id}")
        status = self.executor.wait(handle)
        with self.lock:
            del self.running[point.id]
        with open(log, "ab") as out:
            out.write(f"--- exit status {status}\n".encode())
        return status

    def _interrupt(self, pool: ThreadPoolExecutor) -> None:
        """Stop scheduling, have the executor stop the running points, and record where each stands."""
        with self.lock:
            self.interrupted = True
            running = list(self.running.values())
        pool.shutdown(wait=False, cancel_futures=True)
        self._say(f"interrupted: stopping {len(running)} running points (resume with --resume {self.dir})")
        self.executor.cancel(running)
        for point in self.sweep.points:
            self._record(point)

    def _record(self, point: Point) -> None:
        """The point's row from its newest completed run directory (else its newest attempt)."""
        row, curve = point_result(self.dir, point)
        self.rows[point.id], self.curves[point.id] = row, curve

    def _write_table(self) -> None:
        write_table(self.dir, self.sweep, self.rows, self.curves)

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



def _new_dir(root: Path, name: str) -> Path:
    """<output.dir>/<sweep name>-<UTC timestamp>, with a counter if two sweeps start in the same second."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    path, n = root / f"{name}-{stamp}", 1
    while path.exists():
        n += 1
        path = root / f"{name}-{stamp}-{n}"
    path.mkdir(parents=True)
    return path
