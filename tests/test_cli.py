"""The command line: exit statuses, one-line errors without tracebacks, and the fast subcommands."""

import json
import sys
import types
from pathlib import Path

from hsplit_sim.cli import main
from hsplit_sim.errors import RunError, ScenarioError
from hsplit_sim.scenario import DEVICES, LINKS

QUICKSTART = str(Path(__file__).resolve().parent.parent / "scenarios" / "quickstart.yaml")


def assert_one_error_line(capsys, *fragments):
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    for fragment in fragments:
        assert fragment in lines[0]


def test_validate_prints_summary_and_ok(capsys):
    assert main(["validate", QUICKSTART, "--set", "clients.0.count=5"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "quickstart: model smollm2-135m, algorithm splitlora, 6 clients, 3 rounds"
    assert out[-1] == "ok"


def test_validate_bad_field_exits_2(capsys):
    assert main(["validate", QUICKSTART, "--set", "clients.1.link.up_mbps=-1"]) == 2
    assert_one_error_line(capsys, "--set clients.1.link.up_mbps")
    assert main(["validate", QUICKSTART, "--set", "clients.1.link={up_mbps: -1, down_mbps: 1, latency_ms: 0}"]) == 2
    assert_one_error_line(capsys, "clients.1.link.up_mbps")


def test_validate_missing_file_exits_2(capsys, tmp_path):
    assert main(["validate", str(tmp_path / "absent.yaml")]) == 2
    assert_one_error_line(capsys, "absent.yaml", "no such file")


def test_preflight_errors_exit_2(capsys, monkeypatch):
    def infeasible(scenario):
        raise ScenarioError("clients.1: needs 9.1 GB, budget 8 GB")

    monkeypatch.setattr("hsplit_sim.experiment.preflight.preflight", infeasible)
    assert main(["validate", QUICKSTART]) == 2
    assert_one_error_line(capsys, "clients.1: needs 9.1 GB")


def fake_run_module(monkeypatch, run_scenario):
    module = types.ModuleType("hsplit_sim.experiment.run")
    module.run_scenario = run_scenario
    monkeypatch.setitem(sys.modules, "hsplit_sim.experiment.run", module)


def test_run_prints_run_directory(capsys, monkeypatch, tmp_path):
    fake_run_module(monkeypatch, lambda scenario: tmp_path / scenario.output.dir)
    assert main(["run", QUICKSTART, "--set", "output.dir=elsewhere"]) == 0
    assert capsys.readouterr().out.strip().endswith(str(tmp_path / "elsewhere"))


def test_run_draws_the_run_end_plots_and_survives_a_plotting_failure(capsys, caplog, monkeypatch, tmp_path):
    from test_analysis import make_run

    run_dir = make_run(tmp_path / "run")
    fake_run_module(monkeypatch, lambda scenario: run_dir)
    assert main(["run", QUICKSTART]) == 0
    assert {p.name for p in (run_dir / "plots").iterdir()} == {
        "perplexity.png", "perplexity.svg", "timeline.png", "timeline.svg"}

    def broken(run_dir):
        raise ValueError("no figure today")

    monkeypatch.setattr("analysis.figures.plot_run", broken)
    assert main(["run", QUICKSTART]) == 0  # the tables are the result; figures can be drawn again by report
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(run_dir)
    assert f"plotting {run_dir} failed" in caplog.text and "no figure today" in caplog.text


def test_run_errors_and_interrupt(capsys, monkeypatch):
    def dies(scenario):
        raise RunError("client worker 0 stopped answering")

    fake_run_module(monkeypatch, dies)
    assert main(["run", QUICKSTART]) == 1
    assert_one_error_line(capsys, "client worker 0 stopped answering")

    def interrupted(scenario):
        raise KeyboardInterrupt

    fake_run_module(monkeypatch, interrupted)
    assert main(["run", QUICKSTART]) == 130
    assert "Traceback" not in capsys.readouterr().err


def test_run_bad_scenario_exits_2_before_importing_the_runner(capsys):
    assert main(["run", QUICKSTART, "--set", "algorithm.name=nope"]) == 2
    assert_one_error_line(capsys, "algorithm.name")


def test_devices_lists_every_catalog_entry(capsys):
    assert main(["devices"]) == 0
    out = capsys.readouterr().out
    for name in [*DEVICES, *LINKS]:
        assert name in out


def test_schema_prints_json(capsys):
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert {"model", "data", "algorithm", "clients"} <= set(schema["properties"])


def test_examples_list_copy_and_run_by_name(capsys, tmp_path):
    assert main(["examples"]) == 0
    listing = capsys.readouterr().out
    for name, what in (("quickstart", "SmolLM2-135M fine-tuned with split LoRA"), ("whatif/bandwidth", "sweep")):
        assert name in listing and what in listing
    assert main(["examples", "--copy", str(tmp_path / "mine")]) == 0
    assert (tmp_path / "mine" / "whatif" / "bandwidth.yaml").read_text() == (
        Path(QUICKSTART).parent / "whatif" / "bandwidth.yaml").read_text()
    capsys.readouterr()
    assert main(["examples", "--copy", str(tmp_path / "mine")]) == 2
    assert_one_error_line(capsys, "exists already")
    assert main(["validate", "paper/tiny-heterogeneous"]) == 0
    assert capsys.readouterr().out.startswith("paper-tiny-heterogeneous: model tiny-llama")
    assert main(["validate", "no-such-example"]) == 2
    assert_one_error_line(capsys, "no-such-example", "hsplit-sim examples")


def test_usage_errors_return_2(capsys):
    assert main(["frobnicate"]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_an_output_dir_that_cannot_hold_the_run_is_one_line(capsys, tmp_path):
    """A file, a dangling link (it used to loop for ever) and a name too long for the file system."""
    (tmp_path / "file").write_text("")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    timing = ["--timing-only", "--set", "training.rounds=1"]
    for output, fragment in ((tmp_path / "file", "exists and is not a directory"),
                             (tmp_path / "dangling", "exists and is not a directory")):
        assert main(["run", "tiny", *timing, "--set", f"output.dir={output}"]) == 2
        assert_one_error_line(capsys, f"output.dir: {output}", fragment)
    assert main(["run", "tiny", *timing, "--set", f"output.dir={tmp_path}", "--set", "name=" + "n" * 300]) == 2
    assert_one_error_line(capsys, "output.dir: cannot create", "File name too long")
    assert main(["run", "tiny", *timing, "--set", f"output.dir={tmp_path / 'new' / 'runs'}"]) == 0


def _disk_full_after(monkeypatch, rounds_written: int, only=None):
    """Every os.replace fails with ENOSPC (or only those of files named `only`) once the rounds table holds
    `rounds_written` rounds: a disk that fills mid-run."""
    import errno
    import os

    from hsplit_sim.experiment.rundir import RunWriter

    full = []
    write_rounds, replace = RunWriter.write_rounds, os.replace

    def rounds(self, rows):
        write_rounds(self, rows)
        if len(rows) == rounds_written:
            full.append(True)

    def failing(src, dst):
        if full and (only is None or Path(dst).name in only):
            raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        replace(src, dst)

    monkeypatch.setattr(RunWriter, "write_rounds", rounds)
    monkeypatch.setattr(os, "replace", failing)


def assert_run_ends_in_one_error_line(capsys, *fragments):
    """The progress lines of the finished rounds, then one error line."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert not any("Traceback" in line for line in lines)
    assert [line for line in lines if line.startswith("error: ")] == lines[-1:]
    for fragment in fragments:
        assert fragment in lines[-1]


def test_a_disk_that_fills_mid_run_ends_it_in_one_line_keeping_finished_rounds(capsys, monkeypatch, tmp_path):
    import pandas as pd

    _disk_full_after(monkeypatch, 2)
    timing = ["--timing-only", "--set", "training.rounds=4", "--set", f"output.dir={tmp_path}"]
    assert main(["run", "tiny", *timing]) == 1
    assert_run_ends_in_one_error_line(capsys, "cannot write", "No space left on device", "keeps rounds 0..1")
    (run_dir,) = tmp_path.iterdir()
    assert list(pd.read_csv(run_dir / "rounds.csv")["round"]) == [0, 1]
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "running"  # the disk took no more


def test_a_failed_write_is_recorded_in_the_summary_where_it_can_be(capsys, monkeypatch, tmp_path):
    import pandas as pd

    _disk_full_after(monkeypatch, 2, only={"rounds.parquet"})
    timing = ["--timing-only", "--set", "training.rounds=4", "--set", f"output.dir={tmp_path}"]
    assert main(["run", "tiny", *timing]) == 1
    assert_run_ends_in_one_error_line(capsys, "cannot write rounds.parquet", "keeps rounds 0..1")
    (run_dir,) = tmp_path.iterdir()
    assert list(pd.read_parquet(run_dir / "rounds.parquet")["round"]) == [0, 1]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and "No space left on device" in summary["error"]
    assert (run_dir / "events.parquet").is_file()  # the parts were still combined


def test_a_combined_table_that_cannot_be_appended_ends_the_run_in_one_line_keeping_its_parts(capsys, monkeypatch,
                                                                                             tmp_path):
    """The combined tables are appended on a background thread (rundir.RunWriter): a disk that fails there ends
    the run as any failed write does, and the per-round parts stay for analysis."""
    import errno

    from analysis.load import load_run
    from hsplit_sim.experiment.rundir import RunWriter

    def full(self, name, number, table):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(RunWriter, "_combine", full)
    timing = ["--timing-only", "--set", "training.rounds=3", "--set", f"output.dir={tmp_path}"]
    assert main(["run", "tiny", *timing]) == 1
    assert_run_ends_in_one_error_line(capsys, "cannot write", "No space left on device", "keeps rounds 0..")
    (run_dir,) = tmp_path.iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and "No space left on device" in summary["error"]
    assert not (run_dir / "events.parquet").exists() and (run_dir / ".events.parts").is_dir()
    run = load_run(run_dir)
    assert set(run.events["round"]) == set(run.rounds["round"])  # every round written has its events


def _checkpoint(folder: Path, weights: bool = True, **config) -> Path:
    """A checkpoint directory: config.json (a small GPT-2 unless overridden), optionally weight and tokenizer files."""
    folder.mkdir()
    base = {"model_type": "gpt2", "vocab_size": 1000, "n_positions": 128, "n_embd": 64, "n_layer": 4, "n_head": 4}
    (folder / "config.json").write_text(json.dumps({**base, **config}))
    if weights:
        (folder / "model.safetensors").write_bytes(b"")
        (folder / "tokenizer.json").write_text("{}")
    return folder


def _model_at(folder: Path) -> str:
    return "model={path: " + str(folder) + "}"


def test_validate_checks_what_the_workers_would_fail_on(capsys, tmp_path):
    """Each of these passed validate and failed a run 10-18 s later, after its workers started (#13)."""
    tiny = ["validate", "tiny", "--set", f"output.dir={tmp_path / 'runs'}"]
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    e2e = tmp_path / "e2e"
    e2e.mkdir()
    (e2e / "devset.csv").write_text("meaning,text\na,b\n")
    (tmp_path / "file").write_text("")
    key = tmp_path / "run.key_secret"  # a host other than loopback needs a key file (tests/test_auth.py)
    assert main(["keygen", str(key)]) == 0
    capsys.readouterr()
    cases = [
        ([_model_at(_checkpoint(tmp_path / "bare", weights=False))], "model.path: no weights in"),
        ([_model_at(broken)], "model.path: ", "config.json is not valid JSON"),
        ([_model_at(_checkpoint(tmp_path / "deep", n_layer=10**9))], "n_layer must be an integer in 1..1,000"),
        ([_model_at(_checkpoint(tmp_path / "huge", n_layer=1000, n_embd=16384, n_head=128))],
         "model: ", "GB in fp32 in each of 2 worker processes", "more than this machine's"),
        (["data={name: e2e, dir: " + str(e2e) + "}"], "data.dir: ", "needs the columns mr and ref"),
        (["runtime.torch_device=cuda"], "runtime.torch_device: cuda is not available: torch sees no CUDA device"),
        (["data.max_length=1"], "data.max_length: 1 leaves no prompt token", "at least 9"),
        (["clients.0.count=100"], "data.train_examples: 64 training examples cannot give each of the 101 clients one"),
        (["data.train_examples=null"], "data.train_examples: e2e-synthetic generates its examples"),
        (["runtime.transport=tcp", "runtime.host=no-such-host.invalid", f"runtime.key_file={key}"],
         "runtime.host: cannot resolve"),
        ([f"output.dir={tmp_path / 'file' / 'runs'}"], "output.dir: ", "exists and is not a directory"),
        (["training.rounds=10000000"], "training.rounds: 10,000,000 rounds x 3 clients = 30,000,000 client-rounds"),
        (["seed=4294967296"], "seed: "),
    ]
    for overrides, *fragments in cases:
        arguments = [part for override in overrides for part in ("--set", override)]
        assert main([*tiny, *arguments]) == 2, overrides
        assert_one_error_line(capsys, *fragments)
    assert main([*tiny, "--set", "training.rounds=10000000", "--set", "runtime.timing_only=true"]) == 0
    assert main([*tiny, "--set", _model_at(_checkpoint(tmp_path / "fine"))]) == 0


def test_files_that_would_exhaust_the_machine_are_refused_in_one_line(capsys, tmp_path):
    large = tmp_path / "large.yaml"
    large.write_text("name: x\n" + "# padding\n" * 120_000)
    aliases = tmp_path / "aliases.yaml"  # nine levels of ten references: 10^9 values once expanded
    lines = ["a0: &a0 [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 10)]
    aliases.write_text("\n".join(lines) + "\n")
    cycle = tmp_path / "cycle.yaml"
    cycle.write_text("name: &a [*a]\n")
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(f"base: {QUICKSTART}\ngrid:\n  seed: [{', '.join(map(str, range(20_000)))}]\n")
    for path, fragment in ((large, "bytes, above the cap of 1 MiB"), (aliases, "more than 100,000 values"),
                           (cycle, "nested more than 32 levels deep"), (sweep, "makes 20,000 points, above the cap of 10,000")):
        assert main(["validate", str(path)]) == 2
        assert_one_error_line(capsys, fragment)


def test_validate_takes_a_sweep_file(capsys):
    assert main(["validate", "whatif/bandwidth"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "ok"
    assert main(["validate", "whatif/bandwidth", "--set", "clients.0.count=0"]) == 2
    assert_one_error_line(capsys, "whatif/bandwidth.yaml: point", "clients.0.count")
