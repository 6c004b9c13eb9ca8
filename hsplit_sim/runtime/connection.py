"""The coordinator's side of a worker: requests with timeouts that notice a dead worker within a second and a
stopped or unreachable one within seconds (heartbeat.py), over CurveZMQ (keys.py) with a frame limit both ways."""

import itertools
import subprocess
from collections.abc import Callable

import numpy as np
import zmq

from hsplit_sim.errors import RunError
from hsplit_sim.runtime import stop
from hsplit_sim.runtime.heartbeat import HEARTBEAT_TIMEOUT_S, Heartbeats
from hsplit_sim.runtime.keys import as_client, max_msgsize
from hsplit_sim.runtime.wire import Message, ProtocolError, decode, encode, frame_bytes

POLL_MS = 200


class WorkerConnection:
    def __init__(self, context: zmq.Context, name: str, endpoint: str, process: subprocess.Popen | None,
                 timeout_s: float, heartbeats: Heartbeats, server_key: bytes, frame_limit: int,
                 session: str | None = None):
        """process: None for a worker started by hand; server_key: the worker's public key; the coordinator's own
        key pair is the heartbeats'. frame_limit: the run's largest legitimate frame (a larger reply closes the
        connection before it is read). session: the id every request to a hand-started worker carries."""
        self.name = name
        self.endpoint = endpoint
        self.process = process
        self.session = session
        self.timeout_s = timeout_s
        self.heartbeats = heartbeats
        self.frame_limit = frame_limit
        self.socket = context.socket(zmq.REQ)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.MAXMSGSIZE, max_msgsize(frame_limit))
        as_client(self.socket, heartbeats.keys, server_key)
        self.socket.connect(endpoint)
        self._ids = itertools.count(1)
        self.failure: str | None = None
        self._deferred: tuple[str, int, Callable[[Message], None]] | None = None

    def call(self, op: str, client: int | None = None, args: dict | None = None,
             tensors: dict[str, np.ndarray] | None = None, timeout_s: float | None = None) -> Message:
        """Send one request and wait for its reply; any failure ends the run with a RunError."""
        request_id = self.send(op, client, args, tensors)
        return self.reply(op, request_id, timeout_s)

    def defer(self, op: str, on_reply: Callable[[Message], None], client: int | None = None,
              args: dict | None = None, tensors: dict[str, np.ndarray] | None = None) -> None:
        """Send a request whose reply only `on_reply` needs and return at once, so that this worker computes while
        the coordinator goes on to other workers. The reply is taken (and on_reply called) before this
        connection's next request or by `settle`: the worker does the same work in the same order as with `call`."""
        request_id = self.send(op, client, args, tensors)
        self._deferred = (op, request_id, on_reply)

    def settle(self) -> None:
        """Take the reply of the deferred request, if one is outstanding."""
        if self._deferred is not None:
            op, request_id, on_reply = self._deferred
            self._deferred = None
            on_reply(self.reply(op, request_id))

    def _fail(self, message: str) -> RunError:
        """After a failure the REQ socket is out of step, so every later request repeats the first error."""
        self.failure = self.failure or message
        return RunError(self.failure)

    def send(self, op: str, client: int | None = None, args: dict | None = None,
             tensors: dict[str, np.ndarray] | None = None) -> int:
        """The first half of call, so that several workers can work on requests at once."""
        if stop.requested() and op != "shutdown":
            raise KeyboardInterrupt
        if self.failure:
            raise RunError(self.failure)
        if op == "shutdown" and self._deferred is not None:  # the run is ending: the reply is taken, not used,
            self._deferred = None  # and a worker that takes longer than a heartbeat's silence is killed instead
            self._receive("shutdown", HEARTBEAT_TIMEOUT_S)
        self.settle()
        request_id = next(self._ids)
        header = {"op": op, "id": request_id, "client": client, "args": args or {}}
        if self.session is not None:
            header["session"] = self.session
        frames = encode(header, tensors)
        largest = frame_bytes(frames)
        if largest > self.frame_limit:  # the worker would drop the connection, and the request with it
            raise RunError(f"worker {self.name}: a frame of {largest:,} bytes in {op!r} exceeds the run's frame "
                           f"limit of {self.frame_limit:,} bytes (a bug in the limit's derivation, or the --max-frame "
                           "of a worker started by hand)")
        try:
            self.socket.send_multipart(frames, copy=False)
        except zmq.ZMQError as exc:
            raise self._fail(f"worker {self.name}: could not send {op!r}: {exc}") from None
        return request_id

    def reply(self, op: str, request_id: int, timeout_s: float | None = None) -> Message:
        reply = self._receive(op, timeout_s or self.timeout_s)
        if reply.header.get("id") != request_id:
            raise self._fail(f"worker {self.name}: reply to request {reply.header.get('id')} while waiting for "
                             f"{request_id}")
        if not reply.header.get("ok"):
            raise RunError(f"worker {self.name} failed on {op!r}: {reply.header.get('error')}")
        if op == "init" and self.session is not None:  # a hand-started worker takes frames up to its --max-frame
            self.frame_limit = min(self.frame_limit, reply.header["result"]["frame_limit"])
        return reply

    def _receive(self, op: str, timeout_s: float) -> Message:
        waited_ms = 0
        while not self.socket.poll(POLL_MS):
            if stop.requested() and op != "shutdown":
                raise KeyboardInterrupt
            waited_ms += POLL_MS
            if self.process is not None and self.process.poll() is not None:
                raise self._fail(f"worker {self.name} died (exit status {self.process.returncode}) during {op!r}; "
                                 "see log.txt in the run directory")
            # shutdown has a grace of its own, which another worker's silence must not cut short
            stale = self.heartbeats.stale() if op != "shutdown" else []
            if stale:
                where = self.heartbeats.where.get(stale[0])  # a worker started by hand: where, and which key
                raise self._fail(f"worker {stale[0]}{f' at {where}' if where else ''} stopped answering heartbeats "
                                 f"(none for {HEARTBEAT_TIMEOUT_S:.0f} s while waiting for {self.name}'s reply to "
                                 f"{op!r}): it is stopped, hung or unreachable"
                                 f"{', or its --key is not a copy of runtime.key_file' if where else ''}")
            if waited_ms >= timeout_s * 1000:
                raise self._fail(f"worker {self.name} did not answer {op!r} within {timeout_s:.0f} s")
        try:
            return decode(self.socket.recv_multipart(copy=False), required=("id", "ok"))
        except ProtocolError as exc:
            raise self._fail(f"worker {self.name} sent a malformed reply to {op!r}: {exc}") from None

    def close(self) -> None:
        self.socket.close(linger=0)
