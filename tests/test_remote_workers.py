"""Client workers started by hand (#13, item 2): a scenario lists them in runtime.remote_workers, the run equals one
on local workers, a stopped one ends the run in seconds, and one whose coordinator is gone drops the session and
listens for the next run.

Two workers run for the whole module as `hsplit-sim worker --listen tcp://127.0.0.1:* --key FILE`, each in a
directory of its own with its own copy of the key file, as on other machines."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
import zmq

from hsplit_sim.cli import main
from hsplit_sim.errors import RunError
from hsplit_sim.experiment.run import run_scenario
from hsplit_sim.runtime.keys import as_client, load_key_file
from hsplit_sim.runtime.wire import decode, encode
from hsplit_sim.scenario import load_scenario
from test_auth import one_error_line
from test_run import REPO, alive, read

TINY = REPO / "scenarios" / "tiny.yaml"
BOUND_S = 20  # the design promises 10 s (test_liveness.py): the bound leaves room for a loaded machine
CAPPED = 1_200_000  # worker b's --max-frame, below the tiny run's frame limit (1.25 MiB)


class HandWorker:
    """`hsplit-sim worker` in a directory of its own; its stderr goes to a file there."""

    def __init__(self, directory: Path, key: Path, name: str, *extra: str):
        self.name = name
        directory.mkdir()
        (directory / "run.key_secret").write_bytes(key.read_bytes())
        (directory / "run.key_secret").chmod(0o600)
        self.log = directory / "stderr.txt"
        env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "hsplit_sim.cli", "worker", "--listen", "tcp://127.0.0.1:*", "--key",
                 "run.key_secret", "--name", name, *extra], cwd=directory, env=env, stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=log)
        self.endpoint = self.wait_for(f"worker {name} listening on ").split()[4]

    def lines(self) -> list[str]:
        return self.log.read_text().splitlines()

    def wait_for(self, start: str, after: int = 0, timeout_s: float = 60) -> str:
        """The first line from line `after` on that starts with start."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = [line for line in self.lines()[after:] if line.startswith(start)]
            if found:
                return found[0]
            assert self.process.poll() is None, self.log.read_text()
            time.sleep(0.1)
        raise AssertionError(f"no line {start!r} within {timeout_s} s: {self.log.read_text()}")


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    base = tmp_path_factory.mktemp("hosts")
    key = base / "coordinator" / "run.key_secret"
    key.parent.mkdir()
    assert main(["keygen", str(key)]) == 0
    started = []
    try:
        started.append(HandWorker(base / "host-a", key, "a"))
        started.append(HandWorker(base / "host-b", key, "b", "--max-frame", str(CAPPED)))
        yield key, started
    finally:
        for worker in started:
            worker.process.send_signal(signal.SIGCONT)
            worker.process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                worker.process.wait(20)
            if worker.process.poll() is None:
                worker.process.kill()
                worker.process.wait()


def remote(key: Path, workers: list[HandWorker]) -> list[str]:
    endpoints = ", ".join(f"'{w.endpoint}'" for w in workers)
    return ["runtime.transport=tcp", f"runtime.key_file={key}", f"runtime.remote_workers=[{endpoints}]"]


def tiny(tmp_path: Path, *overrides: str):
    return load_scenario(TINY, [f"output.dir={tmp_path}", "training.rounds=1", "runtime.client_workers=2",
                                *overrides])


def test_a_run_on_workers_started_by_hand_equals_one_on_local_workers(workers, tmp_path):
    """The tiny scenario's client workers are the two hand-started ones: its rounds, events and clients equal a
    run's with two local client workers. Each worker learns its name, heartbeat socket and frame limit at init (b
    takes the run's up to its own --max-frame), and goes back to listening when the run ends."""
    key, (a, b) = workers
    seen = [len(a.lines()), len(b.lines())]
    hand = run_scenario(tiny(tmp_path / "hand", *remote(key, [a, b])), progress=False)
    local = run_scenario(tiny(tmp_path / "local"), progress=False)
    assert json.loads((hand / "summary.json").read_text())["status"] == "completed"
    first, second = read(hand), read(local)
    trained = ["train_loss", "eval_loss", "eval_ppl", "agg_error"]
    pd.testing.assert_frame_equal(first["rounds"].drop(columns=["wall_time_s", *trained]),
                                  second["rounds"].drop(columns=["wall_time_s", *trained]), check_exact=True)
    # Training's values to float rounding: once, on a loaded machine, round 1's eval_loss differed in its 7th digit.
    pd.testing.assert_frame_equal(first["rounds"][trained], second["rounds"][trained], rtol=1e-5)
    pd.testing.assert_frame_equal(first["events"], second["events"], check_exact=True)
    pd.testing.assert_frame_equal(first["clients"], second["clients"], check_exact=True)
    assert a.wait_for("worker a: serving a run as ", seen[0]).startswith(
        "worker a: serving a run as clients0 (heartbeats to tcp://127.0.0.1:")
    assert a.wait_for("worker a: serving", seen[0]).endswith("frames up to 1,310,720 bytes)")
    assert b.wait_for("worker b: serving", seen[1]).endswith(f"frames up to {CAPPED:,} bytes)")
    for worker, after in zip((a, b), seen):
        assert "session ended (its coordinator ended the run)" in worker.wait_for(
            f"worker {worker.name}: session ended", after)
        assert worker.process.poll() is None
    resolved = yaml.safe_load((hand / "scenario.resolved.yaml").read_text())["runtime"]
    assert resolved["client_workers"] == 2 and resolved["remote_workers"] == [a.endpoint, b.endpoint]


def ask(endpoint: str, key: Path, header: dict) -> dict:
    """One request from a holder of the key file, as another coordinator would send it."""
    context = zmq.Context()
    sock = context.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    keys = load_key_file(key)
    as_client(sock, keys, keys.public)
    sock.connect(endpoint)
    try:
        sock.send_multipart(encode(dict(header, id=1, client=None)))
        assert sock.poll(20_000), "no reply"
        return decode(sock.recv_multipart()).header
    finally:
        sock.close(linger=0)
        context.term()


@contextlib.contextmanager
def long_run(tmp_path: Path, key: Path, workers: list[HandWorker]):
    """The tiny scenario for 30 rounds on the hand-started workers as `hsplit-sim run`, yielded once it has written
    a round; killed afterwards if still running."""
    data = yaml.safe_load(TINY.read_text())
    data["training"]["rounds"] = 30
    data["output"] = {"dir": str(tmp_path / "runs")}
    data["runtime"] = {"transport": "tcp", "key_file": str(key), "remote_workers": [w.endpoint for w in workers]}
    path = tmp_path / "long.yaml"
    path.write_text(yaml.safe_dump(data))
    process = subprocess.Popen([sys.executable, "-m", "hsplit_sim.cli", "run", str(path)], cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                               env=dict(os.environ, HF_HUB_OFFLINE="1"))
    try:
        deadline = time.monotonic() + 120
        while not list((tmp_path / "runs").glob("*/rounds.csv")) and time.monotonic() < deadline:
            assert process.poll() is None, process.communicate()
            time.sleep(0.1)
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGCONT)
            process.kill()
            process.communicate()


def one_error(process: subprocess.Popen, stderr: bytes, tmp_path: Path) -> str:
    """The run's one error line, which its summary holds too."""
    text = stderr.decode()
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert process.returncode == 1 and "Traceback" not in text and len(errors) == 1, text
    summary = json.loads(next((tmp_path / "runs").glob("*/summary.json")).read_text())
    assert summary["status"] == "failed" and summary["error"] in errors[0]
    return errors[0]


def test_a_stopped_worker_started_by_hand_ends_the_run_and_drops_the_session_once_resumed(workers, tmp_path):
    """A run on the two workers: another coordinator with the same key file is refused meanwhile; SIGSTOP of worker
    a ends the run in seconds with one error line naming it and its endpoint, although the request timeout is
    600 s. Resumed, a finds its coordinator gone, drops the session and listens again."""
    key, (a, b) = workers
    seen = [len(a.lines()), len(b.lines())]
    try:
        with long_run(tmp_path, key, [a, b]) as process:
            other = ask(b.endpoint, key, {"op": "init", "session": "x",
                                          "args": {"session": {"id": "x", "name": "clients0", "frame_limit": 1000,
                                                               "heartbeat": "tcp://127.0.0.1:1"}}})
            assert not other["ok"] and "this worker is serving another run" in other["error"]
            a.process.send_signal(signal.SIGSTOP)
            stopped_at = time.monotonic()
            _, stderr = process.communicate(timeout=60)
            took = time.monotonic() - stopped_at
    finally:
        a.process.send_signal(signal.SIGCONT)
    assert one_error(process, stderr, tmp_path).startswith(
        f"error: worker clients0 at {a.endpoint} stopped answering heartbeats")
    assert took < BOUND_S, took
    b.wait_for("worker b: session ended", seen[1], timeout_s=40)  # told, or finding the coordinator gone: the
    # coordinator cannot tell a worker whose request it was waiting for when a's silence ended the run
    assert "session ended (its coordinator is gone: no heartbeat connection for 10 s)" in a.wait_for(
        "worker a: session ended", seen[0], timeout_s=40)
    assert alive(a.process.pid) and alive(b.process.pid)
    assert ask(a.endpoint, key, {"op": "ping"})["ok"]


def test_a_stopped_coordinator_loses_its_sessions_and_fails_in_one_line_once_resumed(workers, tmp_path):
    """SIGSTOP of the coordinator: its I/O threads stop answering ZeroMQ's heartbeats, so both workers drop the
    session (5 s to notice, 10 s down); resumed, the run ends with one error line."""
    key, (a, b) = workers
    seen = [len(a.lines()), len(b.lines())]
    with long_run(tmp_path, key, [a, b]) as process:
        process.send_signal(signal.SIGSTOP)
        stopped_at = time.monotonic()
        for worker, after in zip((a, b), seen):
            assert "(its coordinator is gone: no heartbeat connection for 10 s)" in worker.wait_for(
                f"worker {worker.name}: session ended", after, timeout_s=60)
        took = time.monotonic() - stopped_at
        process.send_signal(signal.SIGCONT)
        _, stderr = process.communicate(timeout=60)
    assert 10 < took < 15 + BOUND_S, took
    error = one_error(process, stderr, tmp_path)
    assert ("this worker ended the run's session (its coordinator is gone" in error  # its next request
            or "stopped answering heartbeats" in error), error  # or the coordinator waited for one of them


def test_a_worker_started_with_another_key_file_ends_the_run_in_seconds(workers, tmp_path):
    """The coordinator expects the key file's public key of the worker, which cannot complete the handshake with
    another key pair: the worker never gets its init nor beats, and the run fails as for an unreachable worker, with
    the key named as a possible cause."""
    key, _ = workers
    other_key = tmp_path / "other.key_secret"
    assert main(["keygen", str(other_key)]) == 0
    stranger = HandWorker(tmp_path / "host-c", other_key, "c")
    try:
        started = time.monotonic()
        with pytest.raises(RunError) as error:
            run_scenario(tiny(tmp_path, *remote(key, [stranger]), "runtime.client_workers=1"), progress=False)
        assert str(error.value).startswith(f"worker clients0 at {stranger.endpoint} stopped answering heartbeats")
        assert str(error.value).endswith("it is stopped, hung or unreachable, or its --key is not a copy of "
                                         "runtime.key_file")
        assert time.monotonic() - started < 60  # the server worker's start, then 5 s of silence
    finally:
        stranger.process.terminate()
        stranger.process.wait(20)


@pytest.mark.parametrize("overrides, message", [
    (["runtime.remote_workers=['ipc:///tmp/w']"],
     "runtime.remote_workers.0: 'ipc:///tmp/w' is not tcp://HOST:PORT (a worker started by hand is reached over "
     "tcp, at the port its --listen names)"),
    (["runtime.remote_workers=['tcp://10.0.0.2:70000']"], "runtime.remote_workers.0: 'tcp://10.0.0.2:70000' is not "
     "tcp://HOST:PORT (a worker started by hand is reached over tcp, at the port its --listen names)"),
    (["runtime.remote_workers=['tcp://10.0.0.2:5555', 'tcp://10.0.0.2:5555']"],
     "runtime.remote_workers.1: 'tcp://10.0.0.2:5555' is listed twice"),
    (["runtime.remote_workers=['tcp://10.0.0.2:5555']", "runtime.client_workers=2"],
     "runtime.client_workers: 2, but runtime.remote_workers lists 1: the remote workers are the client workers "
     "(leave client_workers out)"),
    (["runtime.remote_workers=['tcp://10.0.0.2:5555']"],
     "runtime.remote_workers: workers started by hand admit only their key file's key; set runtime.key_file to a "
     "copy of the file their --key names"),
    (["runtime.remote_workers=['tcp://10.0.0.2:5555']", "runtime.key_file=KEY"],
     "runtime.transport: 'ipc' cannot serve runtime.remote_workers, which send heartbeats to this machine: set it "
     "to tcp"),
    (["runtime.remote_workers=['tcp://10.0.0.2:5555']", "runtime.key_file=KEY", "runtime.transport=tcp"],
     "runtime.host: '127.0.0.1' is a loopback address, where the worker at tcp://10.0.0.2:5555 cannot send "
     "heartbeats; set it to this machine's address or '0.0.0.0'"),
], ids=["ipc", "port", "twice", "count", "no-key", "ipc-transport", "loopback-host"])
def test_bad_remote_workers_are_one_line_errors(tmp_path, capsys, overrides, message):
    key = tmp_path / "run.key_secret"
    assert main(["keygen", str(key)]) == 0
    data = yaml.safe_load(TINY.read_text())
    del data["runtime"]
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(dict(data, output={"dir": str(tmp_path / "runs")})))
    capsys.readouterr()
    sets = [arg for o in overrides for arg in ("--set", o.replace("KEY", str(key)))]
    assert main(["validate", str(path), *sets]) == 2
    assert one_error_line(capsys) == f"error: {message}"
    good = ["runtime.remote_workers=['tcp://10.0.0.2:5555', 'tcp://[fd00::2]:5555']", f"runtime.key_file={key}",
            "runtime.transport=tcp", "runtime.host=0.0.0.0"]
    assert main(["validate", str(path), *[arg for o in good for arg in ("--set", o)]]) == 0
    assert load_scenario(path, good).runtime.client_workers == 2
