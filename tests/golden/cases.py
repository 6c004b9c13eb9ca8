"""Stored runs: scenarios whose tables were written by an earlier version of the code and must stay the same.

`python tests/golden/cases.py [CASE ...]` rewrites the stored tables; do that only for a change
that is meant to alter results, and say which and why in its commit. `tests/test_golden.py` reruns every case
and compares.
"""

import copy
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
TABLES = ("rounds", "events", "clients", "plans", "importance")

# A small heterogeneous fleet: clients with unequal budgets, devices and links, two of them identical (they
# reach the server together, so they queue).
BASE = {
    "name": "golden",
    "seed": 5,
    "model": {"name": "tiny-llama"},
    "data": {"name": "e2e-synthetic", "max_length": 32, "train_examples": 64, "eval_examples": 8},
    "algorithm": {"name": "splitlora", "rank": 4, "alpha": 8, "targets": ["q", "v"], "split_layer": 2,
                  "rank_set": [0, 2, 4, 8]},
    "training": {"rounds": 2, "local_steps": 2, "batch_size": 2, "lr": 1.0e-3},
    "server": {"device": "rtx-3090", "accelerators": 1},
    "clients": [
        {"count": 2, "device": "jetson-agx-xavier", "link": "wifi-5", "memory_budget_gb": 0.004},
        {"count": 1, "device": "jetson-agx-orin", "link": "wifi-6", "memory_budget_gb": 0.02},
        {"count": 1, "device": "raspberry-pi-5", "link": "lte", "memory_budget_gb": 0.003},
    ],
    "runtime": {"client_workers": 1, "torch_device": "cpu"},
}

CASES = {
    "splitlora": [],
    "splitlora-per-client": ["algorithm.server_adapters=per_client"],
    "splitlora-drop": ["algorithm.heterogeneity=drop"],
    "hsplitlora": ["algorithm.name=hsplitlora"],
    "hsplitlora-per-client": ["algorithm.name=hsplitlora", "algorithm.server_adapters=per_client"],
    "hsplitlora-budget": ["algorithm.name=hsplitlora", "algorithm.time_budget_s=0.005"],
    "hsplitlora-no-naa": ["algorithm.name=hsplitlora", "algorithm.naa=false"],
    "hsplitlora-no-armsc": ["algorithm.name=hsplitlora", "algorithm.armsc=false"],
    "fedlora": ["algorithm.name=fedlora"],
    "hetlora": ["algorithm.name=hetlora"],
    "flora": ["algorithm.name=flora"],
    "flexlora": ["algorithm.name=flexlora"],
    "cenlora": ["algorithm.name=cenlora"],
    "ft": ["algorithm.name=ft"],
}
# Timing-only at a larger scale: queueing at several accelerators and many clients.
FLEET = ["clients.0.count=20", "clients.1.count=10", "clients.2.count=10", "server.accelerators=2",
         "data.train_examples=400", "training.rounds=3", "runtime.timing_only=true"]
TIMING_CASES = {f"{name}-fleet": overrides + FLEET for name, overrides in CASES.items()}


def scenario(name: str, output: Path):
    from hsplit_sim.scenario import scenario_from_dict

    overrides = {**CASES, **TIMING_CASES}[name]
    return scenario_from_dict(copy.deepcopy(BASE), [*overrides, f"output.dir={output}"])


def run(name: str, output: Path) -> Path:
    from hsplit_sim.experiment.run import run_scenario

    return run_scenario(scenario(name, output), progress=False)


def stored(name: str) -> Path:
    return HERE / name


def regenerate(names: list[str]) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        for name in names:
            run_dir = run(name, Path(scratch) / name)
            target = stored(name)
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir()
            for table in TABLES:
                if (run_dir / f"{table}.parquet").is_file():
                    shutil.copyfile(run_dir / f"{table}.parquet", target / f"{table}.parquet")
            print(name, "written")


if __name__ == "__main__":
    regenerate(sys.argv[1:] or [*CASES, *TIMING_CASES])
