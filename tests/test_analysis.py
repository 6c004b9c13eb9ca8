"""analysis reads run directories only: check it on synthetic runs written per the contract."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
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


def test_plot_run_draws_simulated_against_measured_when_the_host_timed_the_run(tmp_path):
    run_dir = make_run(tmp_path / "run")
    events = pd.read_parquet(run_dir / "events.parquet")
    timed = events[events["kind"].isin(["client_fwd", "server_step", "client_bwd"])]
    host = timed.assign(step=timed.groupby(["round", "client", "kind"]).cumcount(),
                        host_s=(timed["end_s"] - timed["start_s"]) / 100)
    host[["round", "client", "kind", "step", "host_s"]].to_parquet(run_dir / "host_times.parquet", index=False)
    paths = plot_run(run_dir)
    _assert_figures(paths, ["perplexity.png", "perplexity.svg", "timeline.png", "timeline.svg", "host_times.png",
                            "host_times.svg"])
    assert "client_fwd (12)" in (run_dir / "plots" / "host_times.svg").read_text()  # 3 rounds x 2 clients x 2 steps


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
    """Of hsplit_sim, analysis takes the results contract only (no torch, SimPy or ZeroMQ behind it)."""
    heavy = ["torch", "transformers", "peft", "zmq", "simpy"]
    code = (f"import sys, analysis; print([m for m in sys.modules if m in {heavy!r} "
            "or m.startswith('hsplit_sim') and m not in ('hsplit_sim', 'hsplit_sim.results')])")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env,
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_time_units():
    from analysis.plots import _time_unit

    assert _time_unit(0.5) == (1e-3, "ms")
    assert _time_unit(300) == (1.0, "s")
    assert _time_unit(3000) == (60.0, "min")
    assert _time_unit(50_000) == (3600.0, "h")


def make_fleet_run(run_dir: Path, n_clients: int, n_classes: int = 4, n_rounds: int = 2) -> Path:
    """A timing-only run of `n_clients` in `n_classes` device classes (contiguous blocks of clients; class i is
    i + 1 times slower, and within a class a higher id is slower), written as the run writes it: a row group
    per round."""
    run_dir.mkdir(parents=True)
    cls = [k * n_classes // n_clients for k in range(n_clients)]
    events, t = [(0, -1, "eval", "server", 0.0, 1.0)], 1.0
    for rnd in range(1, n_rounds + 1):
        for k in range(n_clients):
            now, d = t, (cls[k] + 1) * (1 + k / n_clients)
            for kind, resource, seconds in (("client_fwd", f"client{k}", d), ("upload", f"client{k}.up", d),
                                            ("server_step", "server", 0.01), ("download", f"client{k}.down", d),
                                            ("client_bwd", f"client{k}", d)):
                events.append((rnd, k, kind, resource, now, now + seconds))
                now += seconds
        t = max(e[5] for e in events)
    events = pd.DataFrame(events, columns=["round", "client", "kind", "resource", "start_s", "end_s"])
    events = events.assign(bytes=0, flops=0.0)
    with pq.ParquetWriter(run_dir / "events.parquet", pa.Schema.from_pandas(events, preserve_index=False)) as out:
        for _, rows in events.groupby("round"):
            out.write_table(pa.Table.from_pandas(rows, preserve_index=False))
    clients = pd.DataFrame([dict(round=r, client=k, device=f"device-{cls[k]}", link=["wifi-5", "lte"][cls[k] % 2],
                                 memory_bytes=(cls[k] + 1) * 10**8 + k, memory_budget_bytes=4 * 10**9)
                            for r in range(n_rounds + 1) for k in range(n_clients)])
    clients.to_parquet(run_dir / "clients.parquet", index=False)
    round_end = events.groupby("round")["end_s"].max()
    pd.DataFrame(dict(round=round_end.index, sim_time_s=round_end.to_numpy(), eval_ppl=math.nan,
                      bytes_up=0, bytes_down=0, algorithm="splitlora")).to_parquet(run_dir / "rounds.parquet")
    (run_dir / "summary.json").write_text(json.dumps(dict(
        name=run_dir.name, algorithm="splitlora", status="completed", n_clients=n_clients,
        rounds_completed=n_rounds, sim_time_s=float(round_end.max()))))
    return run_dir


def _drawn_timeline(run_dir: Path, monkeypatch) -> tuple[list[str], str]:
    """The lane labels and title of the timeline plot_run draws."""
    import analysis.plots

    drawn, save = [], analysis.plots._save

    def spy(fig, out_base):
        ax = fig.axes[0]
        drawn.append(([t.get_text() for t in ax.get_yticklabels()], ax.get_title(loc="left")))
        return save(fig, out_base)

    monkeypatch.setattr(analysis.plots, "_save", spy)
    plot_run(run_dir)
    return drawn[-1]


def test_timeline_of_a_large_fleet_shows_the_slowest_and_fastest_of_each_class(tmp_path, monkeypatch):
    from analysis.plots import MAX_LANES

    lanes, title = _drawn_timeline(make_fleet_run(tmp_path / "run", 200), monkeypatch)
    assert title == "Rounds 1–2, 8 of 200 clients: the slowest and fastest of each device class"
    assert len(lanes) <= MAX_LANES and lanes[0] == "server"
    devices = [lane for lane in lanes if lane.endswith(")")]
    assert devices[:2] == ["client49 (slowest of 50 device-0 / wifi-5)", "client0 (fastest of 50 device-0 / wifi-5)"]
    assert devices[-1] == "client150 (fastest of 50 device-3 / lte)"
    assert {"client49.up", "client49.down"} <= set(lanes)
    assert (tmp_path / "run" / "plots" / "timeline.svg").stat().st_size < 1_000_000


def test_timeline_of_many_classes_keeps_to_the_lane_cap(tmp_path, monkeypatch):
    from analysis.plots import MAX_LANES

    lanes, title = _drawn_timeline(make_fleet_run(tmp_path / "run", 200, n_classes=20), monkeypatch)
    assert len(lanes) <= MAX_LANES
    assert title == "Rounds 1–2, 11 of 200 clients: the slowest of the 11 slowest of 20 device classes"
    assert lanes[1] == "client99 (slowest of 10 device-9 / lte)"  # classes 9 to 19 are the slowest, in fleet order


def test_timeline_of_a_small_fleet_shows_every_client(tmp_path, monkeypatch):
    lanes, title = _drawn_timeline(make_fleet_run(tmp_path / "run", 5), monkeypatch)
    assert title == "Rounds 1–2, all 5 clients"
    assert lanes == ["server"] + [f"client{k}{link}" for k in range(5) for link in ("", ".up", ".down")]


def test_lazy_run_reads_only_the_rounds_asked_for(tmp_path):
    run = load_run(make_fleet_run(tmp_path / "run", 10, n_rounds=3), lazy=True)
    assert run.events is None and run.clients is None
    assert run.round_numbers("events") == [0, 1, 2, 3]  # from the row groups' statistics
    events = run.read("events", ["round", "client", "end_s", "no_such_column"], rounds=[2])
    everything = load_run(tmp_path / "run").events
    expected = everything.loc[everything["round"] == 2, ["round", "client", "end_s"]].reset_index(drop=True)
    pd.testing.assert_frame_equal(events, expected)


def test_killed_run_is_drawn_from_its_parts(tmp_path, monkeypatch):
    """A run killed outright left per-round parts of events and clients, never combined."""
    run_dir = make_fleet_run(tmp_path / "run", 20)
    for name in ("events", "clients"):
        table = pd.read_parquet(run_dir / f"{name}.parquet")
        (run_dir / f".{name}.parts").mkdir()
        for number, rows in table.groupby("round"):
            rows.to_parquet(run_dir / f".{name}.parts" / f"{number:06d}.parquet", index=False)
        (run_dir / f"{name}.parquet").unlink()
    lanes, title = _drawn_timeline(run_dir, monkeypatch)
    assert title == "Rounds 1–2, 8 of 20 clients: the slowest and fastest of each device class"
    from analysis.report import report

    assert "20 clients in 4 classes" in report(run_dir).read_text()


def make_named_run(run_dir: Path) -> Path:
    """A run of the current results version whose resources have names that say nothing of what they are: a
    phone and a laptop sharing a wireless medium `ap0` to a server `gpu-box`. Only the resources table tells."""
    run_dir.mkdir(parents=True)
    resources = pd.DataFrame([
        ("gpu-box", "server", -1, "rtx-3090", -1), ("ap0", "medium", -1, "wifi-5", -1),
        ("phone-7", "device", 0, "phone", 0), ("phone-7-uplink", "uplink", 0, "lte", 0),
        ("phone-7-downlink", "downlink", 0, "lte", 0),
        ("laptop", "device", 1, "laptop", 1), ("laptop-up", "uplink", 1, "wifi-5", 1),
        ("laptop-down", "downlink", 1, "wifi-5", 1)], columns=["resource", "kind", "client", "name", "group"])
    events = pd.DataFrame([  # round, client, kind, resource, start, end
        (0, -1, "eval", "gpu-box", 0.0, 0.0),
        (1, 0, "client_fwd", "phone-7", 0.0, 2.0), (1, 0, "upload", "phone-7-uplink", 2.0, 3.0),
        (1, 0, "upload", "ap0", 3.0, 4.0), (1, 0, "server_queue", "gpu-box", 4.0, 5.0),
        (1, 0, "server_step", "gpu-box", 5.0, 6.0), (1, 0, "download", "phone-7-downlink", 6.0, 7.0),
        (1, 0, "client_bwd", "phone-7", 7.0, 9.0),
        (1, 1, "client_fwd", "laptop", 0.0, 1.0), (1, 1, "upload", "laptop-up", 1.0, 2.0),
        (1, 1, "server_step", "gpu-box", 2.0, 4.0), (1, 1, "download", "laptop-down", 4.0, 5.0),
        (1, 1, "client_bwd", "laptop", 5.0, 6.0),
        (1, -1, "aggregate", "gpu-box", 9.0, 10.0)],
        columns=["round", "client", "kind", "resource", "start_s", "end_s"]).assign(bytes=0, flops=0.0)
    rounds = pd.DataFrame(dict(round=[0, 1], sim_time_s=[0.0, 10.0], eval_ppl=[50.0, 40.0], bytes_up=0,
                               bytes_down=0, algorithm="splitlora"))
    clients = pd.DataFrame(dict(round=1, client=[0, 1], device=["phone", "laptop"], link=["lte", "wifi-5"],
                                memory_bytes=10**8, memory_budget_bytes=10**9))
    for name, table in (("resources", resources), ("events", events), ("rounds", rounds), ("clients", clients)):
        table.to_parquet(run_dir / f"{name}.parquet", index=False)
    (run_dir / "summary.json").write_text(json.dumps(dict(
        name="named", algorithm="splitlora", status="completed", n_clients=2, sim_time_s=10.0, results_version=2)))
    return run_dir


def test_what_a_resource_is_comes_from_the_resources_table(tmp_path, monkeypatch):
    from analysis.metrics import time_breakdown
    from hsplit_sim.results import UTILISATION_COLUMNS, utilisation

    run = load_run(make_named_run(tmp_path / "run"), lazy=True)
    breakdown = time_breakdown(run.batches("events", ["client", "kind", "start_s", "end_s"]), 10.0)
    assert breakdown.loc[0].to_dict() == {"compute": 4.0, "upload": 2.0, "queue": 1.0, "server": 1.0,
                                          "download": 1.0, "idle": 1.0}  # the medium's upload is no compute
    assert breakdown.loc[1, "compute"] == 2.0
    use = utilisation(run.batches("events", list(UTILISATION_COLUMNS)), run.resources, 10.0, n_clients=2)
    assert use == {"server": pytest.approx(0.4), "clients_mean": pytest.approx(0.3)}  # 4 s of 10; 6 s of 2 x 10
    lanes, title = _drawn_timeline(run.path, monkeypatch)
    assert lanes == ["gpu-box", "phone-7", "phone-7-uplink", "phone-7-downlink", "laptop", "laptop-up",
                     "laptop-down", "ap0"]
    assert title == "Round 1, all 2 clients"


def test_a_run_without_a_resources_table_derives_it_from_the_old_names(tmp_path):
    """The legacy path: results version 1 had no resources table; its resource names said what each was."""
    from analysis.report import report

    run_dir = make_run(tmp_path / "run")
    assert not (run_dir / "resources.parquet").exists()
    resources = load_run(run_dir, lazy=True).resources
    assert sorted(resources[["resource", "kind", "client"]].itertuples(index=False, name=None)) == [
        ("client0", "device", 0), ("client0.down", "downlink", 0), ("client0.up", "uplink", 0),
        ("client1", "device", 1), ("client1.down", "downlink", 1), ("client1.up", "uplink", 1),
        ("server", "server", -1)]
    assert {p.name for p in plot_run(run_dir)} >= {"timeline.png", "perplexity.png"}
    assert "time_breakdown" in report(run_dir).read_text()
