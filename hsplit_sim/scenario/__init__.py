"""Scenarios: the schema, YAML loading with overrides, and the built-in device and link catalog."""

from hsplit_sim.errors import ScenarioError
from hsplit_sim.scenario.catalog import (
    DEVICES,
    LINKS,
    DeviceSpec,
    LinkSpec,
    resolve_device,
    resolve_link,
)
from hsplit_sim.scenario.examples import scenario_path
from hsplit_sim.scenario.load import (
    apply_override,
    expanded_clients,
    load_scenario,
    model_hf_config,
    resolved_dict,
    scenario_from_dict,
    server_precision,
)
from hsplit_sim.scenario.schema import AlgorithmConfig, ClientSpec, Scenario

__all__ = [
    "AlgorithmConfig",
    "DEVICES",
    "LINKS",
    "ClientSpec",
    "DeviceSpec",
    "LinkSpec",
    "Scenario",
    "ScenarioError",
    "apply_override",
    "expanded_clients",
    "load_scenario",
    "model_hf_config",
    "resolve_device",
    "resolve_link",
    "resolved_dict",
    "scenario_from_dict",
    "scenario_path",
    "server_precision",
]
