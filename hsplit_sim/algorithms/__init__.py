"""How clients are configured and aggregated: one module per algorithm, registered here by name."""

from hsplit_sim.algorithms.base import Algorithm, RunContext
from hsplit_sim.algorithms.cenlora import CenLoRA
from hsplit_sim.algorithms.splitlora import SplitLoRA

ALGORITHMS: dict[str, type[Algorithm]] = {cls.name: cls for cls in (SplitLoRA, CenLoRA)}

__all__ = ["ALGORITHMS", "Algorithm", "RunContext"]
