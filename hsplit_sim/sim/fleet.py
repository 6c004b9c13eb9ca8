"""The simulated fleet: each client's device and links, shared media, and the server with its accelerators,
with the system's effects (sim/effects.py) applied.

Algorithms say what happens (the work a device computes, bytes a link carries, which client talks to the
server); the fleet's SimPy processes say how long it takes, through the time model, and record each activity
as an event on a typed resource (results.RESOURCE_KINDS). Real work, where there is any, runs through the
callbacks the protocols pass in (`SplitWork`, `StepWork`; None where only time passes), at the point of the
simulated protocol where it happens, so real operations on shared state follow simulated order.
"""

import contextlib
import math
from dataclasses import dataclass

import simpy

from hsplit_sim.costs import Work
from hsplit_sim.errors import RunError
from hsplit_sim.sim.effects import SystemEffects
from hsplit_sim.sim.engine import Clockwork, IterationShape, ServerQueue, Simulation
from hsplit_sim.sim.medium import Medium
from hsplit_sim.sim.timemodel import compute_seconds, transfer_seconds

SERVER = "server"


@dataclass(frozen=True)
class IterationCosts:
    """What one split iteration costs a client and the server: work per device (costs.Work: the backward
    includes the optimiser step), bytes per link (in the simulated precision; `host_up` and `host_down` are the
    fp32 frames real training sends). Entries that depend on whether the iteration probes importance
    (HSplitLoRA's IWI) are pairs indexed by that flag."""

    client_fwd: Work
    client_bwd: tuple[Work, Work]
    server: tuple[Work, Work]
    up: int
    down: int
    host_up: int
    host_down: int


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

    def backward_then_forward(self, step: int, probe: bool, next_probe: bool) -> None:
        """backward(step), then forward(step + 1): where nothing comes between them, a backend may do both at
        once."""
        self.backward(step, probe)
        self.forward(step + 1, next_probe)

    def stop(self) -> None:
        """The client was stopped (a deadline) after a forward whose backward will not come: what the forward
        kept for it can go."""
        raise NotImplementedError


class StepWork:
    """What a whole-model training step does besides taking time (real training)."""

    def step(self, step: int) -> None:
        """One optimiser step."""
        raise NotImplementedError


@dataclass
class Participation:
    """Who took part in a round; how it ended for each client goes to the participation table."""

    selected: list[int]  # trained this round (and receive its result)
    reported: list[int]  # whose updates arrived in time, in client order


class _Durations:
    """A device's compute seconds per work, remembered: every step of a run asks about one of a few works (a
    federated client's step, a split plan's passes), millions of times in a timing-only run."""

    def __init__(self, device, precision: str):
        self.device, self.precision = device, precision
        self.known: dict[int, tuple[Work, float]] = {}  # by id; the work held here keeps its id from being reused

    def of(self, work: Work) -> float:
        found = self.known.get(id(work))
        if found is not None and found[0] is work:
            return found[1]
        seconds = compute_seconds(work, self.device, self.precision)
        if len(self.known) >= 64:  # works made once a round (merges, aggregations) must not pile up
            self.known.clear()
        self.known[id(work)] = (work, seconds)
        return seconds


class ClientNode:
    """A client's device and its up- and downlink, each a resource of its own; its links may go through a
    shared medium. Compute and bandwidth factors are the round's jitter (1 without)."""

    def __init__(self, fleet: "Fleet", spec, medium: Medium | None):
        self.fleet, self.spec, self.index, self.medium = fleet, spec, spec.index, medium
        self.device, self.up, self.down = f"client{self.index}", f"client{self.index}.up", f"client{self.index}.down"
        self.compute_factor = self.bandwidth_factor = 1.0
        self.busy = [0.0, 0.0, 0.0]  # seconds computing, sending, receiving since the round started (energy)
        self.durations = _Durations(spec.device, spec.precision)
        effects = fleet.effects
        self.traced = effects.bandwidth is not None and effects.bandwidth.covers(self.index)

    @property
    def simple(self) -> bool:
        """Durations known in advance: no shared medium, no rates changing over time, no round cut short."""
        return self.medium is None and not self.traced and not self.fleet.effects.cuts_rounds_short

    def compute_seconds(self, work: Work) -> float:
        seconds = self.durations.of(work)
        return seconds * self.compute_factor if self.compute_factor != 1.0 else seconds

    def _rate_mbps(self, up: bool) -> float:
        link = self.spec.link
        mbps = link.up_mbps if up else link.down_mbps
        return mbps * self.bandwidth_factor if self.bandwidth_factor != 1.0 else mbps

    def up_seconds(self, nbytes: int) -> float:
        return transfer_seconds(nbytes, self._rate_mbps(True), self.spec.link.latency_ms)

    def down_seconds(self, nbytes: int) -> float:
        return transfer_seconds(nbytes, self._rate_mbps(False), self.spec.link.latency_ms)

    def compute(self, round_index: int, kind: str, work: Work):
        sim = self.fleet.sim
        start = sim.env.now
        try:
            yield from sim.hold(round_index, self.index, kind, self.device, self.compute_seconds(work),
                                flops=work.flops)
        finally:  # the part done counts when a deadline cuts it short
            self.busy[0] += sim.env.now - start

    def upload(self, round_index: int, kind: str, nbytes: int):
        yield from self._transfer(round_index, kind, nbytes, True)
        self.fleet.bytes_up += nbytes

    def download(self, round_index: int, kind: str, nbytes: int):
        yield from self._transfer(round_index, kind, nbytes, False)
        self.fleet.bytes_down += nbytes

    def _transfer(self, round_index: int, kind: str, nbytes: int, up: bool):
        sim = self.fleet.sim
        start = sim.env.now
        try:
            if self.medium is None and not self.traced:
                seconds = self.up_seconds(nbytes) if up else self.down_seconds(nbytes)
                yield from sim.hold(round_index, self.index, kind, self.up if up else self.down, seconds,
                                    nbytes=nbytes)
            else:
                yield from self._shared_or_traced(round_index, kind, nbytes, up)
        finally:  # sending or receiving time counts for energy, a transfer cut short too
            self.busy[1 if up else 2] += sim.env.now - start

    def take_busy(self) -> list[float]:
        """Seconds computing, sending and receiving since the last call."""
        busy, self.busy = self.busy, [0.0, 0.0, 0.0]
        return busy

    def _shared_or_traced(self, round_index: int, kind: str, nbytes: int, up: bool):
        """A transfer through a shared medium, or at rates that follow a trace: latency, then the bits."""
        resource = self.up if up else self.down
        sim = self.fleet.sim
        env, start = sim.env, sim.now
        planned = start + (self.up_seconds(nbytes) if up else self.down_seconds(nbytes))  # for a partial record
        transfer = None
        try:
            yield env.timeout(self.spec.link.latency_ms / 1000)
            bits, link = nbytes * 8, self.spec.link
            mbps = link.up_mbps if up else link.down_mbps
            trace = self.fleet.effects.bandwidth
            if self.medium is None:
                end = trace.transfer_end(self.index, up, env.now, bits, mbps, self.bandwidth_factor)
                yield env.timeout(end - env.now)
            else:
                if self.traced:  # the trace's rate when the transfer starts caps it (the medium shares it)
                    mbps = trace.rate_mbps(self.index, up, env.now, mbps)
                channel = self.medium.up if up else self.medium.down
                transfer = channel.transfer(bits, mbps * self.bandwidth_factor * 1e6)
                yield transfer
        except simpy.Interrupt:
            if transfer is not None:
                (self.medium.up if up else self.medium.down).cancel(transfer)
            sim.record_part(round_index, self.index, kind, resource, start, max(planned, sim.now), nbytes, 0.0)
            raise
        sim.record(round_index, self.index, kind, resource, start, sim.now, nbytes, 0.0)

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

    def __init__(self, fleet: "Fleet", device, accelerators: int, precision: str):
        self.fleet, self.device, self.accelerators, self.precision = fleet, device, accelerators, precision
        self.durations = _Durations(device, precision)

    def seconds(self, work: Work) -> float:
        return self.durations.of(work)

    def compute(self, round_index: int, kind: str, work: Work, client: int = -1):
        yield from self.fleet.sim.hold(round_index, client, kind, SERVER, self.seconds(work), flops=work.flops)

    def mark(self, round_index: int, kind: str) -> None:
        """An instant on the server (evaluation: a measurement, not part of the protocol)."""
        now = self.fleet.sim.now
        self.fleet.sim.record(round_index, -1, kind, SERVER, now, now)

    def resources(self) -> list[dict]:
        return [{"resource": SERVER, "kind": "server", "client": -1, "name": self.device.name, "group": -1}]


class _SplitTiming:
    """One client's split iteration under one IterationCosts, as durations, computed once."""

    __slots__ = ("costs", "factors", "fwd_s", "fwd_up_s", "server_s", "down_s", "down_bwd_s", "busy", "shape")

    def __init__(self, client: ClientNode, server: ServerNode, costs: IterationCosts):
        self.costs, self.factors = costs, (client.compute_factor, client.bandwidth_factor)
        self.fwd_s = client.compute_seconds(costs.client_fwd)
        self.shape = IterationShape(
            client.index, (client.device, client.up, SERVER, SERVER, client.down, client.device),
            (0, costs.up, 0, 0, costs.down, 0),
            tuple((costs.client_fwd.flops, 0.0, 0.0, costs.server[p].flops, 0.0, costs.client_bwd[p].flops)
                  for p in (False, True)), self.fwd_s)
        self.fwd_up_s = self.fwd_s + client.up_seconds(costs.up)
        self.server_s = tuple(server.seconds(f) for f in costs.server)
        self.down_s = client.down_seconds(costs.down)
        self.down_bwd_s = tuple(self.down_s + client.compute_seconds(f) for f in costs.client_bwd)
        # (computing, sending, receiving) seconds of one iteration, by whether it probes
        self.busy = tuple((self.fwd_s + self.down_bwd_s[p] - self.down_s, self.fwd_up_s - self.fwd_s, self.down_s)
                          for p in (False, True))


class Fleet:
    """The clients, the media and the server of a scenario, on one simulated clock, with the system's effects.
    Counts the bytes every link carried."""

    def __init__(self, sim: Simulation, clients, server_device, accelerators: int, system, seed: int,
                 server_precision: str):
        self.sim = sim
        self.effects = SystemEffects(system, seed, len(clients))
        self.media = media = {spec.name: Medium(sim.env, spec) for spec in system.media}
        self.clients = [ClientNode(self, spec, media.get(spec.medium)) for spec in clients]
        self.server = ServerNode(self, server_device, accelerators, server_precision)
        self.bytes_up = 0  # of completed transfers
        self.bytes_down = 0
        self.participation: list[dict] = []  # rows not yet written, as events
        self._split_timing: dict[int, _SplitTiming] = {}
        self._fast: set = set()  # the generators of _split_fast made for the round being set up
        self._clockwork: Clockwork | None = None  # while a round's split iterations run on one
        self._copies: int | None = None  # copies of the server, where server_steps_in_turn left one queue

    def state(self) -> dict:
        """What the fleet carries from round to round, for a checkpoint (everything else is fixed by the scenario
        or drawn afresh from the seed, the round and the client): bytes so far, and each client's factors of
        the last round it trained in."""
        if any(channel.flows for medium in self.media.values() for channel in (medium.up, medium.down)):
            raise RunError("a transfer is still under way at the round's end: the fleet cannot be saved")
        return {"bytes_up": self.bytes_up, "bytes_down": self.bytes_down,
                "factors": [[c.compute_factor, c.bandwidth_factor] for c in self.clients]}

    def restore(self, state: dict) -> None:
        self.bytes_up, self.bytes_down = state["bytes_up"], state["bytes_down"]
        for client, (compute, bandwidth) in zip(self.clients, state["factors"], strict=True):
            client.compute_factor, client.bandwidth_factor = compute, bandwidth

    def take_participation(self) -> list[dict]:
        rows, self.participation = self.participation, []
        return rows

    def resources(self) -> list[dict]:
        """The resources table: every resource events name, with its kind and owner."""
        media = [{"resource": f"medium.{name}", "kind": "medium", "client": -1, "name": name, "group": -1}
                 for name in self.media]
        return self.server.resources() + media + [row for c in self.clients for row in c.resources()]

    def participate(self, round_index: int, clients, steps: int, client_round):
        """One round's local work of the given clients, as a SimPy process whose value is a Participation.

        Who trains: the clients online at the round's start, or (selection) a seeded random share of them.
        `client_round(node, steps, report)` is a client's work: `steps` local steps, then, if `report`, the
        upload of its update. A client drawn to drop out does a share of its steps and never reports; the
        round closes when every client is done, when enough updates arrived (over-commitment) or at the
        deadline, and whoever is still working then is stopped, its update lost; a client offline when its
        work is done loses it too."""
        env, effects = self.sim.env, self.effects
        candidates = [c.index for c in clients if effects.online(c.index, env.now)]
        while clients and not candidates:  # nobody online: the round waits for the first to come online
            wake = effects.next_online([c.index for c in clients], env.now)
            if wake is None:
                raise RunError(f"round {round_index}: no client is online at {env.now:.6g} s and none comes "
                               "online later (system.availability.trace)")
            yield env.timeout(wake - env.now)
            candidates = [c.index for c in clients if effects.online(c.index, env.now)]
        start = env.now
        selected = effects.select(round_index, candidates)
        online, chosen = set(candidates), set(selected)
        rows = [{"round": round_index, "client": c.index, "outcome": "offline", "end_s": start}
                for c in clients if c.index not in online]
        rows += [{"round": round_index, "client": k, "outcome": "not selected", "end_s": start}
                 for k in candidates if k not in chosen]
        for k in selected:
            self.clients[k].compute_factor, self.clients[k].bandwidth_factor = effects.factors(round_index, k)
        needed = effects.needed(len(selected))
        closed = env.event()
        pending, reported = set(selected), []

        def finished(k: int, process: simpy.Process) -> None:
            """A client's work ended: the round closes once all are done or enough updates arrived; an update
            arriving once it closed (at the same instant) is late like one still on its way."""
            pending.discard(k)
            if not process.ok:
                process.defused = True
                if not closed.triggered:
                    closed.fail(process.value)
                return
            outcome = "reported" if process.value is None else process.value
            if closed.triggered and outcome == "reported":
                outcome = "late"
            rows.append({"round": round_index, "client": k, "outcome": outcome, "end_s": env.now})
            if closed.triggered:
                return
            if outcome == "reported":
                reported.append(k)
            if not pending or len(reported) >= needed:
                closed.succeed()

        # Where nothing can drop or stop a client, its work is the process itself (one frame less on the hot path)
        # and ending means reporting.
        certain = not effects.cuts_rounds_short and effects.system.dropout == 0
        self._fast.clear()
        works = {k: client_round(self.clients[k], steps, True) if certain
                 else self._client(round_index, self.clients[k], steps, client_round) for k in selected}
        if certain and selected and env.peek() == math.inf and all(works[k] in self._fast for k in selected):
            # Nothing but these iterations can happen until the last ends (SimPy holds no event): they run on a
            # Clockwork, in SimPy's order, and SimPy's clock then moves to the last end.
            self._clockwork = Clockwork(env.now)
            try:
                ends = self._clockwork.run([works[k] for k in selected])
            finally:
                self._clockwork = None
                self._fast.clear()
            rows += [{"round": round_index, "client": k, "outcome": "reported", "end_s": end}
                     for k, end in zip(selected, ends)]
            env.advance_to(max(ends))
            self.participation += sorted(rows, key=lambda row: row["client"])
            return Participation(selected, list(selected))
        self._fast.clear()
        processes = {}
        for k in selected:
            processes[k] = env.process(works[k])
            processes[k].callbacks.append(lambda process, k=k: finished(k, process))
        if not selected:
            closed.succeed()
        if effects.system.deadline_s is not None:
            env.timeout(effects.system.deadline_s).callbacks.append(
                lambda _: None if closed.triggered else closed.succeed())
        yield closed
        for k in sorted(pending):
            processes[k].interrupt()
            rows.append({"round": round_index, "client": k, "outcome": "late", "end_s": env.now})
        self.participation += sorted(rows, key=lambda row: row["client"])
        return Participation(selected, sorted(reported))

    def _client(self, round_index: int, node: ClientNode, steps: int, client_round):
        limit = self.effects.steps_before_dropping(round_index, node.index, steps)
        try:
            yield from client_round(node, steps if limit is None else limit, limit is None)
        except simpy.Interrupt:
            return "late"
        if limit is not None:
            return "dropped"
        if not self.effects.online(node.index, self.sim.now):
            return "offline at the end"
        return "reported"

    def server_steps_in_turn(self) -> None:
        """Clients share one server-side state that every step updates (a shared server-side adapter): server
        steps run one at a time, whatever the accelerators; the others stay idle."""
        self._copies = len(self.sim.server.free_at)
        self.sim.server = ServerQueue(1)

    @contextlib.contextmanager
    def independent_server_steps(self):
        """Server steps that share no state (HSplitLoRA's probes of the base model before round 1) use every copy
        of the server even where training steps take turns; the turns start again once all of them are done."""
        if self._copies is None:
            yield
            return
        turns = self.sim.server
        every = self.sim.server = ServerQueue(self._copies)
        every.free_at = [max(turns.free_at)] * self._copies
        try:
            yield
        finally:
            turns.free_at = [max(every.free_at)]
            self.sim.server = turns

    def split_iterations(self, round_index: int, client: ClientNode, costs: IterationCosts, steps: int,
                         probes: frozenset[int], work: SplitWork | None, report: int):
        """A client's local split iterations: forward, upload, queue for an accelerator, server step, download,
        backward; then, if `report` bytes are given, the upload of its update. `probes` holds the steps that
        measure importance; `work` is None where nothing happens besides time (timing-only runs). Returns the
        generator of the client's process (no frame of its own on the hot path), which runs on SimPy or, on the
        fast path, on the round's Clockwork (participate)."""
        if not client.simple:
            return self._split_stepwise(round_index, client, costs, steps, probes, work, report)
        iterations = self._split_fast(round_index, client, costs, steps, probes, work, report)
        self._fast.add(iterations)
        return iterations

    def _split_fast(self, round_index: int, client: ClientNode, costs: IterationCosts, steps: int,
                    probes: frozenset[int], work: SplitWork | None, report: int):
        """The hot path (timing-only runs make millions of these events), with one wait per iteration: the
        server is booked on arrival, so one wait covers the server queue and step, the download, the client
        backward and the next iteration's forward and upload. It waits on the round's Clockwork where
        `participate` runs one (yielding delays), else on SimPy (yielding timeouts): it sees which when it
        starts. A client's device and links are its own here, so joining its activities changes no timing. The
        server callback runs in the order of the server steps; forward and backward, which touch only the
        client's own state, run when the client's process does, which may be before their simulated start, as
        nothing else can observe them. Each iteration is recorded as one compact record (engine.Simulation)
        when the client reaches the server."""
        sim = self.sim
        k = client.index
        timing = self._split_timing.get(k)
        if (timing is None or timing.costs is not costs
                or timing.factors != (client.compute_factor, client.bandwidth_factor)):
            timing = self._split_timing[k] = _SplitTiming(client, self.server, costs)
        append, book = sim.events.append, sim.server.book
        clock = self._clockwork or sim.env
        timeout = sim.env.timeout if clock is sim.env else float
        r, shape = round_index, sim.shape_number(timing.shape)
        fwd_up_s, server_s, down_s, down_bwd_s = timing.fwd_up_s, timing.server_s, timing.down_s, timing.down_bwd_s
        probe = 0 in probes
        if work is not None:
            work.forward(0, probe)
        start = clock.now
        yield timeout(fwd_up_s)
        last = steps - 1
        for step in range(steps):
            now = clock.now
            seconds = server_s[probe]
            acquired = book(now, seconds)
            if work is not None:
                work.server(step, probe)
                if step == last:
                    work.backward(step, probe)
                else:
                    work.backward_then_forward(step, probe, step + 1 in probes)
            served = acquired + seconds
            downloaded = served + down_s
            if step == last:  # SimPy's clock will read now + delay, to the bit
                delay = (acquired - now) + seconds + down_bwd_s[probe]
                append((shape, r, probe, start, now, acquired, served, downloaded, now + delay))
                yield timeout(delay)
                break
            end = served + down_bwd_s[probe]
            append((shape, r, probe, start, now, acquired, served, downloaded, end))
            start = end
            probe = step + 1 in probes
            yield timeout((start - now) + fwd_up_s)
        self.bytes_up += steps * costs.up
        self.bytes_down += steps * costs.down
        probing = len(probes)  # the probing steps, all below `steps`
        for state, (plain, probed) in enumerate(zip(*timing.busy)):
            client.busy[state] += (steps - probing) * plain + probing * probed
        if report:
            start, seconds = clock.now, client.up_seconds(report)
            yield timeout(seconds)
            append((r, k, "adapter_upload", client.up, start, clock.now, report, 0.0))
            self.bytes_up += report
            client.busy[1] += clock.now - start

    def _split_stepwise(self, round_index: int, client: ClientNode, costs: IterationCosts, steps: int,
                        probes: frozenset[int], work: SplitWork | None, report: int):
        """The same iterations, each activity its own SimPy step, for clients whose transfers share a medium or
        follow a trace, and for rounds that can stop a client mid-way. The server step is booked on arrival,
        as on the fast path; a client stopped while it waits leaves the server to finish what it booked."""
        env, book = self.sim.env, self.sim.server.book
        k = client.index
        for step in range(steps):
            probe = step in probes
            if work is not None:
                work.forward(step, probe)
            try:
                yield from client.compute(round_index, "client_fwd", costs.client_fwd)
                yield from client.upload(round_index, "upload", costs.up)
                now = env.now
                seconds = self.server.seconds(costs.server[probe])
                acquired = book(now, seconds)
                self.sim.record(round_index, k, "server_queue", SERVER, now, acquired)
                self.sim.record(round_index, k, "server_step", SERVER, acquired, acquired + seconds,
                                flops=costs.server[probe].flops)
                if work is not None:
                    work.server(step, probe)
                yield env.timeout(acquired + seconds - now)
            except simpy.Interrupt:
                if work is not None:
                    work.stop()
                raise
            if work is not None:
                work.backward(step, probe)
            yield from client.download(round_index, "download", costs.down)
            yield from client.compute(round_index, "client_bwd", costs.client_bwd[probe])
        if report:
            yield from client.upload(round_index, "adapter_upload", report)

    def local_steps(self, round_index: int, client: ClientNode, step_work: Work, steps: int,
                    work: StepWork | None, report: int):
        """Whole-model training steps on the client's own device (federated baselines), then the upload of
        `report` bytes (none: 0)."""
        for step in range(steps):
            if work is not None:
                work.step(step)
            yield from client.compute(round_index, "client_step", step_work)
        if report:
            yield from client.upload(round_index, "adapter_upload", report)

    def server_steps(self, round_index: int, step_work: Work, steps: int, work: StepWork | None):
        """Training steps on the server (centralised baselines)."""
        for step in range(steps):
            if work is not None:
                work.step(step)
            yield from self.server.compute(round_index, "central_step", step_work)
