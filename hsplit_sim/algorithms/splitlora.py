"""SplitLoRA: one split point and one rank for every client; client adapters FedAvg'd (A and B apart).

Clients use one server-side adapter in turn, in the order their server steps happen in simulated time
(algorithm.server_adapters: shared, as SplitLoRA's code does), or each client has its own server-side adapter,
FedAvg'd with the others every round like the client side (per_client): then the server side learns from
local_steps updates a round, not clients x local_steps, and the clients' order no longer matters.
With unequal memory budgets, either one configuration is shrunk until the weakest client can hold it
(algorithm.heterogeneity: weakest), or the scenario's configuration stands and clients that cannot hold
it are dropped (drop); the clients table records which.
"""

from typing import Literal

from pydantic import Field

from hsplit_sim import costs
from hsplit_sim.algorithms.aggregation import adapter_update, exact_update, fedavg
from hsplit_sim.algorithms.base import Outcome, Planned, server_placement
from hsplit_sim.algorithms.plans import ClientPlan
from hsplit_sim.algorithms.protocols.split import SplitProtocol
from hsplit_sim.algorithms.registry import register
from hsplit_sim.errors import ScenarioError
from hsplit_sim.scenario.load import server_precision
from hsplit_sim.scenario.schema import ELEMENT_BYTES, AlgorithmConfig

GB = 1e9


def client_memory(scenario, spec, split: int, rank: int, client, probe: str | None = None) -> int:
    """What a client needs to train `split` blocks with `rank` on the scenario's targets, in its precision; with
    `probe` (IWI's measure, HSplitLoRA without ARMSC), the larger of its training and its probe step."""
    ranks = costs.uniform_ranks(spec, scenario.algorithm.targets, range(split), rank)

    def step(probed: str | None) -> int:
        return costs.training_memory_bytes(spec, 0, split, scenario.training.batch_size, scenario.data.max_length,
                                           ranks, embeddings=True, head=False, element_bytes=client.element_bytes,
                                           probe=probed)

    return step(None) if probe is None else max(step(None), step(probe))


def fits(scenario, spec, split: int, rank: int, client, probe: str | None = None) -> bool:
    return client_memory(scenario, spec, split, rank, client, probe) <= client.memory_budget_gb * GB


def fitting_configuration(scenario, spec, clients, probe: str | None = None) -> tuple[int, int] | None:
    """The scenario's (split, rank), shallower first, then lower rank, until every client holds it (and its
    probe step, with `probe`)."""
    rank = scenario.algorithm.rank
    while rank >= 1:
        for split in range(scenario.algorithm.split_layer, 0, -1):
            if all(fits(scenario, spec, split, rank, c, probe) for c in clients):
                return split, rank
        rank //= 2
    return None


@register
class SplitLoRA(SplitProtocol):
    name = "splitlora"

    class Config(AlgorithmConfig):
        name: Literal["splitlora"]
        heterogeneity: Literal["weakest", "drop"] = Field(
            "weakest", description="unequal budgets: one configuration that fits the weakest client, or the "
            "scenario's configuration with clients that cannot hold it dropped")
        server_adapters: Literal["shared", "per_client"] = Field(
            "shared", description="one server-side adapter the clients train in turn, in the order their server "
            "steps happen (SplitLoRA's code), or one per client, averaged every round like the client side")


    @classmethod
    def configuration(cls, scenario, spec, clients) -> tuple[int, int, list[bool]]:
        """(split, rank, active per client) under algorithm.heterogeneity."""
        algo = scenario.algorithm
        if algo.heterogeneity == "weakest":
            fitting = fitting_configuration(scenario, spec, clients)
            if fitting is None:
                weakest = next(c for c in clients if not fits(scenario, spec, 1, 1, c))
                raise ScenarioError(
                    f"clients.{weakest.group}: client {weakest.index} ({weakest.device.name}) needs "
                    f"{client_memory(scenario, spec, 1, 1, weakest) / GB:.3f} GB for even split 1 at rank 1 but its "
                    f"memory budget is {weakest.memory_budget_gb:g} GB")
            return *fitting, [True] * len(clients)
        active = [fits(scenario, spec, algo.split_layer, algo.rank, c) for c in clients]
        if not any(active):
            need = min(client_memory(scenario, spec, algo.split_layer, algo.rank, c) for c in clients)
            raise ScenarioError(f"clients: no client can hold split {algo.split_layer} at rank {algo.rank} "
                                f"({need / GB:.2f} GB)")
        return algo.split_layer, algo.rank, active

    @classmethod
    def check_memory(cls, scenario, spec, clients, server_device) -> int:
        split, rank, _ = cls.configuration(scenario, spec, clients)
        server_ranks = costs.uniform_ranks(spec, scenario.algorithm.targets, range(split, spec.n_layers), rank)
        server = costs.training_memory_bytes(spec, split, spec.n_layers, scenario.training.batch_size,
                                             scenario.data.max_length, server_ranks, embeddings=False, head=True,
                                             element_bytes=ELEMENT_BYTES[server_precision(scenario)])
        return server_placement(server, scenario, server_device)

    def setup(self) -> None:
        ctx, targets = self.ctx, self.config.targets
        self.split, self.rank, active = self.configuration(ctx.scenario, ctx.spec, ctx.clients)
        self.client_ranks = costs.uniform_ranks(ctx.spec, targets, range(self.split), self.rank)
        self.server_ranks = costs.uniform_ranks(ctx.spec, targets, range(self.split, ctx.spec.n_layers), self.rank)
        # what every broadcast carries, by the receiving client's element bytes (asked for every client, every round)
        self.broadcast_bytes = {e: costs.adapter_bytes(ctx.spec, self.client_ranks, e)
                                for e in {c.element_bytes for c in ctx.clients}}
        shared = {a: ClientPlan(self.split, self.client_ranks, self.server_ranks, a) for a in set(active)}
        self.plans = [shared[a] for a in active]  # one plan object each for active and dropped clients
        self.plan_rows(1)
        server_adapters = ["server"] + ([self.server_adapter(c.index) for c in self.active_clients()]
                                        if self.per_client else [])
        for adapter in server_adapters:
            ctx.backend.configure(None, adapter, self.server_ranks, split=self.split, **self.adapter_config())
        ctx.backend.configure(None, "global_client", self.client_ranks, self.config.scaling)
        for client in self.active_clients():
            self.configure_client(client.index)

    def __init__(self, ctx):
        super().__init__(ctx)
        self.per_client = self.config.server_adapters == "per_client"

    def server_adapter(self, client: int) -> str:
        return f"s{client}" if self.per_client else "server"

    @property
    def order_sensitive(self) -> bool:
        """Clients taking turns on one server-side adapter in simulated-time order: timing can change training."""
        return not self.per_client

    def server_side_adapters(self, clients) -> list[str]:
        return [self.server_adapter(c.index) for c in clients] if self.per_client else []

    def planned(self, clients) -> Planned:
        spec = self.ctx.spec
        averaged = costs.adapter_params(spec, self.client_ranks)
        if self.per_client:
            averaged += costs.adapter_params(spec, self.server_ranks)
        return Planned(2 * len(clients) * averaged,
                       # as the host's fp32 tensors, which the real average must match
                       {"bytes of the averaged adapter": costs.adapter_bytes(spec, self.client_ranks)})

    def aggregate(self, contributions) -> Outcome:
        """FedAvg of the client side; with per-client server sides, of those too (on the server: no traffic),
        and then the aggregation error covers both sides."""
        weights, clients = contributions.weights, contributions.clients
        adapters = [dict(contributions.client_side[k]) for k in clients]
        merged = fedavg(adapters, weights)
        server_merged = {}
        if self.per_client:
            servers = [contributions.server_side[self.server_adapter(k)] for k in clients]
            server_merged = fedavg(servers, weights)
            for adapter, server in zip(adapters, servers):
                adapter.update(server)
        scaling = self.config.scaling
        server_adapters = {"global_client": merged}
        if self.per_client:
            server_adapters.update({name: server_merged for name in ["server"] + self.server_side_adapters(
                [self.ctx.clients[k] for k in contributions.active])})
        return Outcome(used=adapter_update({**merged, **server_merged}, scaling),
                       exact=exact_update(adapters, weights, scaling),
                       measured={"bytes of the averaged adapter": sum(t.nbytes for t in merged.values())},
                       client_adapters={k: merged for k in contributions.active}, server_adapters=server_adapters)

    def deliver(self, round_index: int, client, planned: Planned):
        yield from self.ctx.fleet.clients[client.index].download(round_index, "broadcast",
                                                                 self.broadcast_bytes[client.element_bytes])

    def eval_adapters(self) -> list[str]:
        return ["global_client", "server"]
