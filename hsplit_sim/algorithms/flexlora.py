"""FlexLoRA (Bai et al., arXiv 2402.11505): each client gets the rank-r_k truncated SVD of the dense weighted
sum of the clients' updates. The server evaluates (and the error is that of) the rank-r_max truncation."""

from typing import Literal

from hsplit_sim.algorithms.aggregation import (
    adapter_update,
    flexlora_aggregate,
    lora_pairs,
)
from hsplit_sim.algorithms.base import Outcome, Planned
from hsplit_sim.algorithms.protocols.federated import FederatedProtocol, products_flops
from hsplit_sim.algorithms.registry import register
from hsplit_sim.scenario.schema import AlgorithmConfig


def svd_flops(m: int, n: int) -> int:
    """Thin SVD with U and V of an m x n matrix: Golub & Van Loan's R-SVD count 6 M N^2 + 20 N^3, M >= N."""
    big, small = max(m, n), min(m, n)
    return 6 * big * small ** 2 + 20 * small ** 3


@register
class FlexLoRA(FederatedProtocol):
    name = "flexlora"
    restarts_optimizer = True  # each round's factors are a new SVD basis: the old moments describe another one

    class Config(AlgorithmConfig):
        name: Literal["flexlora"]

    def planned(self, clients) -> Planned:
        flops = self.products_flops(clients) + sum(svd_flops(d_out, d_in) for d_in, d_out in self.module_shapes())
        return Planned(flops, {"FLOPs": flops, "broadcast bytes": self.broadcast_bytes()})

    def aggregate(self, contributions) -> Outcome:
        algo, clients, active = self.config, contributions.clients, contributions.active
        adapters = [contributions.client_side[k] for k in clients]
        ranks = [self.ranks[k] for k in active]
        *per_client, global_adapter = flexlora_aggregate(adapters, contributions.weights, algo.scaling,
                                                         ranks + [self.r_max], algo.contributors)
        flops = products_flops(adapters) + sum(svd_flops(b.shape[0], a.shape[1])
                                               for a, b in lora_pairs(global_adapter).values())
        return Outcome(used=adapter_update(global_adapter, algo.scaling), exact=self.exact(contributions),
                       measured={"FLOPs": flops, "broadcast bytes": {
                           k: sum(t.nbytes for t in adapter.values()) for k, adapter in zip(active, per_client)}},
                       client_adapters=dict(zip(active, per_client)), server_adapters={"global": global_adapter})
