"""Liveness (#13): heartbeats find a stopped worker in seconds whatever the request timeout, workers leave with
their coordinator, and a run whose coordinator is gone reads as crashed.

The design promises detection within 10 s (a heartbeat timeout of 5 s) and workers gone about a second after
their coordinator; the bounds here are 20 s, so that a loaded machine does not fail them.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
import zmq

from hsplit_sim.cli import main
from hsplit_sim.errors import RunError, ScenarioError
from hsplit_sim.experiment.coordinator import identity, reconcile
from hsplit_sim.experiment.run import project_run, run_scenario
from hsplit_sim.runtime.connection import WorkerConnection
from hsplit_sim.runtime import heartbeat
from hsplit_sim.runtime.heartbeat import (FIRST_BEAT_TIMEOUT_S, HEARTBEAT_INTERVAL_S, HEARTBEAT_TIMEOUT_S,
                                          Heartbeats, SessionBeat)
from hsplit_sim.runtime.keys import Keypair
from hsplit_sim.runtime.launcher import hand_keys
from test_run import alive, cmdline, long_run, scenario

BOUND_S = 20

# What a worker does: heartbeats first, then the imports of `init` (torch, transformers, peft), then computation.
BUSY_WORKER = """
import os, sys, time
from hsplit_sim.runtime.heartbeat import start_beating
from hsplit_sim.runtime.worker import read_keys
start_beating("busy", sys.argv[1], os.getppid(), "tcp://127.0.0.1:1", *read_keys(sys.stdin))
import torch
from hsplit_sim.training.roles import make_role
print(time.monotonic(), flush=True)
a = torch.randn(512, 512)
end = time.monotonic() + 3
while time.monotonic() < end:
    a = torch.tanh(a @ a)
"""

# Answers pings at once, never anything else, and sends no heartbeats.
SILENT_WORKER = """
import sys, time, zmq
from hsplit_sim.runtime.keys import Gate, as_server
from hsplit_sim.runtime.wire import decode, encode
from hsplit_sim.runtime.worker import read_keys
keys, coordinator = read_keys(sys.stdin)
context = zmq.Context()
gate = Gate(context, [coordinator])
sock = context.socket(zmq.REP)
as_server(sock, keys)
sock.bind(sys.argv[1])
while True:
    header = decode(sock.recv_multipart(), required=("op", "id")).header
    if header["op"] != "ping":
        time.sleep(3600)
    sock.send_multipart(encode({"id": header["id"], "ok": True, "result": {}}))
"""


def start(script: str, heartbeats: Heartbeats, name: str, *args: str, **popen) -> tuple[subprocess.Popen, Keypair]:
    """A test worker script, its keys handed over stdin as the launcher does, watched by heartbeats."""
    keys = Keypair.new()
    process = subprocess.Popen([sys.executable, "-c", script, *args], stdin=subprocess.PIPE, **popen)
    hand_keys(process, keys, heartbeats.keys.public)
    heartbeats.watch(name, process, keys.public)
    return process, keys


def test_heartbeats_go_out_before_torch_loads_and_keep_coming_while_it_computes():
    context = zmq.Context()
    heartbeats = Heartbeats(context, "tcp://127.0.0.1:*", Keypair.new())
    pull = heartbeats.socket
    process, _ = start(BUSY_WORKER, heartbeats, "busy", heartbeats.endpoint, stdout=subprocess.PIPE,
                       env=dict(os.environ, HF_HUB_OFFLINE="1"))
    beats = []
    try:
        deadline = time.monotonic() + 120
        while process.poll() is None and time.monotonic() < deadline:
            if pull.poll(50):
                assert pull.recv() == b"busy"
                beats.append(time.monotonic())
        imported = float(process.stdout.read())  # CLOCK_MONOTONIC: one clock for every process of the machine
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        process.stdout.close()
        heartbeats.close()
        context.destroy(linger=0)
    assert process.returncode == 0
    assert beats and beats[0] < imported
    assert len([b for b in beats if b > imported]) >= 3 * 0.5 / HEARTBEAT_INTERVAL_S  # 3 s of matmuls
    gaps = [later - earlier for earlier, later in zip(beats, beats[1:])]
    assert max(gaps) < HEARTBEAT_TIMEOUT_S, gaps


def test_a_worker_placed_on_ray_has_longer_for_its_first_beat_only(tmp_path, monkeypatch):
    """Ray starts an actor and the actor the worker, which on a loaded machine takes more than the heartbeat timeout:
    such a worker is stale after FIRST_BEAT_TIMEOUT_S without a first beat, and after HEARTBEAT_TIMEOUT_S of
    silence once it has beaten; a worker watched without the grace is stale after HEARTBEAT_TIMEOUT_S."""
    clock = [1000.0]
    monkeypatch.setattr(heartbeat.time, "monotonic", lambda: clock[0])

    def listen(seconds: float) -> set[str]:
        """The coordinator listening for that long (in steps shorter than a beat, so silence counts); what is
        stale at its end."""
        for _ in range(round(seconds / 0.5)):
            clock[0] += 0.5
            stale = set(heartbeats.stale())
        return stale

    context = zmq.Context()
    heartbeats = Heartbeats(context, f"ipc://{tmp_path}/heartbeat.sock", Keypair.new())
    placed, by_hand = Keypair.new(), Keypair.new()
    beat = None
    try:
        heartbeats.watch("placed", None, placed.public, first_beat_s=FIRST_BEAT_TIMEOUT_S)
        heartbeats.watch("by_hand", None, by_hand.public)
        assert listen(HEARTBEAT_TIMEOUT_S + 0.5) == {"by_hand"}
        beat = SessionBeat("placed", heartbeats.endpoint, placed, heartbeats.keys.public)
        deadline = time.time() + BOUND_S
        while "placed" not in heartbeats._heard and time.time() < deadline:
            time.sleep(0.1)
            heartbeats.stale()  # drains, the coordinator's clock standing still
        beat.stop()
        assert "placed" in heartbeats._heard
        assert "placed" not in listen(HEARTBEAT_TIMEOUT_S - 0.5)
        assert "placed" in listen(1.0)  # well before FIRST_BEAT_TIMEOUT_S after its watch began
        assert clock[0] - 1000.0 < FIRST_BEAT_TIMEOUT_S
    finally:
        if beat is not None:
            beat.stop()
        heartbeats.close()
        context.destroy(linger=0)


def test_a_worker_without_heartbeats_fails_a_request_long_before_its_timeout(tmp_path):
    """Its socket works (it answers a ping), but the request it leaves unanswered fails after the heartbeat
    timeout, although the connection's request timeout is 600 s (and the call's 60 s, so a regression fails with
    another message instead of hanging)."""
    context = zmq.Context()
    heartbeats = Heartbeats(context, f"ipc://{tmp_path}/heartbeat.sock", Keypair.new())
    endpoint = f"ipc://{tmp_path}/w.sock"
    process, keys = start(SILENT_WORKER, heartbeats, "silent", endpoint)
    connection = WorkerConnection(context, "silent", endpoint, process, 600, heartbeats, keys.public, 1 << 20)
    try:
        assert connection.call("ping", timeout_s=BOUND_S).header["ok"] is True
        started = time.monotonic()
        with pytest.raises(RunError, match=r"worker silent stopped answering heartbeats \(none for 5 s while waiting "
                                           r"for silent's reply to 'forward'\): it is stopped, hung or unreachable"):
            connection.call("forward", timeout_s=60)
        assert time.monotonic() - started < BOUND_S
    finally:
        connection.close()
        heartbeats.close()
        process.kill()
        process.wait()
        context.destroy(linger=0)


def test_a_coordinator_stopped_with_its_workers_does_not_fail_them_once_resumed(tmp_path):
    """Ctrl-Z stops the whole process group and fg resumes it: silence while the coordinator was not listening
    is not held against the workers, and a worker that stays silent while it listens still is."""
    context = zmq.Context()
    heartbeats = Heartbeats(context, f"ipc://{tmp_path}/heartbeat.sock", Keypair.new())
    script = ("import os, sys, time; from hsplit_sim.runtime.heartbeat import start_beating; "
              "from hsplit_sim.runtime.worker import read_keys; "
              "start_beating('w', sys.argv[1], os.getppid(), 'tcp://127.0.0.1:1', *read_keys(sys.stdin)); "
              "time.sleep(60)")
    process, _ = start(script, heartbeats, "w", heartbeats.endpoint)

    def listen(seconds: float) -> None:
        for _ in range(int(seconds / 0.2)):
            assert heartbeats.stale() == []
            time.sleep(0.2)

    try:
        listen(2)
        process.send_signal(signal.SIGSTOP)  # the coordinator stops listening at the same time
        time.sleep(HEARTBEAT_TIMEOUT_S + 2)
        process.send_signal(signal.SIGCONT)
        listen(2)
        process.send_signal(signal.SIGSTOP)  # now the coordinator listens
        stopped_at = time.monotonic()
        while not heartbeats.stale() and time.monotonic() - stopped_at < BOUND_S:
            time.sleep(0.2)
        assert heartbeats.silent == {"w"}
        assert HEARTBEAT_TIMEOUT_S - HEARTBEAT_INTERVAL_S - 0.5 < time.monotonic() - stopped_at < BOUND_S
    finally:
        heartbeats.close()
        process.kill()
        process.wait()
        context.destroy(linger=0)


def test_a_stopped_worker_ends_the_run_in_seconds(tmp_path):
    with long_run(tmp_path) as (process, rounds_csv, workers):
        client = [pid for pid in workers if "--name clients0" in cmdline(pid)]
        assert len(client) == 1, [cmdline(pid) for pid in workers]
        os.kill(client[0], signal.SIGSTOP)
        stopped_at = time.monotonic()
        _, stderr = process.communicate(timeout=60)
        took = time.monotonic() - stopped_at
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in workers if alive(pid)], "worker processes outlived the run"

    run_dir = rounds_csv.parent
    assert yaml.safe_load((run_dir / "scenario.resolved.yaml").read_text())["runtime"]["request_timeout_s"] == 600
    assert process.returncode == 1 and took < BOUND_S, (process.returncode, took)
    errors = [line for line in stderr.decode().splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "worker clients0 stopped answering heartbeats" in errors[0], stderr.decode()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["error"] in errors[0]
    assert not list(tmp_path.glob("hsplit-sim-*")), "the socket folder outlived the run"


def test_workers_leave_with_a_killed_coordinator_and_the_run_reads_as_crashed(tmp_path):
    with long_run(tmp_path) as (process, rounds_csv, workers):
        assert len(workers) == 2 and list(tmp_path.glob("hsplit-sim-*"))
        process.kill()
        process.wait()
        killed_at = time.monotonic()
        while any(alive(pid) for pid in workers) and time.monotonic() - killed_at < BOUND_S:
            time.sleep(0.05)
        assert not [pid for pid in workers if alive(pid)], "workers outlived their coordinator"

    assert not list(tmp_path.glob("hsplit-sim-*")), "the socket folder outlived the workers"
    run_dir = rounds_csv.parent
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "running"
    assert main(["report", str(run_dir)]) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "crashed" and f"coordinator (pid {process.pid}) is gone" in summary["error"]


# --- crashed runs ----------------------------------------------------------------------------------------


def gone_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def run_dir_with(tmp_path: Path, status: str, **coordinator) -> Path:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    summary = {"status": status, "error": None, "trajectory": "trained", "algorithm": "splitlora",
               "coordinator": {**identity(), **coordinator}}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    return run_dir


@pytest.mark.parametrize("status, coordinator, marked", [
    ("running", {"pid": "gone"}, True),
    ("running", {"start_ticks": -1}, True),  # this pid, another process: the pid was reused
    ("running", {}, False),  # this very process
    ("running", {"pid": "gone", "host": "another-host"}, False),  # cannot be checked from here
    ("completed", {"pid": "gone"}, False),
    ("failed", {"pid": "gone"}, False),
], ids=["dead-pid", "reused-pid", "alive", "other-host", "completed", "failed"])
def test_reconcile_marks_a_running_run_crashed_only_when_its_coordinator_is_gone(tmp_path, status, coordinator,
                                                                                 marked):
    if coordinator.get("pid") == "gone":
        coordinator["pid"] = gone_pid()
    run_dir = run_dir_with(tmp_path, status, **coordinator)
    before = (run_dir / "summary.json").read_text()
    summary = reconcile(run_dir)
    assert summary == json.loads((run_dir / "summary.json").read_text())
    if marked:
        pid = coordinator.get("pid", os.getpid())
        assert summary["status"] == "crashed" and summary["error"].startswith(f"the coordinator (pid {pid}) is gone")
    else:
        assert (run_dir / "summary.json").read_text() == before


def test_reconcile_leaves_what_is_not_a_summary_alone(tmp_path):
    assert reconcile(tmp_path) is None
    (tmp_path / "summary.json").write_text("[1, 2]")
    assert reconcile(tmp_path) is None
    (tmp_path / "summary.json").write_text(json.dumps({"status": "running"}))  # written before #13: no coordinator
    assert reconcile(tmp_path) == {"status": "running"}


def test_replay_and_projection_refuse_a_crashed_run(tmp_path):
    run_dir = run_dir_with(tmp_path, "running", pid=gone_pid())
    with pytest.raises(ScenarioError, match="runtime.replay_from: .* is not a completed trained run \\(status crashed"):
        run_scenario(scenario(tmp_path, f"runtime.replay_from={run_dir}"), progress=False)
    with pytest.raises(ScenarioError, match="TRAINED_RUN: .* is not a completed trained run \\(status crashed"):
        project_run(run_dir, scenario(tmp_path, "runtime.timing_only=true"), progress=False)
