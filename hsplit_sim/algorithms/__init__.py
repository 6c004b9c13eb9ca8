"""How clients are configured and aggregated: one module per algorithm, registered here by name."""

from hsplit_sim.algorithms.base import Algorithm, RunContext
from hsplit_sim.algorithms.cenlora import FT, CenLoRA
from hsplit_sim.algorithms.federated import FedLoRA, FlexLoRA, FLoRA, HetLoRA
from hsplit_sim.algorithms.hsplitlora import HSplitLoRA
from hsplit_sim.algorithms.splitlora import SplitLoRA

ALGORITHMS: dict[str, type[Algorithm]] = {cls.name: cls for cls in (HSplitLoRA, SplitLoRA, CenLoRA, FT, FedLoRA, HetLoRA, FLoRA, FlexLoRA)}

__all__ = ["ALGORITHMS", "Algorithm", "RunContext"]
