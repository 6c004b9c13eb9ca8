"""Scenario loading: the shipped files load, overrides work, and every bad input is one line naming its field."""

import json
import os
from pathlib import Path

import pytest
import yaml

from hsplit_sim.scenario import (
    DEVICES,
    LINKS,
    Scenario,
    ScenarioError,
    expanded_clients,
    load_scenario,
    model_hf_config,
    resolve_device,
    resolve_link,
    resolved_dict,
    scenario_from_dict,
)

SCENARIOS = Path(__file__).resolve().parent.parent / "scenarios"
QUICKSTART = SCENARIOS / "quickstart.yaml"


def quickstart_data() -> dict:
    return yaml.safe_load(QUICKSTART.read_text())


def test_quickstart_loads_with_defaults():
    scenario = load_scenario(QUICKSTART)
    assert scenario.name == "quickstart"
    assert scenario.model.name == "smollm2-135m"
    assert scenario.algorithm.targets == ["q", "v"]
    assert scenario.training.weight_decay == 0.0
    assert scenario.runtime.transport == "ipc"
    assert scenario.runtime.torch_device == "auto"
    assert model_hf_config(scenario)["num_hidden_layers"] == 30


def test_tiny_loads():
    scenario = load_scenario(SCENARIOS / "tiny.yaml")
    assert scenario.model.name == "tiny-gpt2"
    assert (scenario.training.rounds, scenario.data.max_length) == (2, 48)


def test_expanded_clients_follow_groups_in_order():
    clients = expanded_clients(load_scenario(QUICKSTART))
    assert [(c.index, c.group, c.device.name, c.link.name) for c in clients] == [
        (0, 0, "jetson-agx-xavier", "wifi-5"),
        (1, 0, "jetson-agx-xavier", "wifi-5"),
        (2, 1, "raspberry-pi-5", "lte"),
    ]
    assert clients[2].memory_budget_gb == DEVICES["raspberry-pi-5"].memory_gb


def test_resolved_dict_spells_out_specs_and_versions():
    resolved = resolved_dict(load_scenario(QUICKSTART))
    assert resolved["server"]["device"]["tflops"] == DEVICES["rtx-3090"].tflops
    assert resolved["clients"][1]["link"] == LINKS["lte"].model_dump()
    assert resolved["clients"][0]["memory_budget_gb"] == 32
    assert {"hsplit_sim", "python", "torch", "pyzmq"} <= set(resolved["versions"])
    assert yaml.safe_load(yaml.safe_dump(resolved)) == resolved


def test_overrides_parse_values_index_lists_and_create_keys():
    scenario = scenario_from_dict(
        quickstart_data(),
        [
            "training.lr=1e-3",
            "clients.0.count=10",
            "algorithm.targets=[q,k,v]",
            "runtime.torch_device=cuda:0",
            "output.dir=/tmp/elsewhere",
            "data.partition.kind=dirichlet",
            "data.partition.alpha=0.1",
        ],
    )
    assert scenario.training.lr == 1e-3
    assert len(expanded_clients(scenario)) == 11
    assert scenario.algorithm.targets == ["q", "k", "v"]
    assert scenario.runtime.torch_device == "cuda:0"
    assert scenario.output.dir == "/tmp/elsewhere"
    assert (scenario.data.partition.kind, scenario.data.partition.alpha) == ("dirichlet", 0.1)


def test_override_creates_missing_mapping():
    data = quickstart_data()
    del data["runtime"]
    scenario = scenario_from_dict(data, ["runtime.transport=tcp"])
    assert scenario.runtime.transport == "tcp"
    assert "runtime" not in data  # the caller's dict is left alone


def test_inline_device_and_link():
    scenario = scenario_from_dict(
        quickstart_data(),
        [
            "clients.1.device={tflops: 2.0, efficiency: 0.4, memory_gb: 8}",
            "clients.1.link={up_mbps: 20, down_mbps: 100, latency_ms: 30}",
        ],
    )
    client = expanded_clients(scenario)[2]
    assert (client.device.name, client.device.tflops, client.memory_budget_gb) == ("custom", 2.0, 8)
    assert (client.link.name, client.link.up_mbps) == ("custom", 20)


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["clients.0.devise=x"], "clients.0.devise: unknown key"),
        (["training.rounds=abc"], "training.rounds: Input should be a valid integer"),
        (["clients.1.link={up_mbps: -5, down_mbps: 1, latency_ms: 1}"], "clients.1.link.up_mbps: "),
        (["clients.0.device={tflops: 1, efficiency: 1.5, memory_gb: 1}"], "clients.0.device.efficiency: "),
        (["clients.0.device=warp-drive"], "clients.0.device: unknown device 'warp-drive'"),
        (["clients.1.link=pigeon"], "clients.1.link: unknown link 'pigeon'"),
        (["server.device=abacus"], "server.device: unknown device 'abacus'"),
        (["model.name=gpt-5"], "model.name: unknown model 'gpt-5'"),
        (["model.path=/nowhere"], "model: give exactly one"),
        (["algorithm.name=fedavg"], "algorithm.name: Input should be 'cenlora', 'fedlora'"),
        (["algorithm.armsc=false"], "algorithm.armsc: unknown key"),
        (["algorithm.split_layer=30"], "algorithm.split_layer: 30 is outside 1..29"),
        (["algorithm.split_layer=0"], "algorithm.split_layer: "),
        (["algorithm.targets=[q,k]", "algorithm.rank=192"], "algorithm.rank: 192 must be below 192"),
        (["algorithm.targets=[q,attn]"], "algorithm.targets.1: "),
        (["model.name=tiny-gpt2", "algorithm.targets=[gate]"], "algorithm.targets.0: 'gate' does not exist in gpt2"),
        (["data.partition.kind=zipf"], "data.partition.kind: "),
        (["data.partition={kind: dirichlet, alpha: 0}"], "data.partition.alpha: "),
        (["data.max_length=9000"], "data.max_length: "),
        (["training.eval_every=0"], "training.eval_every: "),
        (["server.accelerators=0"], "server.accelerators: "),
        (["runtime.torch_device=gpu"], "runtime.torch_device: "),
        (["runtime.transport=udp"], "runtime.transport: "),
        (["clients.0.memory_budget_gb=64"], "clients.0.memory_budget_gb: 64 GB exceeds"),
        (["clients=[]"], "clients: "),
        (["clients.2.count=1"], "--set clients.2.count: clients.2 is not an index"),
        (["seed.value=1"], "--set seed.value: seed is 0, not a mapping"),
        (["training.rounds"], "--set training.rounds: expected KEY.PATH=VALUE"),
        (["training.rounds=true"], "training.rounds: Input should be a valid integer (got true)"),
        (["server.accelerators=1000000000000"], "server.accelerators: Input should be less than or equal to 4096"),
        (["runtime.client_workers=10000"], "runtime.client_workers: Input should be less than or equal to 256"),
        (["clients.0.count=100000000000"], "clients.0.count: Input should be less than or equal to 1000000"),
        (["seed=4294967296"], "seed: Input should be less than 4294967296"),
        (["runtime.timing_only=yes"], None),  # YAML's yes is true: a switch takes it
        (["training.lr=.inf"], "training.lr: Input should be a finite number"),
        (["clients.0.device={tflops: .nan, efficiency: 1, memory_gb: 1}"], "clients.0.device.tflops: "),
        (["clients.1.link={up_mbps: 20, down_mbps: 100, latency_ms: .inf}"], "clients.1.link.latency_ms: "),
        # positive and finite, but durations of no meaning (1e-300 Mbit/s gives 1e306 s)
        (["clients.1.link={up_mbps: 1.0e-300, down_mbps: 100, latency_ms: 1}"],
         "clients.1.link.up_mbps: Input should be greater than or equal to 0.0001"),
        (["clients.1.link={up_mbps: 20, down_mbps: 100, latency_ms: 1.0e+300}"], "clients.1.link.latency_ms: "),
        (["clients.0.device={tflops: 1.0e-300, efficiency: 0.5, memory_gb: 1}"], "clients.0.device.tflops: "),
        (["clients.0.device={tflops: 1, efficiency: 1.0e-300, memory_gb: 1}"], "clients.0.device.efficiency: "),
        (["system.media=[{name: ap, up_mbps: 1.0e-300, down_mbps: 1}]"], "system.media.0.up_mbps: "),
        (["clients.0.link={up_mbps: 1, up_mbps: 2, down_mbps: 1, latency_ms: 1}"],
         "--set clients.0.link: value is not valid YAML (YAML syntax error at line 1, column 14: key 'up_mbps' "
         "appears twice"),
    ],
)
def test_bad_input_is_one_line_naming_the_field(overrides, expected):
    if expected is None:
        scenario_from_dict(quickstart_data(), overrides)
        return
    with pytest.raises(ScenarioError) as raised:
        scenario_from_dict(quickstart_data(), overrides)
    message = str(raised.value)
    assert message.startswith(expected)
    assert "\n" not in message


def test_missing_field_is_named():
    data = quickstart_data()
    del data["server"]["device"]
    with pytest.raises(ScenarioError, match=r"^server\.device: required field is missing$"):
        scenario_from_dict(data)


def test_e2e_directory_defaults_to_the_shipped_copy(monkeypatch, tmp_path):
    monkeypatch.delenv("HSPLIT_SIM_E2E_DIR", raising=False)
    assert scenario_from_dict(quickstart_data(), ["data.name=e2e"]).data.dir is None
    monkeypatch.setenv("HSPLIT_SIM_E2E_DIR", str(tmp_path))
    with pytest.raises(ScenarioError, match=r"^data\.dir: .* has no devset\.csv \(or devset\.csv\.gz\)$"):
        scenario_from_dict(quickstart_data(), ["data.name=e2e"])
    (tmp_path / "devset.csv").write_text("mr,ref\n")
    assert scenario_from_dict(quickstart_data(), ["data.name=e2e"]).data.dir == str(tmp_path)
    with pytest.raises(ScenarioError, match=r"^data\.dir: .* has no testset_w_refs\.csv"):
        scenario_from_dict(quickstart_data(), ["data.name=e2e", "data.test_examples=4"])
    with pytest.raises(ScenarioError, match=r"^data\.dir: .* is not a directory"):
        scenario_from_dict(quickstart_data(), ["data.name=e2e", f"data.dir={tmp_path / 'none'}"])


def test_local_checkpoint_config(tmp_path):
    config = {"model_type": "gpt2", "n_embd": 64, "n_layer": 3, "n_positions": 128}
    (tmp_path / "config.json").write_text(json.dumps(config))  # the cost model needs heads and a vocabulary
    with pytest.raises(ScenarioError, match=r"^model\.path: .*config\.json: n_head must be an integer in 1\.\.10,000,000, "
                       "got None$"):
        scenario_from_dict(quickstart_data(), ["model={path: " + str(tmp_path) + "}"])
    (tmp_path / "config.json").write_text(json.dumps({**config, "n_head": 4, "vocab_size": 100}))
    scenario = scenario_from_dict(quickstart_data(), ["model={path: " + str(tmp_path) + "}"])
    assert model_hf_config(scenario)["n_layer"] == 3
    with pytest.raises(ScenarioError, match=r"^algorithm\.split_layer: 3 is outside 1\.\.2"):
        scenario_from_dict(quickstart_data(), ["model={path: " + str(tmp_path) + "}", "algorithm.split_layer=3"])


def test_file_errors(tmp_path):
    with pytest.raises(ScenarioError, match="no such file"):
        load_scenario(tmp_path / "absent.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: x\nmodel: {name: tiny-gpt2\nseed: 1\n")
    with pytest.raises(ScenarioError, match=r"YAML syntax error at line \d+") as raised:
        load_scenario(broken)
    assert "\n" not in str(raised.value)
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n")
    with pytest.raises(ScenarioError, match="top level must be a mapping"):
        load_scenario(listed)
    twice = tmp_path / "twice.yaml"
    twice.write_text("name: x\ntraining: {rounds: 2}\ntraining: {lr: 0.1}\n")  # the second would reset rounds
    with pytest.raises(ScenarioError, match=r"twice.yaml: YAML syntax error at line 3, column 1: key 'training' "
                                            r"appears twice in one mapping$"):
        load_scenario(twice)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ScenarioError, match=r"latin.yaml: not UTF-8 text$"):
        load_scenario(latin)
    deep = tmp_path / "deep.yaml"
    deep.write_text("a: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ScenarioError, match=r"deep.yaml: nested too deeply$"):
        load_scenario(deep)
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    with pytest.raises(ScenarioError, match=r"fifo.yaml: not a regular file$"):  # reading it would wait for ever
        load_scenario(fifo)
    with pytest.raises(ScenarioError, match=r": not a regular file$"):
        load_scenario(tmp_path)


def test_catalog_resolution():
    assert resolve_device("h100").tflops == 67
    assert resolve_link("ethernet").latency_ms == 0.5
    with pytest.raises(ScenarioError, match="unknown device 'tpu'.*rtx-3090"):
        resolve_device("tpu")
    with pytest.raises(ScenarioError, match="unknown link 'smoke'.*wifi-6"):
        resolve_link("smoke")
    for spec in [*DEVICES.values(), *LINKS.values()]:
        assert "assumed" in spec.source


def test_json_schema_is_serialisable():
    schema = json.loads(json.dumps(Scenario.model_json_schema()))
    assert schema["additionalProperties"] is False


@pytest.mark.parametrize("path", sorted(SCENARIOS.rglob("*.yaml")), ids=lambda p: str(p.relative_to(SCENARIOS)))
def test_every_shipped_scenario_and_sweep_file_loads(path, monkeypatch, tmp_path):
    """A shipped file that no longer validates (a renamed key, a new constraint) fails here, not for a user;
    from any working directory, since examples run by name wherever the user is."""
    from hsplit_sim.experiment.sweep import load_sweep_file

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HSPLIT_SIM_E2E_DIR", raising=False)
    if "base" in yaml.safe_load(path.read_text()):
        assert load_sweep_file(path).points
    else:
        load_scenario(path)
