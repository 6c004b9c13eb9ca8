"""Checks that need the cost model: can every device hold what the algorithm asks of it?"""

from hsplit_sim import costs
from hsplit_sim.algorithms import ALGORITHMS
from hsplit_sim.scenario import expanded_clients, model_hf_config, resolve_device
from hsplit_sim.scenario.schema import Scenario


def preflight(scenario: Scenario) -> int:
    """Raise a ScenarioError naming the first device whose memory cannot hold its configuration; return how many
    accelerators one copy of the server's state takes."""
    spec = costs.ModelSpec.from_hf_config(model_hf_config(scenario))
    return ALGORITHMS[scenario.algorithm.name].check_memory(scenario, spec, expanded_clients(scenario),
                                                     resolve_device(scenario.server.device))
