"""SplitLoRA: one split point and one rank for every client; client adapters FedAvg'd (A and B apart).

Clients use one server-side adapter in turn, in the order their server steps happen in simulated time
(algorithm.server_adapters: shared, as SplitLoRA's code does), or each client has its own server-side adapter,
FedAvg'd with the others every round like the client side (per_client): then the server side learns from
local_steps updates a round, not clients x local_steps, and the clients' order no longer matters.
With unequal memory budgets, either one configuration is shrunk until the weakest client can hold it
(algorithm.heterogeneity: weakest), or the scenario's configuration stands and clients that cannot hold
it are dropped (drop); the clients table records which.
"""

from hsplit_sim import costs
from hsplit_sim.algorithms.aggregation import adapter_update, data_weights, exact_update, fedavg, relative_error
from hsplit_sim.algorithms.base import check_equal, ranks_to_wire
from hsplit_sim.algorithms.split_protocol import ClientPlan, SplitProtocol
from hsplit_sim.errors import ScenarioError

GB = 1e9


def client_memory(scenario, spec, split: int, rank: int) -> int:
    ranks = costs.uniform_ranks(spec, scenario.algorithm.targets, range(split), rank)
    return costs.training_memory_bytes(spec, 0, split, scenario.training.batch_size, scenario.data.max_length,
                                       ranks, embeddings=True, head=False)


def fitting_configuration(scenario, spec, budget_bytes: float) -> tuple[int, int] | None:
    """The scenario's (split, rank), shallower first, then lower rank, until it fits the budget."""
    rank = scenario.algorithm.rank
    while rank >= 1:
        for split in range(scenario.algorithm.split_layer, 0, -1):
            if client_memory(scenario, spec, split, rank) <= budget_bytes:
                return split, rank
        rank //= 2
    return None


class SplitLoRA(SplitProtocol):
    name = "splitlora"

    @classmethod
    def configuration(cls, scenario, spec, clients) -> tuple[int, int, list[bool]]:
        """(split, rank, active per client) under algorithm.heterogeneity."""
        algo = scenario.algorithm
        if algo.heterogeneity == "weakest":
            weakest = min(clients, key=lambda c: c.memory_budget_gb)
            fitting = fitting_configuration(scenario, spec, weakest.memory_budget_gb * GB)
            if fitting is None:
                raise ScenarioError(
                    f"clients.{weakest.group}: client {weakest.index} ({weakest.device.name}) needs "
                    f"{client_memory(scenario, spec, 1, 1) / GB:.3f} GB for even split 1 at rank 1 but its memory "
                    f"budget is {weakest.memory_budget_gb:g} GB")
            return *fitting, [True] * len(clients)
        need = client_memory(scenario, spec, algo.split_layer, algo.rank)
        active = [need <= c.memory_budget_gb * GB for c in clients]
        if not any(active):
            raise ScenarioError(f"clients: no client can hold split {algo.split_layer} at rank {algo.rank} "
                                f"({need / GB:.2f} GB)")
        return algo.split_layer, algo.rank, active

    @classmethod
    def check_memory(cls, scenario, spec, clients, server_device) -> None:
        split, rank, _ = cls.configuration(scenario, spec, clients)
        server_ranks = costs.uniform_ranks(spec, scenario.algorithm.targets, range(split, spec.n_layers), rank)
        server = costs.training_memory_bytes(spec, split, spec.n_layers, scenario.training.batch_size,
                                             scenario.data.max_length, server_ranks, embeddings=False, head=True)
        if server > server_device.memory_gb * GB:
            raise ScenarioError(f"server.device: {server_device.name} needs {server / GB:.2f} GB but has "
                                f"{server_device.memory_gb:g} GB")

    def setup(self) -> None:
        ctx, targets = self.ctx, self.ctx.scenario.algorithm.targets
        self.split, self.rank, active = self.configuration(ctx.scenario, ctx.spec, ctx.clients)
        client_ranks = costs.uniform_ranks(ctx.spec, targets, range(self.split), self.rank)
        server_ranks = costs.uniform_ranks(ctx.spec, targets, range(self.split, ctx.spec.n_layers), self.rank)
        self.plans = [ClientPlan(self.split, client_ranks, server_ranks, a) for a in active]
        self.scaling = ctx.scenario.algorithm.alpha / self.rank
        self.plan_rows(1)
        if not ctx.real:
            return
        server_adapters = ["server"] + ([self.server_adapter(c.index) for c in self.active_clients()]
                                        if self.per_client else [])
        for adapter in server_adapters:
            ctx.server.call("configure", args=dict(self.adapter_args, adapter=adapter, split=self.split,
                                                   ranks=ranks_to_wire(server_ranks)))
        ctx.server.call("configure", args={"adapter": "global_client", "alpha": ctx.scenario.algorithm.alpha,
                                           "ranks": ranks_to_wire(client_ranks)})
        for client in self.active_clients():
            self.configure_client(client.index)

    @property
    def per_client(self) -> bool:
        return self.ctx.scenario.algorithm.server_adapters == "per_client"  # none: shared

    def server_adapter(self, client: int) -> str:
        return f"s{client}" if self.per_client else "server"

    @property
    def order_sensitive(self) -> bool:
        """Clients taking turns on one server-side adapter in simulated-time order: timing can change training."""
        return not self.per_client

    def round(self, round_index: int):
        ctx = self.ctx
        yield self.train_clients(round_index)
        adapters = {}
        yield self.upload_adapters(round_index, adapters)
        clients = self.active_clients()
        client_ranks = self.plans[clients[0].index].client_ranks
        averaged = costs.adapter_params(ctx.spec, client_ranks)
        if self.per_client:
            averaged += costs.adapter_params(ctx.spec, self.plans[clients[0].index].server_ranks)
        flops = 2 * len(clients) * averaged
        nbytes = costs.adapter_bytes(ctx.spec, client_ranks)
        if ctx.real:
            ordered = [adapters[c.index] for c in clients]
            weights = data_weights([ctx.partition_sizes[c.index] for c in clients])
            merged = fedavg(ordered, weights)
            check_equal(sum(t.nbytes for t in merged.values()), nbytes, "broadcast of the averaged adapter")
            server_merged = {}
            if self.per_client:  # the server side is averaged too, on the server (no traffic)
                servers = [ctx.server.call("get_adapter", args={"adapter": self.server_adapter(c.index)}).tensors
                           for c in clients]
                server_merged = fedavg(servers, weights)
                for adapter, server in zip(ordered, servers):
                    adapter.update(server)  # so the aggregation error covers both sides
            exact = exact_update(ordered, weights, ctx.scenario.algorithm.alpha)
            ctx.stats.agg_error = relative_error(
                adapter_update({**merged, **server_merged}, ctx.scenario.algorithm.alpha), exact)
        yield from ctx.sim.hold(round_index, -1, "aggregate", "server",
                                self.compute_seconds(flops, ctx.server_device), flops=flops)
        yield ctx.sim.all_of(self.download(round_index, c, nbytes) for c in clients)
        if ctx.real:
            for c in clients:
                ctx.worker_of(c.index).call("set_adapter", client=c.index,
                                            args={"adapter": self.client_adapter(c.index)}, tensors=merged)
            ctx.server.call("set_adapter", args={"adapter": "global_client"}, tensors=merged)
            if self.per_client:
                for adapter in ["server"] + [self.server_adapter(c.index) for c in clients]:
                    ctx.server.call("set_adapter", args={"adapter": adapter}, tensors=server_merged)

    def eval_adapters(self) -> list[str]:
        return ["global_client", "server"]
