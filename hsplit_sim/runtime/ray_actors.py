"""Workers as Ray actors (runtime.placement: ray): each actor starts one worker process on its node, as the
launcher starts a local one (its own key pair and the coordinator's public key on its stdin, `--parent` the
actor's pid), and the coordinator connects to it over tcp. Ray is imported only here, and only in runs that place
their workers on it.

Nothing outlives the run: at its end the pool stops each worker and kills its actor. If the coordinator dies, Ray
kills the actors it owns and (Ray 2.60, measured) their worker processes with them; where it leaves a worker
behind, the worker exits within a second of its actor (heartbeat.py: its parent is gone)."""

import ipaddress
import os
import subprocess
import sys

from hsplit_sim.errors import RunError
from hsplit_sim.runtime.keys import Keypair
from hsplit_sim.runtime.launcher import free_tcp_port, hand_keys


class WorkerHost:
    """The body of one actor: the worker process it started on its node."""

    def __init__(self):
        self.process: subprocess.Popen | None = None

    def start(self, name: str, bind_host: str | None, heartbeat: str, keys: dict, coordinator: bytes,
              frame_limit: int, env: dict) -> tuple[str, int]:
        """Start the worker on a free port of bind_host (None: the node's address, which the coordinator reaches);
        returns its endpoint and pid. keys: its key pair (Keypair.to_wire); env: what its environment adds."""
        import ray

        host = bind_host or ray.util.get_node_ip_address()
        endpoint = f"tcp://{f'[{host}]' if ':' in host else host}:{free_tcp_port(host)}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "hsplit_sim.runtime.worker", "--name", name, "--endpoint", endpoint,
             "--heartbeat", heartbeat, "--parent", str(os.getpid()), "--max-frame", str(frame_limit)],
            stdin=subprocess.PIPE, env=dict(os.environ, **env))
        hand_keys(self.process, Keypair.from_wire(keys), coordinator)
        return endpoint, self.process.pid

    def stop(self, grace_s: float) -> int | None:
        """Wait for the worker to exit (after its shutdown), killing it after grace_s; its exit status."""
        if self.process is None:
            return None
        try:
            return self.process.wait(grace_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


class RayWorkers:
    """The run's actors, on the cluster RAY_ADDRESS names, else on a local Ray instance started for the run (and
    shut down with it); a process that has Ray initialised already keeps its instance."""

    def __init__(self):
        import ray  # preflight checked that it is installed

        self.ray = ray
        self.started = not ray.is_initialized()
        if self.started:
            ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, log_to_driver=False)
        self.actors = {}

    def start(self, workers: dict[str, Keypair], heartbeat: str, coordinator: bytes, frame_limit: int,
              env: dict, server_gpus: int, timeout_s: float) -> dict[str, tuple[str, int]]:
        """Start an actor per worker (the server asks for server_gpus GPUs, each for a CPU per torch thread) and
        its worker process; returns each worker's endpoint and pid. heartbeat: the coordinator's bound heartbeat
        socket, whose wildcard host becomes this node's address. A coordinator on loopback is reached from its own
        node only: the actors go there, and their workers listen on loopback too."""
        ray = self.ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        loopback = ipaddress.ip_address(heartbeat.removeprefix("tcp://").rpartition(":")[0].strip("[]")).is_loopback
        here = ray.util.get_node_ip_address()
        heartbeat = heartbeat.replace("tcp://0.0.0.0:", f"tcp://{f'[{here}]' if ':' in here else here}:")
        actor_class = ray.remote(WorkerHost)
        cpus = int(env.get("HSPLIT_SIM_TORCH_THREADS", 1))
        strategy = (NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False) if loopback
                    else "SPREAD")
        pending = {}
        for name, keys in workers.items():
            actor = actor_class.options(num_cpus=cpus, num_gpus=server_gpus if name == "server" else 0,
                                        scheduling_strategy=strategy).remote()
            self.actors[name] = actor
            pending[name] = actor.start.remote(name, "127.0.0.1" if loopback else None, heartbeat,
                                               keys.to_wire(), coordinator, frame_limit, env)
        ready, _ = ray.wait(list(pending.values()), num_returns=len(pending), timeout=timeout_s)
        if len(ready) < len(pending):
            late = [name for name, ref in pending.items() if ref not in ready]
            raise RunError(f"Ray did not place worker {late[0]} within {timeout_s:.0f} s (runtime.request_timeout_s): "
                           f"each worker asks for {cpus} CPU and the server for {server_gpus} GPU; the cluster has "
                           f"{_resources(ray.available_resources())} free of {_resources(ray.cluster_resources())}"
                           f"{' on this node (runtime.host is loopback)' if loopback else ''}")
        try:
            return {name: ray.get(ref) for name, ref in pending.items()}
        except ray.exceptions.RayError as exc:
            raise RunError(f"Ray could not start a worker: {exc}") from None

    def close(self, grace_s: float, kill: set[str]) -> None:
        """Give each worker grace_s to exit (those named in kill none), then kill the actors."""
        ray = self.ray
        stopping = [actor.stop.remote(0 if name in kill else grace_s) for name, actor in self.actors.items()]
        ray.wait(stopping, num_returns=len(stopping), timeout=grace_s + 5)
        for actor in self.actors.values():
            ray.kill(actor)
        if self.started:
            ray.shutdown()


def _resources(resources: dict) -> str:
    return ", ".join(f"{resources.get(kind, 0):g} {kind}" for kind in ("CPU", "GPU"))
