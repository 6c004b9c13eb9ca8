"""FLoRA (Wang et al., arXiv 2409.05976): the stacked adapters (the exact weighted sum of updates) are merged
into the base weights and every client starts the next round from a fresh adapter; the server evaluates the
merged weights.

A client worker hosts several virtual clients sharing one copy of the base weights, so the merge runs once per
worker, while every client's link carries, per module, the stacked factors or the dense update, whichever is
smaller, and its device pays the merge's FLOPs. The server's "global" adapter is never set: it only gives the
server's model the PEFT wrapping that the merged modules' paths name.
"""

from typing import Literal

from hsplit_sim import costs
from hsplit_sim.algorithms.aggregation import factors_update, stack
from hsplit_sim.algorithms.base import Outcome, Planned
from hsplit_sim.algorithms.protocols.federated import FederatedProtocol
from hsplit_sim.algorithms.registry import register
from hsplit_sim.scenario.schema import AlgorithmConfig


@register
class FLoRA(FederatedProtocol):
    name = "flora"
    replaces_adapters = False

    class Config(AlgorithmConfig):
        name: Literal["flora"]

    def planned(self, clients) -> Planned:
        stacked = sum(self.ranks[c.index] for c in clients)  # every client adapts every target weight
        shapes = self.module_shapes()
        nbytes = sum(min((d_in + d_out) * stacked * costs.FP32, d_in * d_out * costs.FP32) for d_in, d_out in shapes)
        flops = sum(stacked * d_in for d_in, _ in shapes)
        return Planned(flops, {"FLOPs": flops, "broadcast bytes": {c.index: nbytes for c in self.active_clients()}},
                       client_merges=tuple((d_out, stacked, d_in) for d_in, d_out in shapes))

    def aggregate(self, contributions) -> Outcome:
        algo = self.config
        factors = stack([contributions.client_side[k] for k in contributions.clients], contributions.weights,
                        algo.scaling, algo.contributors)
        nbytes = sum(min(b.nbytes + a.nbytes, b.shape[0] * a.shape[1] * costs.FP32) for b, a in factors.values())
        return Outcome(used=factors_update(factors), exact=self.exact(contributions),
                       measured={"FLOPs": sum(a.size for _, a in factors.values()),
                                 "broadcast bytes": {k: nbytes for k in contributions.active}},
                       merge=factors)

    def after_round(self, round_index: int) -> None:
        for c in self.active_clients():
            self.configure_client(c.index)

    def eval_adapters(self) -> list[str]:
        return []
