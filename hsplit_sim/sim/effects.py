"""System effects beyond each device's speed and link: who is online, who is selected, who drops out, how
much compute and bandwidth vary, and link rates over time. Every random draw is seeded from the scenario's
seed, the round and the client, so a run repeats exactly and one client's draws never depend on another's.
"""

import bisect
import math

import numpy as np

from hsplit_sim.scenario.traces import bandwidth_steps, online_windows

# Separate streams per purpose: switching one effect on never changes the draws of another.
_SELECTION, _DROPOUT, _JITTER, _AVAILABILITY = 1, 2, 3, 4


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([seed, *keys])


class Availability:
    """When each client is online: the windows of a trace, or alternating online and offline periods of
    exponential length (means given) starting in the stationary state, generated as far as asked."""

    def __init__(self, spec, seed: int, n_clients: int):
        self.seed = seed
        self.trace = online_windows(spec.trace, n_clients) if spec.trace is not None else None
        self.means = (spec.mean_online_s, spec.mean_offline_s)
        self.generated: dict[int, tuple[list[float], bool, np.random.Generator]] = {}

    def online(self, client: int, t: float) -> bool:
        if self.trace is not None:
            windows = self.trace.get(client)
            return windows is None or any(start <= t < end for start, end in windows)
        changes, first_online = self._changes(client, t)
        return first_online == (bisect.bisect_right(changes, t) % 2 == 0)

    def next_online(self, client: int, t: float) -> float | None:
        """The first time after t at which an offline client comes online; None if it never does again."""
        if self.trace is not None:
            return min((start for start, _ in self.trace.get(client, []) if start > t), default=None)
        changes, first_online = self._changes(client, t)
        i = bisect.bisect_right(changes, t)
        while first_online != (i % 2 == 1):  # after change i the client is online when i and the start differ
            i += 1
            changes, _ = self._changes(client, changes[-1])
        return changes[i]

    def _changes(self, client: int, t: float) -> tuple[list[float], bool]:
        """Times at which the client switches state, at least until t, and whether it starts online."""
        if client not in self.generated:
            rng = _rng(self.seed, _AVAILABILITY, client)
            on, off = self.means
            self.generated[client] = ([], bool(rng.random() < on / (on + off)), rng)
        changes, first_online, rng = self.generated[client]
        while not changes or changes[-1] <= t:
            online_now = first_online == (len(changes) % 2 == 0)
            last = changes[-1] if changes else 0.0
            changes.append(last + rng.exponential(self.means[0] if online_now else self.means[1]))
        return changes, first_online


class BandwidthTrace:
    """A client's link rates over simulated time: piecewise constant from each step of the trace on."""

    def __init__(self, path: str, n_clients: int):
        self.steps = bandwidth_steps(path, n_clients)

    def covers(self, client: int) -> bool:
        return client in self.steps

    def rate_mbps(self, client: int, up: bool, t: float, base_mbps: float) -> float:
        """The client's rate at time t (its scenario link's before the trace's first step)."""
        steps = self.steps[client]
        i = bisect.bisect_right([time for time, _, _ in steps], t)
        return base_mbps if i == 0 else steps[i - 1][1 if up else 2]

    def transfer_end(self, client: int, up: bool, start: float, bits: float, base_mbps: float,
                     factor: float) -> float:
        """When `bits` sent from `start` have gone through, the rate changing at each step of the trace."""
        steps = self.steps[client]
        times = [t for t, _, _ in steps]
        i = bisect.bisect_right(times, start)  # steps[i - 1] holds at start (base rate before the first)
        t, left = start, bits
        while True:
            mbps = base_mbps if i == 0 else steps[i - 1][1 if up else 2]
            rate = mbps * 1e6 * factor
            until = times[i] if i < len(times) else math.inf
            if t + left / rate <= until:
                return t + left / rate
            left -= (until - t) * rate
            t, i = until, i + 1


class SystemEffects:
    """The scenario's system section, as decisions per round and client."""

    def __init__(self, system, seed: int, n_clients: int):
        self.system, self.seed = system, seed
        self.availability = Availability(system.availability, seed, n_clients) if system.availability else None
        self.bandwidth = BandwidthTrace(system.bandwidth_trace, n_clients) if system.bandwidth_trace else None

    @property
    def cuts_rounds_short(self) -> bool:
        """Whether a round can stop clients mid-work (deadline, enough updates, going offline), which needs
        every activity recorded as it happens."""
        selection = self.system.selection
        return (self.system.deadline_s is not None or self.availability is not None
                or (selection is not None and selection.over_commit > 0))

    def online(self, client: int, t: float) -> bool:
        return self.availability is None or self.availability.online(client, t)

    def next_online(self, clients: list[int], t: float) -> float | None:
        """When the first of these (all offline) clients comes online after t; None: none ever does."""
        times = [time for k in clients if (time := self.availability.next_online(k, t)) is not None]
        return min(times, default=None)

    def needed(self, candidates: int) -> int:
        """How many updates a round waits for."""
        selection = self.system.selection
        return candidates if selection is None else min(candidates, selection.clients_per_round)

    def select(self, round_index: int, candidates: list[int]) -> list[int]:
        """The clients that train this round, in client order: all candidates, or a seeded random
        clients_per_round x (1 + over_commit) of them."""
        selection = self.system.selection
        if selection is None:
            return candidates
        n = min(len(candidates), math.ceil(selection.clients_per_round * (1 + selection.over_commit)))
        chosen = _rng(self.seed, _SELECTION, round_index).choice(len(candidates), size=n, replace=False)
        return sorted(candidates[i] for i in chosen)

    def steps_before_dropping(self, round_index: int, client: int, steps: int) -> int | None:
        """None if the client stays; else how many of its local steps it completes before it leaves."""
        if self.system.dropout == 0:
            return None
        rng = _rng(self.seed, _DROPOUT, round_index, client)
        if rng.random() >= self.system.dropout:
            return None
        return int(rng.integers(0, steps))

    def factors(self, round_index: int, client: int) -> tuple[float, float]:
        """(compute, bandwidth) multipliers of the client's durations and link rates this round."""
        jitter = self.system.jitter
        if jitter is None:
            return 1.0, 1.0
        rng = _rng(self.seed, _JITTER, round_index, client)
        compute, bandwidth = rng.standard_normal(2)
        return float(np.exp(jitter.compute_sigma * compute)), float(np.exp(jitter.bandwidth_sigma * bandwidth))
