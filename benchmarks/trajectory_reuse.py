"""Trajectory reuse on a bandwidth-only sweep: same perplexity as full reruns, for a fraction of the wall time.

The sweep is scenarios/whatif/bandwidth.yaml's question on the tiny GPT-2 (scenarios/tiny.yaml): the two
Jetsons' uplink over several bandwidths, for each algorithm. It runs twice into a temporary directory: with
reuse (points sharing a training key train once, the others are re-timed) and with --no-reuse (every point
trains). Printed: each sweep's wall time and their ratio, which points trained and which were re-timed, and
whether every perplexity column (final and best in sweep.parquet, eval_ppl of every round of every point)
is identical between the two.

Default algorithms: HSplitLoRA and FedLoRA, whose training cannot depend on timing. SplitLoRA's clients
take turns on one server-side adapter in simulated-time order, so a bandwidth change that reorders their
server steps changes training: add it with --algorithms splitlora,hsplitlora to see such points train anew.

    python benchmarks/trajectory_reuse.py
    python benchmarks/trajectory_reuse.py --bandwidths 1,8,64 --rounds 2 --steps 2     # quicker
"""

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pandas as pd  # noqa: E402
import yaml  # noqa: E402

from hsplit_sim.experiment.sweep import load_sweep_file, run_sweep  # noqa: E402


def sweep_file(directory: Path, args) -> Path:
    shutil.copy(ROOT / "scenarios" / "tiny.yaml", directory / "tiny.yaml")
    path = directory / "bandwidth.yaml"
    path.write_text(yaml.safe_dump({
        "name": "bandwidth-reuse",
        "base": "tiny.yaml",
        "set": {"clients.0.link": {"name": "wifi-5-swept", "up_mbps": 100, "down_mbps": 200, "latency_ms": 5},
                "training.rounds": args.rounds, "training.local_steps": args.steps},
        "grid": {"algorithm.name": args.algorithms.split(","),
                 "clients.0.link.up_mbps": [float(b) for b in args.bandwidths.split(",")]},
    }, sort_keys=False))
    return path


def perplexities(sweep_dir: Path) -> tuple[pd.DataFrame, dict[str, list[float]]]:
    table = pd.read_parquet(sweep_dir / "sweep.parquet")
    curves = {row.point: pd.read_parquet(sweep_dir / row.run_dir / "rounds.parquet")["eval_ppl"].tolist()
              for row in table.itertuples() if row.run_dir}
    return table, curves


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--algorithms", default="hsplitlora,fedlora")
    parser.add_argument("--bandwidths", default="1,2,4,8,16,32,64,128,256,512", help="uplink Mbps, comma-separated")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--processes", type=int, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sweep = load_sweep_file(sweep_file(tmp, args), [f"output.dir={tmp / 'runs'}"])
        timings = {}
        dirs = {}
        for label, reuse in (("reuse", True), ("no-reuse", False)):
            started = time.monotonic()
            dirs[label] = run_sweep(sweep, processes=args.processes, progress=False, reuse=reuse)
            timings[label] = time.monotonic() - started
        (with_reuse, curves_reuse), (full, curves_full) = perplexities(dirs["reuse"]), perplexities(dirs["no-reuse"])

    print(f"sweep: {len(sweep.points)} points = algorithms {args.algorithms} x uplink Mbps {args.bandwidths}; "
          f"tiny-gpt2, {args.rounds} rounds x {args.steps} local steps")
    print(f"with reuse: {with_reuse['trajectory'].value_counts().to_dict()}; "
          f"status {with_reuse['status'].value_counts().to_dict()}")
    print(f"without:    {full['trajectory'].value_counts().to_dict()}; status {full['status'].value_counts().to_dict()}")
    identical = all(with_reuse[c].tolist() == full[c].tolist() for c in ("final_eval_ppl", "best_eval_ppl"))
    identical_curves = curves_reuse.keys() == curves_full.keys() and all(
        curves_reuse[p] == curves_full[p] for p in curves_reuse)
    same_time = with_reuse["sim_time_s"].tolist() == full["sim_time_s"].tolist()
    print(f"final_eval_ppl and best_eval_ppl identical: {identical}; every round's eval_ppl identical: "
          f"{identical_curves}; sim_time_s identical: {same_time}")
    print(with_reuse[["algorithm.name", "clients.0.link.up_mbps", "trajectory", "final_eval_ppl", "sim_time_s",
                      "wall_time_s"]].to_string(index=False))
    print(f"wall time with reuse {timings['reuse']:.1f} s, full reruns {timings['no-reuse']:.1f} s, "
          f"ratio {timings['reuse'] / timings['no-reuse']:.3f} (goal: at most 0.2)")


if __name__ == "__main__":
    main()
