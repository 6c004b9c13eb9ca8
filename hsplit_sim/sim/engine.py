"""SimPy environment plus the one event log every table and plot is derived from."""

import gc
import heapq

import simpy


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


class Simulation:
    """Holds simulated activities and records each as an event row.

    `events` holds the rows (tuples in results.EVENT_COLUMNS order) not yet written to the run directory:
    the run writes them after every round and clears the list (in place, so hot loops may keep `events.append`
    bound), so memory does not grow with the length of a run. `n_events` counts every row ever recorded.
    """

    def __init__(self, accelerators: int, start_s: float = 0.0):
        self.env = simpy.Environment(initial_time=start_s)
        self.server = ServerQueue(accelerators)
        self.events: list[tuple] = []
        self.flushed = 0

    @property
    def now(self) -> float:
        return self.env.now

    @property
    def n_events(self) -> int:
        return self.flushed + len(self.events)

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
        self.flushed = state["events"] - len(self.events)

    def take_events(self) -> list[tuple]:
        """The rows recorded since the last call; the list is emptied in place."""
        rows = self.events[:]
        self.events.clear()
        self.flushed += len(rows)
        return rows

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
