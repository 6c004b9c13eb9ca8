"""Federated baselines without a split: every client trains the whole model on its own device.

FedLoRA (one rank, A and B averaged apart), HetLoRA (per-client ranks, zero-padding, norm-weighted
averaging, truncation), FLoRA (stacking merged into the base weights, fresh adapters each round) and
FlexLoRA (dense sum of updates, SVD, per-client truncation). A client's rank is the highest in
algorithm.rank_set whose whole-model training fits its memory budget (FedLoRA: algorithm.rank); a client
that fits none is dropped and the clients table says so.
"""

from dataclasses import dataclass, field

import numpy as np

from hsplit_sim import costs
from hsplit_sim.algorithms.aggregation import (
    adapter_update,
    data_weights,
    exact_update,
    factors_update,
    fedavg,
    flexlora_aggregate,
    hetlora_aggregate,
    lora_pairs,
    relative_error,
    stack,
    truncate,
)
from hsplit_sim.algorithms.base import Algorithm, batch_indices, check_equal, checked_bytes, ranks_to_wire
from hsplit_sim.errors import ScenarioError

GB = 1e9


@dataclass
class Outcome:
    """What one aggregation produced and what goes back down."""

    used: dict[str, np.ndarray]  # the update the rule applies, judged against exact_update
    flops: float  # the server's compute for the rule
    client_adapters: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)  # set_adapter per client
    global_adapter: dict[str, np.ndarray] | None = None  # what the server evaluates
    merge: dict[str, tuple[np.ndarray, np.ndarray]] | None = None  # (B, A) merged into the base weights


@dataclass
class Planned:
    """An aggregation's costs from the cost model: the server's FLOPs, each client's broadcast bytes, and
    (FLoRA) the FLOPs of merging the update into a client's weights."""

    flops: int
    down: dict[int, int]
    merge_flops: int = 0


def products_flops(adapters: list[dict[str, np.ndarray]]) -> int:
    """FLOPs of forming every B_k @ A_k densely (HetLoRA's norms, FlexLoRA's sum)."""
    return sum(2 * a.shape[0] * a.shape[1] * b.shape[0]
               for adapter in adapters for a, b in lora_pairs(adapter).values())


def svd_flops(m: int, n: int) -> int:
    """Thin SVD with U and V of an m x n matrix: Golub & Van Loan's R-SVD count 6 M N^2 + 20 N^3, M >= N."""
    big, small = max(m, n), min(m, n)
    return 6 * big * small ** 2 + 20 * small ** 3


class Federated(Algorithm):
    """Whole-model local training, adapter upload, a rule of the subclass, broadcast."""

    @classmethod
    def candidate_ranks(cls, scenario) -> list[int]:
        """Ranks a client may get, highest first."""
        return sorted((r for r in scenario.algorithm.rank_set if r > 0), reverse=True)

    @classmethod
    def whole_model_memory(cls, scenario, spec, rank: int) -> int:
        ranks = costs.uniform_ranks(spec, scenario.algorithm.targets, range(spec.n_layers), rank)
        return costs.training_memory_bytes(spec, 0, spec.n_layers, scenario.training.batch_size,
                                           scenario.data.max_length, ranks, embeddings=True, head=True)

    @classmethod
    def client_ranks(cls, scenario, spec, clients) -> list[int]:
        """Each client's rank, 0 for a client that cannot train the whole model at any candidate rank."""
        need = {r: cls.whole_model_memory(scenario, spec, r) for r in cls.candidate_ranks(scenario)}
        return [next((r for r, n in need.items() if n <= c.memory_budget_gb * GB), 0) for c in clients]

    @classmethod
    def check_memory(cls, scenario, spec, clients, server_device) -> None:
        if not any(cls.client_ranks(scenario, spec, clients)):
            smallest = min(cls.candidate_ranks(scenario))
            need = cls.whole_model_memory(scenario, spec, smallest)
            raise ScenarioError(f"clients: no client can train the whole model for {cls.name} even at rank "
                                f"{smallest} ({need / GB:.3f} GB; the largest memory budget is "
                                f"{max(c.memory_budget_gb for c in clients):g} GB)")
        weights = costs.weights_bytes(spec, 0, spec.n_layers, embeddings=True, head=True)
        if weights > server_device.memory_gb * GB:
            raise ScenarioError(f"server.device: {server_device.name} needs {weights / GB:.2f} GB to evaluate "
                                f"the model but has {server_device.memory_gb:g} GB")

    def setup(self) -> None:
        ctx = self.ctx
        self.ranks = self.client_ranks(ctx.scenario, ctx.spec, ctx.clients)
        self.r_max = max(self.ranks)
        by_rank = {r: self.whole_step_flops(r) for r in set(self.ranks)}
        self.step_flops = [by_rank[r] for r in self.ranks]
        if not ctx.real:
            return
        ctx.server.call("configure", args={"adapter": "global", "alpha": ctx.scenario.algorithm.alpha,
                                           "ranks": ranks_to_wire(self.rank_layout(self.r_max))})
        for c in self.active_clients():
            self.configure_client(c.index)

    def rank_layout(self, rank: int) -> costs.Ranks:
        return costs.uniform_ranks(self.ctx.spec, self.ctx.scenario.algorithm.targets, range(self.ctx.spec.n_layers),
                                   rank)

    def whole_step_flops(self, rank: int) -> int:
        ctx, n = self.ctx, self.ctx.spec.n_layers
        ranks = self.rank_layout(rank)
        return (costs.forward_flops(ctx.spec, 0, n, ctx.batch, ctx.seq, ranks, head=True)
                + costs.backward_flops(ctx.spec, 0, n, ctx.batch, ctx.seq, ranks, head=True,
                                       input_requires_grad=False))

    def configure_client(self, client: int) -> None:
        """A fresh adapter (A from the shared seed, B zero) at the client's rank, with its optimizer."""
        if not self.ctx.real:
            return
        training = self.ctx.scenario.training
        self.ctx.worker_of(client).call("configure", client=client, args={
            "adapter": self.client_adapter(client), "alpha": self.ctx.scenario.algorithm.alpha, "lr": training.lr,
            "weight_decay": training.weight_decay, "ranks": ranks_to_wire(self.rank_layout(self.ranks[client]))})

    def active_clients(self):
        return [c for c in self.ctx.clients if self.ranks[c.index] > 0]

    def round(self, round_index: int):
        ctx, alpha = self.ctx, self.ctx.scenario.algorithm.alpha
        clients = self.active_clients()
        yield ctx.sim.all_of(self.local_steps(round_index, c) for c in clients)
        uploaded: dict[int, dict[str, np.ndarray]] = {}
        yield ctx.sim.all_of(self.upload_adapter(round_index, c, uploaded) for c in clients)
        planned = self.planned(clients)
        outcome = None
        if ctx.real:
            adapters = [uploaded[c.index] for c in clients]
            weights = data_weights([ctx.partition_sizes[c.index] for c in clients])
            outcome = self.aggregate(clients, adapters, weights)
            exact = exact_update(adapters, weights, alpha, ctx.scenario.algorithm.contributors)
            ctx.stats.agg_error = relative_error(outcome.used, exact)
            check_equal(outcome.flops, planned.flops, f"FLOPs of {self.name}'s aggregation")
            check_equal({c.index: self.broadcast_bytes(c.index, outcome) for c in clients}, planned.down,
                        f"bytes of {self.name}'s broadcast")
        yield from ctx.sim.hold(round_index, -1, "aggregate", "server",
                                self.compute_seconds(planned.flops, ctx.server_device), flops=planned.flops)
        yield ctx.sim.all_of(self.broadcast(round_index, c, planned) for c in clients)
        if ctx.real:
            self.apply(outcome, clients)

    def module_shapes(self) -> list[tuple[int, int]]:
        """(d_in, d_out) of every weight a client's adapter covers (the same at every rank)."""
        return [costs.module_shape(self.ctx.spec, m) for layer in self.rank_layout(1).values() for m in layer]

    def products_flops(self, clients) -> int:
        """products_flops from shapes: every client's B_k @ A_k formed densely."""
        per_rank = sum(2 * d_in * d_out for d_in, d_out in self.module_shapes())
        return sum(self.ranks[c.index] * per_rank for c in clients)

    def planned(self, clients) -> "Planned":
        """The aggregation's FLOPs and each client's broadcast bytes from the cost model (checked in real runs)."""
        raise NotImplementedError

    def local_steps(self, round_index: int, client):
        ctx, k = self.ctx, client.index
        steps = ctx.scenario.training.local_steps
        seconds = self.compute_seconds(self.step_flops[k], client.device)
        for step in range(steps):
            if ctx.real:
                batch = batch_indices(ctx.partitions[k], ctx.batch, (round_index - 1) * steps + step,
                                      ctx.scenario.seed)
                reply = ctx.worker_of(k).call("full_step", client=k, args={"adapter": self.client_adapter(k)},
                                              tensors={"batch": batch})
                ctx.stats.losses.append(reply.header["result"]["loss"])
            yield from ctx.sim.hold(round_index, k, "client_step", f"client{k}", seconds, flops=self.step_flops[k])

    def adapter_bytes(self, client: int) -> int:
        return costs.adapter_bytes(self.ctx.spec, self.rank_layout(self.ranks[client]))

    def aggregate(self, clients, adapters: list[dict[str, np.ndarray]], weights: np.ndarray) -> Outcome:
        raise NotImplementedError

    def broadcast_bytes(self, client: int, outcome: Outcome) -> int:
        return sum(t.nbytes for t in outcome.client_adapters[client].values())

    def broadcast(self, round_index: int, client, planned: "Planned"):
        nbytes = planned.down[client.index]
        self.ctx.stats.bytes_down += nbytes
        yield from self.ctx.sim.hold(round_index, client.index, "broadcast", f"client{client.index}.down",
                                     costs.transfer_seconds(nbytes, client.link.down_mbps, client.link.latency_ms),
                                     nbytes=nbytes)

    def apply(self, outcome: Outcome, clients) -> None:
        """The real state changes of the broadcast: each client's new adapter and the server's global one."""
        for c in clients:
            self.ctx.worker_of(c.index).call("set_adapter", client=c.index, args={"adapter": f"c{c.index}"},
                                             tensors=outcome.client_adapters[c.index])
        self.ctx.server.call("set_adapter", args={"adapter": "global"}, tensors=outcome.global_adapter)

    def eval_adapters(self) -> list[str]:
        return ["global"]

    def client_rows(self, round_index: int) -> list[dict]:
        """Dropped clients show the memory the smallest candidate rank would need."""
        ctx = self.ctx
        smallest = min(self.candidate_ranks(ctx.scenario))
        rows = []
        for c in ctx.clients:
            rank = self.ranks[c.index]
            ranks = self.rank_layout(rank) if rank else {}
            rows.append({
                "round": round_index, "client": c.index, "device": c.device.name, "link": c.link.name,
                "split_layer": ctx.spec.n_layers, "rank": rank,
                "adapted_weights": sum(len(layer) for layer in ranks.values()),
                "adapter_params": costs.adapter_params(ctx.spec, ranks),
                "memory_bytes": self.whole_model_memory(ctx.scenario, ctx.spec, rank or smallest),
                "memory_budget_bytes": int(c.memory_budget_gb * GB), "n_examples": ctx.partition_sizes[c.index],
                "status": "active" if rank else "dropped"})
        return rows


class FedLoRA(Federated):
    """FedIT-style FedLoRA: one rank for every client, A and B averaged apart."""

    name = "fedlora"

    @classmethod
    def candidate_ranks(cls, scenario) -> list[int]:
        return [scenario.algorithm.rank]

    def planned(self, clients) -> "Planned":
        ranks = self.rank_layout(self.ctx.scenario.algorithm.rank)
        nbytes = costs.adapter_bytes(self.ctx.spec, ranks)
        return Planned(2 * costs.adapter_params(self.ctx.spec, ranks) * len(clients), {c.index: nbytes for c in clients})

    def aggregate(self, clients, adapters, weights) -> Outcome:
        merged = fedavg(adapters, weights)
        return Outcome(used=adapter_update(merged, self.ctx.scenario.algorithm.alpha),
                       flops=2 * sum(t.size for t in merged.values()) * len(adapters),
                       client_adapters={c.index: merged for c in clients}, global_adapter=merged)


class HetLoRA(Federated):
    """HetLoRA without rank self-pruning: zero-pad to r_max, norm-weighted averaging, truncation to r_k.

    The error is that of the global rank-r_max adapter, which the server evaluates.
    """

    name = "hetlora"

    def planned(self, clients) -> "Planned":
        spec = self.ctx.spec
        flops = (self.products_flops(clients)
                 + 2 * costs.adapter_params(spec, self.rank_layout(self.r_max)) * len(clients))
        return Planned(flops, {c.index: costs.adapter_bytes(spec, self.rank_layout(self.ranks[c.index]))
                               for c in clients})

    def aggregate(self, clients, adapters, weights) -> Outcome:
        global_adapter, used = hetlora_aggregate(adapters, weights, self.ctx.scenario.algorithm.alpha)
        flops = products_flops(adapters) + 2 * sum(t.size for t in global_adapter.values()) * len(adapters)
        return Outcome(used=used, flops=flops, global_adapter=global_adapter,
                       client_adapters={c.index: truncate(global_adapter, self.ranks[c.index]) for c in clients})


class FlexLoRA(Federated):
    """FlexLoRA: each client gets the rank-r_k truncated SVD of the dense weighted sum of updates.

    The server evaluates (and the error is that of) the rank-r_max truncation.
    """

    name = "flexlora"

    def planned(self, clients) -> "Planned":
        spec = self.ctx.spec
        flops = self.products_flops(clients) + sum(svd_flops(d_out, d_in) for d_in, d_out in self.module_shapes())
        return Planned(flops, {c.index: costs.adapter_bytes(spec, self.rank_layout(self.ranks[c.index]))
                               for c in clients})

    def aggregate(self, clients, adapters, weights) -> Outcome:
        algo = self.ctx.scenario.algorithm
        ranks = [self.ranks[c.index] for c in clients]
        *per_client, global_adapter = flexlora_aggregate(adapters, weights, algo.alpha, ranks + [self.r_max],
                                                         algo.contributors)
        flops = products_flops(adapters) + sum(svd_flops(b.shape[0], a.shape[1])
                                               for a, b in lora_pairs(global_adapter).values())
        return Outcome(used=adapter_update(global_adapter, algo.alpha), flops=flops, global_adapter=global_adapter,
                       client_adapters={c.index: a for c, a in zip(clients, per_client)})


class FLoRA(Federated):
    """FLoRA: the stacked adapters (exact weighted sum of updates) are merged into the base weights and
    every client starts the next round from a fresh adapter; the server evaluates the merged weights.

    A client worker hosts several virtual clients sharing one copy of the base weights, so the merge runs
    once per worker, while every client's link carries, per module, the stacked factors or the dense
    update, whichever is smaller, and its device pays the merge's FLOPs. The server's "global" adapter is
    never set: it only gives the server's model the PEFT wrapping that the merged modules' paths name.
    """

    name = "flora"

    def planned(self, clients) -> "Planned":
        stacked = sum(self.ranks[c.index] for c in clients)  # every client adapts every target weight
        shapes = self.module_shapes()
        nbytes = sum(min((d_in + d_out) * stacked * costs.FP32, d_in * d_out * costs.FP32) for d_in, d_out in shapes)
        return Planned(sum(stacked * d_in for d_in, _ in shapes), {c.index: nbytes for c in clients},
                       merge_flops=sum(2 * d_out * stacked * d_in for d_in, d_out in shapes))

    def aggregate(self, clients, adapters, weights) -> Outcome:
        algo = self.ctx.scenario.algorithm
        factors = stack(adapters, weights, algo.alpha, algo.contributors)
        return Outcome(used=factors_update(factors), flops=sum(a.size for _, a in factors.values()), merge=factors)

    def broadcast_bytes(self, client: int, outcome: Outcome) -> int:
        return sum(min(b.nbytes + a.nbytes, b.shape[0] * a.shape[1] * costs.FP32) for b, a in outcome.merge.values())

    def broadcast(self, round_index: int, client, planned: "Planned"):
        yield from super().broadcast(round_index, client, planned)
        flops = planned.merge_flops
        yield from self.ctx.sim.hold(round_index, client.index, "merge", f"client{client.index}",
                                     self.compute_seconds(flops, client.device), flops=flops)

    def apply(self, outcome: Outcome, clients) -> None:
        flat = {}
        for path, (b, a) in outcome.merge.items():
            flat[f"{path}.B"], flat[f"{path}.A"] = b, a
        for worker in [self.ctx.server, *self.ctx.client_workers]:
            worker.call("merge", tensors=flat)
        for c in clients:
            self.configure_client(c.index)

    def eval_adapters(self) -> list[str]:
        return []
