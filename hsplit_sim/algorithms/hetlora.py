"""HetLoRA (Cho et al., arXiv 2401.06432) without rank self-pruning: each client's rank is the highest of
algorithm.rank_set it can train the whole model at; adapters are zero-padded to r_max, averaged with weights
proportional to ||B_k A_k||_F, and truncated back to r_k for each client. The error is that of the global
rank-r_max adapter, which the server evaluates."""

from typing import Literal

from hsplit_sim import costs
from hsplit_sim.algorithms.aggregation import hetlora_aggregate, truncate
from hsplit_sim.algorithms.base import Outcome, Planned
from hsplit_sim.algorithms.protocols.federated import FederatedProtocol, products_flops
from hsplit_sim.algorithms.registry import register
from hsplit_sim.scenario.schema import AlgorithmConfig


@register
class HetLoRA(FederatedProtocol):
    name = "hetlora"

    class Config(AlgorithmConfig):
        name: Literal["hetlora"]

    def planned(self, clients) -> Planned:
        spec = self.ctx.spec
        flops = (self.products_flops(clients)
                 + 2 * costs.adapter_params(spec, self.rank_layout(self.r_max)) * len(clients))
        return Planned(flops, {"FLOPs": flops, "broadcast bytes": self.broadcast_bytes()})

    def aggregate(self, contributions) -> Outcome:
        adapters = [contributions.client_side[k] for k in contributions.clients]
        global_adapter, used = hetlora_aggregate(adapters, contributions.weights, self.config.scaling)
        per_client = {k: truncate(global_adapter, self.ranks[k]) for k in contributions.active}
        flops = products_flops(adapters) + 2 * sum(t.size for t in global_adapter.values()) * len(adapters)
        return Outcome(used=used, exact=self.exact(contributions),
                       measured={"FLOPs": flops, "broadcast bytes": {
                           k: sum(t.nbytes for t in adapter.values()) for k, adapter in per_client.items()}},
                       client_adapters=per_client, server_adapters={"global": global_adapter})
