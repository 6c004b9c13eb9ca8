"""Checks that need the cost model: can every device hold what the algorithm asks of it?"""

from hsplit_sim import costs
from hsplit_sim.algorithms import ALGORITHMS
from hsplit_sim.errors import ScenarioError
from hsplit_sim.scenario import expanded_clients, model_hf_config, resolve_device
from hsplit_sim.scenario.schema import Scenario

GB = 1e9


def preflight(scenario: Scenario) -> None:
    """Raise a ScenarioError naming the first device whose memory cannot hold its configuration."""
    spec = costs.ModelSpec.from_hf_config(model_hf_config(scenario))
    client_bytes, server_bytes = ALGORITHMS[scenario.algorithm.name].memory_needs(scenario, spec)
    for client in expanded_clients(scenario):
        if client_bytes > client.memory_budget_gb * GB:
            raise ScenarioError(
                f"clients.{client.group}: client {client.index} ({client.device.name}) needs "
                f"{client_bytes / GB:.2f} GB for its configuration but its memory budget is "
                f"{client.memory_budget_gb:g} GB (lower algorithm.split_layer, rank or training.batch_size)"
            )
    server = resolve_device(scenario.server.device)
    if server_bytes > server.memory_gb * GB:
        raise ScenarioError(f"server.device: {server.name} needs {server_bytes / GB:.2f} GB but has "
                            f"{server.memory_gb:g} GB")
