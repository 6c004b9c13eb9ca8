"""CenLoRA: LoRA of one rank on algorithm.targets of every block, trained on the server on pooled data."""

from typing import Literal

from hsplit_sim import costs
from hsplit_sim.algorithms.protocols.centralised import CentralisedProtocol
from hsplit_sim.algorithms.registry import register
from hsplit_sim.scenario.schema import AlgorithmConfig


@register
class CenLoRA(CentralisedProtocol):
    name = "cenlora"

    class Config(AlgorithmConfig):
        name: Literal["cenlora"]
    adapter = "central"

    @classmethod
    def ranks(cls, scenario, spec) -> costs.Ranks:
        return costs.uniform_ranks(spec, scenario.algorithm.targets, range(spec.n_layers), scenario.algorithm.rank)

    def configure(self, ranks: costs.Ranks) -> None:
        self.ctx.backend.configure(None, self.adapter, ranks, self.config.scaling, optimizer=self.optimizer())
