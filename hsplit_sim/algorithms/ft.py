"""FT: full fine-tuning of every weight on the server on pooled data."""

from typing import Literal

from hsplit_sim import costs
from hsplit_sim.algorithms.protocols.centralised import CentralisedProtocol
from hsplit_sim.algorithms.registry import register
from hsplit_sim.scenario.schema import AlgorithmConfig


@register
class FT(CentralisedProtocol):
    name = "ft"

    class Config(AlgorithmConfig):
        name: Literal["ft"]
    full_finetune = True
    adapter = None

    @classmethod
    def ranks(cls, scenario, spec) -> costs.Ranks:
        return {}

    def configure(self, ranks: costs.Ranks) -> None:
        self.ctx.backend.setup_full(self.optimizer())
