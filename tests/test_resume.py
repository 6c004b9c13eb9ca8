"""Resume of a single run: a run stopped at any point and resumed with `hsplit-sim run --resume` writes the same
tables as a run that never stopped; a run directory that cannot resume is refused in one line."""

import copy
import json
import math
import os
import signal
import subprocess
import sys
import time
import weakref
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from golden.cases import BASE, FLEET
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from hsplit_sim.algorithms.base import Planned
from hsplit_sim.algorithms.plans import ClientPlan
from hsplit_sim.cli import main
from hsplit_sim.experiment import checkpoint
from hsplit_sim.experiment.run import run_scenario, worker_init_args
from hsplit_sim.runtime.wire import (JSON_CHUNK_BYTES, MAX_HEADER_BYTES, PAGE_HEADER_BYTES, decode, encode,
                                     from_json_arrays, json_arrays, page)
from hsplit_sim.scenario import load_scenario, scenario_from_dict
from hsplit_sim.training.roles import make_role

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
TABLES = ("rounds", "events", "clients", "plans", "importance", "participation", "energy")
WALL_CLOCK = {"rounds": ["wall_time_s"]}
# Timing-only, with every effect that carries state across rounds or decides who trains: a shared medium, jitter,
# clients going offline, over-committed selection (late clients), dropouts (catching up on missed rounds).
SYSTEM = FLEET + ["training.rounds=5", "system.media=[{name: ap, up_mbps: 50, down_mbps: 100}]",
                  "clients.0.medium=ap", "system.jitter={compute_sigma: 0.3, bandwidth_sigma: 0.5}",
                  "system.availability={mean_online_s: 2.0, mean_offline_s: 0.5}",
                  "system.selection={clients_per_round: 2, over_commit: 0.5}", "system.dropout=0.1"]
# Killed after a round's tables are on disk but before its checkpoint: the worst moment.
KILL_BEFORE_CHECKPOINT = """
import os, sys
from hsplit_sim.experiment import run
save = run._Checkpoints.save
def save_or_die(self, round_index):
    if round_index == int(sys.argv[2]):
        os._exit(9)
    save(self, round_index)
run._Checkpoints.save = save_or_die
from hsplit_sim.cli import main
main(["run", sys.argv[1]])
"""


def scenario_file(tmp_path: Path, name: str, overrides: list[str]) -> Path:
    data = copy.deepcopy(BASE)
    scenario = scenario_from_dict(data, [*overrides, f"output.dir={tmp_path / name}"])
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(scenario.model_dump(mode="json", exclude_none=True)))
    return path


def run_dir_of(folder: Path) -> Path:
    found = [p for p in folder.iterdir() if p.is_dir()]
    assert len(found) == 1, found
    return found[0]


def assert_same_tables(expected: Path, produced: Path) -> None:
    for table in TABLES:
        assert (expected / f"{table}.parquet").is_file() == (produced / f"{table}.parquet").is_file(), table
        if not (expected / f"{table}.parquet").is_file():
            continue
        wall = WALL_CLOCK.get(table, [])
        pd.testing.assert_frame_equal(pd.read_parquet(produced / f"{table}.parquet").drop(columns=wall),
                                      pd.read_parquet(expected / f"{table}.parquet").drop(columns=wall),
                                      check_exact=True, obj=table)


def resume(run_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hsplit_sim.cli", "run", "--resume", str(run_dir)], check=False,
                          cwd=REPO, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"),
                          timeout=600)


def checkpoint_round(run_dir: Path) -> int | None:
    try:
        with safe_open(run_dir / checkpoint.FILE, framework="np") as stored:
            return json.loads(stored.metadata()["checkpoint"])["round"]
    except (OSError, ValueError):
        return None


def test_round_state_survives_the_checkpoint_codec():
    plan = ClientPlan(2, {0: {"q": 4}, 1: {"v": 2}}, {2: {"q": 8}}, False)
    equal_plan = ClientPlan(2, {0: {"q": 4}, 1: {"v": 2}}, {2: {"q": 8}}, False)
    planned = Planned(7, {"shapes": {(0, "q"): (64, 8, 64)}, "broadcast bytes": {0: 10, 3: 12}}, ((64, 8, 64),))
    equal_planned = Planned(7, {"shapes": {(0, "q"): (64, 8, 64)}, "broadcast bytes": {0: 10, 3: 12}}, ((64, 8, 64),))
    missed = {3: [planned], 1: [planned, planned], 2: [equal_planned]}
    state = {"plans": [plan, plan, equal_plan], "_missed": missed,
             "importance": {"0.q": float("nan"), "1.v": 0.1 + 0.2},
             "held": [np.int64(2), 3], "rows": [{"round": 1, "__odd": (1, 2)}],
             "global_adapter": {"w.lora_A.weight": np.arange(6, dtype=np.float32).reshape(2, 3) / 7},
             "layouts": {(None, "server"): ({3: {"q": 4}}, 2), (0, "c0"): ({0: {"q": 2}}, 2)}}
    written = json.dumps(checkpoint.encode(state))
    # each once, then by number; a frozen plan equal to one written is written as it, a mutable Planned is not
    assert written.count('"__ClientPlan"') == 1 and written.count('"__Planned"') == 2
    back = checkpoint.decode(json.loads(written))
    assert back["plans"] == [plan, plan, plan] and isinstance(back["plans"][0], ClientPlan)
    assert back["plans"][0] is back["plans"][1] is back["plans"][2]
    assert back["_missed"] == missed and list(back["_missed"]) == [3, 1, 2]
    assert back["_missed"][2][0] is not back["_missed"][3][0]
    assert math.isnan(back["importance"]["0.q"]) and back["importance"]["1.v"] == 0.1 + 0.2
    assert back["held"] == [2, 3] and type(back["held"][0]) is int
    assert back["rows"] == [{"round": 1, "__odd": (1, 2)}] and back["layouts"] == state["layouts"]
    array = back["global_adapter"]["w.lora_A.weight"]
    assert array.dtype == np.float32 and np.array_equal(array, state["global_adapter"]["w.lora_A.weight"])


def tiny_role():
    scenario = load_scenario(REPO / "scenarios" / "tiny.yaml", ["model.name=tiny-llama", "data.train_examples=16"])
    return make_role(worker_init_args(scenario, "server", 2))


def configure(role, name: str, rank: int, layers=(0, 1)) -> None:
    role.configure(None, {"adapter": name, "scaling": 2.0, "lr": 1e-2,
                          "ranks": [[layer, "self_attn.q_proj", rank] for layer in layers]}, {})


def dumped(role, merged_values: bool = True) -> tuple[dict, dict, list[list[bytes]]]:
    """A role's dump_state page by page over the wire, as RealBackend.state asks for it: (its JSON state, its
    tensors, each page's frames)."""
    arrays, pages, start = {}, [], 0
    while start is not None:
        result, tensors = role.dump_state(None, {"merged_values": merged_values, "start": start}, {})
        pages.append([bytes(frame) for frame in encode({"id": 1, "ok": True, "result": result}, tensors)])
        message = decode(pages[-1])
        arrays.update(message.tensors)
        start = message.header["result"]["next"]
    return *from_json_arrays(arrays), pages


def loaded(role, state: dict, tensors: dict) -> None:
    """A dump into a role with load_state page by page over the wire, as RealBackend.restore sends it."""
    arrays, start = {**json_arrays(state), **tensors}, 0
    while start is not None:
        part, following = page(arrays, start)
        args = {"start": start, "last": following is None}
        message = decode([bytes(frame) for frame in encode({"op": "load_state", "id": 1, "args": args}, part)])
        role.load_state(None, message.header["args"], message.tensors)
        start = following


def step(role, names, batch: int) -> None:
    for name in names:
        role.full_step(None, {"adapter": name}, {"batch": np.arange(2) + batch})


def test_a_worker_state_loads_into_a_fresh_worker_and_trains_on_identically():
    """Adapters re-made along the way, Adam moments, a merge into the base weights: a second worker that loads
    the first's dump over adapters of its own holds the same and trains on to the same values."""
    first = tiny_role()
    configure(first, "gone", 2)
    configure(first, "x", 4)
    configure(first, "y", 2, layers=(1,))
    configure(first, "gone", 2, layers=(1,))
    step(first, ["x", "y"], 0)
    step(first, ["x", "y"], 2)
    path = "base_model.model.model.layers.0.self_attn.q_proj"
    rng = np.random.default_rng(0)
    first.merge(None, {}, {f"{path}.B": rng.standard_normal((128, 2), dtype=np.float32),
                           f"{path}.A": rng.standard_normal((2, 128), dtype=np.float32)})
    state, tensors, _ = dumped(first)
    assert [a["adapter"] for a in state["adapters"]] == ["x", "y", "gone"] and state["merged"] == [path]
    paths_only = dumped(first, merged_values=False)
    assert paths_only[0]["merged"] == [path] and set(tensors) - set(paths_only[1]) == {f"merged.{path}"}
    assert any(key.startswith("optimizer.x.") and key.endswith("exp_avg_sq") for key in tensors)

    second = tiny_role()
    configure(second, "other", 8)
    configure(second, "x", 8)
    loaded(second, state, tensors)
    again, again_tensors, _ = dumped(second)
    assert json.dumps(again, sort_keys=True) == json.dumps(state, sort_keys=True)
    assert set(again_tensors) == set(tensors)
    assert all(np.array_equal(again_tensors[key], tensors[key]) for key in tensors)
    assert list(second.adapters) == ["x", "y", "gone"]

    for role in (first, second):
        step(role, ["x", "y"], 4)
    after = [dumped(role)[1] for role in (first, second)]
    assert all(np.array_equal(after[0][key], after[1][key]) for key in after[0])
    losses = [role.evaluate(None, {"adapters": ["x", "y"], "batch_size": 4}, {})[0]["loss"] for role in (first, second)]
    assert losses[0] == losses[1]


def test_full_fine_tuning_state_loads_into_a_fresh_worker():
    first = tiny_role()
    first.setup_full(None, {"lr": 1e-3}, {})
    first.full_step(None, {}, {"batch": np.arange(2)})
    state, tensors, _ = dumped(first)
    second = tiny_role()
    loaded(second, state, tensors)
    for role in (first, second):
        role.full_step(None, {}, {"batch": np.arange(2) + 2})
    after = [dict(role.model.state_dict()) for role in (first, second)]
    assert all(after[0][key].equal(after[1][key]) for key in after[0])
    assert not all(after[0][key].equal(tiny_role().model.state_dict()[key]) for key in after[0])  # it trained


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["float32", "float64", "float16", "int64", "int32", "uint8", "bool"]),
                          st.lists(st.integers(0, 4), max_size=3)), max_size=8))
def test_a_checkpoint_written_array_by_array_reads_back_the_same(tmp_path_factory, arrays):
    """save_checkpoint writes each worker's arrays to disk as put() hands them over, keeping none (a thousand
    clients' adapters and moments are not held all at once), and the file is safetensors that load_checkpoint and
    safetensors itself read back: every dtype and shape a worker's state may hold, 0-d and empty ones too."""
    from hsplit_sim.experiment.rundir import RunWriter

    rng = np.random.default_rng(0)
    made = {f"t{i}": np.array(rng.standard_normal(shape) * 100).astype(dtype)
            for i, (dtype, shape) in enumerate(arrays)}
    released = []

    def worker_states(put):
        for i, (name, array) in enumerate(made.items()):
            handed = array.copy() if i % 2 else array.T  # a transposed view is not contiguous
            put("server" if i % 3 else "client-0", name, handed)
            released.append(weakref.ref(handed))
            del handed
            assert all(ref() is None for ref in released)
        return {"server": {"adapters": ["a"]}, "client-0": {"adapters": []}}

    writer = RunWriter(tmp_path_factory.mktemp("run"))
    checkpoint.save_checkpoint(writer, 3, {"rows": [1]}, worker_states)
    assert sorted(p.name for p in writer.path.iterdir()) == [checkpoint.FILE]  # no scratch file left
    run, workers = checkpoint.load_checkpoint(writer.path)
    assert run["round"] == 3 and run["rows"] == [1]
    assert {name: header for name, (header, _) in workers.items()} == {"server": {"adapters": ["a"]},
                                                                        "client-0": {"adapters": []}}
    loaded = {**workers["server"][1], **workers["client-0"][1]}
    assert loaded.keys() == made.keys()
    for i, (name, array) in enumerate(made.items()):
        expected = array if i % 2 else array.T
        assert loaded[name].dtype == expected.dtype and np.array_equal(loaded[name], expected)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 40), max_size=12), st.integers(1, 100))
def test_pages_hold_at_most_their_data_budget_and_together_every_array_once(sizes, data_budget):
    """A page is one array, or as many as fit in the data budget: the receiver of a checkpoint's pages holds about
    one page of data at a time, and the pages, in order, are the arrays."""
    arrays = {f"t{i}": np.zeros(n, dtype=np.uint8) for i, n in enumerate(sizes)}
    pages, start = [], 0
    while arrays and start is not None:
        part, start = page(arrays, start, data_budget=data_budget)
        pages.append(part)
    assert [name for part in pages for name in part] == list(arrays)
    for part in pages:
        assert len(part) == 1 or sum(a.nbytes for a in part.values()) <= data_budget
    for before, after in zip(pages, pages[1:]):  # no page could have taken the next one's first array
        assert sum(a.nbytes for a in before.values()) + next(iter(after.values())).nbytes > data_budget


def test_a_state_of_many_adapters_goes_in_pages_of_bounded_headers():
    """So many adapters that one header could not list their tensors (a thousand tiny clients' worker): every page's
    header stays within the page budget, every frame within the JSON chunk's, and a fresh worker that loads the
    pages holds the same adapters, optimizer states and random state."""
    first = tiny_role()
    names = [f"c{k}" for k in range(500)]
    for name in names:
        configure(first, name, 1, layers=range(4))
        for param in first.adapters[name].params:  # a step on random gradients: Adam moments, without a batch's cost
            param.grad = torch.randn_like(param)
        first.optimizers[name].step()
    rng = torch.get_rng_state()
    state, tensors, pages = dumped(first)
    listed = [len(json.dumps(json.loads(frames[0])["tensors"], separators=(",", ":"))) for frames in pages]
    assert sum(listed) > MAX_HEADER_BYTES and len(pages) >= 3
    assert all(entries - 2 <= PAGE_HEADER_BYTES for entries in listed)  # less the list's brackets
    assert all(len(frame) <= JSON_CHUNK_BYTES for frames in pages for frame in frames[1:])

    second = tiny_role()
    configure(second, "other", 8)
    assert not torch.get_rng_state().equal(rng)
    loaded(second, state, tensors)
    assert torch.get_rng_state().equal(rng) and list(second.adapters) == names
    for name in names:
        values = [role.adapters[name].state() for role in (first, second)]
        assert all(values[0][key].equal(values[1][key]) for key in values[0])
        saved = [role.optimizers[name].state_dict() for role in (first, second)]
        assert json.dumps(saved[0]["param_groups"]) == json.dumps(saved[1]["param_groups"])  # betas: a list after JSON
        assert saved[0]["state"].keys() == saved[1]["state"].keys() == set(range(8))  # A and B of 4 layers
        assert all(moment.equal(saved[1]["state"][index][key])
                   for index, moments in saved[0]["state"].items() for key, moment in moments.items())


@pytest.mark.parametrize("algorithm, every, killed_at", [("hsplitlora", 1, 3), ("fedlora", 1, 3), ("fedlora", 2, 4)])
def test_a_timing_only_run_killed_before_a_checkpoint_resumes_to_the_same_tables(algorithm, every, killed_at,
                                                                                  tmp_path):
    """Killed after round `killed_at`'s tables; with a checkpoint every `every` rounds the last one is round 2's,
    so the resume redoes the rounds after it."""
    overrides = [*SYSTEM, f"algorithm.name={algorithm}", f"output.checkpoint_every={every}"]
    expected = run_scenario(scenario_from_dict(copy.deepcopy(BASE), [*overrides, f"output.dir={tmp_path / 'ref'}"]),
                            progress=False)
    outcomes = set(pd.read_parquet(expected / "participation.parquet")["outcome"])
    assert {"reported", "late", "not selected", "dropped"} <= outcomes, outcomes  # the effects do happen
    path = scenario_file(tmp_path, "cut", overrides)
    killed = subprocess.run([sys.executable, "-c", KILL_BEFORE_CHECKPOINT, str(path), str(killed_at)], check=False,
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert killed.returncode == 9, killed.stderr
    run_dir = run_dir_of(tmp_path / "cut")
    assert checkpoint_round(run_dir) == 2
    assert len(pd.read_parquet(run_dir / "rounds.parquet")) == killed_at + 1  # on disk past the checkpoint
    resumed = resume(run_dir)
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.strip().splitlines()[-1] == str(run_dir)
    assert_same_tables(expected, run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["resumed"][0]["from_round"] == 2
    assert summary["events"] == json.loads((expected / "summary.json").read_text())["events"]
    assert not (run_dir / checkpoint.FILE).exists()


def test_without_checkpoints_a_killed_run_cannot_resume(tmp_path):
    path = scenario_file(tmp_path, "cut", [*FLEET, "output.checkpoint_every=0"])
    killed = subprocess.run([sys.executable, "-c", KILL_BEFORE_CHECKPOINT, str(path), "2"], check=False, cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == 9, killed.stderr
    run_dir = run_dir_of(tmp_path / "cut")
    assert len(pd.read_parquet(run_dir / "rounds.parquet")) == 3 and not (run_dir / checkpoint.FILE).exists()
    refused = resume(run_dir)
    assert refused.returncode == 2 and "no checkpoint" in refused.stderr


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
        except (OSError, ValueError):
            continue
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_trained_run_whose_coordinator_is_killed_resumes_to_the_same_tables(tmp_path):
    """HSplitLoRA on real workers (merges into the base weights, plans that change with importance), the
    coordinator killed with SIGKILL once round 1's checkpoint is on disk."""
    overrides = ["algorithm.name=hsplitlora", "training.rounds=3"]
    expected = run_scenario(scenario_from_dict(copy.deepcopy(BASE), [*overrides, f"output.dir={tmp_path / 'ref'}"]),
                            progress=False)
    assert pd.read_parquet(expected / "plans.parquet")["round"].max() > 1  # plans do change on the way
    path = scenario_file(tmp_path, "cut", overrides)
    process = subprocess.Popen([sys.executable, "-m", "hsplit_sim.cli", "run", str(path)], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                               env=dict(os.environ, HF_HUB_OFFLINE="1", TMPDIR=str(tmp_path)))
    workers: list[int] = []
    try:
        deadline, run_dir = time.monotonic() + 300, None
        while time.monotonic() < deadline and process.poll() is None:
            found = list((tmp_path / "cut").glob("*/summary.json"))
            if found and (checkpoint_round(found[0].parent) or 0) >= 1:
                run_dir = found[0].parent
                break
            time.sleep(0.05)
        assert run_dir is not None and process.poll() is None, "the run did not reach round 1's checkpoint alive"
        workers = children(process.pid)
        process.send_signal(signal.SIGKILL)
        process.wait()
        killed_after = checkpoint_round(run_dir)
        assert killed_after < 3
        deadline = time.monotonic() + 30
        while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [pid for pid in workers if alive(pid)], "workers outlived their coordinator"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        for pid in workers:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "running"
    resumed = resume(run_dir)
    assert resumed.returncode == 0, resumed.stderr
    assert "Traceback" not in resumed.stderr
    assert_same_tables(expected, run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["resumed"][0]["from_round"] == killed_after


def refused(capsys, *argv: str) -> str:
    assert main(["run", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --resume"), err
    return err[0]


@pytest.fixture
def stopped_run(tmp_path) -> Path:
    """A timing-only run killed before round 2's checkpoint (so with round 1's)."""
    path = scenario_file(tmp_path, "cut", FLEET)
    killed = subprocess.run([sys.executable, "-c", KILL_BEFORE_CHECKPOINT, str(path), "2"], check=False, cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == 9, killed.stderr
    return run_dir_of(tmp_path / "cut")


def test_resume_refuses_what_it_cannot_continue(stopped_run, tmp_path, capsys, monkeypatch):
    assert "not a run directory" in refused(capsys, "--resume", str(tmp_path))
    assert "give no FILE" in refused(capsys, "tiny", "--resume", str(stopped_run))

    summary_file = stopped_run / "summary.json"
    summary = json.loads(summary_file.read_text())
    summary_file.write_text(json.dumps(dict(summary, coordinator={**summary["coordinator"], "pid": os.getpid(),
                                                                    "start_ticks": None})))
    assert "still running" in refused(capsys, "--resume", str(stopped_run))
    summary_file.write_text(json.dumps(summary))

    monkeypatch.setattr("hsplit_sim.experiment.trajectory.KEY_VERSION", -1)
    assert "training key" in refused(capsys, "--resume", str(stopped_run))
    monkeypatch.undo()

    resolved = stopped_run / "scenario.resolved.yaml"
    original = resolved.read_text()
    resolved.write_text(original.replace("seed: 5", "seed: 6"))
    assert "changed since the checkpoint" in refused(capsys, "--resume", str(stopped_run))
    resolved.write_text(original)

    kept = (stopped_run / checkpoint.FILE).read_bytes()
    (stopped_run / checkpoint.FILE).unlink()
    assert "no checkpoint" in refused(capsys, "--resume", str(stopped_run))
    (stopped_run / checkpoint.FILE).write_bytes(kept[:len(kept) // 2])
    assert "cannot be read" in refused(capsys, "--resume", str(stopped_run))
    (stopped_run / checkpoint.FILE).write_bytes(kept)

    assert main(["run", "--resume", str(stopped_run)]) == 0
    capsys.readouterr()
    assert "complete" in refused(capsys, "--resume", str(stopped_run))


def test_the_frame_limit_admits_the_checkpoints_largest_weight():
    """A checkpoint sends weights whole (one frame each): a merged projection, or under full fine-tuning the
    embedding and its Adam moments."""
    from hsplit_sim import costs
    from hsplit_sim.experiment.run import frame_limit
    from hsplit_sim.scenario import model_hf_config

    for algorithm, largest in (("flora", lambda spec: spec.d_ff * spec.d_model),
                               ("ft", lambda spec: spec.vocab_size * spec.d_model)):
        scenario = scenario_from_dict(copy.deepcopy(BASE), ["model.name=smollm2-135m", f"algorithm.name={algorithm}"])
        spec = costs.ModelSpec.from_hf_config(model_hf_config(scenario))
        assert frame_limit(scenario, spec, 4) >= largest(spec) * 4 > costs.largest_frame_bytes(
            spec, 2, 32, 8, 4, 64), algorithm
