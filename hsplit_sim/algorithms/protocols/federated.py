"""Federated baselines without a split: every client trains the whole model on its own device, uploads its
adapter, and receives what its algorithm's rule gives it.

A client's rank is the highest in algorithm.rank_set whose whole-model training fits its memory budget
(FedLoRA: algorithm.rank); a client that fits none is dropped and the clients table says so.
"""

import numpy as np

from hsplit_sim import costs
from hsplit_sim.algorithms.aggregation import exact_update, lora_pairs
from hsplit_sim.algorithms.base import Planned, server_placement
from hsplit_sim.algorithms.protocols.collaborative import Collaborative
from hsplit_sim.errors import ScenarioError
from hsplit_sim.scenario.load import server_precision
from hsplit_sim.scenario.schema import ELEMENT_BYTES

GB = 1e9


def products_flops(adapters: list[dict[str, np.ndarray]]) -> int:
    """FLOPs of forming every B_k @ A_k densely (HetLoRA's norms, FlexLoRA's sum)."""
    return sum(2 * a.shape[0] * a.shape[1] * b.shape[0]
               for adapter in adapters for a, b in lora_pairs(adapter).values())


class FederatedProtocol(Collaborative):
    """Whole-model local training, adapter upload, the algorithm's rule, broadcast."""

    family = "federated"

    @classmethod
    def candidate_ranks(cls, scenario) -> list[int]:
        """Ranks a client may get, highest first."""
        return sorted((r for r in scenario.algorithm.rank_set if r > 0), reverse=True)

    @classmethod
    def whole_model_memory(cls, scenario, spec, rank: int, element_bytes: int) -> int:
        ranks = costs.uniform_ranks(spec, scenario.algorithm.targets, range(spec.n_layers), rank)
        return costs.training_memory_bytes(spec, 0, spec.n_layers, scenario.training.batch_size,
                                           scenario.data.max_length, ranks, embeddings=True, head=True,
                                           element_bytes=element_bytes)

    @classmethod
    def client_ranks(cls, scenario, spec, clients) -> list[int]:
        """Each client's rank, 0 for a client that cannot train the whole model at any candidate rank."""
        return [next((r for r in cls.candidate_ranks(scenario)
                      if cls.whole_model_memory(scenario, spec, r, c.element_bytes) <= c.memory_budget_gb * GB), 0)
                for c in clients]

    @classmethod
    def check_memory(cls, scenario, spec, clients, server_device) -> int:
        if not any(cls.client_ranks(scenario, spec, clients)):
            smallest = min(cls.candidate_ranks(scenario))
            need = min(cls.whole_model_memory(scenario, spec, smallest, c.element_bytes) for c in clients)
            raise ScenarioError(f"clients: no client can train the whole model for {cls.name} even at rank "
                                f"{smallest} ({need / GB:.3f} GB; the largest memory budget is "
                                f"{max(c.memory_budget_gb for c in clients):g} GB)")
        weights = costs.weights_bytes(spec, 0, spec.n_layers, embeddings=True, head=True,
                                      element_bytes=ELEMENT_BYTES[server_precision(scenario)])
        return server_placement(weights, scenario, server_device, " to evaluate the model")

    def setup(self) -> None:
        ctx = self.ctx
        self.ranks = self.client_ranks(ctx.scenario, ctx.spec, ctx.clients)
        self.r_max = max(self.ranks)
        by_rank = {r: self.whole_step_work(r) for r in set(self.ranks)}
        self.step_work = [by_rank[r] for r in self.ranks]
        ctx.backend.configure(None, "global", self.rank_layout(self.r_max), self.config.scaling)
        for c in self.active_clients():
            self.configure_client(c.index)

    def rank_layout(self, rank: int) -> costs.Ranks:
        return costs.uniform_ranks(self.ctx.spec, self.config.targets, range(self.ctx.spec.n_layers), rank)

    def whole_step_work(self, rank: int) -> costs.Work:
        """One local step at a rank: forward, backward and the optimiser step of the whole model."""
        ctx, n = self.ctx, self.ctx.spec.n_layers
        ranks = self.rank_layout(rank)
        forward, backward = costs.segment_work(ctx.spec, 0, n, ctx.batch, ctx.seq, ranks, True, False)
        return forward + backward + costs.optimizer_work(ctx.spec, ranks, ctx.scenario.training.weight_decay)

    def configure_client(self, client: int) -> None:
        """A fresh adapter (A from the shared seed, B zero) at the client's rank, with its optimizer."""
        self.ctx.backend.configure(client, self.client_adapter(client), self.rank_layout(self.ranks[client]),
                                   self.config.scaling, optimizer=self.optimizer())

    def active_clients(self):
        return [c for c in self.ctx.clients if self.ranks[c.index] > 0]

    def train(self, round_index: int, client, steps: int, report: int):
        ctx, k = self.ctx, client.index
        work = ctx.backend.step_work(round_index, k, self.client_adapter(k), steps)
        return ctx.fleet.local_steps(round_index, ctx.fleet.clients[k], self.step_work[k], steps, work, report)

    def module_shapes(self) -> list[tuple[int, int]]:
        """(d_in, d_out) of every weight a client's adapter covers (the same at every rank)."""
        return [costs.module_shape(self.ctx.spec, m) for layer in self.rank_layout(1).values() for m in layer]

    def products_flops(self, clients) -> int:
        """products_flops from shapes: every client's B_k @ A_k formed densely."""
        per_rank = sum(2 * d_in * d_out for d_in, d_out in self.module_shapes())
        return sum(self.ranks[c.index] * per_rank for c in clients)

    def adapter_bytes(self, client: int) -> int:
        return costs.adapter_bytes(self.ctx.spec, self.rank_layout(self.ranks[client]),
                                   self.ctx.clients[client].element_bytes)

    def host_adapter_bytes(self, client: int) -> int:
        return costs.adapter_bytes(self.ctx.spec, self.rank_layout(self.ranks[client]))

    def broadcast_bytes(self) -> dict[int, int]:
        """What each client's rank of adapter weighs as the host's fp32 tensors (what a rule that truncates or
        replaces sends it)."""
        spec = self.ctx.spec
        return {c.index: costs.adapter_bytes(spec, self.rank_layout(self.ranks[c.index]))
                for c in self.active_clients()}

    def exact(self, contributions) -> dict[str, np.ndarray]:
        """The exact weighted sum of the reporting clients' updates, every rule's yardstick."""
        return exact_update([contributions.client_side[k] for k in contributions.clients], contributions.weights,
                            self.config.scaling, self.config.contributors)

    def deliver(self, round_index: int, client, planned: Planned):
        """The rule's result for the client, in its precision: every tensor of it is a floating-point one."""
        node = self.ctx.fleet.clients[client.index]
        host = planned.predicted["broadcast bytes"][client.index]
        yield from node.download(round_index, "broadcast", host * client.element_bytes // costs.FP32)
        if planned.client_merges:
            yield from node.compute(round_index, "merge", costs.merge_work(planned.client_merges))

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
                "memory_bytes": self.whole_model_memory(ctx.scenario, ctx.spec, rank or smallest, c.element_bytes),
                "memory_budget_bytes": int(c.memory_budget_gb * GB), "n_examples": ctx.partition_sizes[c.index],
                "status": "active" if rank else "dropped"})
        return rows
