"""The wire format, and a worker process that survives malformed requests and is noticed when it dies."""

import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest
import zmq

from hsplit_sim.errors import RunError
from hsplit_sim.runtime.connection import WorkerConnection
from hsplit_sim.runtime.heartbeat import Heartbeats
from hsplit_sim.runtime.keys import Keypair
from hsplit_sim.runtime.launcher import spawn_worker
from hsplit_sim.runtime.wire import (JSON_CHUNK_BYTES, PROTOCOL_VERSION, ProtocolError, decode, encode,
                                     from_json_arrays, json_arrays, page)


def frames_of(header: dict, *buffers: bytes) -> list[bytes]:
    return [json.dumps(header).encode(), *buffers]


def round_trip(tensors: dict) -> dict:
    frames = encode({"op": "x", "id": 1}, tensors)
    return decode([bytes(f) for f in frames], required=("op", "id")).tensors


# --- wire format ------------------------------------------------------------------------------------


def test_round_trip_of_dtypes_and_shapes():
    rng = np.random.default_rng(0)
    tensors = {
        "f32": rng.normal(size=(3, 4)).astype(np.float32),
        "f64": rng.normal(size=(2, 3, 5)),
        "f16": rng.normal(size=(7,)).astype(np.float16),
        "i64": np.arange(12, dtype=np.int64).reshape(3, 4),
        "i32": np.array([-1, 0, 2**31 - 1], dtype=np.int32),
        "u8": np.arange(256, dtype=np.uint8),
        "bool": np.array([[True, False], [False, True]]),
        "scalar": np.array(3.5, dtype=np.float32),
        "empty": np.zeros((0,), dtype=np.float32),
        "empty3d": np.zeros((2, 0, 3), dtype=np.int64),
        "strided": np.arange(20, dtype=np.float32).reshape(4, 5)[:, ::2],  # made contiguous on the way out
    }
    back = round_trip(tensors)
    assert list(back) == list(tensors)
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype, name
        assert back[name].shape == t.shape, name
        np.testing.assert_array_equal(back[name], t)


def test_header_round_trip_and_payload_bytes():
    tensors = {"a": np.ones((2, 3), np.float32), "b": np.ones(4, np.int64)}
    message = decode(encode({"op": "step", "id": 7, "client": 3, "args": {"k": [1, 2]}}, tensors))
    assert message.header["op"] == "step" and message.header["id"] == 7 and message.header["client"] == 3
    assert message.header["args"] == {"k": [1, 2]} and message.header["v"] == PROTOCOL_VERSION
    assert message.payload_bytes == 2 * 3 * 4 + 4 * 8
    assert decode(encode({"op": "ping", "id": 1})).tensors == {}


def test_encode_rejects_dtypes_that_cannot_cross():
    with pytest.raises(ProtocolError, match="complex64"):
        encode({"op": "x", "id": 1}, {"z": np.zeros(2, np.complex64)})


def spec(name="t", dtype="float32", shape=(2,)):
    return {"name": name, "dtype": dtype, "shape": list(shape)}


@pytest.mark.parametrize(
    "frames, fragment",
    [
        ([], "empty"),
        ([b"\xff\xfe not json"], "not JSON"),
        ([b"{truncated"], "not JSON"),
        ([b"[1, 2]"], "not a JSON object"),
        (frames_of({"op": "x", "id": 1}), "version"),
        (frames_of({"v": 99, "op": "x", "id": 1}), "version"),
        (frames_of({"v": PROTOCOL_VERSION, "id": 1}), "'op'"),
        (frames_of({"v": PROTOCOL_VERSION, "op": "x", "id": 1, "tensors": [spec()]}), "1 tensors but 0 buffers"),
        (frames_of({"v": PROTOCOL_VERSION, "op": "x", "id": 1, "tensors": []}, b"\0" * 8), "0 tensors but 1"),
        (frames_of({"v": PROTOCOL_VERSION, "op": "x", "id": 1, "tensors": "t"}, b"\0" * 8), "buffers followed"),
        (frames_of({"v": PROTOCOL_VERSION, "op": "x", "id": 1, "tensors": [spec()]}, b"\0" * 7), "7 bytes"),
        (frames_of({"v": PROTOCOL_VERSION, "op": "x", "id": 1, "tensors": [spec()]}, b"\0" * 16), "16 bytes"),
        (frames_of({"v": PROTOCOL_VERSION, "op": "x", "id": 1, "tensors": [spec(dtype="object")]}, b"\0" * 16),
         "'object' not allowed"),
        (frames_of({"v": PROTOCOL_VERSION, "op": "x", "id": 1, "tensors": [spec(dtype="complex64")]}, b"\0" * 16),
         "not allowed"),
        (frames_of({"v": PROTOCOL_VERSION, "op": "x", "id": 1, "tensors": [spec(), spec()]}, b"\0" * 8, b"\0" * 8),
         "not a new string"),
        (frames_of({"v": PROTOCOL_VERSION, "op": "x", "id": 1, "tensors": [spec(shape=(-1,))]}, b""), "bad shape"),
        (frames_of({"v": PROTOCOL_VERSION, "op": "x", "id": 1, "tensors": [spec(shape=(2.0,))]}, b"\0" * 8),
         "bad shape"),
        (frames_of({"v": PROTOCOL_VERSION, "op": "x", "id": 1, "tensors": [{"name": "t"}]}, b""),
         "needs name, dtype and shape"),
        (frames_of({"v": PROTOCOL_VERSION, "op": "x", "id": 1, "tensors": [spec(name=5)]}, b"\0" * 8),
         "not a new string"),
    ],
    ids=["no-frames", "binary-header", "truncated-json", "json-array", "no-version", "wrong-version", "missing-op",
         "missing-buffer", "extra-buffer", "tensors-not-list", "short-buffer", "long-buffer", "object-dtype",
         "complex-dtype", "duplicate-name", "negative-dim", "float-dim", "incomplete-spec", "non-string-name"],
)
def test_decode_rejects(frames, fragment):
    with pytest.raises(ProtocolError, match=fragment.replace("(", r"\(")):
        decode(frames, required=("op", "id"))


def test_decode_rejects_oversized_header():
    huge = json.dumps({"v": PROTOCOL_VERSION, "op": "x", "id": 1, "pad": "x" * (1 << 20)}).encode()
    with pytest.raises(ProtocolError, match="exceeds"):
        decode([huge])


def test_json_goes_as_bounded_chunks_among_other_arrays():
    value = {"adapters": [{"adapter": f"c{k}", "ranks": [[layer, "q", 8] for layer in range(30)]} for k in range(2000)]}
    chunks = json_arrays(value)
    assert len(chunks) >= 3 and all(0 < chunk.nbytes <= JSON_CHUNK_BYTES for chunk in chunks.values())
    back, rest = from_json_arrays(round_trip({"w": np.ones(2), **chunks, "v": np.zeros(1)}))
    assert back == value and list(rest) == ["w", "v"]


def test_pages_cover_the_arrays_in_order_within_the_budget():
    arrays = {f"a{k}": np.zeros((k % 3, 2), np.float32) for k in range(100)}
    named, start = [], 0
    while start is not None:
        part, start = page(arrays, start, budget=200)
        header = json.loads(bytes(encode({"id": 1}, part)[0]))
        assert len(json.dumps(header["tensors"], separators=(",", ":"))) - 2 <= 200
        named += list(part)
    assert named == list(arrays)
    part, following = page(arrays, 0, budget=1)
    assert list(part) == ["a0"] and following == 1  # an entry over the budget goes alone


# --- a real worker process -----------------------------------------------------------------------


FRAME_LIMIT = 1 << 20


@pytest.fixture
def worker(tmp_path):
    """A worker process on an ipc endpoint, beating to this process; killed whatever the test does. Yields the
    process, a function that makes an authenticated connection to it, a context and the heartbeats."""
    endpoint = f"ipc://{tmp_path}/w.sock"
    context = zmq.Context()
    heartbeats = Heartbeats(context, f"ipc://{tmp_path}/heartbeat.sock", Keypair.new())
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    process, keys = spawn_worker("t", endpoint, heartbeats, FRAME_LIMIT, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, env=env)

    def connect(timeout_s=30) -> WorkerConnection:
        return WorkerConnection(context, "t", endpoint, process, timeout_s, heartbeats, keys.public, FRAME_LIMIT)

    try:
        yield process, connect, context, heartbeats
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(10)
        process.stdout.close()
        heartbeats.close()
        context.destroy(linger=0)


def request(sock, frames, timeout_s=20.0) -> dict:
    sock.send_multipart(frames)
    assert sock.poll(int(timeout_s * 1000)), "worker did not answer"
    return decode(sock.recv_multipart(), required=("id", "ok")).header


def test_worker_answers_garbage_with_errors_and_keeps_serving(worker):
    process, connect, _, _ = worker
    sock = connect().socket  # the connection's authenticated socket, for frames it would never send

    reply = request(sock, [b"\x00\x01 garbage", b"more garbage"])
    assert reply["ok"] is False and "malformed" in reply["error"] and reply["id"] is None

    reply = request(sock, [json.dumps({"v": 42, "op": "ping", "id": 1}).encode()])
    assert reply["ok"] is False and "malformed" in reply["error"] and "version" in reply["error"]

    header = {"v": PROTOCOL_VERSION, "op": "ping", "id": 2, "tensors": [spec()]}
    reply = request(sock, [json.dumps(header).encode(), b"\0" * 3])
    assert reply["ok"] is False and "malformed" in reply["error"]

    reply = request(sock, encode({"op": 5, "id": 3, "client": None, "args": {}}))
    assert reply["ok"] is False and "malformed" in reply["error"] and reply["id"] == 3

    reply = request(sock, encode({"op": "ping", "id": 4, "client": None, "args": {}}))
    assert reply["ok"] is True and reply["id"] == 4
    assert reply["result"] == {"name": "t", "pid": process.pid}

    reply = request(sock, encode({"op": "forward", "id": 5, "client": 0, "args": {}}))
    assert reply["ok"] is False and reply["id"] == 5 and "before init" in reply["error"]

    reply = request(sock, encode({"op": "ping", "id": 6, "client": None, "args": {}}))
    assert reply["ok"] is True and reply["id"] == 6

    reply = request(sock, encode({"op": "shutdown", "id": 7, "client": None, "args": {}}))
    assert reply["ok"] is True and reply["id"] == 7
    assert process.wait(10) == 0
    sock.close(linger=0)


def test_connection_notices_a_dead_worker(worker):
    process, connect, _, _ = worker
    connection = connect()
    try:
        assert connection.call("ping", timeout_s=20).header["result"]["pid"] == process.pid
        process.send_signal(signal.SIGKILL)
        process.wait(5)
        started = time.monotonic()
        with pytest.raises(RunError, match="died"):
            connection.call("ping")
        assert time.monotonic() - started < 2.0
    finally:
        connection.close()


def test_connection_reports_a_failed_request(worker):
    process, connect, _, _ = worker
    connection = connect()
    try:
        with pytest.raises(RunError, match="failed on 'backward'.*before init"):
            connection.call("backward", client=0, timeout_s=20)
        assert connection.call("ping").header["ok"] is True  # the REQ socket is usable again
    finally:
        connection.close()


def test_a_deferred_request_is_answered_before_the_next_or_on_settle(worker):
    """defer returns at once; its reply reaches on_reply before the connection's next request is sent, or at
    settle; a deferred request that failed raises there, naming the worker and the op."""
    process, connect, _, _ = worker
    connection = connect()
    replies = []
    try:
        connection.defer("ping", replies.append)
        assert replies == []
        assert connection.call("ping").header["ok"] is True
        assert [r.header["result"]["pid"] for r in replies] == [process.pid]  # taken before the call's own
        connection.defer("ping", replies.append)
        connection.settle()
        connection.settle()  # nothing outstanding: nothing happens
        assert len(replies) == 2
        connection.defer("backward", replies.append, client=0)
        with pytest.raises(RunError, match="worker t failed on 'backward'.*before init"):
            connection.settle()
        assert len(replies) == 2 and connection.call("ping").header["ok"] is True
        connection.defer("ping", replies.append)
        assert connection.call("shutdown", timeout_s=20).header["ok"] is True  # the run ends: taken, not used
        assert len(replies) == 2 and process.wait(10) == 0
    finally:
        connection.close()


def test_local_client_workers_share_the_cores_unless_threads_are_set(monkeypatch):
    from hsplit_sim.runtime.launcher import worker_env

    monkeypatch.delenv("HSPLIT_SIM_TORCH_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert "HSPLIT_SIM_TORCH_THREADS" not in worker_env(None)  # one worker computes at a time: torch's default
    assert worker_env(None, sharing=2)["HSPLIT_SIM_TORCH_THREADS"] == "4"
    assert worker_env(None, sharing=16)["HSPLIT_SIM_TORCH_THREADS"] == "1"
    assert worker_env(3, sharing=2)["HSPLIT_SIM_TORCH_THREADS"] == "3"
    monkeypatch.setenv("HSPLIT_SIM_TORCH_THREADS", "2")  # a sweep's share of the machine
    assert worker_env(None, sharing=4)["HSPLIT_SIM_TORCH_THREADS"] == "2"


def test_a_split_iterations_two_sides_overlap_only_on_cores_of_their_own(monkeypatch):
    """Overlapping the server step with a client worker's backward measured slower on SmolLM2-135M when both
    took every core: local workers overlap only when their torch threads fit the machine's cores."""
    from hsplit_sim.runtime.launcher import _threads_fit

    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    monkeypatch.delenv("HSPLIT_SIM_TORCH_THREADS", raising=False)
    assert not _threads_fit(1, None)  # unset: torch takes every core in each worker
    assert _threads_fit(1, 2) and _threads_fit(3, 1) and not _threads_fit(2, 2)
    monkeypatch.setenv("HSPLIT_SIM_TORCH_THREADS", "2")  # as a sweep sets it for its points
    assert _threads_fit(1, None) and not _threads_fit(2, None)
