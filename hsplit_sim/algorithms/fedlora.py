"""FedLoRA (FedIT-style): every client trains the whole model at one rank; A and B are averaged apart."""

from typing import Literal

from hsplit_sim import costs
from hsplit_sim.algorithms.aggregation import adapter_update, fedavg
from hsplit_sim.algorithms.base import Outcome, Planned
from hsplit_sim.algorithms.protocols.federated import FederatedProtocol
from hsplit_sim.algorithms.registry import register
from hsplit_sim.scenario.schema import AlgorithmConfig


@register
class FedLoRA(FederatedProtocol):
    name = "fedlora"

    class Config(AlgorithmConfig):
        name: Literal["fedlora"]

    @classmethod
    def candidate_ranks(cls, scenario) -> list[int]:
        return [scenario.algorithm.rank]

    def planned(self, clients) -> Planned:
        ranks = self.rank_layout(self.config.rank)
        nbytes = costs.adapter_bytes(self.ctx.spec, ranks)
        flops = 2 * costs.adapter_params(self.ctx.spec, ranks) * len(clients)
        return Planned(flops, {"FLOPs": flops, "broadcast bytes": {c.index: nbytes for c in self.active_clients()}})

    def aggregate(self, contributions) -> Outcome:
        adapters = [contributions.client_side[k] for k in contributions.clients]
        merged = fedavg(adapters, contributions.weights)
        return Outcome(used=adapter_update(merged, self.config.scaling), exact=self.exact(contributions),
                       measured={"FLOPs": 2 * sum(t.size for t in merged.values()) * len(adapters),
                                 "broadcast bytes": {k: sum(t.nbytes for t in merged.values())
                                                     for k in contributions.active}},
                       client_adapters={k: merged for k in contributions.active}, server_adapters={"global": merged})
