"""Timing-only mode at scale: 1,000 clients x 100 rounds x 10 local steps, no training.

Builds a scenario of a mixed fleet from the device catalog (fast Jetson AGX Orins and laptops, slower
Jetson Orin Nanos and phones, slow Raspberry Pis, on ethernet, Wi-Fi, 5G and LTE) and runs it timing-only.
Prints the simulated events (rows of the events table), the SimPy events scheduled, the simulation's wall
seconds (setup and rounds, tables written every round, no plots) and events per second, the whole run's wall
seconds, and peak memory. Run it a few times on a busy machine: wall-clock figures are noisy.

    python benchmarks/timing_only.py                       # 1,000 x 100 x 10, splitlora, tiny-llama
    python benchmarks/timing_only.py --algorithm hsplitlora --model smollm2-135m
    python benchmarks/timing_only.py --clients 100 --rounds 10 --profile   # cProfile's top functions
"""

import argparse
import cProfile
import json
import os
import pstats
import resource
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hsplit_sim.experiment.run import run_scenario  # noqa: E402
from hsplit_sim.scenario import scenario_from_dict  # noqa: E402

FLEET = [  # (share of the fleet, device, link)
    (0.2, "jetson-agx-orin", "ethernet"),
    (0.2, "laptop-rtx-3050", "wifi-6"),
    (0.2, "jetson-orin-nano", "wifi-5"),
    (0.2, "flagship-phone", "5g"),
    (0.2, "raspberry-pi-5", "lte"),
]


def scenario(args, output: str):
    counts = [int(share * args.clients) for share, _, _ in FLEET]
    counts[0] += args.clients - sum(counts)
    return scenario_from_dict({
        "name": f"timing-{args.clients}x{args.rounds}x{args.steps}",
        "seed": 0,
        "model": {"name": args.model},
        "data": {"name": "e2e-synthetic", "max_length": 64, "train_examples": 20 * args.clients,
                 "eval_examples": 16},
        "algorithm": {"name": args.algorithm, "rank": 8, "split_layer": 1, "targets": ["q", "v"]},
        "training": {"rounds": args.rounds, "local_steps": args.steps, "batch_size": 4},
        "server": {"device": "a100", "accelerators": args.accelerators},
        "clients": [{"count": n, "device": device, "link": link} for n, (_, device, link) in zip(counts, FLEET) if n],
        "runtime": {"timing_only": True},
        "output": {"dir": output},
    })


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--accelerators", type=int, default=4)
    parser.add_argument("--algorithm", default="splitlora")
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--profile", action="store_true", help="print cProfile's 25 costliest functions")
    parser.add_argument("--plots", action="store_true", help="also draw the run's plots (not timed separately)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as output:
        spec = scenario(args, output)
        started = time.monotonic()
        profiler = cProfile.Profile() if args.profile else None
        if profiler:
            profiler.enable()
        run_dir = run_scenario(spec, progress=False)
        if args.plots:
            from analysis.figures import plot_run

            plot_run(run_dir)
        if profiler:
            profiler.disable()
        wall = time.monotonic() - started
        summary = json.loads((Path(run_dir) / "summary.json").read_text())
        events_mb = (Path(run_dir) / "events.parquet").stat().st_size / 2**20
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    simulated = summary["simulation_wall_s"]
    print(f"scenario: {args.clients} clients x {args.rounds} rounds x {args.steps} local steps, "
          f"{args.algorithm}, {args.model}, {args.accelerators} server accelerators, timing-only")
    print(f"status: {summary['status']}; simulated time {summary['sim_time_s']:.1f} s")
    print(f"simulated events (events table rows): {summary['events']:,}")
    print(f"SimPy events scheduled: {summary['simpy_events']:,}")
    print(f"simulation wall time: {simulated:.2f} s  ->  {summary['events'] / simulated:,.0f} events/s "
          f"({summary['simpy_events'] / simulated:,.0f} SimPy events/s)")
    print(f"whole run wall time (set-up, simulation, tables, combining events): {wall:.2f} s  ->  "
          f"{summary['events'] / wall:,.0f} events/s")
    print(f"events.parquet: {events_mb:.1f} MiB; peak memory (max RSS): {peak_mb:.0f} MiB")
    if profiler:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
