"""The benchmarks compare like with like: a drift in either side's training would make their ratios meaningless."""

import importlib.util
from pathlib import Path

import pytest

from hsplit_sim.scenario import load_scenario

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def benchmark(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_overhead_trains_the_plain_loop_as_the_simulator_trains(tmp_path):
    overhead = benchmark("overhead")
    scenario = load_scenario(overhead.SCENARIO, ["model.name=tiny-gpt2", f"output.dir={tmp_path}",
                                                 "training.rounds=2", "training.local_steps=2"])
    _, _, simulated_losses, turns = overhead.simulated(scenario)
    _, _, plain_losses = overhead.plain_loop(scenario, turns)
    assert sorted(turns[1]) == [0, 0, 1, 1, 2, 2]
    assert len(simulated_losses) == 3 and simulated_losses[2] < simulated_losses[0]
    assert plain_losses == pytest.approx(simulated_losses, abs=1e-5)
