"""analysis reads run directories only: check it on synthetic runs written per the contract."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from analysis import load_run, plot_perplexity, plot_run, plot_timeline

REPO = Path(__file__).resolve().parents[1]


def _events(n_rounds: int) -> pd.DataFrame:
    """Two clients of different speed sharing one server, two local steps per round."""
    rows = []

    def add(rnd, client, kind, resource, start, dur, nbytes=0, flops=0.0):
        rows.append(dict(round=rnd, client=client, kind=kind, resource=resource,
                         start_s=start, end_s=start + dur, bytes=nbytes, flops=flops))
        return start + dur

    t = add(0, -1, "eval", "server", 0.0, 5.0, flops=1e12)
    for rnd in range(1, n_rounds + 1):
        server_free = t
        ends = []
        for c, speed in enumerate((1.0, 2.5)):
            now = t
            for _ in range(2):
                now = add(rnd, c, "client_fwd", f"client{c}", now, 10.0 * speed, flops=1e12)
                now = add(rnd, c, "upload", f"client{c}.up", now, 6.0, nbytes=4_000_000)
                start = max(now, server_free)
                add(rnd, c, "server_queue", "server", now, start - now)  # zero length when free
                now = server_free = add(rnd, c, "server_step", "server", start, 8.0, flops=5e12)
                now = add(rnd, c, "download", f"client{c}.down", now, 4.0, nbytes=4_000_000)
                now = add(rnd, c, "client_bwd", f"client{c}", now, 15.0 * speed, flops=2e12)
            ends.append(add(rnd, c, "adapter_upload", f"client{c}.up", now, 2.0, nbytes=500_000))
        t = add(rnd, -1, "aggregate", "server", max(ends), 0.5)
        for c in range(2):
            end = add(rnd, -1, "broadcast", f"client{c}.down", t, 1.5, nbytes=500_000)
        t = add(rnd, -1, "eval", "server", end, 5.0, flops=1e12)
    return pd.DataFrame(rows)


def make_run(run_dir: Path, n_rounds: int = 3, status: str = "completed",
             formats: tuple = ("parquet", "csv")) -> Path:
    """Write summary.json and the tables the run command writes."""
    run_dir.mkdir(parents=True)
    events = _events(n_rounds)
    round_end = events.groupby("round")["end_s"].max()
    ppl = [60.0 * 0.6**r for r in range(n_rounds + 1)]
    rounds = pd.DataFrame(dict(
        round=range(n_rounds + 1),
        sim_time_s=[round_end[r] for r in range(n_rounds + 1)],
        wall_time_s=[2.0 * r for r in range(n_rounds + 1)],
        train_loss=[math.nan] + [math.log(p) + 0.1 for p in ppl[1:]],
        eval_loss=[math.log(p) for p in ppl],
        eval_ppl=ppl,
        bytes_up=[10**7 * r for r in range(n_rounds + 1)],
        bytes_down=[10**7 * r for r in range(n_rounds + 1)],
        agg_error=[math.nan] + [1e-6] * n_rounds,
        algorithm="hsplitlora",
    ))
    clients = pd.DataFrame([
        dict(round=r, client=c, device=dev, link="wifi", split_layer=2 + c, rank=8,
             memory_bytes=10**9, memory_budget_bytes=4 * 10**9, n_examples=100, status="ok")
        for r in range(1, n_rounds + 1) for c, dev in enumerate(("jetson-orin", "rpi5"))
    ])
    for name, table in (("rounds", rounds), ("events", events), ("clients", clients)):
        if "parquet" in formats:
            table.to_parquet(run_dir / f"{name}.parquet", index=False)
        if "csv" in formats:
            table.to_csv(run_dir / f"{name}.csv", index=False)
    summary = dict(name=run_dir.name, algorithm="hsplitlora", status=status,
                   error="worker died" if status == "failed" else None,
                   rounds_completed=n_rounds, final_eval_ppl=ppl[-1], best_eval_ppl=min(ppl),
                   sim_time_s=float(round_end.max()), wall_time_s=2.0 * n_rounds)
    (run_dir / "summary.json").write_text(json.dumps(summary))
    return run_dir


def _assert_figures(paths, names):
    assert sorted(p.name for p in paths) == sorted(names)
    for path in paths:
        assert path.stat().st_size > 1000


def test_load_run_round_trips(tmp_path):
    run_dir = make_run(tmp_path / "run")
    run = load_run(run_dir)
    assert run.summary["status"] == "completed"
    assert run.algorithm == "hsplitlora"
    assert list(run.rounds["round"]) == [0, 1, 2, 3]
    pd.testing.assert_frame_equal(run.events, pd.read_parquet(run_dir / "events.parquet"))
    assert len(run.clients) == 6


def test_load_run_csv_only_and_missing_tables(tmp_path):
    run_dir = make_run(tmp_path / "run", formats=("csv",))
    (run_dir / "clients.csv").unlink()
    run = load_run(run_dir)
    assert run.rounds["eval_ppl"].iloc[-1] == pytest.approx(60.0 * 0.6**3)
    assert run.clients.empty


def test_load_run_rejects_non_run_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        load_run(tmp_path)


def test_plot_run_writes_figures(tmp_path):
    paths = plot_run(make_run(tmp_path / "run"))
    _assert_figures(paths, ["perplexity.png", "perplexity.svg", "timeline.png", "timeline.svg"])
    assert all(p.parent == tmp_path / "run" / "plots" for p in paths)


def test_plot_run_csv_only(tmp_path):
    paths = plot_run(make_run(tmp_path / "run", formats=("csv",)))
    _assert_figures(paths, ["perplexity.png", "perplexity.svg", "timeline.png", "timeline.svg"])


def test_plot_run_failed_after_one_round(tmp_path):
    paths = plot_run(make_run(tmp_path / "run", n_rounds=1, status="failed"))
    _assert_figures(paths, ["perplexity.png", "perplexity.svg", "timeline.png", "timeline.svg"])


def test_plot_run_zero_rounds_skips_perplexity(tmp_path):
    run_dir = make_run(tmp_path / "run", n_rounds=0, status="failed")
    (run_dir / "rounds.parquet").unlink()
    (run_dir / "rounds.csv").unlink()
    paths = plot_run(run_dir)
    _assert_figures(paths, ["timeline.png", "timeline.svg"])


def test_plot_perplexity_compares_runs(tmp_path):
    a = load_run(make_run(tmp_path / "a"))
    b = load_run(make_run(tmp_path / "b"))
    b.summary["algorithm"] = "splitlora"
    paths = plot_perplexity([a, b], tmp_path / "cmp" / "ppl")
    _assert_figures(paths, ["ppl.png", "ppl.svg"])
    assert plot_timeline(a, tmp_path / "cmp" / "tl", rounds=1)


def test_analysis_imports_no_heavy_code():
    heavy = ["torch", "transformers", "peft", "zmq", "simpy", "hsplit_sim"]
    code = f"import sys, analysis; print([m for m in {heavy!r} if m in sys.modules])"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env,
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_timeline_rows_and_time_units():
    from analysis.plots import _resource_key, _time_unit

    rows = ["client10", "client2.down", "server", "client2", "client2.up", "client0.up"]
    assert sorted(rows, key=_resource_key) == [
        "server", "client0.up", "client2", "client2.up", "client2.down", "client10"]
    assert _time_unit(0.5) == (1e-3, "ms")
    assert _time_unit(300) == (1.0, "s")
    assert _time_unit(3000) == (60.0, "min")
    assert _time_unit(50_000) == (3600.0, "h")
