"""Timing-only mode: the same SimPy processes without workers give a real run's events exactly, and no torch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from hsplit_sim.experiment.run import run_scenario
from hsplit_sim.scenario import load_scenario

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "scenarios" / "tiny.yaml"


def run(tmp_path: Path, *overrides: str) -> Path:
    scenario = load_scenario(TINY, [f"output.dir={tmp_path}", *overrides])
    return run_scenario(scenario, progress=False)


@pytest.mark.parametrize("algorithm", ["splitlora", "fedlora"])
def test_timing_only_events_equal_a_real_runs(tmp_path, algorithm):
    """Real runs are deterministic and take durations from the cost model, so timing-only must match exactly:
    kinds, resources, start and end, bytes and FLOPs, and the clients table and byte columns too."""
    overrides = [f"algorithm.name={algorithm}", "clients.1.count=2", "training.rounds=2"]
    real = run(tmp_path / "real", *overrides)
    timing = run(tmp_path / "timing", *overrides, "runtime.timing_only=true")
    real_events, timing_events = pd.read_parquet(real / "events.parquet"), pd.read_parquet(timing / "events.parquet")
    assert len(real_events) > 20
    pd.testing.assert_frame_equal(real_events, timing_events)
    pd.testing.assert_frame_equal(pd.read_parquet(real / "clients.parquet"), pd.read_parquet(timing / "clients.parquet"))

    real_rounds, timing_rounds = pd.read_parquet(real / "rounds.parquet"), pd.read_parquet(timing / "rounds.parquet")
    assert list(real_rounds.columns) == list(timing_rounds.columns)  # same form; accuracy columns are NaN
    for column in ("sim_time_s", "bytes_up", "bytes_down", "round"):
        assert real_rounds[column].tolist() == timing_rounds[column].tolist()
    assert timing_rounds[["train_loss", "eval_loss", "eval_ppl", "agg_error"]].isna().all().all()
    assert real_rounds["eval_ppl"].notna().all()

    summary = json.loads((timing / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["timing_only"] and summary["trajectory"] == "timing-only"
    assert summary["final_eval_ppl"] is None and summary["events"] == len(timing_events)
    assert summary["sim_time_s"] == json.loads((real / "summary.json").read_text())["sim_time_s"]
    assert not (timing / ".events.parts").exists()  # parts were combined into events.parquet


@pytest.mark.parametrize("algorithm", ["hsplitlora", "hetlora", "flexlora", "flora", "cenlora", "ft"])
def test_every_algorithm_runs_timing_only_and_plots(tmp_path, algorithm):
    from analysis.figures import plot_run

    run_dir = run(tmp_path, f"algorithm.name={algorithm}", "runtime.timing_only=true")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["sim_time_s"] > 0
    events = pd.read_parquet(run_dir / "events.parquet")
    assert set(events["round"]) == {0, 1, 2}
    assert plot_run(run_dir)  # analysis copes with NaN accuracy columns


def test_timing_only_imports_no_torch(tmp_path):
    code = (
        "import sys\n"
        "from hsplit_sim.experiment.run import run_scenario\n"
        "from hsplit_sim.scenario import load_scenario\n"
        f"s = load_scenario({str(TINY)!r}, ['output.dir={tmp_path}', 'runtime.timing_only=true', "
        "'algorithm.name=hsplitlora'])\n"
        "run_scenario(s, progress=False)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                            env=dict(os.environ, HF_HUB_OFFLINE="1"), timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")


def test_timing_only_partition_sizes_are_equal_shares(tmp_path):
    run_dir = run(tmp_path, "runtime.timing_only=true", "data.train_examples=10", "clients.0.count=3")
    clients = pd.read_parquet(run_dir / "clients.parquet")
    first = clients[clients["round"] == 0]
    assert first["n_examples"].tolist() == [3, 3, 2, 2]


def test_cli_timing_only_flag(tmp_path):
    from hsplit_sim.cli import main

    assert main(["run", str(TINY), "--timing-only", "--set", f"output.dir={tmp_path}"]) == 0
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert json.loads((run_dir / "summary.json").read_text())["timing_only"] is True


def test_a_round_writes_only_its_own_rows_of_the_growing_tables(tmp_path, monkeypatch):
    """Round 30 must cost what round 1 does: the only table rewritten whole each round is the rounds table (a row
    a round); every other table gets the round's rows as one more part, and the checkpoint carries no table."""
    from hsplit_sim.experiment import checkpoint
    from hsplit_sim.experiment.rundir import RunWriter

    rewritten, saved = [], []
    write_table = RunWriter.write_table
    monkeypatch.setattr(RunWriter, "write_table", lambda self, name, *a, **k: (
        rewritten.append(name), write_table(self, name, *a, **k))[1])
    save = checkpoint.save_checkpoint
    monkeypatch.setattr(checkpoint, "save_checkpoint", lambda writer, r, run, worker_states: (
        saved.append(len(json.dumps(checkpoint.encode(run["algorithm"])))), save(writer, r, run, worker_states))[1])
    rounds = 6
    run_dir = run(tmp_path, "algorithm.name=hetlora", "runtime.timing_only=true", f"training.rounds={rounds}",
                  "clients.1.count=3")
    assert sorted(rewritten) == ["resources"] + ["rounds"] * (rounds + 1)
    plans = pd.read_parquet(run_dir / "plans.parquet")
    assert len(plans) == 5 and set(plans["round"]) == {1}  # the plans setup made, written once
    assert len(set(saved[1:])) == 1  # the algorithm's round state does not grow with the rounds
    assert not any(run_dir.glob(".*.parts"))


def test_a_further_table_without_rows_is_written_empty(tmp_path):
    run_dir = run(tmp_path, "algorithm.name=hsplitlora", "runtime.timing_only=true", "training.rounds=1")
    assert pd.read_parquet(run_dir / "importance.parquet").empty  # nothing measured, the table is there
    assert not pd.read_parquet(run_dir / "plans.parquet").empty


@pytest.mark.parametrize("algorithm", ["splitlora", "hsplitlora"])
def test_split_iterations_on_the_clockwork_give_simpys_tables(tmp_path, monkeypatch, algorithm):
    """A round's fast split iterations run on a Clockwork (sim/engine.py); run as SimPy processes instead (a
    wrapper makes them unknown to the fleet's fast path), every table is the same, to the bit and in order."""
    from hsplit_sim.sim import engine
    from hsplit_sim.sim.fleet import Fleet

    overrides = [f"algorithm.name={algorithm}", "clients.0.count=6", "clients.1.count=3", "server.accelerators=2",
                 "training.rounds=3", "training.local_steps=3", "runtime.timing_only=true"]
    rounds_on_clockwork = []
    clockwork_run = engine.Clockwork.run
    monkeypatch.setattr(engine.Clockwork, "run", lambda self, processes: rounds_on_clockwork.append(1) or
                        clockwork_run(self, processes))
    clockwork = run(tmp_path / "clockwork", *overrides)
    assert len(rounds_on_clockwork) == 3

    split_iterations = Fleet.split_iterations

    def as_simpy_processes(self, *args):
        yield from split_iterations(self, *args)

    monkeypatch.setattr(Fleet, "split_iterations", as_simpy_processes)
    simpy_run = run(tmp_path / "simpy", *overrides)
    assert len(rounds_on_clockwork) == 3
    for table in ("events", "participation", "energy", "clients", "plans"):
        pd.testing.assert_frame_equal(pd.read_parquet(clockwork / f"{table}.parquet"),
                                      pd.read_parquet(simpy_run / f"{table}.parquet"), check_exact=True)
    rounds = [pd.read_parquet(d / "rounds.parquet").drop(columns="wall_time_s") for d in (clockwork, simpy_run)]
    pd.testing.assert_frame_equal(*rounds, check_exact=True)
