"""A shared wireless medium: the clients behind one access point share its capacity.

Each direction is a processor-sharing channel: the transfers in flight divide its capacity max-min fairly,
each also capped by its own link's rate (a client never sends faster than its radio). Whenever a transfer
starts or ends the others' rates are recomputed, so two equal transfers that start together on a channel
they saturate each take twice as long as one alone.
"""

import itertools

import simpy

DONE = 1e-9  # bits left, relative to the transfer, below which it counts as finished (float rounding)


def fair_rates(capacity: float, caps: list[float]) -> list[float]:
    """Max-min fair shares of `capacity` among flows each capped at caps[i] (water-filling)."""
    rates = [0.0] * len(caps)
    left, pending = capacity, sorted(range(len(caps)), key=lambda i: caps[i])
    while pending:
        share = left / len(pending)
        i = pending[0]
        if caps[i] <= share:
            rates[i] = caps[i]
            left -= caps[i]
            pending.pop(0)
        else:
            for j in pending:
                rates[j] = share
            break
    return rates


class Channel:
    """One direction of a medium."""

    def __init__(self, env: simpy.Environment, capacity_bps: float):
        self.env, self.capacity = env, capacity_bps
        self.flows: dict[int, list] = {}  # id -> [bits left, cap, bits in all, event, rate]
        self.ids = itertools.count()
        self.updated = 0.0
        self.generation = 0

    def transfer(self, bits: float, cap_bps: float) -> simpy.Event:
        """An event that succeeds when `bits` have gone through at the rate the channel gives this transfer."""
        self._advance()
        done = self.env.event()
        self.flows[next(self.ids)] = [bits, cap_bps, bits, done, 0.0]
        self._reschedule()
        return done

    def cancel(self, done: simpy.Event) -> None:
        """Stop a transfer whose sender was interrupted."""
        self._advance()
        for key, flow in list(self.flows.items()):
            if flow[3] is done:
                del self.flows[key]
        self._reschedule()

    def _advance(self) -> None:
        elapsed = self.env.now - self.updated
        for flow in self.flows.values():
            flow[0] -= flow[4] * elapsed
        self.updated = self.env.now

    def _reschedule(self) -> None:
        for key, flow in list(self.flows.items()):
            if flow[0] <= DONE * flow[2]:
                del self.flows[key]
                flow[3].succeed()
        rates = fair_rates(self.capacity, [flow[1] for flow in self.flows.values()])
        for flow, rate in zip(self.flows.values(), rates):
            flow[4] = rate
        self.generation += 1
        if self.flows:
            soonest = min(flow[0] / flow[4] for flow in self.flows.values())
            self.env.process(self._wake(soonest, self.generation))

    def _wake(self, delay: float, generation: int):
        yield self.env.timeout(delay)
        if generation == self.generation:  # nothing started or ended meanwhile
            self._advance()
            self._reschedule()


class Medium:
    def __init__(self, env: simpy.Environment, spec):
        self.name = spec.name
        self.up = Channel(env, spec.up_mbps * 1e6)
        self.down = Channel(env, spec.down_mbps * 1e6)
