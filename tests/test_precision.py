"""The simulated precision: rates per number format, bytes of what crosses links and of memory, devices that lack
a format, and the paper's config-only models."""

import json

import pandas as pd
import pytest
import yaml
from durations import seconds, transfer

from hsplit_sim import costs
from hsplit_sim.errors import ScenarioError
from hsplit_sim.experiment.preflight import preflight
from hsplit_sim.experiment.run import run_scenario
from hsplit_sim.scenario import DEVICES, expanded_clients, model_hf_config, scenario_from_dict
from hsplit_sim.sim.timemodel import compute_seconds

BASE = {
    "name": "precision", "seed": 0, "model": {"name": "tiny-llama"},
    "data": {"name": "e2e-synthetic", "max_length": 32, "train_examples": 32, "eval_examples": 8},
    "algorithm": {"name": "splitlora", "rank": 4, "split_layer": 2},
    "training": {"rounds": 1, "local_steps": 2, "batch_size": 2},
    "server": {"device": "rtx-3090"},
    "clients": [{"count": 2, "device": "jetson-agx-orin", "link": "wifi-6"}],
}


def test_rates_per_format():
    xavier = DEVICES["jetson-agx-xavier"]
    big = costs.Work.compute_bound(int(1.41e12 * 11 * xavier.efficiency))
    assert compute_seconds(big, xavier, "fp16") == pytest.approx(1.41)
    assert compute_seconds(big, xavier, "fp32") == pytest.approx(11.0)
    assert xavier.peak_tflops("bf16") is None  # Volta has no BF16


def test_half_precision_halves_floating_point_bytes():
    spec = costs.ModelSpec.from_hf_config(model_hf_config(scenario_from_dict(BASE)))
    b, L = 2, 32
    assert costs.activation_bytes(spec, b, L, 2) * 2 == costs.activation_bytes(spec, b, L)
    assert costs.smashed_bytes(spec, b, L, 2) == b * L * spec.d_model * 2 + 2 * b * L * 8  # labels, mask int64
    ranks = costs.uniform_ranks(spec, ["q", "v"], range(2), 4)
    assert costs.adapter_bytes(spec, ranks, 2) * 2 == costs.adapter_bytes(spec, ranks)
    fp32 = costs.training_memory_bytes(spec, 0, 2, b, L, ranks, embeddings=True, head=False)
    fp16 = costs.training_memory_bytes(spec, 0, 2, b, L, ranks, embeddings=True, head=False, element_bytes=2)
    trainable = 16 * costs.adapter_params(spec, ranks)  # mixed precision keeps 16 bytes per trainable parameter
    assert fp16 - trainable == (fp32 - trainable) // 2


def test_a_device_without_the_format_needs_an_override():
    with pytest.raises(ScenarioError, match=r"^clients.0.precision: jetson-agx-xavier has no bf16 rate; set "
                                            r"clients.0.precision to one it has \(fp32, fp16\)"):
        scenario_from_dict(BASE, ["precision=bf16", "clients.0.device=jetson-agx-xavier"])
    scenario = scenario_from_dict(BASE, ["precision=bf16", "clients.0.device=jetson-agx-xavier",
                                         "clients.0.precision=fp16"])
    assert [c.precision for c in expanded_clients(scenario)] == ["fp16", "fp16"]


@pytest.mark.parametrize("timing_only", [True, False])
def test_fp16_charges_fp16_rates_and_bytes_while_the_host_trains_in_fp32(tmp_path, timing_only):
    """Real training checks its fp32 frames against the cost model's fp32 prediction; the clock charges fp16."""
    scenario = scenario_from_dict(BASE, [f"output.dir={tmp_path}", "precision=fp16",
                                         f"runtime.timing_only={timing_only}"])
    spec = costs.ModelSpec.from_hf_config(model_hf_config(scenario))
    run_dir = run_scenario(scenario, progress=False)
    assert json.loads((run_dir / "summary.json").read_text())["precision"] == {"server": "fp16", "clients": ["fp16"]}
    events = pd.read_parquet(run_dir / "events.parquet")
    orin, link = DEVICES["jetson-agx-orin"], expanded_clients(scenario)[0].link
    fwd = events[events["kind"] == "client_fwd"].iloc[0]
    forward = costs.segment_work(spec, 0, 2, 2, 32, costs.uniform_ranks(spec, ["q", "v"], range(2), 4), False, False)[0]
    assert fwd["end_s"] - fwd["start_s"] == pytest.approx(seconds(forward, orin, "fp16"))
    # At tiny-llama's width launches dominate (116 kernels x 20 us against microseconds of arithmetic), so fp16
    # saves little.
    assert fwd["end_s"] - fwd["start_s"] < seconds(forward, orin, "fp32")
    up = events[events["kind"] == "upload"].iloc[0]
    assert up["bytes"] == costs.smashed_bytes(spec, 2, 32, 2)
    assert up["end_s"] - up["start_s"] == pytest.approx(transfer(up["bytes"], link.up_mbps, link.latency_ms))
    adapter = events[events["kind"] == "adapter_upload"].iloc[0]
    assert adapter["bytes"] == costs.adapter_bytes(spec, costs.uniform_ranks(spec, ["q", "v"], range(2), 4), 2)


def test_the_papers_models_are_configs_for_timing():
    paper = ["model.name=llama-2-7b", "server.device=rtx-3090"]
    with pytest.raises(ScenarioError, match="^model.name: llama-2-7b is a config without weights"):
        scenario_from_dict(BASE, paper)
    with pytest.raises(ScenarioError, match=r"^server.device: rtx-3090 needs 2\d.\d\d GB but has 24 GB"):
        preflight(scenario_from_dict(BASE, [*paper, "runtime.timing_only=true"]))  # fp32 weights alone: 26 GB
    preflight(scenario_from_dict(BASE, [*paper, "runtime.timing_only=true", "precision=fp16"]))
    preflight(scenario_from_dict(BASE, ["model.name=gpt2-large", "runtime.timing_only=true"]))


def test_a_server_state_larger_than_one_accelerator_is_spread_over_several(tmp_path):
    """FT of LLaMA-2-7B (16 bytes a trained parameter) fits no single RTX 3090 but fits five of the paper's
    eight; a state that fits one is replicated."""
    paper = ["model.name=llama-2-7b", "server.device=rtx-3090", "runtime.timing_only=true", "precision=fp16",
             "training.local_steps=1", f"output.dir={tmp_path}"]
    with pytest.raises(ScenarioError, match=r"^server.device: rtx-3090 needs 10\d.\d\d GB for ft but has 24 GB x 4 "
                                            r"accelerators$"):
        preflight(scenario_from_dict(BASE, [*paper, "algorithm.name=ft", "server.accelerators=4"]))
    ft = scenario_from_dict(BASE, [*paper, "algorithm.name=ft", "server.accelerators=8"])
    assert preflight(ft) == 5
    summary = json.loads((run_scenario(ft, progress=False) / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["server_placement"] == {"accelerators": 8, "accelerators_per_copy": 5, "copies": 1}
    assert preflight(scenario_from_dict(BASE, [*paper, "server.accelerators=8"])) == 1  # SplitLoRA's server side


def test_a_trained_run_projected_to_the_papers_scale(tmp_path):
    """The tiny run's perplexity per round beside LLaMA-2-7B's time per round on the paper's server; the run
    directory and the figure say it is a projection."""
    from hsplit_sim.cli import main

    trained = run_scenario(scenario_from_dict(BASE, [f"output.dir={tmp_path / 'trained'}",
                                                     "training.rounds=2"]), progress=False)
    paper = {**BASE, "model": {"name": "llama-2-7b"}, "precision": "fp16",
             "server": {"device": "rtx-3090", "accelerators": 8}, "output": {"dir": str(tmp_path / "projected")}}
    system = tmp_path / "paper.yaml"
    system.write_text(yaml.safe_dump(paper))
    assert main(["project", str(trained), "--system", str(system)]) == 0
    projected = next((tmp_path / "projected").iterdir())
    summary = json.loads((projected / "summary.json").read_text())
    assert summary["trajectory"] == "projected" and summary["replayed_from"] == str(trained)
    assert summary["projection_differs_in"] == {"model.name": ["tiny-llama", "llama-2-7b"]}
    mine, theirs = (pd.read_parquet(d / "rounds.parquet") for d in (projected, trained))
    pd.testing.assert_series_equal(mine["eval_ppl"], theirs["eval_ppl"])
    assert (mine["sim_time_s"].iloc[1:] > 10 * theirs["sim_time_s"].iloc[1:]).all()  # 7B on Jetsons takes longer
    assert (projected / "plots" / "perplexity.svg").is_file()
    assert "Projected" in (projected / "plots" / "perplexity.svg").read_text()

    assert main(["project", str(trained), "--system", str(system), "--set", "algorithm.name=hsplitlora"]) == 2
    assert main(["project", str(trained), "--system", str(system), "--set", "training.rounds=3"]) == 2
