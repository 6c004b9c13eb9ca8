"""Liveness of workers and coordinator, independent of how long a request may take.

Each worker sends its name every HEARTBEAT_INTERVAL_S from a thread of its own, on a PUSH socket connected to the
one PULL socket the coordinator binds. The coordinator drains them while it waits for any reply and fails the run
when it has listened for HEARTBEAT_TIMEOUT_S without hearing from a live worker: a stopped, hung or unreachable
worker is found in seconds even with runtime.request_timeout_s at 600. The same thread ends the worker when its
coordinator is gone, mid-request included (the request loop cannot look while torch computes).

The thread keeps beating while the worker's main thread computes: torch releases the GIL inside its operators and
Python hands the GIL over every 5 ms (sys.getswitchinterval) otherwise; tests/test_liveness.py checks the gaps
while a process imports torch and multiplies matrices.

Both ends use CurveZMQ (keys.py): the PULL socket is a server that admits only the keys of the workers it watches,
and a beat counts only for the worker whose key sent it, so no other process can keep a stopped worker alive.
"""

import contextlib
import os
import subprocess
import sys
import threading
import time

import zmq

from hsplit_sim.runtime.keys import Gate, Keypair, as_client, as_server

HEARTBEAT_INTERVAL_S = 1.0
HEARTBEAT_TIMEOUT_S = 5.0
MAX_BEAT_BYTES = 1024  # a beat is a worker's name: the PULL socket's ZMQ_MAXMSGSIZE


class Heartbeats:
    """The coordinator's end: when each worker was last heard from, by the coordinator's clock at draining."""

    def __init__(self, context: zmq.Context, endpoint: str, keys: Keypair):
        """endpoint: an ipc path, or tcp://HOST:* for a free port (self.endpoint then names the port); keys: the
        coordinator's. Starts the context's ZAP handler (one per context), which close() stops."""
        self.keys = keys
        self.gate = Gate(context, name="coordinator")
        self.socket = context.socket(zmq.PULL)
        try:
            self.socket.setsockopt(zmq.LINGER, 0)
            self.socket.setsockopt(zmq.MAXMSGSIZE, MAX_BEAT_BYTES)
            as_server(self.socket, keys)
            self.socket.bind(endpoint)
        except BaseException:
            self.close()
            raise
        # what workers connect to: a bind to every interface is reached on loopback here
        self.endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT).replace("tcp://0.0.0.0:", "tcp://127.0.0.1:")
        self.silent: set[str] = set()  # every worker stale() has reported: close() kills them without asking
        self._last: dict[str, float] = {}
        self._processes: dict[str, subprocess.Popen] = {}
        self._user_ids: dict[str, str] = {}
        self._drained = time.monotonic()

    def watch(self, name: str, process: subprocess.Popen, public: bytes) -> None:
        """Expect heartbeats from a worker just started with that public key (the clock starts now, its first beat
        is due soon)."""
        self.gate.admit(public)
        self._user_ids[name] = public.decode()  # the ZAP handler's User-Id of a CurveZMQ client: its Z85 key
        self._last[name] = time.monotonic()
        self._processes[name] = process

    def stale(self) -> list[str]:
        """Live workers not heard from while the coordinator listened for HEARTBEAT_TIMEOUT_S; drains every
        heartbeat waiting first. One that has exited is left to its connection, which reports how it ended (or it
        was shut down)."""
        now = time.monotonic()
        if now - self._drained > HEARTBEAT_INTERVAL_S:
            # The coordinator was not listening (busy between requests, or stopped itself, as by Ctrl-Z and fg):
            # heartbeats sent meanwhile may still be on their way, so silence counts from now.
            self._last = dict.fromkeys(self._last, now)
        self._drained = now
        while self.socket.poll(0):
            frame = self.socket.recv(copy=False)
            name = frame.bytes.decode(errors="replace")
            if name in self._last and frame.get("User-Id") == self._user_ids[name]:
                self._last[name] = now
        stale = [name for name, last in self._last.items()
                 if now - last > HEARTBEAT_TIMEOUT_S and self._processes[name].poll() is None]
        self.silent.update(stale)
        return stale

    def close(self) -> None:
        self.socket.close(linger=0)
        self.gate.close()


def start_beating(name: str, endpoint: str, parent: int, serving: str, keys: Keypair, coordinator: bytes) -> None:
    """The worker's end, started before anything heavy is imported. parent: the coordinator's pid, passed on the
    command line so that a coordinator gone before the worker started is noticed too; serving: the worker's own
    endpoint; keys: the worker's; coordinator: the coordinator's public key."""
    ipc_paths = [e.removeprefix("ipc://") for e in (serving, endpoint) if e.startswith("ipc://")]
    threading.Thread(target=_beat, args=(name, endpoint, parent, ipc_paths, keys, coordinator), name="heartbeat",
                     daemon=True).start()


def _beat(name: str, endpoint: str, parent: int, ipc_paths: list[str], keys: Keypair, coordinator: bytes) -> None:
    socket = zmq.Context().socket(zmq.PUSH)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.SNDHWM, 10)
    as_client(socket, keys, coordinator)
    socket.connect(endpoint)
    while True:
        if os.getppid() != parent:
            _coordinator_gone(name, parent, ipc_paths)
        try:
            socket.send(name.encode(), zmq.NOBLOCK)
        except zmq.Again:  # the coordinator is not reading (busy or stopped): it counts from its last drain
            pass
        time.sleep(HEARTBEAT_INTERVAL_S)


def _coordinator_gone(name: str, parent: int, ipc_paths: list[str]) -> None:
    """Exit at once, even mid-request: nobody is waiting for the result. The socket files and their folder would
    otherwise stay behind, the coordinator that made them being gone."""
    print(f"worker {name}: the coordinator (pid {parent}) is gone; exiting", file=sys.stderr, flush=True)
    for path in ipc_paths:
        with contextlib.suppress(OSError):
            os.unlink(path)
    for folder in {os.path.dirname(path) for path in ipc_paths}:
        with contextlib.suppress(OSError):  # the last worker out finds it empty
            os.rmdir(folder)
    os._exit(3)
