"""The report reads result files only: check it on a synthetic sweep and a synthetic run directory."""

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import yaml

from analysis import load_sweep, report
from test_analysis import make_fleet_run

REPO = Path(__file__).resolve().parents[1]
RUN_FIGURES = {"perplexity", "timeline", "time_breakdown", "bytes_per_round", "memory"}
SWEEP_FIGURES = {"perplexity", "time_to_target", "axis_0", "axis_1", "heatmap", "bytes_per_round",
                 "time_breakdown", "memory"}


def make_run(run_dir: Path, speed: float, algorithm: str) -> None:
    """Two clients, two rounds of the split protocol; the slower `speed`, the longer everything takes."""
    run_dir.mkdir(parents=True)
    events, t = [], 0.0
    for rnd in (1, 2):
        for c in (0, 1):
            s = t
            for kind, resource, d in (("client_fwd", f"client{c}", 1), ("upload", f"client{c}.up", 2),
                                      ("server_queue", "server", 0.5), ("server_step", "server", 1),
                                      ("download", f"client{c}.down", 2), ("client_bwd", f"client{c}", 1)):
                events.append(dict(round=rnd, client=c, kind=kind, resource=resource, start_s=s,
                                   end_s=s + d * speed, bytes=10**6, flops=1e9))
                s += d * speed
        t = s + 1.0
    ppl = [100.0, 60.0 + speed, 40.0 + speed]
    rounds = pd.DataFrame(dict(round=[0, 1, 2], sim_time_s=[0.0, t / 2, t], eval_ppl=ppl, bytes_up=[0, 4e6, 8e6],
                               bytes_down=[0, 3e6, 6e6], algorithm=algorithm))
    clients = pd.DataFrame([dict(round=r, client=c, device=d, memory_bytes=10**8, memory_budget_bytes=8 * 10**9)
                            for r in (0, 1, 2) for c, d in enumerate(("jetson", "rpi5"))])
    for name, table in (("rounds", rounds), ("events", pd.DataFrame(events)), ("clients", clients)):
        table.to_parquet(run_dir / f"{name}.parquet", index=False)
    (run_dir / "summary.json").write_text(json.dumps(dict(
        name=run_dir.name, algorithm=algorithm, status="completed", n_clients=2, sim_time_s=t,
        final_eval_ppl=ppl[-1], best_eval_ppl=ppl[-1])))


def make_sweep(sweep_dir: Path, trained: bool = True, reference: dict | None = None) -> None:
    """2 algorithms x 3 uplinks and a failed point; untrained points have no perplexity (timing-only)."""
    rows = []
    for algorithm in ("splitlora", "hsplitlora"):
        for up in (1, 8, 64):
            point = f"{algorithm}_{up}-abc123"
            run_dir = sweep_dir / "points" / point / f"{point}-20260101-000000"
            make_run(run_dir, 64 / up, algorithm)
            summary = json.loads((run_dir / "summary.json").read_text())
            rows.append({"point": point, "seed": 0, "algorithm.name": algorithm, "clients.0.link.up_mbps": up,
                         "status": "completed", "error": None, "target_ppl": 110.0,
                         "final_eval_ppl": summary["final_eval_ppl"] if trained else None,
                         "best_eval_ppl": summary["best_eval_ppl"] if trained else None,
                         "time_to_target_s": summary["sim_time_s"] / 2 if trained else None,
                         "sim_time_s": summary["sim_time_s"], "bleu": 0.4 if trained else None,
                         "run_dir": str(run_dir.relative_to(sweep_dir))})
            if not trained:
                rounds = pd.read_parquet(run_dir / "rounds.parquet").assign(eval_ppl=float("nan"))
                rounds.to_parquet(run_dir / "rounds.parquet", index=False)
    rows.append({**rows[0], "point": "broken-def456", "algorithm.name": "ft", "status": "failed",
                 "error": "worker died", "final_eval_ppl": None, "time_to_target_s": None, "run_dir": None})
    pd.DataFrame(rows).to_parquet(sweep_dir / "sweep.parquet", index=False)
    (sweep_dir / "sweep.resolved.yaml").write_text(yaml.safe_dump(
        {"name": "bw", "axes": ["algorithm.name", "clients.0.link.up_mbps"], "zip_axes": [], "target_ppl": None,
         "reference": reference}))


def figures(page: Path) -> set[str]:
    stems = {p.stem for p in page.parent.glob("*.png")}
    assert stems == {p.stem for p in page.parent.glob("*.svg")}
    return stems


def test_sweep_report_draws_every_figure(tmp_path):
    make_sweep(tmp_path)
    table = load_sweep(tmp_path)
    assert len(table) == 7 and table.attrs["axes"] == ["algorithm.name", "clients.0.link.up_mbps"]
    page = report(tmp_path)
    assert page == tmp_path / "report" / "index.html"
    assert figures(page) == SWEEP_FIGURES
    text = page.read_text()
    assert text.count("<svg") == len(SWEEP_FIGURES) and "worker died" in text and "src=" not in text


def test_sweep_report_sets_measured_beside_published(tmp_path):
    make_sweep(tmp_path, reference={"source": "the paper, Fig. 5", "method": "hsplitlora",
                                    "speedup": {"splitlora": 1.5, "ft": 1.4},
                                    "claims": ["SplitLoRA degrades under heterogeneity."]})
    text = report(tmp_path).read_text()
    table = load_sweep(tmp_path)
    times = table[table["status"] == "completed"].groupby("algorithm.name")["time_to_target_s"].mean()
    measured = times["splitlora"] / times["hsplitlora"]
    assert "Against the published figures" in text and "the paper, Fig. 5" in text
    assert "<li>SplitLoRA degrades under heterogeneity.</li>" in text
    assert f"{measured:.4g}" in text  # splitlora's measured speed-up; ft failed, so it has none
    assert "<th>bleu</th>" in text  # the results table shows generation scores


def test_timing_only_sweep_report_shows_time_not_perplexity(tmp_path):
    make_sweep(tmp_path, trained=False)
    page = report(tmp_path)
    assert figures(page) == SWEEP_FIGURES - {"perplexity", "time_to_target"}
    text = page.read_text()
    assert "timing-only" in text and "Simulated time" in text and "<th>bleu</th>" not in text


def test_run_report_draws_every_figure(tmp_path):
    make_run(tmp_path / "run", 1.0, "splitlora")
    page = report(tmp_path / "run")
    assert figures(page) == RUN_FIGURES
    assert page.read_text().count("<svg") == len(RUN_FIGURES)


def _drawn(monkeypatch) -> dict:
    """Figures the report draws, by file name: their y and x tick labels."""
    import analysis.plots

    module = importlib.import_module("analysis.report")  # `analysis.report` is also the function's name
    drawn = {}

    def spy(fig, out_base):
        ax = fig.axes[0]
        drawn[out_base.name] = ([t.get_text() for t in ax.get_yticklabels()],
                                [t.get_text() for t in ax.get_xticklabels()])
        return analysis.plots._save(fig, out_base)

    monkeypatch.setattr(module, "_save", spy)
    monkeypatch.setattr("analysis.figures._save", spy)
    return drawn


def test_run_report_of_a_large_fleet_shows_device_classes(tmp_path, monkeypatch):
    drawn = _drawn(monkeypatch)
    text = report(make_fleet_run(tmp_path / "run", 200)).read_text()
    classes = [f"device-{i} / {['wifi-5', 'lte'][i % 2]}" for i in range(4)]
    assert drawn["time_breakdown"][0] == [f"{c} (50)" for c in classes]
    assert drawn["memory"][1] == [c.replace(" / ", "\n") + "\n(50 clients)" for c in classes]
    assert "200 clients in 4 classes" in text and "of each device class" in text
    assert figures(tmp_path / "run" / "report" / "index.html") == RUN_FIGURES - {"perplexity"}


def test_run_report_of_a_small_fleet_shows_every_client(tmp_path, monkeypatch):
    drawn = _drawn(monkeypatch)
    report(make_fleet_run(tmp_path / "run", 3, n_classes=2))
    assert drawn["time_breakdown"][0] == ["0 (device-0)", "1 (device-0)", "2 (device-1)"]
    assert drawn["memory"][1] == ["0\ndevice-0", "1\ndevice-0", "2\ndevice-1"]


def test_sweep_report_of_large_fleets_shows_device_classes(tmp_path, monkeypatch):
    drawn = _drawn(monkeypatch)
    rows = []
    for up in (1, 8):
        make_fleet_run(tmp_path / "points" / f"up{up}", 200)
        rows.append({"point": f"up{up}", "seed": 0, "clients.0.link.up_mbps": up, "status": "completed",
                     "final_eval_ppl": None, "time_to_target_s": None, "sim_time_s": 400.0 / up,
                     "run_dir": f"points/up{up}"})
    pd.DataFrame(rows).to_parquet(tmp_path / "sweep.parquet", index=False)
    (tmp_path / "sweep.resolved.yaml").write_text(yaml.safe_dump(
        {"name": "fleet", "axes": ["clients.0.link.up_mbps"], "zip_axes": [], "target_ppl": None}))
    text = report(tmp_path).read_text()
    assert drawn["memory"][1] == [f"device-{i}\n{['wifi-5', 'lte'][i % 2]}\n(50 clients)" for i in range(4)]
    assert drawn["time_breakdown"][0] == ["up_mbps=1", "up_mbps=8"]  # a bar per point: the mean over its clients
    assert "of each device class" in text


def test_analysis_imports_no_training_stack():
    code = ("import sys, analysis, analysis.report, analysis.metrics; "
            "bad = [m for m in ('torch', 'zmq', 'simpy', 'hsplit_sim.runtime', 'hsplit_sim.training') "
            "if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_point_descriptions_name_a_shared_value_once():
    from analysis.report import _describe

    links = ["algorithm.name", "clients.0.link", "clients.1.link"]
    assert _describe(links, ["splitlora", "wifi-5", "wifi-5"]) == "splitlora, link=wifi-5"
    assert _describe(links, ["splitlora", "wifi-5", "lte"]) == "splitlora, clients.0.link=wifi-5, clients.1.link=lte"
    assert _describe(["algorithm.time_budget_s"], [float("nan")]) == "time_budget_s=none"  # null in the sweep file


def test_run_end_plots_and_the_report_draw_from_one_registry(tmp_path):
    from analysis.figures import RUN_FIGURES as REGISTRY
    from analysis.figures import plot_run

    run_dir = make_fleet_run(tmp_path / "run", 3, n_classes=2)
    assert {path.stem for path in plot_run(run_dir)} <= {f.name for f in REGISTRY if f.at_run_end}
    assert {path.parent.name for path in plot_run(run_dir)} == {"plots"}
    page = report(run_dir).read_text()
    for figure in REGISTRY:
        assert f"<h2>{figure.title}</h2>" in page
