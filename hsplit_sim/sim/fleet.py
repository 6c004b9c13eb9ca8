"""The simulated fleet: each client's device and links, and the server with its accelerators.

Algorithms say what happens (FLOPs a device computes, bytes a link carries, which client talks to the
server); the fleet's SimPy processes say how long it takes, through the time model, and record each activity
as an event on a typed resource (results.RESOURCE_KINDS). Real work, where there is any, runs through the
callbacks the protocols pass in (`SplitWork`, `StepWork`; None where only time passes), at the point of the
simulated protocol where it happens, so real operations on shared state follow simulated order.
"""

from dataclasses import dataclass

from hsplit_sim.sim.engine import Simulation
from hsplit_sim.sim.timemodel import compute_seconds, transfer_seconds

SERVER = "server"


@dataclass(frozen=True)
class IterationCosts:
    """What one split iteration costs a client and the server: FLOPs per device, bytes per link. Entries that
    depend on whether the iteration probes importance (HSplitLoRA's IWI) are pairs indexed by that flag."""

    client_fwd: int
    client_bwd: tuple[int, int]
    server: tuple[int, int]
    up: int
    down: int


class SplitWork:
    """What a split iteration does besides taking time (real training)."""

    def forward(self, step: int, probe: bool) -> None:
        """The client's forward pass and the upload of what it sends."""
        raise NotImplementedError

    def server(self, step: int, probe: bool) -> None:
        """The server's step on what arrived; called in the order the server serves steps."""
        raise NotImplementedError

    def backward(self, step: int, probe: bool) -> None:
        """The client's backward pass on the gradient that came back."""
        raise NotImplementedError


class StepWork:
    """What a whole-model training step does besides taking time (real training)."""

    def step(self, step: int) -> None:
        """One optimiser step."""
        raise NotImplementedError


class ClientNode:
    """A client's device and its up- and downlink, each a resource of its own."""

    def __init__(self, fleet: "Fleet", spec):
        self.fleet, self.spec, self.index = fleet, spec, spec.index
        self.device, self.up, self.down = f"client{self.index}", f"client{self.index}.up", f"client{self.index}.down"

    def compute_seconds(self, flops: float) -> float:
        return compute_seconds(flops, self.spec.device)

    def up_seconds(self, nbytes: int) -> float:
        link = self.spec.link
        return transfer_seconds(nbytes, link.up_mbps, link.latency_ms)

    def down_seconds(self, nbytes: int) -> float:
        link = self.spec.link
        return transfer_seconds(nbytes, link.down_mbps, link.latency_ms)

    def compute(self, round_index: int, kind: str, flops: float):
        yield from self.fleet.sim.hold(round_index, self.index, kind, self.device, self.compute_seconds(flops),
                                       flops=flops)

    def upload(self, round_index: int, kind: str, nbytes: int):
        self.fleet.bytes_up += nbytes
        yield from self.fleet.sim.hold(round_index, self.index, kind, self.up, self.up_seconds(nbytes), nbytes=nbytes)

    def download(self, round_index: int, kind: str, nbytes: int):
        self.fleet.bytes_down += nbytes
        yield from self.fleet.sim.hold(round_index, self.index, kind, self.down, self.down_seconds(nbytes),
                                       nbytes=nbytes)

    def resources(self) -> list[dict]:
        spec = self.spec
        return [{"resource": self.device, "kind": "device", "client": self.index, "name": spec.device.name,
                 "group": spec.group},
                {"resource": self.up, "kind": "uplink", "client": self.index, "name": spec.link.name,
                 "group": spec.group},
                {"resource": self.down, "kind": "downlink", "client": self.index, "name": spec.link.name,
                 "group": spec.group}]


class ServerNode:
    """The server's accelerators: split steps queue for them first come, first served (engine.ServerQueue);
    its own work (aggregation, centralised training) occupies the server as one resource."""

    def __init__(self, fleet: "Fleet", device, accelerators: int):
        self.fleet, self.device, self.accelerators = fleet, device, accelerators

    def seconds(self, flops: float) -> float:
        return compute_seconds(flops, self.device)

    def compute(self, round_index: int, kind: str, flops: float, client: int = -1):
        yield from self.fleet.sim.hold(round_index, client, kind, SERVER, self.seconds(flops), flops=flops)

    def mark(self, round_index: int, kind: str) -> None:
        """An instant on the server (evaluation: a measurement, not part of the protocol)."""
        now = self.fleet.sim.now
        self.fleet.sim.record(round_index, -1, kind, SERVER, now, now)

    def resources(self) -> list[dict]:
        return [{"resource": SERVER, "kind": "server", "client": -1, "name": self.device.name, "group": -1}]


class _SplitTiming:
    """One client's split iteration under one IterationCosts, as durations, computed once."""

    __slots__ = ("costs", "fwd_s", "fwd_up_s", "server_s", "down_s", "down_bwd_s")

    def __init__(self, client: ClientNode, server: ServerNode, costs: IterationCosts):
        self.costs = costs
        self.fwd_s = client.compute_seconds(costs.client_fwd)
        self.fwd_up_s = self.fwd_s + client.up_seconds(costs.up)
        self.server_s = tuple(server.seconds(f) for f in costs.server)
        self.down_s = client.down_seconds(costs.down)
        self.down_bwd_s = tuple(self.down_s + client.compute_seconds(f) for f in costs.client_bwd)


class Fleet:
    """The clients and the server of a scenario, on one simulated clock. Counts the bytes every link carried."""

    def __init__(self, sim: Simulation, clients, server_device, accelerators: int):
        self.sim = sim
        self.clients = [ClientNode(self, spec) for spec in clients]
        self.server = ServerNode(self, server_device, accelerators)
        self.bytes_up = 0
        self.bytes_down = 0
        self._split_timing: dict[int, _SplitTiming] = {}

    def resources(self) -> list[dict]:
        """The resources table: every resource events name, with its kind and owner."""
        return self.server.resources() + [row for c in self.clients for row in c.resources()]

    def split_iterations(self, round_index: int, client: ClientNode, costs: IterationCosts, steps: int,
                         probes: frozenset[int], work: SplitWork | None):
        """A client's local split iterations: forward, upload, queue for an accelerator, server step, download,
        backward. `probes` holds the steps that measure importance; `work` is None where nothing happens besides
        time (timing-only runs).

        The hot path (timing-only runs make millions of these events), with one SimPy event per iteration:
        the server is booked on arrival, so one timeout covers the server queue and step, the download, the
        client backward and the next iteration's forward and upload. A client's device and links are its
        own, so joining its activities changes no timing. The server callback runs in the order of the
        server steps; forward and backward, which touch only the client's own state, run when the client's
        process does, which may be before their simulated start, as nothing else can observe them."""
        sim = self.sim
        k = client.index
        timing = self._split_timing.get(k)
        if timing is None or timing.costs is not costs:
            timing = self._split_timing[k] = _SplitTiming(client, self.server, costs)
        env, append, book = sim.env, sim.events.append, sim.server.book
        timeout = env.timeout
        r, device, up_res, down_res = round_index, client.device, client.up, client.down
        fwd_s, fwd_up_s, fwd_flops, up_bytes, down_bytes = (timing.fwd_s, timing.fwd_up_s, costs.client_fwd,
                                                            costs.up, costs.down)
        server_s, server_flops, down_s, down_bwd_s, bwd_flops = (timing.server_s, costs.server, timing.down_s,
                                                                 timing.down_bwd_s, costs.client_bwd)
        probe = 0 in probes
        if work is not None:
            work.forward(0, probe)
        start = env.now
        yield timeout(fwd_up_s)
        last = steps - 1
        for step in range(steps):
            now = env.now
            middle = start + fwd_s
            append((r, k, "client_fwd", device, start, middle, 0, fwd_flops))
            append((r, k, "upload", up_res, middle, now, up_bytes, 0.0))
            seconds = server_s[probe]
            acquired = book(now, seconds)
            append((r, k, "server_queue", SERVER, now, acquired, 0, 0.0))
            if work is not None:
                work.server(step, probe)
            served = acquired + seconds
            append((r, k, "server_step", SERVER, acquired, served, 0, server_flops[probe]))
            if work is not None:
                work.backward(step, probe)
            downloaded = served + down_s
            append((r, k, "download", down_res, served, downloaded, down_bytes, 0.0))
            if step == last:
                yield timeout((acquired - now) + seconds + down_bwd_s[probe])
                append((r, k, "client_bwd", device, downloaded, env.now, 0, bwd_flops[probe]))
                break
            start = served + down_bwd_s[probe]
            append((r, k, "client_bwd", device, downloaded, start, 0, bwd_flops[probe]))
            probe = step + 1 in probes
            if work is not None:
                work.forward(step + 1, probe)
            yield timeout((start - now) + fwd_up_s)
        self.bytes_up += steps * up_bytes
        self.bytes_down += steps * down_bytes

    def local_steps(self, round_index: int, client: ClientNode, flops: int, steps: int, work: StepWork | None):
        """Whole-model training steps on the client's own device (federated baselines)."""
        for step in range(steps):
            if work is not None:
                work.step(step)
            yield from client.compute(round_index, "client_step", flops)

    def server_steps(self, round_index: int, flops: int, steps: int, work: StepWork | None):
        """Training steps on the server (centralised baselines)."""
        for step in range(steps):
            if work is not None:
                work.step(step)
            yield from self.server.compute(round_index, "central_step", flops)
