"""Liveness of workers and coordinator, independent of how long a request may take.

Each worker sends its name every HEARTBEAT_INTERVAL_S from a thread of its own, on a PUSH socket connected to the
one PULL socket the coordinator binds. The coordinator drains them while it waits for any reply and fails the run
when it has listened for HEARTBEAT_TIMEOUT_S without hearing from a live worker: a stopped, hung or unreachable
worker is found in seconds even with runtime.request_timeout_s at 600. The same thread ends the worker when its
coordinator is gone, mid-request included (the request loop cannot look while torch computes).

The thread keeps beating while the worker's main thread computes: torch releases the GIL inside its operators and
Python hands the GIL over every 5 ms (sys.getswitchinterval) otherwise; tests/test_liveness.py checks the gaps
while a process imports torch and multiplies matrices.

A worker started by hand (`hsplit-sim worker`) has no parent to watch: it learns the heartbeat socket and its name
in the run at `init` and beats from a `SessionBeat`, whose PUSH connection also carries ZeroMQ's own heartbeats
(ZMQ_HEARTBEAT_IVL: pings that the coordinator's I/O thread answers whatever its main thread does). When that
connection has been down for COORDINATOR_TIMEOUT_S (the coordinator exited, is stopped or unreachable), the session
is over and the worker listens for the next coordinator (worker.py).

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
# A worker the coordinator had Ray start beats once Ray has started its actor and the actor its process, which
# on a loaded machine takes longer than HEARTBEAT_TIMEOUT_S; silence counts from its first beat on.
FIRST_BEAT_TIMEOUT_S = 30.0
COORDINATOR_TIMEOUT_S = 10.0  # a hand-started worker's session ends after its heartbeat connection is down this long
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
        # what workers on other machines are told: a bind to every interface (0.0.0.0) they reach at the address
        # their requests come from (SessionBeat); local workers reach it on loopback
        self.bound = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.endpoint = self.bound.replace("tcp://0.0.0.0:", "tcp://127.0.0.1:")
        self.silent: set[str] = set()  # every worker stale() has reported: close() kills them without asking
        self._last: dict[str, float] = {}
        self._processes: dict[str, subprocess.Popen | None] = {}
        self._user_ids: dict[str, str] = {}
        self._first_beat_s: dict[str, float] = {}
        self._heard: set[str] = set()  # workers whose first beat has come
        self.where: dict[str, str] = {}  # the endpoints of workers started by hand
        self._drained = time.monotonic()

    def watch(self, name: str, process: subprocess.Popen | None, public: bytes, where: str | None = None,
              first_beat_s: float = HEARTBEAT_TIMEOUT_S) -> None:
        """Expect heartbeats from a worker just started with that public key (the clock starts now, its first beat
        is due within first_beat_s). process: None for a worker started by hand, which beats once it has its
        `init`; where: its endpoint, named in errors."""
        self.gate.admit(public)
        self._first_beat_s[name] = first_beat_s
        self._heard.discard(name)
        if where is not None:
            self.where[name] = where
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
                self._heard.add(name)
        stale = [name for name, last in self._last.items()
                 if now - last > (HEARTBEAT_TIMEOUT_S if name in self._heard else self._first_beat_s[name])
                 and _running(self._processes[name])]
        self.silent.update(stale)
        return stale

    def close(self) -> None:
        self.socket.close(linger=0)
        self.gate.close()


def _running(process: subprocess.Popen | None) -> bool:
    """A local worker that has not exited, or a worker started by hand (whose process the coordinator cannot see)."""
    return process is None or process.poll() is None


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


class SessionBeat:
    """A hand-started worker's heartbeats for the run it serves, and its watch on that run's coordinator: `gone` is
    set once the heartbeat connection has been down for COORDINATOR_TIMEOUT_S (never up counts as down). ZeroMQ's
    heartbeats (a ping every HEARTBEAT_INTERVAL_S, the connection closed after HEARTBEAT_TIMEOUT_S without an
    answer) bring a stopped or unreachable coordinator down like one that exited."""

    def __init__(self, name: str, endpoint: str, keys: Keypair, coordinator: bytes):
        """name: the worker's name in the run (what the coordinator watches); keys: the worker's; coordinator: the
        coordinator's public key."""
        self.gone = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(name, endpoint, keys, coordinator),
                                        name="session-heartbeat", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self, name: str, endpoint: str, keys: Keypair, coordinator: bytes) -> None:
        context = zmq.Context()
        socket = context.socket(zmq.PUSH)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.SNDHWM, 10)
        socket.setsockopt(zmq.HEARTBEAT_IVL, int(HEARTBEAT_INTERVAL_S * 1000))
        socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(HEARTBEAT_TIMEOUT_S * 1000))
        as_client(socket, keys, coordinator)
        monitor = socket.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
        socket.connect(endpoint)
        up, down_since = False, time.monotonic()
        try:
            while not self._stop.is_set():
                while monitor.poll(0):  # an event's first frame: its kind (uint16), then a value
                    if int.from_bytes(monitor.recv_multipart()[0][:2], "little") == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                        up = True
                    elif up:
                        up, down_since = False, time.monotonic()
                if not up and time.monotonic() - down_since > COORDINATOR_TIMEOUT_S:
                    self.gone.set()
                    return
                with contextlib.suppress(zmq.Again):
                    socket.send(name.encode(), zmq.NOBLOCK)
                self._stop.wait(HEARTBEAT_INTERVAL_S)
        finally:
            socket.disable_monitor()
            monitor.close(linger=0)
            socket.close(linger=0)
            context.term()
