"""Starts the server worker and the client workers as local processes or as Ray actors (runtime.placement, with
ray_actors.py), or takes client workers started by hand (runtime.remote_workers), and connects to them."""

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import zmq

from hsplit_sim.runtime import stop
from hsplit_sim.runtime.connection import WorkerConnection
from hsplit_sim.runtime.heartbeat import FIRST_BEAT_TIMEOUT_S, Heartbeats
from hsplit_sim.runtime.keys import Keypair

SHUTDOWN_GRACE_S = 5
WILDCARD = "0.0.0.0"  # a bind to every interface, which local workers and the coordinator reach on loopback


def free_tcp_port(host: str) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def spawn_worker(name: str, endpoint: str, heartbeats: Heartbeats, frame_limit: int, **popen) -> tuple[
        subprocess.Popen, Keypair]:
    """Start a worker process that binds `endpoint` with a key pair of its own, made here and written into its
    stdin with the coordinator's public key (never on its command line); it is watched by `heartbeats` from now.
    popen: stdout, stderr, env for subprocess.Popen. Returns the process and the worker's key pair."""
    keys = Keypair.new()
    process = subprocess.Popen(
        [sys.executable, "-m", "hsplit_sim.runtime.worker", "--name", name, "--endpoint", endpoint,
         "--heartbeat", heartbeats.endpoint, "--parent", str(os.getpid()), "--max-frame", str(frame_limit)],
        stdin=subprocess.PIPE, **popen)
    hand_keys(process, keys, heartbeats.keys.public)
    heartbeats.watch(name, process, keys.public)
    return process, keys


def hand_keys(process: subprocess.Popen, keys: Keypair, coordinator: bytes) -> None:
    """Write a worker's key pair and the coordinator's public key into its stdin, one JSON line, and close it
    (what worker.read_keys reads). A pipe of 64 KiB takes the line without waiting for the worker."""
    try:
        process.stdin.write(json.dumps({"keys": keys.to_wire(), "coordinator": coordinator.decode()}).encode()
                            + b"\n")
        process.stdin.close()
    except OSError:  # it died at once: its connection reports how
        pass


def worker_env(torch_threads: int | None, sharing: int = 1) -> dict[str, str]:
    """What a worker's environment adds to its host's: the coordinator's settings, or these defaults. Workers take
    turns on the same cores; libgomp's default spin-wait (300,000 iterations) keeps an idle worker's threads busy
    while another computes. A short spin measured about 30% faster on tiny models. sharing: the local client
    workers, whose federated steps run at once (WorkerConnection.defer): unless threads are set, each gets an
    equal share of the cores (two workers of two threads each on two cores took twice as long as one worker)."""
    env = {"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
           "GOMP_SPINCOUNT": os.environ.get("GOMP_SPINCOUNT", "10000")}
    threads = torch_threads or os.environ.get("HSPLIT_SIM_TORCH_THREADS")  # a sweep sets it for its points
    if not threads and sharing > 1:
        threads = max(1, (os.cpu_count() or 1) // sharing)
    if threads:
        env["HSPLIT_SIM_TORCH_THREADS"] = str(threads)
    return env


def _threads_fit(client_workers: int, torch_threads: int | None) -> bool:
    """Whether local workers with these torch threads can all compute at once without taking turns on a core.
    Unset, torch takes every core in each worker."""
    threads = torch_threads or os.environ.get("HSPLIT_SIM_TORCH_THREADS")
    return bool(threads) and (1 + client_workers) * int(threads) <= (os.cpu_count() or 1)


class WorkerPool:
    """One server worker and `client_workers` client workers, each its own process, here or in a Ray actor; or,
    with remote_workers, the client workers started by hand at those endpoints."""

    def __init__(self, client_workers: int, transport: str, host: str, log_path: Path, timeout_s: float,
                 frame_limit: int, keys: Keypair | None = None, torch_threads: int | None = None,
                 remote_workers: Sequence[str] = (), placement: str = "local", server_gpus: int = 0):
        """frame_limit: the run's largest legitimate frame in bytes (a larger one is refused unread, both ways);
        keys: the coordinator's key pair (runtime.key_file), else one made for this run; remote_workers: tcp
        endpoints of workers started by hand with the same key file (`hsplit-sim worker`), in place of local
        client workers; placement "ray": every worker in a Ray actor (tcp only), the server's asking for
        server_gpus GPUs. own_cores: whether the server and the client workers compute at once without sharing
        cores (client workers started by hand, or local ones whose threads fit the machine's cores), so that a
        split iteration's two sides may overlap (backends/real.py)."""
        self.context = zmq.Context()
        self._ipc_dir = tempfile.mkdtemp(prefix="hsplit-sim-") if transport == "ipc" else None
        self._log = open(log_path, "ab")
        self._processes: list[subprocess.Popen] = []
        self._ray = None
        self._ray_pids: list[int] = []
        self.connections = {}
        self.frame_limit = frame_limit
        self.heartbeats = None
        self.own_cores = bool(remote_workers) or (placement == "local" and _threads_fit(client_workers, torch_threads))
        try:
            self.heartbeats = Heartbeats(self.context, f"ipc://{self._ipc_dir}/heartbeat.sock" if self._ipc_dir
                                         else f"tcp://{host}:*", keys or Keypair.new())
            if placement == "ray":
                self._place_on_ray(client_workers, timeout_s, torch_threads, server_gpus)
            else:
                self._start(0 if remote_workers else client_workers, host, timeout_s, torch_threads)
            for i, endpoint in enumerate(remote_workers):
                self._connect(f"clients{i}", endpoint, timeout_s)
        except BaseException:  # Ctrl-C while starting: the workers started so far and the socket folder go too
            self.close()
            raise

    def _start(self, client_workers: int, host: str, timeout_s: float, torch_threads: int | None) -> None:
        for name in ["server"] + [f"clients{i}" for i in range(client_workers)]:
            env = dict(os.environ, **worker_env(torch_threads, 1 if name == "server" else client_workers))
            endpoint = (f"ipc://{self._ipc_dir}/{name}.sock" if self._ipc_dir
                        else f"tcp://{host}:{free_tcp_port(host)}")
            process, keys = spawn_worker(name, endpoint, self.heartbeats, self.frame_limit, stdout=self._log,
                                         stderr=subprocess.STDOUT, env=env)
            self._processes.append(process)
            reach = endpoint.replace(f"tcp://{WILDCARD}:", "tcp://127.0.0.1:")
            self.connections[name] = WorkerConnection(self.context, name, reach, process, timeout_s,
                                                      self.heartbeats, keys.public, self.frame_limit)

    def _place_on_ray(self, client_workers: int, timeout_s: float, torch_threads: int | None,
                      server_gpus: int) -> None:
        """Each worker in a Ray actor of its own (ray_actors.py), with a key pair of its own as a local worker."""
        from hsplit_sim.runtime.ray_actors import RayWorkers

        workers = {name: Keypair.new() for name in ["server"] + [f"clients{i}" for i in range(client_workers)]}
        for name, keys in workers.items():  # admitted before the workers connect, whose clocks start afresh below
            self.heartbeats.watch(name, None, keys.public)
        self._ray = RayWorkers()
        placed = self._ray.start(workers, self.heartbeats.bound, self.heartbeats.keys.public, self.frame_limit,
                                 worker_env(torch_threads), server_gpus, timeout_s)
        for name, (endpoint, pid) in placed.items():
            self.heartbeats.watch(name, None, workers[name].public, first_beat_s=FIRST_BEAT_TIMEOUT_S)
            self._ray_pids.append(pid)
            self.connections[name] = WorkerConnection(self.context, name, endpoint, None, timeout_s, self.heartbeats,
                                                      workers[name].public, self.frame_limit)

    def _connect(self, name: str, endpoint: str, timeout_s: float) -> None:
        """A worker started by hand with the key file: its key pair is the coordinator's. Its heartbeats are
        expected from now; it starts them when `init` (init_args) tells it where to send them."""
        keys = self.heartbeats.keys
        self.heartbeats.watch(name, None, keys.public, where=endpoint)
        self.connections[name] = WorkerConnection(self.context, name, endpoint, None, timeout_s, self.heartbeats,
                                                  keys.public, self.frame_limit, session=secrets.token_hex(16))

    def init_args(self, connection: WorkerConnection) -> dict:
        """What `init` adds for a worker started by hand: its session (worker.Worker._open), else nothing."""
        if connection.session is None:
            return {}
        return {"session": {"id": connection.session, "name": connection.name, "heartbeat": self.heartbeats.bound,
                            "frame_limit": self.frame_limit}}

    @property
    def server(self) -> WorkerConnection:
        return self.connections["server"]

    @property
    def client_workers(self) -> list[WorkerConnection]:
        return [c for name, c in self.connections.items() if name != "server"]

    def pids(self) -> list[int]:
        """The workers' process ids, on their nodes for Ray actors."""
        return [p.pid for p in self._processes] + self._ray_pids

    def close(self) -> None:
        """Ask each worker that can still answer to stop, then make sure: nothing outlives the run. A worker whose
        connection failed (its REQ socket is out of step) or that stopped answering heartbeats (a stopped process
        never answers) is killed at once. A worker started by hand is asked to end the run's session, and otherwise
        ends it itself once the heartbeat socket is gone. Another Ctrl-C waits until this is done."""
        with stop.deferred():
            for connection in self.connections.values():
                if ((connection.process is None or connection.process.poll() is None) and not connection.failure
                        and connection.name not in self.heartbeats.silent):
                    try:
                        connection.call("shutdown", timeout_s=SHUTDOWN_GRACE_S)
                    except Exception:  # noqa: BLE001 - a worker that cannot stop politely is killed below
                        pass
                connection.close()
            silent = self.heartbeats.silent if self.heartbeats else set()
            for connection in self.connections.values():
                if connection.process is not None and (connection.failure or connection.name in silent):
                    connection.process.kill()
            for process in self._processes:
                try:
                    process.wait(SHUTDOWN_GRACE_S)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            if self._ray:
                self._ray.close(SHUTDOWN_GRACE_S, {c.name for c in self.connections.values() if c.failure} | silent)
            if self.heartbeats:
                self.heartbeats.close()
            self.context.term()
            self._log.close()
            if self._ipc_dir:
                shutil.rmtree(self._ipc_dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
