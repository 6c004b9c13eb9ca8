"""The whole path on tiny models: a scenario in, a run directory out, with the time model checked event by event."""

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from durations import seconds, transfer
from hsplit_sim import costs
from hsplit_sim.errors import ScenarioError
from hsplit_sim.experiment.preflight import preflight
from hsplit_sim.experiment.run import run_scenario
from hsplit_sim.scenario import expanded_clients, model_hf_config, resolve_device, scenario_from_dict

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
ROUNDS, LOCAL_STEPS, BATCH, SEQ, RANK = 2, 2, 2, 32, 4

# Three identical clients (they reach the server together, so they queue) and one slow one.
BASE = {
    "name": "t",
    "seed": 3,
    "model": {"name": "tiny-gpt2"},
    "data": {"name": "e2e-synthetic", "max_length": SEQ, "train_examples": 48, "eval_examples": 8},
    "algorithm": {"name": "splitlora", "rank": RANK, "alpha": 8, "targets": ["q", "v"], "split_layer": 1},
    "training": {"rounds": ROUNDS, "local_steps": LOCAL_STEPS, "batch_size": BATCH, "lr": 1e-3},
    "server": {"device": "rtx-3090", "accelerators": 1},
    "clients": [
        {"count": 3, "device": "jetson-agx-orin", "link": "wifi-6"},
        {"count": 1, "device": "raspberry-pi-5", "link": "lte"},
    ],
    "runtime": {"client_workers": 1, "torch_device": "cpu"},
}

# Module names written out here rather than taken from costs.uniform_ranks, so a mapping slip shows.
MODULES = {
    "gpt2": {"q": "attn.c_attn", "v": "attn.c_attn", "o": "attn.c_proj"},
    "llama": {"q": "self_attn.q_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj"},
}



def scenario(tmp_path: Path, *overrides: str):
    return scenario_from_dict(BASE, [f"output.dir={tmp_path}", *overrides])


def read(run_dir: Path) -> dict[str, pd.DataFrame]:
    return {name: pd.read_parquet(run_dir / f"{name}.parquet") for name in ("rounds", "events", "clients")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Each scenario runs once for the whole module: a run costs seconds of worker start-up."""
    cache = {}

    def get(key: str, overrides: tuple[str, ...] = ()) -> Path:
        if key not in cache:
            out = tmp_path_factory.mktemp(key)
            cache[key] = run_scenario(scenario(out, *overrides), progress=False)
        return cache[key]

    return get


SPLIT = ("split", ())
SPLIT_AGAIN = ("split-again", ())
LLAMA = ("llama", ("model.name=tiny-llama", "algorithm.split_layer=2", "algorithm.targets=[q, v, o]",
                   "clients=[{count: 3, device: jetson-agx-orin, link: wifi-6}]", "server.accelerators=3",
                   "algorithm.server_adapters=per_client"))
CENLORA = ("cenlora", ("algorithm.name=cenlora",))


def test_run_directory_contract(runs):
    run_dir = runs(*SPLIT)
    for name in ("scenario.resolved.yaml", "rounds.parquet", "rounds.csv", "events.parquet", "clients.parquet",
                 "resources.parquet", "summary.json", "log.txt"):
        assert (run_dir / name).is_file(), name
        assert (run_dir / name).stat().st_size > 0, name
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["error"] is None
    assert summary["rounds_completed"] == ROUNDS and summary["n_clients"] == 4
    resolved = yaml.safe_load((run_dir / "scenario.resolved.yaml").read_text())
    assert resolved["training"]["rounds"] == ROUNDS and resolved["seed"] == 3

    tables = read(run_dir)
    rounds = tables["rounds"]
    assert rounds["round"].tolist() == list(range(ROUNDS + 1))
    assert rounds["eval_ppl"].map(math.isfinite).all()
    assert math.isnan(rounds["train_loss"][0]) and rounds["train_loss"][1:].map(math.isfinite).all()
    assert rounds["sim_time_s"].is_monotonic_increasing and rounds["sim_time_s"][0] == 0
    csv = pd.read_csv(run_dir / "rounds.csv")
    assert csv["round"].tolist() == rounds["round"].tolist()
    assert summary["final_eval_ppl"] == pytest.approx(rounds["eval_ppl"].iloc[-1])

    events = tables["events"]
    assert {"round", "client", "kind", "resource", "start_s", "end_s", "bytes", "flops"} <= set(events.columns)
    per_client = LOCAL_STEPS * ROUNDS
    counts = events.groupby(["kind", "client"]).size()
    for kind in ("client_fwd", "upload", "server_queue", "server_step", "download", "client_bwd"):
        assert all(counts[kind, k] == per_client for k in range(4)), kind
    for kind in ("adapter_upload", "broadcast"):
        assert all(counts[kind, k] == ROUNDS for k in range(4)), kind
    assert counts["aggregate", -1] == ROUNDS and counts["eval", -1] == ROUNDS + 1
    assert set(tables["clients"]["client"]) == set(range(4))

    # Every real operation's host seconds, joinable to its event by (round, client, kind, step).
    host = pd.read_parquet(run_dir / "host_times.parquet")
    assert (host["host_s"] > 0).all()
    assert host.groupby(["kind", "client"]).size().to_dict() == {
        (kind, k): per_client for kind in ("client_bwd", "client_fwd", "server_step") for k in range(4)}
    steps = host.groupby(["round", "client", "kind"])["step"].agg(list)
    assert steps.map(lambda numbers: numbers == list(range(LOCAL_STEPS))).all()


def test_two_runs_of_one_seed_are_identical(runs):
    first, second = read(runs(*SPLIT)), read(runs(*SPLIT_AGAIN))
    pd.testing.assert_frame_equal(first["rounds"].drop(columns="wall_time_s"),
                                  second["rounds"].drop(columns="wall_time_s"), check_exact=True)
    pd.testing.assert_frame_equal(first["events"], second["events"], check_exact=True)
    pd.testing.assert_frame_equal(first["clients"], second["clients"], check_exact=True)


@pytest.mark.parametrize("algorithm", ["fedlora", "splitlora"])
def test_tables_are_the_same_whatever_the_workers(tmp_path, monkeypatch, algorithm):
    """Clients dealt to two client workers (whose federated steps then run at once: WorkerConnection.defer) train
    what one worker does: rounds (but wall time), events and clients tables equal. The workers' torch threads are
    fixed: another thread count may sum in another order (seen: the last digits of a loss)."""
    monkeypatch.setenv("HSPLIT_SIM_TORCH_THREADS", "1")
    one, two = (read(run_scenario(scenario(tmp_path / str(n), f"algorithm.name={algorithm}",
                                           f"runtime.client_workers={n}"), progress=False)) for n in (1, 2))
    assert two["rounds"]["train_loss"].iloc[1:].notna().all()
    pd.testing.assert_frame_equal(one["rounds"].drop(columns="wall_time_s"), two["rounds"].drop(columns="wall_time_s"),
                                  check_exact=True)
    pd.testing.assert_frame_equal(one["events"], two["events"], check_exact=True)
    pd.testing.assert_frame_equal(one["clients"], two["clients"], check_exact=True)


@pytest.mark.parametrize("algorithm", ["splitlora", "hsplitlora"])
def test_overlapping_a_split_iterations_two_sides_changes_no_table(tmp_path, monkeypatch, algorithm):
    """Where the server and client workers have cores of their own, the server steps one client while the client
    worker computes another's backward and next forward (backends/real.py: _RealSplitWork): each worker does the
    same requests in the same order, so the tables are those of one request at a time."""
    from hsplit_sim.backends.real import RealBackend
    from hsplit_sim.runtime import launcher

    monkeypatch.setenv("HSPLIT_SIM_TORCH_THREADS", "1")
    runs, overlaps = [], []
    made = RealBackend.__init__
    monkeypatch.setattr(RealBackend, "__init__", lambda self, *args, **kwargs: (
        overlaps.append(kwargs["overlap_split"]), made(self, *args, **kwargs))[1])
    for fits in (True, False):
        monkeypatch.setattr(launcher, "_threads_fit", lambda workers, threads, fits=fits: fits)
        runs.append(read(run_scenario(scenario(tmp_path / str(fits), f"algorithm.name={algorithm}"),
                                      progress=False)))
    overlapped, one_at_a_time = runs
    assert overlaps == [True, False]
    assert overlapped["rounds"]["train_loss"].iloc[1:].notna().all()
    pd.testing.assert_frame_equal(overlapped["rounds"].drop(columns="wall_time_s"),
                                  one_at_a_time["rounds"].drop(columns="wall_time_s"), check_exact=True)
    for table in ("events", "clients"):
        pd.testing.assert_frame_equal(overlapped[table], one_at_a_time[table], check_exact=True)


def expected_costs(overrides: tuple[str, ...]):
    """Per-kind FLOPs and bytes recomputed from the cost model and the scenario."""
    sc = scenario(Path("unused"), *overrides)
    spec = costs.ModelSpec.from_hf_config(model_hf_config(sc))
    algo, b, L = sc.algorithm, sc.training.batch_size, sc.data.max_length
    modules = sorted({MODULES[spec.family][t] for t in algo.targets})

    def ranks(layers):
        return {layer: {m: algo.rank for m in modules} for layer in layers}

    client_ranks, server_ranks = ranks(range(algo.split_layer)), ranks(range(algo.split_layer, spec.n_layers))
    s, n = algo.split_layer, spec.n_layers
    flops = {
        "client_fwd": costs.forward_flops(spec, 0, s, b, L, client_ranks, head=False),
        "client_bwd": costs.backward_flops(spec, 0, s, b, L, client_ranks, head=False, input_requires_grad=False),
        "server_step": costs.forward_flops(spec, s, n, b, L, server_ranks, head=True)
        + costs.backward_flops(spec, s, n, b, L, server_ranks, head=True, input_requires_grad=True),
        "central_step": costs.forward_flops(spec, 0, n, b, L, ranks(range(n)), head=True)
        + costs.backward_flops(spec, 0, n, b, L, ranks(range(n)), head=True, input_requires_grad=False),
    }
    nbytes = {
        "upload": costs.smashed_bytes(spec, b, L),
        "download": costs.gradient_bytes(spec, b, L),
        "adapter_upload": costs.adapter_bytes(spec, client_ranks),
        "broadcast": costs.adapter_bytes(spec, client_ranks),
    }
    averaged = costs.adapter_params(spec, client_ranks)
    if getattr(algo, "server_adapters", "shared") == "per_client":  # each client's server side is averaged too
        averaged += costs.adapter_params(spec, server_ranks)
    flops["aggregate"] = 2 * len(expanded_clients(sc)) * averaged
    decay = sc.training.weight_decay
    client, server = costs.segment_work(spec, 0, s, b, L, client_ranks, False, False), \
        costs.segment_work(spec, s, n, b, L, server_ranks, True, True)
    central = costs.segment_work(spec, 0, n, b, L, ranks(range(n)), True, False)
    work = {
        "client_fwd": client[0],
        "client_bwd": client[1] + costs.optimizer_work(spec, client_ranks, decay),
        "server_step": server[0] + server[1] + costs.optimizer_work(spec, server_ranks, decay),
        "central_step": central[0] + central[1] + costs.optimizer_work(spec, ranks(range(n)), decay),
        "aggregate": costs.Work.compute_bound(flops["aggregate"]),
    }
    assert {kind: w.flops for kind, w in work.items()} == flops
    return sc, flops, work, nbytes


@pytest.mark.parametrize("which", [SPLIT, LLAMA, CENLORA], ids=["gpt2", "llama", "cenlora"])
def test_every_duration_comes_from_the_cost_model(runs, which):
    run_dir = runs(*which)
    sc, flops, work, nbytes = expected_costs(which[1])
    clients = expanded_clients(sc)
    server = resolve_device(sc.server.device)
    events = read(run_dir)["events"]
    checked = 0
    for e in events.itertuples():
        duration = e.end_s - e.start_s
        if e.kind in ("client_fwd", "client_bwd", "server_step", "central_step", "aggregate"):
            device = clients[e.client].device if e.kind in ("client_fwd", "client_bwd") else server
            assert e.flops == flops[e.kind], e
            assert duration == pytest.approx(seconds(work[e.kind], device), rel=1e-9), e
            assert e.bytes == 0
            checked += 1
        elif e.kind in nbytes:
            link = clients[e.client].link
            rate = link.up_mbps if e.kind in ("upload", "adapter_upload") else link.down_mbps
            assert e.bytes == nbytes[e.kind], e
            assert duration == pytest.approx(transfer(nbytes[e.kind], rate, link.latency_ms),
                                             rel=1e-9), e
            checked += 1
        elif e.kind == "data_upload":  # bytes checked in test_cenlora_runs_end_to_end
            link = clients[e.client].link
            assert duration == pytest.approx(transfer(e.bytes, link.up_mbps, link.latency_ms), rel=1e-9), e
            checked += 1
        else:
            assert e.kind in ("server_queue", "eval"), e.kind
        assert duration >= 0
    assert checked > 0

    rounds = read(run_dir)["rounds"]
    if sc.algorithm.name == "splitlora":
        n, steps = len(clients), sc.training.local_steps
        per_round_up = n * steps * nbytes["upload"] + n * nbytes["adapter_upload"]
        per_round_down = n * steps * nbytes["download"] + n * nbytes["broadcast"]
        assert rounds["bytes_up"].tolist() == [r * per_round_up for r in rounds["round"]]
        assert rounds["bytes_down"].tolist() == [r * per_round_down for r in rounds["round"]]
        # Each client's own work is a strict chain: fwd, upload, queue, server, download, bwd, ... in order.
        for k in range(n):
            own = events[(events["client"] == k) & (events["round"] == 1)].sort_values(["start_s", "end_s"])
            assert (own["start_s"].to_numpy()[1:] >= own["end_s"].to_numpy()[:-1] - 1e-12).all()
    else:  # centralised: the pooled data goes up once, in round 1; nothing comes down
        data = int(events[events["kind"] == "data_upload"]["bytes"].sum())
        assert data > 0 and rounds["bytes_up"].tolist() == [0] + [data] * (len(rounds) - 1)
        assert rounds["bytes_down"].eq(0).all()


def intervals(events: pd.DataFrame, kind: str) -> list[tuple[float, float]]:
    rows = events[events["kind"] == kind].sort_values(["start_s", "end_s"])
    return list(zip(rows["start_s"], rows["end_s"]))


def overlaps(spans: list[tuple[float, float]]) -> int:
    return sum(1 for (_, end), (start, _) in zip(spans, spans[1:]) if start < end)


def test_one_accelerator_makes_clients_queue(runs):
    events = read(runs(*SPLIT))["events"]
    queue = events[events["kind"] == "server_queue"]
    waits = queue["end_s"] - queue["start_s"]
    assert (waits > 0).sum() >= 2  # three identical clients arrive together: two of them wait
    steps = intervals(events, "server_step")
    assert len(steps) == 4 * ROUNDS * LOCAL_STEPS
    assert overlaps(steps) == 0


def test_one_accelerator_per_client_runs_separate_server_adapters_at_once(runs, tmp_path):
    """Also: tiny-llama, split after block 2, runs end to end. A shared server-side adapter is updated by one
    step at a time, so there its steps queue whatever the accelerators."""
    run_dir = runs(*LLAMA)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["n_clients"] == 3
    tables = read(run_dir)
    assert tables["rounds"]["eval_ppl"].map(math.isfinite).all()
    assert set(tables["clients"]["split_layer"]) == {2}
    events = tables["events"]
    queue = events[events["kind"] == "server_queue"]
    assert ((queue["end_s"] - queue["start_s"]) == 0).all()
    assert overlaps(intervals(events, "server_step")) > 0

    shared = run_scenario(scenario(tmp_path, *LLAMA[1], "algorithm.server_adapters=shared",
                                   "runtime.timing_only=true"), progress=False)
    events = read(shared)["events"]
    queue = events[events["kind"] == "server_queue"]
    assert overlaps(intervals(events, "server_step")) == 0 and (queue["end_s"] > queue["start_s"]).any()


def test_cenlora_runs_end_to_end(runs):
    run_dir = runs(*CENLORA)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["algorithm"] == "cenlora"
    tables = read(run_dir)
    rounds, events = tables["rounds"], tables["events"]
    assert rounds["round"].tolist() == list(range(ROUNDS + 1))
    assert rounds["eval_ppl"].map(math.isfinite).all()
    kinds = set(events["kind"])
    assert "central_step" in kinds and not kinds & {"upload", "download", "server_step", "adapter_upload"}
    assert (events["kind"] == "central_step").sum() == ROUNDS * LOCAL_STEPS * 4
    # Each client's partition goes up once, as int64 ids, labels and mask, before the server's first step.
    uploads = events[events["kind"] == "data_upload"].set_index("client")
    sizes = tables["clients"].query("round == 0").set_index("client")["n_examples"]
    assert set(uploads["round"]) == {1} and sorted(uploads.index) == sorted(sizes.index)
    assert all(uploads.loc[k, "bytes"] == 3 * 8 * sizes[k] * SEQ for k in sizes.index)
    assert events[events["kind"] == "central_step"]["start_s"].min() >= uploads["end_s"].max()
    host = pd.read_parquet(run_dir / "host_times.parquet")
    assert set(host["kind"]) == {"central_step"} and set(host["client"]) == {-1}
    assert len(host) == ROUNDS * LOCAL_STEPS * 4
    assert overlaps(intervals(events, "central_step")) == 0
    assert set(tables["clients"]["status"]) == {"data-only"}


def test_centralised_baselines_train_on_the_stated_device(tmp_path):
    """centralised.device: the pooled data trains on that device (one of it), whose catalog figures time every
    step; a device too small for the model is a preflight error naming the field; split methods ignore it."""
    spec = costs.ModelSpec.from_hf_config(model_hf_config(scenario(tmp_path)))
    ranks = costs.uniform_ranks(spec, ["q", "v"], range(spec.n_layers), RANK)
    forward, backward = costs.segment_work(spec, 0, spec.n_layers, BATCH, SEQ, ranks, True, False)
    step = forward + backward + costs.optimizer_work(spec, ranks)
    for device, accelerators in (("jetson-agx-orin", "4"), (None, "4")):
        overrides = ["algorithm.name=cenlora", "runtime.timing_only=true", f"server.accelerators={accelerators}",
                     f"output.dir={tmp_path / str(device)}"]
        if device:
            overrides.append(f"centralised.device={device}")
        run_dir = run_scenario(scenario(tmp_path, *overrides), progress=False)
        events = read(run_dir)["events"]
        steps = events[events["kind"] == "central_step"]
        expected = seconds(step, resolve_device(device or "rtx-3090"))
        assert np.allclose(steps["end_s"] - steps["start_s"], expected, rtol=1e-12)
        assert set(pd.read_parquet(run_dir / "resources.parquet").query("kind == 'server'")["name"]) == {
            device or "rtx-3090"}
        placement = json.loads((run_dir / "summary.json").read_text())["server_placement"]
        assert placement["accelerators"] == (1 if device else 4)
    small = {"name": "watch", "tflops": 0.1, "efficiency": 0.5, "memory_gb": 0.001}
    with pytest.raises(ScenarioError, match=r"^centralised\.device: watch needs [0-9.]+ GB for ft but has 0.001 GB"):
        preflight(scenario_from_dict({**BASE, "centralised": {"device": small}},
                                     [f"output.dir={tmp_path}", "algorithm.name=ft", "runtime.timing_only=true"]))
    preflight(scenario_from_dict({**BASE, "centralised": {"device": small}},
                                 [f"output.dir={tmp_path}", "runtime.timing_only=true"]))  # SplitLoRA: unused


def test_per_client_server_adapters_train_alike_whatever_the_order(runs):
    """With one server-side adapter per client, who reaches the server first changes timing, not learning; with
    the shared adapter (SplitLoRA's code) the same change reorders the updates and so changes training."""
    slow_first = ("clients.0.link=lte", "clients.1.link=ethernet")  # the Pi's steps now reach the server first
    result = {("shared", "base"): read(runs(*SPLIT))["rounds"]}  # shared is the default
    for mode, name, order in (("shared", "reordered", slow_first), ("per_client", "base", ()),
                              ("per_client", "reordered", slow_first)):
        overrides = (f"algorithm.server_adapters={mode}", *order)
        result[mode, name] = read(runs(f"{mode}-{name}", overrides))["rounds"]
    shared, per_client = result["shared", "base"], result["per_client", "base"]
    assert (shared["sim_time_s"] != result["shared", "reordered"]["sim_time_s"]).any()
    assert not np.allclose(shared["eval_ppl"], result["shared", "reordered"]["eval_ppl"])
    assert np.allclose(per_client["eval_ppl"], result["per_client", "reordered"]["eval_ppl"], rtol=1e-5)
    assert not np.allclose(per_client["eval_ppl"], shared["eval_ppl"])
    assert (per_client["agg_error"].iloc[1:] > 1e-4).all()  # FedAvg of factors, now over both sides


def test_a_device_without_memory_for_its_segment_fails_preflight(tmp_path):
    tiny_budget = scenario(tmp_path, "clients.1.memory_budget_gb=0.001")
    with pytest.raises(ScenarioError, match=r"^clients\.1: client 3 \(raspberry-pi-5\) needs"):
        preflight(tiny_budget)
    with pytest.raises(ScenarioError, match=r"^clients\.1"):
        run_scenario(tiny_budget, progress=False)
    assert not any(tmp_path.iterdir())  # nothing started, nothing written
    preflight(scenario(tmp_path, "clients.1.memory_budget_gb=4"))


# --- a worker killed mid-run ---------------------------------------------------------------------------


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@contextlib.contextmanager
def long_run(tmp_path: Path):
    """A 30-round tiny run as `hsplit-sim run`, yielded once it has written two rounds with (process, its
    rounds.csv, its worker pids); whatever is still alive afterwards is killed. Its temporary files (the ipc
    socket folder) go to tmp_path."""
    data = json.loads(json.dumps(BASE))
    data["training"]["rounds"] = 30
    data["output"] = {"dir": str(tmp_path / "runs")}
    path = tmp_path / "long.yaml"
    path.write_text(yaml.safe_dump(data))
    process = subprocess.Popen([sys.executable, "-m", "hsplit_sim.cli", "run", str(path)], cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                               env=dict(os.environ, HF_HUB_OFFLINE="1", TMPDIR=str(tmp_path)))
    workers: list[int] = []
    try:
        deadline, rounds_csv = time.monotonic() + 120, None
        while rounds_csv is None and time.monotonic() < deadline and process.poll() is None:
            found = list((tmp_path / "runs").glob("*/rounds.csv"))
            if found and len(pd.read_csv(found[0])) >= 2:
                rounds_csv = found[0]
            time.sleep(0.1)
        assert rounds_csv is not None, f"no two rounds before the deadline: {process.poll()}"
        workers.extend(children(process.pid))
        yield process, rounds_csv, workers
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
        for pid in workers:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_a_killed_worker_ends_the_run_cleanly(tmp_path):
    with long_run(tmp_path) as (process, rounds_csv, workers):
        client = [pid for pid in workers if "--name clients0" in cmdline(pid)]
        assert len(workers) == 2 and len(client) == 1, [cmdline(pid) for pid in workers]
        finished = len(pd.read_csv(rounds_csv))
        os.kill(client[0], signal.SIGKILL)
        killed_at = time.monotonic()
        _, stderr = process.communicate(timeout=10)
        assert time.monotonic() - killed_at < 10

    assert process.returncode == 1
    err = stderr.decode()
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    assert "worker clients0 died" in errors[0]
    run_dir = rounds_csv.parent
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and "worker clients0 died" in summary["error"]
    assert summary["error"] in errors[0]
    rounds = pd.read_csv(rounds_csv)
    assert len(rounds) >= finished and rounds["round"].tolist() == list(range(len(rounds)))
    assert rounds["round"].iloc[-1] < 30
    assert summary["rounds_completed"] == rounds["round"].iloc[-1]
    assert "died" in (run_dir / "log.txt").read_text()
    time.sleep(0.5)
    assert not [pid for pid in workers if alive(pid)], "worker processes outlived the run"


def test_sigterm_interrupts_the_run_like_ctrl_c(tmp_path):
    """A scheduler's kill must not leave a run directory that says "running", nor worker processes."""
    with long_run(tmp_path) as (process, rounds_csv, workers):
        process.terminate()
        _, stderr = process.communicate(timeout=20)
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in workers if alive(pid)]

    assert not list(tmp_path.glob("hsplit-sim-*")), "the socket folder outlived the run"
    assert process.returncode == 130, stderr.decode()
    assert "Traceback" not in stderr.decode()
    summary = json.loads((rounds_csv.parent / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["rounds_completed"] >= 1  # round 0 is evaluation
    assert 1 in set(pd.read_parquet(rounds_csv.parent / "host_times.parquet")["round"])  # finished rounds kept
