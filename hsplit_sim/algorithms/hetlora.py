"""HetLoRA (Cho et al., arXiv 2401.06432): each client starts at the highest rank of algorithm.rank_set it can
train the whole model at; adapters are zero-padded to r_max, averaged with weights proportional to
||B_k A_k||_F, and truncated back to r_k for each client. The error is that of the global rank-r_max adapter,
which the server evaluates.

Rank self-pruning (algorithm.self_pruning, on by default): a client's local objective adds
lambda ||B[:, t:r]||_F ||A[t:r, :]||_F over its weights, t = floor(gamma r), which pushes the last ranks of its
adapter towards zero; after its local steps, a client whose tail norm came out smaller than its reference (the
tail of the adapter it received, or of the one it trained the round before) cuts its rank to floor(gamma r)
before it uploads. Ranks only shrink. The plans table records every client's rank from the round it takes
effect, with the tail norm and reference that decided it.

Timing-only runs measure nothing, so ranks stay; a replay takes each change from the trained run's plans table.
"""

import math
from typing import Literal

import numpy as np
from pydantic import Field

from hsplit_sim import costs
from hsplit_sim.algorithms.aggregation import hetlora_aggregate, lora_pairs, truncate
from hsplit_sim.algorithms.base import Outcome, Planned
from hsplit_sim.algorithms.plans import ClientPlan
from hsplit_sim.algorithms.protocols.federated import FederatedProtocol, products_flops
from hsplit_sim.algorithms.registry import register
from hsplit_sim.scenario.schema import AlgorithmConfig


def tail_start(rank: int, gamma: float, min_rank: int) -> int:
    """Where the tail of a rank-r adapter starts, which is also the rank a prune leaves: floor(gamma r), never
    below min_rank (at or under min_rank the tail is empty)."""
    return min(rank, max(int(gamma * rank), min_rank))


def tail_norm(adapter: dict[str, np.ndarray], gamma: float, min_rank: int = 1) -> float:
    """sum over the adapter's weights of ||B[:, t:r]||_F ||A[t:r, :]||_F, t = tail_start(r): the quantity
    HetLoRA's regulariser penalises and its pruning decision compares (training/roles.py: tail_penalty computes
    the same on the worker)."""
    total = 0.0
    for a, b in lora_pairs(adapter).values():
        start = tail_start(a.shape[0], gamma, min_rank)
        total += float(np.linalg.norm(b[:, start:].astype(np.float64)) * np.linalg.norm(a[start:].astype(np.float64)))
    return total


def pruned_rank(rank: int, tail: float, reference: float | None, gamma: float, min_rank: int) -> int:
    """A client's rank after its local training: tail_start(rank) if its tail norm is smaller than the
    reference, else the same rank (and the same without a reference)."""
    if reference is None or not tail < reference:
        return rank
    return tail_start(rank, gamma, min_rank)


def rank_of(plan: ClientPlan) -> int:
    return max((r for modules in plan.client_ranks.values() for r in modules.values()), default=0)


@register
class HetLoRA(FederatedProtocol):
    name = "hetlora"
    further_tables = ("plans",)
    # self-pruning changes ranks and plans from round to round
    round_state = FederatedProtocol.round_state + ("reference", "ranks", "plans")

    class Config(AlgorithmConfig):
        name: Literal["hetlora"]
        self_pruning: bool = Field(
            True, description="HetLoRA's local rank self-pruning: a tail penalty in each client's loss, and a "
            "client whose tail norm fell below its reference cuts its rank to floor(gamma r) before it uploads")
        pruning_gamma: float = Field(
            0.99, gt=0, lt=1, description="gamma: a pruned client keeps floor(gamma r) of its rank r, and the "
            "penalised tail is ranks floor(gamma r)..r-1")
        pruning_lambda: float = Field(
            0.01, ge=0, description="lambda: weight of the tail penalty lambda ||B_tail||_F ||A_tail||_F in the "
            "local loss (0: no penalty, the pruning decision still runs)")
        pruning_reference: Literal["received", "previous_round"] = Field(
            "received", description="what a client's tail norm after local training is compared with: the tail "
            "of the adapter it received for the round (a fresh adapter's is 0), or the tail it had after its "
            "previous local training (none before its first: no prune)")
        min_rank: int = Field(1, ge=1, description="no client prunes below this rank")

    def setup(self) -> None:
        super().setup()
        algo = self.config
        # The reference each client's next decision compares with. A fresh adapter's tail is 0 (B is zero).
        self.reference: list[float | None] = [0.0 if algo.pruning_reference == "received" else None
                                              for _ in self.ctx.clients]
        self.plans = [self.plan_of(r) for r in self.ranks]
        self.add_rows("plans", [{**plan.row(1, k), "tail_norm": math.nan, "reference_norm": math.nan}
                                for k, plan in enumerate(self.plans)])

    def restore(self, state: dict) -> None:
        super().restore(state)
        self.step_work = [self.whole_step_work(rank) for rank in self.ranks]

    def plan_of(self, rank: int) -> ClientPlan:
        """The whole model on the client, every target weight at the rank."""
        return ClientPlan(self.ctx.spec.n_layers, self.rank_layout(rank), {}, rank > 0)

    def regulariser(self) -> dict | None:
        algo = self.config
        if not algo.self_pruning or algo.pruning_lambda == 0:
            return None
        return {"weight": algo.pruning_lambda, "gamma": algo.pruning_gamma, "min_rank": algo.min_rank}

    def configure_client(self, client: int) -> None:
        """As every federated client, with the tail penalty in its loss."""
        self.ctx.backend.configure(client, self.client_adapter(client), self.rank_layout(self.ranks[client]),
                                   self.config.scaling, optimizer=self.optimizer(), regulariser=self.regulariser())

    def train(self, round_index: int, client, steps: int, report: int):
        """The local steps, then the client's pruning decision, then (report: non-zero) the upload of its adapter
        at the rank it now has."""
        ctx, k = self.ctx, client.index
        node = ctx.fleet.clients[k]
        work = ctx.backend.step_work(round_index, k, self.client_adapter(k), steps)
        yield from ctx.fleet.local_steps(round_index, node, self.step_work[k], steps, work, 0)
        self.self_prune(round_index, k)
        if report:
            yield from node.upload(round_index, "adapter_upload", self.adapter_bytes(k))

    def self_prune(self, round_index: int, k: int) -> None:
        """Client k's decision after its local steps of round_index, from its adapter's tail norm (where real
        training measured one) or, in a replay, from the trained run's plans; in force from the next round,
        and already for this round's upload."""
        algo, backend = self.config, self.ctx.backend
        if not algo.self_pruning:
            return
        rank, proposed = self.ranks[k], list(self.plans)
        tail = reference = math.nan
        tensors = backend.adapter(k, self.client_adapter(k))
        if tensors is not None:
            tail, before = tail_norm(tensors, algo.pruning_gamma, algo.min_rank), self.reference[k]
            reference = math.nan if before is None else before
            proposed[k] = self.plan_of(pruned_rank(rank, tail, before, algo.pruning_gamma, algo.min_rank))
            if algo.pruning_reference == "previous_round":
                self.reference[k] = tail
        plan = backend.plans(round_index + 1, proposed, self.plans)[k]
        if rank_of(plan) == rank:
            return
        backend.reshape(k, self.client_adapter(k), plan.client_ranks)
        self.plans[k], self.ranks[k] = plan, rank_of(plan)
        self.step_work[k] = self.whole_step_work(self.ranks[k])
        self.add_rows("plans", [{**plan.row(round_index + 1, k), "tail_norm": tail, "reference_norm": reference}])

    def planned(self, clients) -> Planned:
        spec = self.ctx.spec
        flops = (self.products_flops(clients)
                 + 2 * costs.adapter_params(spec, self.rank_layout(self.r_max)) * len(clients))
        return Planned(flops, {"FLOPs": flops, "broadcast bytes": self.broadcast_bytes()})

    def aggregate(self, contributions) -> Outcome:
        algo = self.config
        adapters = [contributions.client_side[k] for k in contributions.clients]
        global_adapter, used = hetlora_aggregate(adapters, contributions.weights, algo.scaling, self.r_max)
        per_client = {k: truncate(global_adapter, self.ranks[k]) for k in contributions.active}
        if algo.self_pruning and algo.pruning_reference == "received":
            for k, adapter in per_client.items():
                self.reference[k] = tail_norm(adapter, algo.pruning_gamma, algo.min_rank)
        flops = products_flops(adapters) + 2 * sum(t.size for t in global_adapter.values()) * len(adapters)
        return Outcome(used=used, exact=self.exact(contributions),
                       measured={"FLOPs": flops, "broadcast bytes": {
                           k: sum(t.nbytes for t in adapter.values()) for k, adapter in per_client.items()}},
                       client_adapters=per_client, server_adapters={"global": global_adapter})
