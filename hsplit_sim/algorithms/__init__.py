"""How clients are configured and aggregated: one module per algorithm, registered here by name.

Each module holds one class: its family's protocol (protocols/) filled in with the algorithm's decisions.
Adding an algorithm is a module with its class and one line here; docs/algorithms.md shows how.
"""

from hsplit_sim.algorithms.base import Algorithm, RunContext
from hsplit_sim.algorithms.cenlora import CenLoRA
from hsplit_sim.algorithms.fedlora import FedLoRA
from hsplit_sim.algorithms.flexlora import FlexLoRA
from hsplit_sim.algorithms.flora import FLoRA
from hsplit_sim.algorithms.ft import FT
from hsplit_sim.algorithms.hetlora import HetLoRA
from hsplit_sim.algorithms.hsplitlora import HSplitLoRA
from hsplit_sim.algorithms.splitlora import SplitLoRA

ALGORITHMS: dict[str, type[Algorithm]] = {
    cls.name: cls for cls in (HSplitLoRA, SplitLoRA, CenLoRA, FT, FedLoRA, HetLoRA, FLoRA, FlexLoRA)}

__all__ = ["ALGORITHMS", "Algorithm", "RunContext"]
