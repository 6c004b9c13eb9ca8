"""Authenticated, encrypted workers (#13): a process without the run's keys cannot reach a worker or the heartbeat
socket, nor change a run; a frame over the run's limit is refused unread and the worker lives; tcp listens on
loopback unless the scenario names an interface and a key file."""

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
import zmq

from hsplit_sim.cli import main
from hsplit_sim.errors import RunError
from hsplit_sim.experiment.run import run_scenario
from hsplit_sim.runtime import launcher
from hsplit_sim.runtime.connection import WorkerConnection
from hsplit_sim.runtime.heartbeat import HEARTBEAT_TIMEOUT_S, Heartbeats
from hsplit_sim.runtime.keys import Keypair, as_client, load_key_file
from hsplit_sim.runtime.launcher import spawn_worker
from hsplit_sim.runtime.wire import decode, encode
from test_run import BASE, read, scenario

# The attack of #13: a merge that changes the base weights, on the server's PEFT-wrapped model or the plain one. Block 0 is
# run by the client workers (split 1) and by the server's evaluation, so a merge served anywhere changes the run.
MERGES = [{f"{root}transformer.h.0.attn.c_proj.B": np.full((128, 1), 0.05, np.float32),
           f"{root}transformer.h.0.attn.c_proj.A": np.ones((1, 128), np.float32)}
          for root in ("base_model.model.", "")]


class Recorder:
    """Wraps launcher.spawn_worker: every worker a run starts, with its endpoint and key pair, and the run's
    coordinator key pair, as soon as the worker is started."""

    def __init__(self, monkeypatch):
        self.workers: list[tuple[str, str, Keypair]] = []
        self.heartbeat_endpoint = self.coordinator = None
        self.started = threading.Event()
        original = launcher.spawn_worker

        def spawn(name, endpoint, heartbeats, frame_limit, **popen):
            process, keys = original(name, endpoint, heartbeats, frame_limit, **popen)
            self.workers.append((name, endpoint, keys))
            self.heartbeat_endpoint, self.coordinator = heartbeats.endpoint, heartbeats.keys
            self.started.set()
            return process, keys

        monkeypatch.setattr(launcher, "spawn_worker", spawn)


class Attacker(threading.Thread):
    """Sends merges (and shutdowns, with shutdown) to every worker of a run from the moment they start until
    stopped, on DEALER sockets (they send again without waiting for a reply), and keeps the replies. keys None:
    plain sockets (no CurveZMQ); a Keypair: a CurveZMQ client with those keys that knows each worker's public key
    (public keys are not secret); "coordinator": with the run's coordinator key pair."""

    def __init__(self, recorder: Recorder, keys: Keypair | str | None = None, shutdown: bool = True):
        super().__init__(daemon=True)
        self.recorder, self.keys, self.shutdown = recorder, keys, shutdown
        self.replies: list[dict] = []
        self.halt = threading.Event()
        self.context = zmq.Context()

    def run(self) -> None:
        self.recorder.started.wait(60)
        if self.keys == "coordinator":
            self.keys = self.recorder.coordinator
        sockets = []
        sent = 0
        while not self.halt.is_set():
            for _, endpoint, worker_keys in self.recorder.workers[len(sockets):]:
                sock = self.context.socket(zmq.DEALER)
                sock.setsockopt(zmq.LINGER, 0)
                sock.setsockopt(zmq.SNDHWM, 20)
                if self.keys is not None:
                    as_client(sock, self.keys, worker_keys.public)
                sock.connect(endpoint)
                sockets.append(sock)
            for sock in sockets:
                requests = [encode({"op": "merge", "id": sent, "client": None, "args": {}}, MERGES[sent % 2])]
                if self.shutdown:
                    requests.append(encode({"op": "shutdown", "id": -1, "client": None, "args": {}}))
                for frames in requests:
                    with contextlib.suppress(zmq.Again):
                        sock.send_multipart([b"", *frames], zmq.NOBLOCK)
                sent += 1
                while sock.poll(0):
                    self.replies.append(decode(sock.recv_multipart()[1:]).header)
            time.sleep(0.05)
        for sock in sockets:
            sock.close(linger=0)
        self.context.term()

    def stop(self) -> list[dict]:
        self.halt.set()
        self.join(10)
        return self.replies


ONE_ROUND = "training.rounds=1"  # the runs here are about who gets through, not about training


def attacked_run(tmp_path: Path, monkeypatch, attackers, *overrides) -> tuple[Path, Recorder, list[list[dict]]]:
    """A one-round run of test_run's tiny scenario while the attackers made by attackers(recorder) are at work;
    with the replies each attacker got."""
    recorder = Recorder(monkeypatch)
    running = [make(recorder) for make in attackers]
    for attacker in running:
        attacker.start()
    try:
        run_dir = run_scenario(scenario(tmp_path, ONE_ROUND, *overrides), progress=False)
    finally:
        replies = [attacker.stop() for attacker in running]
    return run_dir, recorder, replies


def assert_same_tables(run_dir: Path, reference: Path) -> None:
    first, second = read(run_dir), read(reference)
    pd.testing.assert_frame_equal(first["rounds"].drop(columns="wall_time_s"),
                                  second["rounds"].drop(columns="wall_time_s"), check_exact=True)
    pd.testing.assert_frame_equal(first["events"], second["events"], check_exact=True)
    pd.testing.assert_frame_equal(first["clients"], second["clients"], check_exact=True)


@pytest.fixture(scope="module")
def undisturbed(tmp_path_factory) -> Path:
    return run_scenario(scenario(tmp_path_factory.mktemp("undisturbed"), ONE_ROUND), progress=False)


@pytest.mark.parametrize("transport", ["ipc", "tcp"])
def test_a_process_without_the_key_changes_nothing(undisturbed, tmp_path, monkeypatch, transport):
    """Plain sockets and a CurveZMQ client with a key of its own push merges and shutdowns at every worker for the
    whole run: they get no reply, the workers log the unknown key, and the tables equal an undisturbed run's."""
    run_dir, recorder, (plain, wrong_key) = attacked_run(
        tmp_path, monkeypatch, [lambda r: Attacker(r), lambda r: Attacker(r, Keypair.new())],
        f"runtime.transport={transport}")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed", summary["error"]
    assert plain == [] and wrong_key == []
    assert_same_tables(run_dir, undisturbed)
    log = (run_dir / "log.txt").read_text()
    for name, _, _ in recorder.workers:
        assert f"worker {name}: refused a connection with an unknown CurveZMQ key" in log
    if transport == "tcp":  # the default host: nothing listens beyond this machine
        assert all(endpoint.startswith("tcp://127.0.0.1:") for _, endpoint, _ in recorder.workers)
        assert recorder.heartbeat_endpoint.startswith("tcp://127.0.0.1:")


def test_the_same_attack_with_the_coordinators_key_would_change_the_run(undisturbed, tmp_path, monkeypatch):
    """The control: the attack above is a real one. With the coordinator's key its merges are served, and the
    run's tables differ from an undisturbed run's, or the run breaks (a merge between a client's forward and backward
    invalidates the step's graph)."""
    try:
        run_dir, _, (replies,) = attacked_run(tmp_path, monkeypatch,
                                              [lambda r: Attacker(r, "coordinator", shutdown=False)])
    except RunError as error:  # a merge served between a client's forward and backward breaks the run outright
        assert "modified by an inplace operation" in str(error)
        return
    assert any(r.get("ok") and r["result"] == {"modules": 1} for r in replies), replies[:5]
    rounds, reference = read(run_dir)["rounds"], read(undisturbed)["rounds"]
    assert not np.array_equal(rounds["eval_loss"].to_numpy(), reference["eval_loss"].to_numpy())


def test_heartbeats_count_only_from_the_key_of_the_worker_they_name(tmp_path):
    """Plain and wrong-key PUSH sockets beat in the name of a silent worker, and a real worker's key in the name of
    another: none of it reaches or counts, and the silent worker is reported stale."""
    context = zmq.Context()
    heartbeats = Heartbeats(context, f"ipc://{tmp_path}/heartbeat.sock", Keypair.new())
    sleeper = subprocess.Popen(["sleep", "60"])
    silent, beating = Keypair.new(), Keypair.new()
    heartbeats.watch("silent", sleeper, silent.public)
    heartbeats.watch("beating", sleeper, beating.public)
    senders = []
    for keys, name in [(None, b"silent"), (Keypair.new(), b"silent"), (beating, b"silent"), (beating, b"beating")]:
        sock = context.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 0)
        if keys is not None:
            as_client(sock, keys, heartbeats.keys.public)
        sock.connect(heartbeats.endpoint)
        senders.append((sock, name))
    try:
        started = time.monotonic()
        stale = []
        while not stale and time.monotonic() - started < 3 * HEARTBEAT_TIMEOUT_S:
            for sock, name in senders:
                with contextlib.suppress(zmq.Again):
                    sock.send(name, zmq.NOBLOCK)
            time.sleep(0.2)
            stale = heartbeats.stale()
        assert stale == ["silent"]
        assert time.monotonic() - started > HEARTBEAT_TIMEOUT_S
        assert heartbeats.gate.refused >= 1  # the wrong key, at the handshake
    finally:
        for sock, _ in senders:
            sock.close(linger=0)
        heartbeats.close()
        context.destroy(linger=0)
        sleeper.kill()
        sleeper.wait()


def test_a_worker_without_keys_on_stdin_does_not_start(tmp_path):
    worker = subprocess.run([sys.executable, "-m", "hsplit_sim.runtime.worker", "--name", "t", "--endpoint",
                             f"ipc://{tmp_path}/w.sock", "--heartbeat", f"ipc://{tmp_path}/h.sock", "--parent",
                             str(os.getpid()), "--max-frame", "1000"], stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, timeout=60)
    assert worker.returncode == 1 and worker.stdout == ""
    assert worker.stderr.startswith("worker: no keys on stdin") and "Traceback" not in worker.stderr
    assert not (tmp_path / "w.sock").exists()


def peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_an_oversized_frame_is_refused_unread_and_the_worker_lives(tmp_path):
    """A frame of 100 MB from a peer with the coordinator's key (so past the handshake) closes its connection
    before it is read: the worker's peak memory does not grow by it, and it goes on serving. A frame over the
    limit is not sent by the coordinator either."""
    limit = 1 << 20
    context = zmq.Context()
    heartbeats = Heartbeats(context, f"ipc://{tmp_path}/heartbeat.sock", Keypair.new())
    process, keys = spawn_worker("t", f"ipc://{tmp_path}/w.sock", heartbeats, limit,
                                 env=dict(os.environ, HF_HUB_OFFLINE="1"))

    def connect() -> WorkerConnection:
        return WorkerConnection(context, "t", f"ipc://{tmp_path}/w.sock", process, 30, heartbeats, keys.public,
                                limit)

    try:
        first = connect()
        assert first.call("ping").header["result"]["pid"] == process.pid
        before = peak_rss_kib(process.pid)
        sock = context.socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        as_client(sock, heartbeats.keys, keys.public)
        sock.connect(f"ipc://{tmp_path}/w.sock")
        sock.send_multipart(encode({"op": "ping", "id": 1, "client": None, "args": {}},
                                   {"big": np.zeros(100_000_000, np.uint8)}), copy=False)
        assert not sock.poll(2000), "the worker answered a 100 MB frame"
        sock.close(linger=0)
        assert process.poll() is None
        assert peak_rss_kib(process.pid) - before < 50_000  # KiB: the 100 MB were never held
        assert first.call("ping").header["ok"] is True
        with pytest.raises(RunError, match="exceeds the run's frame limit of 1,048,576 bytes"):
            first.call("ping", tensors={"big": np.zeros(limit + 1, np.uint8)})
        assert first.call("ping").header["ok"] is True  # nothing was sent: the connection is still in step
        assert connect().call("shutdown").header["ok"] is True
        assert process.wait(10) == 0
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        heartbeats.close()
        context.destroy(linger=0)


def test_frame_limit_covers_the_runs_largest_tensor():
    """The limit is a quarter above the cost model's largest frame, and never below the header cap."""
    from hsplit_sim import costs
    from hsplit_sim.experiment.run import frame_limit
    from hsplit_sim.runtime.wire import MAX_HEADER_BYTES
    from hsplit_sim.scenario import model_hf_config

    small = scenario(Path("unused"))
    spec = costs.ModelSpec.from_hf_config(model_hf_config(small))
    assert frame_limit(small, spec, 4) == MAX_HEADER_BYTES * 5 // 4
    big = scenario(Path("unused"), "training.batch_size=64", "data.max_length=512")
    activations = costs.activation_bytes(spec, 64, 512)
    assert activations > MAX_HEADER_BYTES and frame_limit(big, spec, 4) == activations * 5 // 4
    many = scenario(Path("unused"), "clients=[{count: 400, device: jetson-agx-orin, link: wifi-6}]",
                    "data.train_examples=800")
    stacked = 401 * max(many.algorithm.rank_set) * 512 * 4  # FLoRA and NAA stack every client's factors
    assert frame_limit(many, spec, 400) == max(stacked, MAX_HEADER_BYTES) * 5 // 4


def write_scenario(tmp_path: Path) -> Path:
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(dict(BASE, output={"dir": str(tmp_path / "runs")})))
    return path


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.7", "example.org", "::"])
def test_an_interface_without_a_key_file_is_one_line_and_exit_2(tmp_path, capsys, host):
    path = write_scenario(tmp_path)
    assert main(["validate", str(path), "--set", "runtime.transport=tcp", "--set", f"runtime.host='{host}'"]) == 2
    assert one_error_line(capsys) == (f"error: runtime.host: {host!r} is not a loopback address; listening there "
                                      "needs runtime.key_file too (hsplit-sim keygen FILE)")
    for loopback in ("127.0.0.1", "localhost", "::1"):  # and ipc ignores the host
        assert main(["validate", str(path), "--set", "runtime.transport=tcp", "--set",
                     f"runtime.host={loopback}"]) == 0
    assert main(["validate", str(path), "--set", f"runtime.host='{host}'"]) == 0


def test_a_key_file_opens_an_interface_and_must_be_a_private_secret_certificate(tmp_path, capsys):
    path = write_scenario(tmp_path)
    key = tmp_path / "run.key_secret"
    assert main(["keygen", str(key)]) == 0
    assert key.stat().st_mode & 0o777 == 0o600
    assert capsys.readouterr().out.strip() == f"{key}: public key {load_key_file(key).public.decode()}"
    assert main(["keygen", str(key)]) == 2
    assert "exists already" in one_error_line(capsys)
    tcp = ["--set", "runtime.transport=tcp", "--set", "runtime.host=0.0.0.0"]
    assert main(["validate", str(path), *tcp, "--set", f"runtime.key_file={key}"]) == 0
    data = yaml.safe_load(path.read_text())
    data["runtime"].update(transport="tcp", host="0.0.0.0", key_file="run.key_secret")  # beside the scenario
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    path.write_text(yaml.safe_dump(data))
    with contextlib.chdir(elsewhere):
        assert main(["validate", str(path)]) == 0
    capsys.readouterr()

    public_only = tmp_path / "run.key"
    public_only.write_text(f'curve\n    public-key = "{load_key_file(key).public.decode()}"\n')
    public_only.chmod(0o600)
    cases = [(public_only, "holds a public key only"), (tmp_path / "absent", "cannot read"),
             (tmp_path, "is not a regular file")]
    key.chmod(0o644)
    cases.append((key, "is open to other users (mode 0644); chmod 600"))
    for bad, fragment in cases:
        assert main(["validate", str(path), *tcp, "--set", f"runtime.key_file={bad}"]) == 2
        line = one_error_line(capsys)
        assert line.startswith("error: runtime.key_file: ") and fragment in line, line


# A second process, in a directory of its own, with its own copy of the key file: ping, then shutdown.
HAND_CLIENT = """
import json, sys, zmq
from pathlib import Path
from hsplit_sim.runtime.keys import Keypair, as_client, load_key_file
from hsplit_sim.runtime.wire import decode, encode

endpoint, key_file = sys.argv[1], sys.argv[2]
context = zmq.Context()

def ask(keys, server, op):
    sock = context.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    as_client(sock, keys, server)
    sock.connect(endpoint)
    sock.send_multipart(encode({"op": op, "id": 1, "client": None, "args": {}}))
    reply = decode(sock.recv_multipart()).header if sock.poll(20000 if keys is not None else 2000) else None
    sock.close()
    return reply

keys = load_key_file(Path(key_file))
answers = {"stranger": ask(Keypair.new(), keys.public, "shutdown"), "ping": ask(keys, keys.public, "ping"),
           "shutdown": ask(keys, keys.public, "shutdown")}
print(json.dumps(answers))
"""


def test_a_worker_started_by_hand_serves_the_holder_of_its_key_file_only(tmp_path):
    """`hsplit-sim worker --listen ADDR --key FILE` and a client process over tcp, each in its own directory with
    its own copy of the key file: a stranger's shutdown gets nothing, the key holder's ping and shutdown are
    answered, and the worker exits 0."""
    here, there = tmp_path / "worker-host", tmp_path / "coordinator-host"
    here.mkdir()
    there.mkdir()
    assert main(["keygen", str(here / "run.key_secret")]) == 0
    (there / "run.key_secret").write_bytes((here / "run.key_secret").read_bytes())
    (there / "run.key_secret").chmod(0o600)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    worker = subprocess.Popen([sys.executable, "-m", "hsplit_sim.cli", "worker", "--listen", "tcp://127.0.0.1:*",
                               "--key", "run.key_secret", "--name", "by-hand"], cwd=here, env=env,
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        announced = worker.stderr.readline()
        assert announced.startswith("worker by-hand listening on tcp://127.0.0.1:"), announced
        endpoint = announced.split()[4]
        client = subprocess.run([sys.executable, "-c", HAND_CLIENT, endpoint, "run.key_secret"], cwd=there, env=env,
                                capture_output=True, text=True, timeout=120)
        assert client.returncode == 0, client.stderr
        answers = json.loads(client.stdout)
        assert answers["stranger"] is None
        assert answers["ping"]["ok"] is True and answers["ping"]["result"]["name"] == "by-hand"
        assert answers["ping"]["result"]["pid"] == worker.pid
        assert answers["shutdown"]["ok"] is True
        assert worker.wait(20) == 0
        assert "refused a connection with an unknown CurveZMQ key" in worker.stderr.read()
    finally:
        if worker.poll() is None:
            worker.kill()
        worker.wait()
        worker.stdout.close()
        worker.stderr.close()


def test_a_worker_started_by_hand_refuses_a_bad_key_file_or_address_in_one_line(tmp_path, capsys):
    key = tmp_path / "run.key_secret"
    assert main(["keygen", str(key)]) == 0
    capsys.readouterr()
    assert main(["worker", "--listen", "127.0.0.1:5555", "--key", str(key)]) == 2
    assert one_error_line(capsys) == "error: --listen: '127.0.0.1:5555' is not tcp://HOST:PORT or ipc://PATH"
    assert main(["worker", "--listen", "tcp://no-such-host.invalid:5555", "--key", str(key)]) == 2
    assert one_error_line(capsys).startswith("error: --listen: cannot listen on tcp://no-such-host.invalid:5555")
    key.chmod(0o640)
    assert main(["worker", "--listen", "tcp://127.0.0.1:*", "--key", str(key)]) == 2
    assert "error: --key: " in one_error_line(capsys)
