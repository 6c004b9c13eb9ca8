"""SimPy environment plus the one event log every table and plot is derived from."""

import simpy

EVENT_COLUMNS = ("round", "client", "kind", "resource", "start_s", "end_s", "bytes", "flops")


class Simulation:
    """Holds simulated activities and records each as an event row.

    Clients' devices and links are private to each client, so only the server's accelerators are a
    shared resource: contention there is the queueing the model shows.
    """

    def __init__(self, accelerators: int):
        self.env = simpy.Environment()
        self.server = simpy.Resource(self.env, capacity=accelerators)
        self.events: list[tuple] = []

    @property
    def now(self) -> float:
        return self.env.now

    def record(self, round_index: int, client: int, kind: str, resource: str, start: float, end: float,
               nbytes: int = 0, flops: float = 0.0) -> None:
        self.events.append((round_index, client, kind, resource, start, end, nbytes, flops))

    def hold(self, round_index: int, client: int, kind: str, resource: str, seconds: float,
             nbytes: int = 0, flops: float = 0.0):
        """A process step that occupies `resource` for `seconds` of simulated time."""
        if seconds < 0:
            raise ValueError(f"negative duration {seconds} for {kind} on {resource}")
        start = self.env.now
        yield self.env.timeout(seconds)
        self.record(round_index, client, kind, resource, start, self.env.now, nbytes, flops)

    def acquire_server(self, round_index: int, client: int):
        """Queue for one of the server's accelerators; the caller must release the returned request."""
        start = self.env.now
        request = self.server.request()
        yield request
        self.record(round_index, client, "server_queue", "server", start, self.env.now)
        return request

    def all_of(self, processes):
        return self.env.all_of([self.env.process(p) for p in processes])

    def run(self, process) -> None:
        self.env.process(process)
        self.env.run()
