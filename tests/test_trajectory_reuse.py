"""Trajectory reuse: the training key, replaying a trained run under another system, and reuse in sweeps."""

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml

from hsplit_sim.errors import ScenarioError
from hsplit_sim.experiment.run import run_scenario
from hsplit_sim.experiment.sweep import load_sweep_file, run_sweep
from hsplit_sim.backends.replay import ReplayMismatch
from hsplit_sim.experiment.trajectory import training_key
from hsplit_sim.scenario import load_scenario

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "scenarios" / "tiny.yaml"
LINK = "clients.0.link={name: swept, up_mbps: %s, down_mbps: 200, latency_ms: 5}"


def scenario(tmp_path: Path, *overrides: str):
    return load_scenario(TINY, [f"output.dir={tmp_path}", *overrides])


def run(tmp_path: Path, *overrides: str) -> Path:
    return run_scenario(scenario(tmp_path, *overrides), progress=False)


def test_training_key_ignores_the_system_and_sees_training():
    base = training_key(load_scenario(TINY))
    for system in (  # the Pi 5 and the Orin Nano both have 8 GB: the same memory budget
"clients.0.link=lte", "clients.1.device=jetson-orin-nano", "server.device=a100",
                   "server.accelerators=3", "runtime.client_workers=2", "runtime.timing_only=true", "name=other",
                   "clients.1.device={name: pi, tflops: 9, efficiency: 0.5, memory_gb: 8}"):
        assert training_key(load_scenario(TINY, [system])) == base, system
    for training in ("seed=1", "algorithm.rank=4", "training.lr=0.01", "data.train_examples=32",
                     "clients.1.memory_budget_gb=4", "clients.0.count=3", "algorithm.name=hsplitlora",
                     "model.name=tiny-llama", "clients.1.device=laptop-rtx-3050",  # 4 GB, not 8: another budget
                     "clients.0.precision=fp16"):  # half the bytes: another fit
        assert training_key(load_scenario(TINY, [training])) != base, training
    budget = ["algorithm.name=hsplitlora", "algorithm.time_budget_s=0.01"]
    timed = training_key(load_scenario(TINY, budget))
    assert training_key(load_scenario(TINY, [*budget, "server.device=a100"])) == timed
    pi = "clients.1.device={name: pi, tflops: 0.154, efficiency: 0.3, memory_gb: 8, memory_bandwidth_gbps: %s}"
    assert training_key(load_scenario(TINY, [*budget, pi % 17.1])) != training_key(
        load_scenario(TINY, [*budget, pi % 34.2]))


def test_hsplitlora_retimed_equals_a_full_rerun(tmp_path):
    """Train at one uplink, re-time at another: rounds (accuracy included), plans and events equal a real run
    at the other uplink, because HSplitLoRA's training with one server-side adapter per client cannot depend
    on timing."""
    common = ["algorithm.name=hsplitlora", "algorithm.server_adapters=per_client", "training.rounds=2",
              "training.local_steps=2"]
    trained = run(tmp_path / "trained", *common, LINK % 1)
    rerun = run(tmp_path / "rerun", *common, LINK % 64)
    retimed = run(tmp_path / "retimed", *common, LINK % 64, f"runtime.replay_from={trained}")

    summary = json.loads((retimed / "summary.json").read_text())
    assert summary["trajectory"] == "retimed" and summary["replayed_from"] == str(trained)
    assert json.loads((trained / "summary.json").read_text())["trajectory"] == "trained"
    a, b = pd.read_parquet(rerun / "rounds.parquet"), pd.read_parquet(retimed / "rounds.parquet")
    pd.testing.assert_frame_equal(a.drop(columns="wall_time_s"), b.drop(columns="wall_time_s"))
    assert a["eval_ppl"].notna().all()
    for table in ("events", "plans", "clients", "importance"):
        pd.testing.assert_frame_equal(pd.read_parquet(rerun / f"{table}.parquet"),
                                      pd.read_parquet(retimed / f"{table}.parquet"))
    assert pd.read_parquet(trained / "rounds.parquet")["sim_time_s"].iloc[-1] > a["sim_time_s"].iloc[-1]


def test_replay_refuses_another_training_key(tmp_path):
    trained = run(tmp_path / "a", "runtime.timing_only=true")
    summary = json.loads((trained / "summary.json").read_text())
    (trained / "summary.json").write_text(json.dumps(dict(summary, trajectory="trained")))
    with pytest.raises(ScenarioError, match="training key"):
        run(tmp_path / "b", "algorithm.rank=4", f"runtime.replay_from={trained}")


def fake_trained(tmp_path: Path, *overrides: str) -> Path:
    """A timing-only run dressed as a trained one: enough for the server-order check, without training."""
    run_dir = run(tmp_path, *overrides, "runtime.timing_only=true")
    summary = json.loads((run_dir / "summary.json").read_text())
    (run_dir / "summary.json").write_text(json.dumps(dict(summary, trajectory="trained")))
    return run_dir


def test_splitlora_replay_checks_the_server_order(tmp_path):
    """SplitLoRA's clients share one server adapter: a bandwidth that reorders server steps cannot reuse."""
    common = ["algorithm.name=splitlora", "training.rounds=2", "training.local_steps=4"]
    source = fake_trained(tmp_path / "source", *common, LINK % 64)
    same_order = run(tmp_path / "ok", *common, LINK % 128, f"runtime.replay_from={source}")
    assert json.loads((same_order / "summary.json").read_text())["trajectory"] == "retimed"
    with pytest.raises(ReplayMismatch, match="order"):
        run(tmp_path / "bad", *common, LINK % 1, f"runtime.replay_from={source}")


def test_hsplitlora_replay_checks_the_server_order_of_training_rounds_only(tmp_path):
    """With one shared server adapter HSplitLoRA trains in server-step order, but its probes before round 1
    (round 0) share no server state: another order there does not stop a replay; in a training round it does."""
    common = ["algorithm.name=hsplitlora", "training.rounds=1", "training.local_steps=2"]
    source = fake_trained(tmp_path / "source", *common, LINK % 64)
    events = pd.read_parquet(source / "events.parquet")

    def reorder(round_index: int) -> None:
        rows = events.index[(events["round"] == round_index) & (events["kind"] == "server_queue")]
        assert events.loc[rows, "client"].nunique() > 1
        changed = events.copy()
        changed.loc[rows, "client"] = events.loc[rows, "client"].to_numpy()[::-1]
        changed.to_parquet(source / "events.parquet", index=False)

    reorder(0)
    replayed = run(tmp_path / "ok", *common, LINK % 64, f"runtime.replay_from={source}")
    assert json.loads((replayed / "summary.json").read_text())["trajectory"] == "retimed"
    reorder(1)
    with pytest.raises(ReplayMismatch, match="round 1: .*order"):
        run(tmp_path / "bad", *common, LINK % 64, f"runtime.replay_from={source}")


def test_sweep_trains_once_per_training_key(tmp_path):
    shutil.copy(TINY, tmp_path / "base.yaml")
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({
        # The Raspberry Pi on Ethernet: the Jetsons' uplink, swept, decides the round's time.
        "base": "base.yaml", "set": {"clients.0.link": {"up_mbps": 100, "down_mbps": 200, "latency_ms": 5},
                                     "clients.1.link": "ethernet"},
        "grid": {"algorithm.name": ["hsplitlora"], "clients.0.link.up_mbps": [1, 8, 64]}}))
    sweep = load_sweep_file(path, ["training.rounds=1", "training.local_steps=2", f"output.dir={tmp_path / 'runs'}"])
    sweep_dir = run_sweep(sweep, processes=1, progress=False)
    table = pd.read_parquet(sweep_dir / "sweep.parquet")
    assert table["status"].tolist() == ["completed"] * 3
    assert table["trajectory"].tolist() == ["trained", "retimed", "retimed"]
    assert table["final_eval_ppl"].nunique() == 1 and table["final_eval_ppl"].notna().all()
    assert table["sim_time_s"].is_monotonic_decreasing and table["sim_time_s"].nunique() == 3
