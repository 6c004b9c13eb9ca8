"""Sweeps: expansion and validation of sweep files, and a real tiny sweep that fails a point and resumes."""

import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from analysis import report
from hsplit_sim.errors import ScenarioError
from hsplit_sim.experiment.sweep import Point, load_sweep_file, point_result, refresh_table, run_sweep

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "scenarios" / "tiny.yaml"


def sweep_file(tmp_path: Path, **spec) -> Path:
    """A sweep file beside a copy of tiny.yaml, which it names by a relative path."""
    shutil.copy(TINY, tmp_path / "base.yaml")
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"base": "base.yaml", **spec}))
    return path


def test_grid_zip_and_seeds_expand(tmp_path):
    path = sweep_file(tmp_path, grid={"algorithm.name": ["splitlora", "cenlora"], "training.rounds": [1, 2]},
                      zip={"clients.0.count": [1, 3], "clients.1.count": [2, 4]}, seeds=[0, 5])
    sweep = load_sweep_file(path, ["training.batch_size=2"])
    assert len(sweep.points) == 2 * 2 * 2 * 2
    assert sweep.axes == ["algorithm.name", "training.rounds", "clients.0.count", "clients.1.count", "seed"]
    assert len({p.id for p in sweep.points}) == len(sweep.points)
    counts = {(p.scenario["clients"][0]["count"], p.scenario["clients"][1]["count"]) for p in sweep.points}
    assert counts == {(1, 2), (3, 4)}  # zip axes move together
    assert {p.seed for p in sweep.points} == {0, 5}
    assert all(p.scenario["training"]["batch_size"] == 2 for p in sweep.points)
    first = sweep.points[0]
    assert first.values == {"algorithm.name": "splitlora", "training.rounds": 1, "clients.0.count": 1,
                            "clients.1.count": 2, "seed": 0}
    assert first.id == load_sweep_file(path, ["training.batch_size=2"]).points[0].id  # stable


def test_inline_base_and_set(tmp_path):
    base = yaml.safe_load(TINY.read_text())
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"base": base, "set": {"clients.0.link": {"up_mbps": 5, "down_mbps": 9,
                                                                              "latency_ms": 1}},
                                    "grid": {"clients.0.link.up_mbps": [1, 8]}}))
    sweep = load_sweep_file(path)
    assert [p.scenario["clients"][0]["link"]["up_mbps"] for p in sweep.points] == [1, 8]


def test_a_null_axis_value_leaves_the_key_unset(tmp_path):
    """A key only one algorithm has is null on the points of the others, which would reject it; a null also drops
    what the base or `set:` gave the key, so the schema's default applies."""
    path = sweep_file(tmp_path, zip={"algorithm.name": ["splitlora", "hsplitlora", "hsplitlora"],
                                     "algorithm.armsc": [None, False, None],
                                     "algorithm.time_budget_s": [None, None, 0.05]})
    split, ablated, budgeted = load_sweep_file(path).points
    assert "armsc" not in split.scenario["algorithm"] and "time_budget_s" not in split.scenario["algorithm"]
    assert ablated.scenario["algorithm"]["armsc"] is False and ablated.scenario["algorithm"]["time_budget_s"] is None
    assert budgeted.scenario["algorithm"]["armsc"] is True and budgeted.scenario["algorithm"]["time_budget_s"] == 0.05
    assert split.values == {"algorithm.name": "splitlora", "algorithm.armsc": None, "algorithm.time_budget_s": None}

    path = sweep_file(tmp_path, set={"algorithm.name": "hsplitlora", "algorithm.time_budget_s": 0.05},
                      grid={"algorithm.time_budget_s": [None, 0.1], "clients.0.memory_budget_gb": [None]})
    unset, set_ = load_sweep_file(path).points
    assert unset.scenario["algorithm"]["time_budget_s"] is None and set_.scenario["algorithm"]["time_budget_s"] == 0.1
    assert unset.scenario["clients"][0]["memory_budget_gb"] is None  # not in the base either: nothing to remove


@pytest.mark.parametrize("spec, fragments", [
    ({"grid": {"algorithm.name": ["splitlora", "nope"]}}, ["algorithm.name=nope", "algorithm.name: Input should be"]),
    ({"grid": {"clients.7.count": [1]}}, ["clients.7.count=1", "clients.7"]),
    ({"grid": {"clients.0.link.up_mbps": [1]}}, ["clients.0.link"]),  # a catalog name, not a mapping
    ({"zip": {"clients.0.count": [1, 2], "clients.1.count": [1]}}, ["zip", "equal lengths"]),
    ({"grid": {"training.rounds": 3}}, ["grid.training.rounds", "list"]),
    ({"axes": {}}, ["axes", "unknown key"]),
    ({"grid": {"algorithm.name": ["splitlora"]}, "reference": {"source": "x", "method": "splitlora"}},
     ["reference", "source, method, and speedup or claims"]),
    ({"grid": {"algorithm.name": ["splitlora", "cenlora"]},
      "reference": {"source": "x", "method": "hsplitlora", "speedup": {"cenlora": 1.3}}},
     ["reference", "'hsplitlora' is not an algorithm.name of the grid"]),
    ({"grid": {"algorithm.name": ["splitlora", "cenlora"]},
      "reference": {"source": "x", "method": "splitlora", "speedup": {"cenlora": -1}}},
     ["reference.speedup", "positive numbers"]),
])
def test_bad_sweeps_fail_up_front(tmp_path, spec, fragments):
    with pytest.raises(ScenarioError) as error:
        load_sweep_file(sweep_file(tmp_path, **spec))
    for fragment in fragments:
        assert fragment in str(error.value)


def test_reference_is_kept_for_the_report(tmp_path):
    reference = {"source": "a paper, Table 2", "method": "splitlora", "speedup": {"cenlora": 4.7}}
    path = sweep_file(tmp_path, grid={"algorithm.name": ["splitlora", "cenlora"]}, reference=reference)
    assert load_sweep_file(path).reference == {**reference, "claims": []}


def test_point_row_carries_generation_scores(tmp_path):
    run_dir = tmp_path / "points" / "p-abc123" / "p-abc123-20260101-000000"
    run_dir.mkdir(parents=True)
    (run_dir / "summary.json").write_text(json.dumps({
        "status": "completed", "final_eval_ppl": 4.0, "best_eval_ppl": 3.9, "sim_time_s": 2.0,
        "generation": {"bleu": 0.5, "rouge_l": 0.6}, "generation_unavailable": {"meteor": "no java"}}))
    row, _ = point_result(tmp_path, Point("p-abc123", {}, 0, {}))
    assert (row["bleu"], row["rouge_l"], row["final_eval_ppl"]) == (0.5, 0.6, 4.0)
    assert math.isnan(row["meteor"]) and math.isnan(row["cider"])


def test_missing_base_names_the_file(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("base: absent.yaml\n")
    with pytest.raises(ScenarioError, match="absent.yaml: no such file"):
        load_sweep_file(path)


def runs_of(sweep_dir: Path) -> dict[str, list[str]]:
    return {p.name: sorted(d.name for d in p.iterdir() if d.is_dir()) for p in (sweep_dir / "points").iterdir()}


def test_resume_refuses_a_directory_this_sweep_did_not_write(tmp_path):
    """A folder without the sweep's sweep.resolved.yaml, or with another sweep's, is not adopted (#13)."""
    sweep = load_sweep_file(sweep_file(tmp_path, grid={"training.rounds": [1]}))
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    with pytest.raises(ScenarioError, match="not a sweep directory"):
        run_sweep(sweep, resume=stranger, progress=False)
    (stranger / "sweep.resolved.yaml").write_text(yaml.safe_dump({"name": "another"}))
    with pytest.raises(ScenarioError, match="a directory of sweep 'another'"):
        run_sweep(sweep, resume=stranger, progress=False)
    assert sorted(p.name for p in stranger.iterdir()) == ["notes.txt", "sweep.resolved.yaml"]  # nothing written
    with pytest.raises(ScenarioError, match="no such directory"):
        run_sweep(sweep, resume=tmp_path / "missing", progress=False)


def test_real_sweep_records_failure_resumes_and_reports(tmp_path):
    """2 algorithms x 2 memory budgets on tiny-gpt2: split LoRA cannot fit the tiny budget, so it fails alone."""
    path = sweep_file(tmp_path, grid={"algorithm.name": ["splitlora", "cenlora"],
                                      "clients.1.memory_budget_gb": [8, 1.0e-6]})
    small = ["training.rounds=1", "training.local_steps=1", "data.train_examples=16", "data.eval_examples=8",
             f"output.dir={tmp_path / 'runs'}"]
    sweep = load_sweep_file(path, small)
    sweep_dir = run_sweep(sweep, processes=2, progress=False)

    table = pd.read_parquet(sweep_dir / "sweep.parquet")
    assert (sweep_dir / "sweep.csv").is_file() and (sweep_dir / "sweep.resolved.yaml").is_file()
    assert list(table["algorithm.name"]) == ["splitlora", "splitlora", "cenlora", "cenlora"]
    assert list(table["status"]) == ["completed", "failed", "completed", "completed"]
    assert "memory budget" in table.loc[1, "error"]
    done = table[table["status"] == "completed"]
    assert done["final_eval_ppl"].notna().all() and done["time_to_target_s"].notna().all()
    assert (table["target_ppl"] == done["final_eval_ppl"].max()).all()
    assert done["util_server"].between(0, 1).all() and done["util_clients_mean"].between(0, 1).all()

    before = runs_of(sweep_dir)
    redo = table.loc[3, "point"]
    shutil.rmtree(sweep_dir / table.loc[3, "run_dir"])
    run_sweep(sweep, resume=sweep_dir, processes=2, progress=False)
    after = runs_of(sweep_dir)
    assert len(after[redo]) == 1 and after[redo] != before[redo]
    for point in table.loc[[0, 2], "point"]:
        assert after[point] == before[point]  # completed points were not run again
    assert list(pd.read_parquet(sweep_dir / "sweep.parquet")["status"]) == list(table["status"])

    page = report(sweep_dir)
    assert {"perplexity", "time_to_target", "axis_0", "axis_1", "heatmap"} <= {p.stem for p in page.parent.glob("*.png")}

    written = pd.read_parquet(sweep_dir / "sweep.parquet")
    (sweep_dir / "sweep.parquet").unlink()
    (sweep_dir / "sweep.csv").unlink()
    refresh_table(sweep_dir)
    pd.testing.assert_frame_equal(pd.read_parquet(sweep_dir / "sweep.parquet"), written)


def test_sigterm_stops_the_sweep_and_its_points(tmp_path):
    """Points run in sessions of their own, so a killed sweep must pass the stop on or they run on orphaned."""
    path = sweep_file(tmp_path, grid={"algorithm.name": ["splitlora"]})
    runs = tmp_path / "runs"
    process = subprocess.Popen(
        [sys.executable, "-m", "hsplit_sim.cli", "sweep", str(path), "--set", "training.rounds=40",
         "--set", f"output.dir={runs}"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not any(
                len(pd.read_csv(f)) >= 2 for f in runs.glob("*/points/*/*/rounds.csv")):
            time.sleep(0.2)
        process.terminate()
        output, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, output.decode()
    [summary] = [json.loads(f.read_text()) for f in runs.glob("*/points/*/*/summary.json")]
    assert summary["status"] == "interrupted"
    table = pd.read_parquet(next(runs.glob("*/sweep.parquet")))
    assert list(table["status"]) == ["interrupted"]
    leftover = subprocess.run(["pgrep", "-f", str(runs)], capture_output=True, text=True).stdout.split()
    assert not leftover, "point processes outlived the sweep"


def test_resume_continues_a_point_that_stopped_with_a_checkpoint(tmp_path, monkeypatch):
    """A point killed after round 1's checkpoint continues from it (`run --resume`) when the sweep resumes: one
    run directory, marked resumed, with the rounds an uninterrupted run of the point gives."""
    from test_resume import KILL_BEFORE_CHECKPOINT

    from hsplit_sim.experiment.sweep import executors

    path = sweep_file(tmp_path, grid={"algorithm.name": ["fedlora"]})
    sweep = load_sweep_file(path, ["training.rounds=3", "runtime.timing_only=true", f"output.dir={tmp_path / 'runs'}"])

    class Killing(executors.LocalExecutor):
        def submit(self, argv, env, log_path, cpus):  # the point's process dies before round 2's checkpoint
            return super().submit([sys.executable, "-c", KILL_BEFORE_CHECKPOINT, argv[-1], "2"], env, log_path, cpus)

    monkeypatch.setitem(executors.EXECUTORS, "local", Killing)
    sweep_dir = run_sweep(sweep, processes=1, progress=False)
    assert list(pd.read_parquet(sweep_dir / "sweep.parquet")["status"]) == ["crashed"]
    monkeypatch.undo()

    run_sweep(sweep, resume=sweep_dir, processes=1, progress=False)
    point = next((sweep_dir / "points").iterdir())
    (run_dir,) = [d for d in point.iterdir() if d.is_dir()]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and [r["from_round"] for r in summary["resumed"]] == [1]
    assert list(pd.read_parquet(sweep_dir / "sweep.parquet")["status"]) == ["completed"]
    fresh = subprocess.run([sys.executable, "-m", "hsplit_sim.cli", "run", str(point / "scenario.yaml"), "--set",
                            f"output.dir={tmp_path / 'fresh'}"], cwd=REPO, capture_output=True, timeout=300)
    assert fresh.returncode == 0, fresh.stderr
    (fresh_dir,) = (tmp_path / "fresh").iterdir()
    pd.testing.assert_frame_equal(pd.read_parquet(run_dir / "rounds.parquet").drop(columns="wall_time_s"),
                                  pd.read_parquet(fresh_dir / "rounds.parquet").drop(columns="wall_time_s"))


def test_points_on_remote_workers_run_one_at_a_time(tmp_path):
    path = sweep_file(tmp_path, grid={"algorithm.name": ["splitlora", "fedlora"]})
    sweep = load_sweep_file(path, ["runtime.remote_workers=[tcp://127.0.0.1:5999]", "runtime.transport=tcp",
                                   f"runtime.key_file={tmp_path / 'key'}", f"output.dir={tmp_path / 'runs'}"])
    with pytest.raises(ScenarioError, match="serve one run at a time: use --processes 1"):
        run_sweep(sweep, processes=2, progress=False)
