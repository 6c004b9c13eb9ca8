"""Calibration: the fit recovers a host it was generated from, and `hsplit-sim calibrate` writes an entry a
scenario can use."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from hsplit_sim import costs
from hsplit_sim.cli import main
from hsplit_sim.scenario import DeviceSpec, scenario_from_dict
from hsplit_sim.sim.calibration import KINDS, fit_host, host_device, relative_errors, step_work
from hsplit_sim.sim.timemodel import compute_seconds

WORKS = [step_work(model, kind, split, batch, seq)
         for model in ("tiny-gpt2", "tiny-llama") for kind in KINDS for split in (1, 3)
         for batch, seq in ((1, 16), (8, 128))]


@settings(max_examples=20, deadline=None)
@given(efficiency=st.floats(0.01, 1.0), overhead_us=st.floats(0.0, 50.0))
def test_the_fit_recovers_the_host_it_was_generated_from(efficiency, overhead_us):
    host = DeviceSpec(tflops=2.0, efficiency=efficiency, memory_gb=8, memory_bandwidth_gbps=20.0,
                      launch_overhead_us=overhead_us)
    seconds = [compute_seconds(w, host) for w in WORKS]
    fitted_efficiency, fitted_overhead = fit_host(WORKS, seconds, 2.0, 20.0)
    fitted = host.model_copy(update={"efficiency": fitted_efficiency, "launch_overhead_us": fitted_overhead})
    assert abs(relative_errors(fitted, WORKS, seconds)).max() < 0.01
    assert fitted_overhead == pytest.approx(overhead_us, rel=0.05, abs=0.2)


def test_step_work_is_what_a_split_run_charges():
    spec = costs.ModelSpec.from_hf_config({"model_type": "llama", "num_hidden_layers": 4, "hidden_size": 128,
                                           "num_attention_heads": 4, "num_key_value_heads": 2,
                                           "intermediate_size": 344, "vocab_size": 1000})
    ranks = costs.uniform_ranks(spec, ["q", "v"], range(4), 8)
    client = costs.segment_work(spec, 0, 1, 2, 32, {0: ranks[0]}, False, False)
    server_ranks = {k: v for k, v in ranks.items() if k >= 1}
    server = costs.segment_work(spec, 1, 4, 2, 32, server_ranks, True, True)
    assert step_work("tiny-llama", "client_fwd", 1, 2, 32) == client[0]
    assert step_work("tiny-llama", "client_bwd", 1, 2, 32) == client[1] + costs.optimizer_work(spec, {0: ranks[0]})
    assert step_work("tiny-llama", "server_step", 1, 2, 32) == server[0] + server[1] + costs.optimizer_work(
        spec, server_ranks)


def test_host_device_says_where_its_figures_come_from():
    host = DeviceSpec(tflops=1.0, efficiency=0.2, memory_gb=8, memory_bandwidth_gbps=10.0, launch_overhead_us=5.0)
    device = host_device("host", WORKS, [compute_seconds(w, host) for w in WORKS], 1.0, 10.0, 8.0, "today")
    assert device.source.startswith("measured by hsplit-sim calibrate on today")
    assert "worst 0." in device.source and device.tflops_fp16 is None


def test_calibrate_writes_an_entry_a_scenario_can_use(tmp_path, capsys):
    out = tmp_path / "host.yaml"
    assert main(["calibrate", "--models", "tiny-llama", "--repeats", "1", "--out", str(out)]) == 0
    entry = yaml.safe_load(out.read_text())
    device = DeviceSpec(**entry)
    assert device.name == "host" and device.launch_overhead_us >= 0 and 0 < device.efficiency <= 1
    printed = capsys.readouterr().out
    assert printed.count("tiny-llama") == 3 * 4 * 3  # 3 splits x 4 batch shapes x 3 steps
    scenario = scenario_from_dict({
        "name": "calibrated", "model": {"name": "tiny-llama"}, "data": {"name": "e2e-synthetic"},
        "algorithm": {"name": "splitlora"}, "server": {"device": "rtx-3090"},
        "clients": [{"count": 1, "device": entry, "link": "wifi-6"}]})
    assert scenario.clients[0].device == device
    assert main(["calibrate", "--models", "tiny-llama", "--out", str(out)]) == 2  # never overwrites
    assert main(["calibrate", "--models", "llama-2-7b", "--out", str(tmp_path / "x.yaml")]) == 2
    assert "built-in models with weights" in capsys.readouterr().err
