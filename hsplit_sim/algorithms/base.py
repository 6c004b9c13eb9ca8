"""What every algorithm gets (the run context) and owes (its configuration of clients, a round as a SimPy
process through its family's protocol, its aggregation rule).

An algorithm never computes a duration (the fleet does, from the FLOPs and bytes it is told) and never asks
whether training is real: the run's backend (real workers, timing-only, or a replay of a trained run) does
the work or skips it behind one interface.
"""

import math
from dataclasses import dataclass, field

import numpy as np

from hsplit_sim import costs
from hsplit_sim.errors import ScenarioError
from hsplit_sim.scenario.catalog import resolve_device
from hsplit_sim.scenario.schema import ClientSpec, Scenario
from hsplit_sim.sim.fleet import Fleet


@dataclass
class RoundStats:
    """What one round adds to the rounds table besides evaluation and bytes (the fleet counts those)."""

    losses: list[float] = field(default_factory=list)
    agg_error: float = float("nan")


@dataclass
class RunContext:
    """What an algorithm works with: the scenario and model shapes, the simulated fleet, the run's backend."""

    scenario: Scenario
    spec: costs.ModelSpec
    clients: list[ClientSpec]
    fleet: Fleet
    backend: object  # hsplit_sim.backends.Backend: real workers, timing-only or replay
    partition_sizes: list[int]
    stats: RoundStats = field(default_factory=RoundStats)

    @property
    def seq(self) -> int:
        return self.scenario.data.max_length

    @property
    def batch(self) -> int:
        return self.scenario.training.batch_size


@dataclass
class Contributions:
    """What an aggregation works on: the adapters of the clients that reported, with their data weights."""

    clients: list[int]  # in client order
    active: list[int]  # every client the algorithm trains: the result replaces their adapters, reported or not
    weights: np.ndarray  # p_k over the clients that reported
    client_side: dict[int, dict[str, np.ndarray]]  # uploaded over each client's link
    server_side: dict[str, dict[str, np.ndarray]]  # read on the server by adapter name (no traffic)


@dataclass
class Planned:
    """An aggregation's cost from the plans alone (the same in every backend): the server's FLOPs, and the
    quantities a real aggregation must reproduce exactly (checked by the real backend)."""

    flops: int
    predicted: dict[str, object] = field(default_factory=dict)
    # what each receiving client merges into its weights, as (d_out, rank, d_in) per weight
    client_merges: tuple[tuple[int, int, int], ...] = ()


@dataclass
class Outcome:
    """What a real aggregation produced and what it changes on the workers."""

    used: dict[str, np.ndarray]  # the update the rule applies, judged against `exact`
    exact: dict[str, np.ndarray]  # sum_k p_k s_k B_k A_k over the contributions
    measured: dict[str, object]  # the real counterparts of Planned.predicted
    client_adapters: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)  # set on each client
    server_adapters: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # set on the server, by name
    merge: dict[str, tuple[np.ndarray, np.ndarray]] | None = None  # (B, A) merged into every worker's weights


class Algorithm:
    """An algorithm configures clients, runs a round as a SimPy process, and names the adapters of its global
    model. Families (protocols/) write the round once; each algorithm module fills in its decisions."""

    name: str
    family: str  # "split", "federated" or "centralised"
    further_tables: tuple[str, ...] = ()  # the tables add_rows fills, written even where no row came
    order_sensitive = False  # clients share state updated in simulated-time order (a shared server adapter)
    prepares = False  # work comes before round 1, as round 0 (prepare)
    # Attributes that change from round to round: a checkpoint saves them at each round's end so that a run can
    # resume (experiment/checkpoint.py); setup() rebuilds everything else from the scenario.
    round_state: tuple[str, ...] = ()

    def __init__(self, ctx: RunContext):
        self.ctx = ctx
        self.config = ctx.scenario.algorithm  # this algorithm's Config

    @classmethod
    def device_speeds_matter(cls, config) -> bool:
        """Whether the devices' compute rates can change what this configuration learns (the training key)."""
        return False

    @classmethod
    def server_device(cls, scenario: Scenario):
        """The device the server's work runs on (the centralised baselines may name another)."""
        return resolve_device(scenario.server.device)

    @classmethod
    def server_accelerators(cls, scenario: Scenario) -> int:
        """How many of server_device there are."""
        return scenario.server.accelerators

    @classmethod
    def check_memory(cls, scenario: Scenario, spec: costs.ModelSpec, clients: list[ClientSpec], server_device) -> int:
        """Raise a ScenarioError if a device cannot hold what this algorithm asks of it (before the run); return
        how many of the server's accelerators one copy of its server-side state takes (`server_placement`)."""
        raise NotImplementedError

    def setup(self) -> None:
        raise NotImplementedError

    def round(self, round_index: int):
        raise NotImplementedError

    def prepare(self):
        """Work before round 1, as round 0 (HSplitLoRA's importance probe): a SimPy process like round."""
        raise NotImplementedError

    def state(self) -> dict:
        """The round_state attributes that exist (some appear on first use)."""
        return {name: self.__dict__[name] for name in self.round_state if name in self.__dict__}

    def restore(self, state: dict) -> None:
        """Round state from a checkpoint, after setup(). The rows setup added are dropped: the checkpointed run
        wrote them before its checkpoint."""
        unknown = set(state) - set(self.round_state)
        if unknown:
            raise ValueError(f"restore: {self.name} has no round state {sorted(unknown)}")
        self.__dict__.update(state)
        self.__dict__.pop("_new_rows", None)

    def eval_adapters(self) -> list[str]:
        """The server worker's adapters that make up the global model (none: the base weights are it)."""
        raise NotImplementedError

    def client_rows(self, round_index: int) -> list[dict]:
        raise NotImplementedError

    def add_rows(self, table: str, rows: list[dict]) -> None:
        """Rows of a further table of the run directory (plans, HSplitLoRA's importance)."""
        self.__dict__.setdefault("_new_rows", {}).setdefault(table, []).extend(rows)

    def take_rows(self) -> dict[str, list[dict]]:
        """The further tables' rows added since the last call, by table: the run writes them as one more part
        each, so a table never has to be held or rewritten whole (a checkpoint follows a take: nothing is
        pending in it)."""
        return self.__dict__.pop("_new_rows", {})

    def optimizer(self) -> dict:
        """The optimiser every trained adapter gets: one for every method."""
        training = self.ctx.scenario.training
        return {"lr": training.lr, "weight_decay": training.weight_decay}


def server_placement(need_bytes: float, scenario: Scenario, server_device, what: str = "") -> int:
    """How many accelerators one copy of the server's state takes: 1 where it fits one (every accelerator then
    holds a replica), else the fewest that hold it with its layers spread over them (plain model parallelism:
    they run one after another, so a step takes as long as on one accelerator; the hand-offs between them are not
    charged). A ScenarioError where all of them together cannot hold it."""
    accelerators, each = scenario.server.accelerators, server_device.memory_gb * 1e9
    if need_bytes > accelerators * each:
        pooled = f" x {accelerators} accelerators" if accelerators > 1 else ""
        raise ScenarioError(f"server.device: {server_device.name} needs {need_bytes / 1e9:.2f} GB{what} but has "
                            f"{server_device.memory_gb:g} GB{pooled}")
    return max(1, math.ceil(need_bytes / each))
