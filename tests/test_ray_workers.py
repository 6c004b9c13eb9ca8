"""Workers as Ray actors (#13, item 2): runtime.placement ray on a local Ray instance gives the tables of a run on
local workers, and leaves no actor and no worker process behind, whether the run ends or its coordinator is
killed. The bad settings are one-line errors, Ray or not."""

import logging
import os
import subprocess
import sys
import time

import pandas as pd
import pytest
import yaml

from hsplit_sim.cli import main
from hsplit_sim.experiment.run import run_scenario
from hsplit_sim.scenario import load_scenario
from test_auth import one_error_line
from test_run import REPO, alive, children, cmdline, read

TINY = REPO / "scenarios" / "tiny.yaml"
ON_RAY = ["runtime.placement=ray", "runtime.transport=tcp"]
# A local Ray instance and its workers need the machine to themselves (make test runs these after the others)
pytestmark = pytest.mark.ray
CPUS = 2  # the server's actor and the client worker's, one CPU each


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=CPUS, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def tree(pid: int) -> list[int]:
    """Every process below pid: the local Ray instance's raylet, its actors, and their workers."""
    found, todo = [], [pid]
    while todo:
        below = children(todo.pop())
        found.extend(below)
        todo.extend(below)
    return found


def all_gone(ray, pids: list[int], timeout_s: float) -> float:
    """Seconds until none of pids is alive and the actors' CPUs are free again; fails after timeout_s."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if not any(alive(pid) for pid in pids) and ray.available_resources().get("CPU") == CPUS:
            return time.monotonic() - started
        time.sleep(0.1)
    raise AssertionError(f"still alive after {timeout_s} s: {[cmdline(p) for p in pids if alive(p)]}, "
                         f"{ray.available_resources()}")


def test_a_run_on_ray_actors_equals_one_on_local_workers(local_ray, tmp_path, monkeypatch, caplog):
    """A round of the tiny scenario, its workers in Ray actors and then local: the same rounds, events and
    clients (one torch thread each: an actor's worker computes with the CPU it asks for). Once the run has ended
    its workers are gone and the actors' CPUs free."""
    monkeypatch.setenv("HSPLIT_SIM_TORCH_THREADS", "1")
    caplog.set_level(logging.INFO, "hsplit_sim")
    overrides = [f"output.dir={tmp_path}", "training.rounds=1"]
    on_ray = run_scenario(load_scenario(TINY, overrides + ON_RAY), progress=False)
    started = [r.getMessage() for r in caplog.records if r.getMessage().startswith("workers started: ")]
    pids = [int(pid) for pid in started[0].removeprefix("workers started: ").strip("[]").split(", ")]
    assert len(pids) == 2
    all_gone(local_ray, pids, 10)
    local = run_scenario(load_scenario(TINY, overrides), progress=False)
    first, second = read(on_ray), read(local)
    pd.testing.assert_frame_equal(first["rounds"].drop(columns="wall_time_s"),
                                  second["rounds"].drop(columns="wall_time_s"), check_exact=True)
    pd.testing.assert_frame_equal(first["events"], second["events"], check_exact=True)
    pd.testing.assert_frame_equal(first["clients"], second["clients"], check_exact=True)


def test_a_killed_coordinator_takes_its_actors_and_workers_with_it(local_ray, tmp_path):
    """`hsplit-sim run` on the same Ray instance (RAY_ADDRESS), killed with SIGKILL once it has written a round: Ray
    kills the actors it owned, and each worker exits within a second of its actor."""
    data = yaml.safe_load(TINY.read_text())
    data["training"]["rounds"] = 30
    data["output"] = {"dir": str(tmp_path / "runs")}
    data["runtime"] = {"placement": "ray", "transport": "tcp"}
    path = tmp_path / "long.yaml"
    path.write_text(yaml.safe_dump(data))
    env = dict(os.environ, HF_HUB_OFFLINE="1", RAY_ADDRESS=local_ray.get_runtime_context().gcs_address)
    process = subprocess.Popen([sys.executable, "-m", "hsplit_sim.cli", "run", str(path)], cwd=REPO, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not list((tmp_path / "runs").glob("*/rounds.csv")) and time.monotonic() < deadline:
            assert process.poll() is None, process.communicate()
            time.sleep(0.1)
        below = tree(os.getpid())
        workers = [pid for pid in below if "-m hsplit_sim.runtime.worker " in cmdline(pid)]
        actors = [pid for pid in below if cmdline(pid).startswith("ray::WorkerHost")]
        assert len(workers) == 2 and len(actors) == 2, [cmdline(pid) for pid in below]
        process.kill()
        process.communicate()
        took = all_gone(local_ray, workers + actors, 30)
        print(f"actors and workers gone {took:.1f} s after the coordinator was killed")
        assert took < 10
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


@pytest.mark.parametrize("overrides, message", [
    (["runtime.placement=ray"], "runtime.transport: 'ipc' cannot serve runtime.placement 'ray', whose workers are "
     "reached over tcp: set it to tcp"),
    (ON_RAY + ["runtime.remote_workers=['tcp://10.0.0.2:5555']", "runtime.key_file=KEY", "runtime.host=0.0.0.0"],
     "runtime.placement: 'ray' starts every worker itself; runtime.remote_workers names workers started by hand: "
     "use one or the other"),
    (["runtime.ray_server_gpus=1"], "runtime.ray_server_gpus: set for runtime.placement 'ray' only"),
    (ON_RAY + ["runtime.ray_server_gpus=-1"],
     "runtime.ray_server_gpus: Input should be greater than or equal to 0 (got -1)"),
    (["runtime.placement=slurm"], "runtime.placement: Input should be 'local' or 'ray' (got 'slurm')"),
], ids=["ipc", "remote-workers", "gpus-without-ray", "negative-gpus", "unknown"])
def test_bad_placements_are_one_line_errors(tmp_path, capsys, overrides, message):
    key = tmp_path / "run.key_secret"
    assert main(["keygen", str(key)]) == 0
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(dict(yaml.safe_load(TINY.read_text()), output={"dir": str(tmp_path / "runs")})))
    capsys.readouterr()
    assert main(["validate", str(path), *[a for o in overrides for a in ("--set", o.replace("KEY", str(key)))]]) == 2
    assert one_error_line(capsys) == f"error: {message}"


def test_placement_ray_without_ray_names_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as where it is not installed
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(dict(yaml.safe_load(TINY.read_text()), output={"dir": str(tmp_path / "runs")})))
    assert main(["validate", str(path), *[a for o in ON_RAY for a in ("--set", o)]]) == 2
    assert one_error_line(capsys) == "error: runtime.placement: 'ray' needs Ray: pip install 'hsplit-sim[ray]'"
