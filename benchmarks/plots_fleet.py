"""Cost of the figures of a large fleet: run-end plots (plot_run) and `hsplit-sim report` of timing-only runs.

Makes timing-only runs of the mixed fleet of benchmarks/timing_only.py: 1,000 clients x 100 rounds x 10 local
steps (about 6 million events) and 10,000 clients x 30 rounds (so making it takes a few minutes on two cores).
Then, each in a fresh Python process as at a run's end or in `hsplit-sim report`, it times (a)
analysis.figures.plot_run(RUN) and (b) analysis.report.report(RUN): wall seconds (interpreter start and imports
included: they are part of the cost) and peak memory (the process's peak RSS), for each and for both together
(wall: the sum; memory: the sum of the two peaks, and the larger one), and the sizes of the PNG and SVG files
written. Goals, for 1,000 clients: both together under 3 s and 500 MB, every SVG under 1 MiB. Wall-clock
figures are noisy on a shared machine: --repeat takes the median.

    python benchmarks/plots_fleet.py                                    # makes 1000x100 and 10000x30, then times
    python benchmarks/plots_fleet.py --fleet 1000x100 --keep runs/bench  # keep the run to time it again later
    python benchmarks/plots_fleet.py --run-dir runs/bench/timing-1000x100x10-*   # time existing runs
    python benchmarks/plots_fleet.py --fleet 10000x50 --steps 5 --repeat 5
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from argparse import Namespace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GOAL_S, GOAL_MB, GOAL_SVG_MIB = 3.0, 500, 1.0
CALLS = {"plot_run": "analysis.figures", "report": "analysis.report"}
# The child's own peak: VmHWM belongs to the process's memory since its exec. (Its ru_maxrss does not: Linux starts
# it at the peak of the process it was forked from, here this one, which made the runs.)
CHILD = """
import re, sys
from {module} import {call}
{call}(sys.argv[1])
print(int(re.search(r"VmHWM:\\s*(\\d+)", open("/proc/self/status").read()).group(1)) // 1024)
"""


def make_run(clients: int, rounds: int, steps: int, root: str) -> Path:
    """A timing-only run of the mixed fleet (splitlora, tiny-llama, 4 server accelerators); its directory."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from timing_only import run_scenario, scenario  # its mixed fleet; it puts the repository on the path too

    args = Namespace(clients=clients, rounds=rounds, steps=steps, accelerators=4, algorithm="splitlora",
                     model="tiny-llama")
    started = time.monotonic()
    run_dir = Path(run_scenario(scenario(args, root), progress=False))
    print(f"made {run_dir} in {time.monotonic() - started:.0f} s", flush=True)
    return run_dir


def measure(call: str, run_dir: Path) -> tuple[float, int]:
    """Wall seconds and peak RSS (MB) of a fresh process that does `call` on the run."""
    code = CHILD.format(module=CALLS[call], call=call)
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code, str(run_dir)], cwd=REPO, env=env, capture_output=True,
                         text=True, check=True)
    return time.monotonic() - started, int(out.stdout.split()[-1])


def imports_seconds() -> float:
    """Wall seconds of a fresh process that only imports what the report needs."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    started = time.monotonic()
    subprocess.run([sys.executable, "-c", "import analysis.report"], cwd=REPO, env=env, check=True)
    return time.monotonic() - started


def bench(run_dir: Path, repeat: int) -> None:
    summary = json.loads((run_dir / "summary.json").read_text())
    events_mib = (run_dir / "events.parquet").stat().st_size / 2**20
    print(f"\n{run_dir}\n  {summary['n_clients']:,} clients x {summary['rounds_completed']} rounds: "
          f"{summary['events']:,} events (events.parquet {events_mib:.0f} MiB)")
    walls, peaks = {}, {}
    for call in CALLS:
        runs = [measure(call, run_dir) for _ in range(repeat)]
        walls[call], peaks[call] = statistics.median(w for w, _ in runs), max(m for _, m in runs)
        print(f"  {call:9s} {walls[call]:5.2f} s {peaks[call]:5d} MB"
              + (f"   (wall of {repeat}: {', '.join(f'{w:.2f}' for w, _ in runs)})" if repeat > 1 else ""))
    wall, memory = sum(walls.values()), sum(peaks.values())
    print(f"  together  {wall:5.2f} s {memory:5d} MB   (sum of the two peaks; the larger {max(peaks.values())} MB)")
    starts = [imports_seconds() for _ in range(repeat)]
    print(f"  of which interpreter start and imports (pandas, pyarrow, matplotlib), per fresh process: "
          f"{statistics.median(starts):.2f} s; `hsplit-sim run` has paid most of it before its run-end plots")
    files = sorted(p for folder in ("plots", "report") for p in (run_dir / folder).glob("*.*"))
    print("  files: " + ", ".join(f"{p.relative_to(run_dir)} {p.stat().st_size / 2**10:.0f} KiB" for p in files))
    svg_mib = max((p.stat().st_size / 2**20 for p in files if p.suffix == ".svg"), default=0.0)
    verdict = {True: "met", False: "NOT met"}
    print(f"  goals (set for 1,000 clients): wall {wall:.2f} < {GOAL_S} s {verdict[wall < GOAL_S]}; "
          f"memory {memory} < {GOAL_MB} MB {verdict[memory < GOAL_MB]}; "
          f"largest SVG {svg_mib:.2f} < {GOAL_SVG_MIB} MiB {verdict[svg_mib < GOAL_SVG_MIB]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fleet", nargs="+", default=["1000x100", "10000x30"], metavar="CLIENTSxROUNDS",
                        help="runs to make and time (default: 1000x100 10000x30)")
    parser.add_argument("--steps", type=int, default=10, help="local steps per round (default 10)")
    parser.add_argument("--keep", metavar="DIR", help="make runs under DIR and keep them (default: a temporary one)")
    parser.add_argument("--run-dir", nargs="+", type=Path, metavar="DIR", help="time these runs; make none")
    parser.add_argument("--repeat", type=int, default=3, help="times each call is measured (median wall; default 3)")
    args = parser.parse_args()
    if args.run_dir:
        for run_dir in args.run_dir:
            bench(run_dir, args.repeat)
        return
    with tempfile.TemporaryDirectory() as scratch:
        for fleet in args.fleet:
            clients, rounds = (int(n) for n in fleet.lower().split("x"))
            bench(make_run(clients, rounds, args.steps, args.keep or scratch), args.repeat)


if __name__ == "__main__":
    main()
