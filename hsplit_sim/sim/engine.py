"""SimPy environment plus the one event log every table and plot is derived from."""

import gc
import heapq
import math
from dataclasses import dataclass

import simpy

# The activities of one split iteration, in the order it does them and its events are listed.
SPLIT_KINDS = ("client_fwd", "upload", "server_queue", "server_step", "download", "client_bwd")


@dataclass(frozen=True, eq=False)
class IterationShape:
    """What every split iteration of one client under one set of costs has in common: its resources, bytes and
    FLOPs per activity of SPLIT_KINDS (FLOPs as (plain, probing) pairs of those tuples) and its forward's
    seconds. A compact record names its shape instead of repeating all of this six times."""

    client: int
    resources: tuple[str, ...]
    nbytes: tuple[int, ...]
    flops: tuple[tuple[float, ...], tuple[float, ...]]
    fwd_s: float


def expanded(events: list[tuple], shapes: list[IterationShape]):
    """Event rows (EVENT_COLUMNS tuples) of a list that may hold compact split-iteration records (Simulation),
    in order: a record gives its six rows. `shapes` are the shapes its records name by number."""
    for event in events:
        if len(event) == 8:
            yield event
            continue
        number, r, probe, start, arrived, acquired, served, downloaded, end = event
        shape = shapes[number]
        k, flops = shape.client, shape.flops[probe]
        times = (start, start + shape.fwd_s, arrived, acquired, served, downloaded, end)
        for i, kind in enumerate(SPLIT_KINDS):
            yield r, k, kind, shape.resources[i], times[i], times[i + 1], shape.nbytes[i], flops[i]


def rows_in(events: list[tuple]) -> int:
    """How many event rows a list of rows and compact records stands for."""
    records = len(events) - list(map(len, events)).count(8)
    return len(events) + (len(SPLIT_KINDS) - 1) * records


class ServerQueue:
    """The server's accelerators as a first-come-first-served queue, booked arithmetically.

    In a FIFO queue of c servers, each arrival starts at the later of its arrival and the earliest time an
    accelerator frees up after every earlier arrival was placed. So a step is booked when it arrives, with no
    SimPy event at all (timing-only runs make a million of them): `book` returns its start and marks that
    accelerator busy until start + seconds. Arrivals are booked in the order their processes run, which is
    the order of simulated arrival (ties: SimPy's order), and real server steps run in that order too.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.free_at = [0.0] * capacity  # a heap: when each accelerator is next free

    def book(self, now: float, seconds: float) -> float:
        free = heapq.heappop(self.free_at)
        start = free if free > now else now
        heapq.heappush(self.free_at, start + seconds)
        return start


class Clockwork:
    """Runs processes that only wait (generators that yield delays in seconds) in exactly the order SimPy would
    run them as processes started together, for a fraction of SimPy's cost per wait: a heap of (wake-up time,
    order of scheduling), which is SimPy's own order for timeouts, and processes started in the order given,
    as SimPy starts processes in the order they were made. The fleet runs a round's split iterations on it
    when nothing else can happen while they run (Fleet.participate); `now` is its clock meanwhile."""

    def __init__(self, now: float):
        self.now = now

    def run(self, processes: list) -> list[float]:
        """Run the processes to their ends; returns when each ended, in their order."""
        ends = [self.now] * len(processes)
        waiting, order = [], 0
        for i, process in enumerate(processes):
            for delay in process:  # its first wait, or it ended at once
                waiting.append((self.now + delay, order, i, process))
                order += 1
                break
        heapq.heapify(waiting)
        pop, push = heapq.heappop, heapq.heappush
        while waiting:
            at, _, i, process = pop(waiting)
            self.now = at
            try:
                delay = process.send(None)
            except StopIteration:
                ends[i] = at
                continue
            push(waiting, (at + delay, order, i, process))  # SimPy's wake-up time: its clock plus the delay
            order += 1
        return ends


class Environment(simpy.Environment):
    """SimPy's environment, whose clock the Clockwork can move: a timeout cannot always land on a given instant
    (now + delay rounds, and for some pairs no delay gives the instant exactly), and SimPy has no public way
    to set its clock."""

    def advance_to(self, t: float) -> None:
        """The clock at `t` exactly, as a timeout ending then would leave it; only while nothing is scheduled,
        so no event can be passed over."""
        if t < self._now or self.peek() != math.inf:
            raise RuntimeError(f"the clock cannot move from {self._now!r} to {t!r} with events scheduled")
        self._now = t


class Simulation:
    """Holds simulated activities and records each as an event row.

    `events` holds the rows (tuples in results.EVENT_COLUMNS order) not yet written to the run directory:
    the run writes them after every round and clears the list (in place, so hot loops may keep `events.append`
    bound), so memory does not grow with the length of a run. `n_events` counts every row ever recorded. A
    split iteration on the fleet's fast path is one compact record instead of six rows: (the number of its
    IterationShape, round, probing, start, arrival at the server, server step start, its end, download end,
    backward end), nine plain values where a row has eight; shapes are numbered (`shape_number`) afresh
    after every `take_events`, which hands them over with the records. `rows` gives the rows of what is not
    taken yet, and the run directory expands whole rounds of records in numpy (a timing-only run records
    millions).
    """

    def __init__(self, accelerators: int, start_s: float = 0.0):
        self.env = Environment(initial_time=start_s)
        self.server = ServerQueue(accelerators)
        self.events: list[tuple] = []
        self.flushed = 0
        self._shapes: dict[IterationShape, int] = {}  # the numbers records not yet taken use

    @property
    def now(self) -> float:
        return self.env.now

    @property
    def n_events(self) -> int:
        return self.flushed + rows_in(self.events)

    def state(self) -> dict:
        """The clock at a round's end, for a checkpoint. Nothing else waits then: every process of the round has
        ended, and what SimPy may still hold (a deadline that did not fire, a medium's superseded wake-up) does
        nothing when it fires, so a simulation started at `now` (start_s) with these values goes on the same."""
        return {"now": self.env.now, "server_free_at": list(self.server.free_at), "events": self.n_events}

    def restore(self, state: dict) -> None:
        """The values of `state` on a simulation started at state["now"], whose server queue is set up."""
        if self.env.now != state["now"] or len(self.server.free_at) != len(state["server_free_at"]):
            raise ValueError("restore: the simulation's clock or server queue does not match the state's")
        self.server.free_at = list(state["server_free_at"])
        self.flushed = state["events"] - rows_in(self.events)

    def take_events(self) -> tuple[list[tuple], list[IterationShape]]:
        """The rows and compact records recorded since the last call, and the shapes those records number; the
        list is emptied in place."""
        rows, shapes = self.events[:], list(self._shapes)
        self.events.clear()
        self._shapes = {}
        self.flushed += rows_in(rows)
        return rows, shapes

    def shape_number(self, shape: IterationShape) -> int:
        """The number compact records use for `shape` until the next take_events."""
        number = self._shapes.get(shape)
        if number is None:
            number = self._shapes[shape] = len(self._shapes)
        return number

    def rows(self):
        """The event rows recorded and not yet taken, records expanded (engine.expanded)."""
        return expanded(self.events, list(self._shapes))

    def record(self, round_index: int, client: int, kind: str, resource: str, start: float, end: float,
               nbytes: int = 0, flops: float = 0.0) -> None:
        self.events.append((round_index, client, kind, resource, start, end, nbytes, flops))

    def hold(self, round_index: int, client: int, kind: str, resource: str, seconds: float,
             nbytes: int = 0, flops: float = 0.0):
        """A process step that occupies `resource` for `seconds` of simulated time. Interrupted (a round's
        deadline), it records the part done, with that share of its bytes and FLOPs, and passes the
        interrupt on."""
        if seconds < 0:
            raise ValueError(f"negative duration {seconds} for {kind} on {resource}")
        start = self.env.now
        try:
            yield self.env.timeout(seconds)
        except simpy.Interrupt:
            self.record_part(round_index, client, kind, resource, start, start + seconds, nbytes, flops)
            raise
        self.events.append((round_index, client, kind, resource, start, self.env.now, nbytes, flops))

    def record_part(self, round_index: int, client: int, kind: str, resource: str, start: float, end: float,
                    nbytes: int, flops: float) -> None:
        """The part of an activity from start to now of one planned to end at `end`."""
        share = (self.now - start) / (end - start) if end > start else 1.0
        self.record(round_index, client, kind, resource, start, self.now, int(nbytes * share), flops * share)

    def all_of(self, processes):
        return self.env.all_of([self.env.process(p) for p in processes])

    def run(self, process) -> None:
        """Run `process` to its end with Python's cyclic garbage collector paused (the process collects the
        young generation at its round ends): the hot loops allocate millions of short-lived tuples and events,
        and the generational collections they set off cost more than the simulation itself (at 10,000 clients,
        3.3 s a round against 1.4 s, growing with every round, as each full collection walked more live rows)."""
        enabled = gc.isenabled()
        gc.disable()
        try:
            self.env.process(process)
            self.env.run()
        finally:
            if enabled:
                gc.enable()
