"""The federated baselines end to end on tiny GPT-2: whole-model clients, ranks by memory, honest errors."""

import json
import math
import os
from pathlib import Path

import pandas as pd
import pytest

from durations import seconds, transfer
from hsplit_sim import costs
from hsplit_sim.errors import ScenarioError
from hsplit_sim.experiment.preflight import preflight
from hsplit_sim.experiment.run import run_scenario
from hsplit_sim.scenario import expanded_clients, model_hf_config, scenario_from_dict

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROUNDS, LOCAL_STEPS = 2, 2
# Whole tiny GPT-2 at batch 2 x 32 needs 0.00761 / 0.00775 / 0.00802 GB at rank 4 / 8 / 16: these budgets
# give ranks 16, 16, 8, 4 from rank_set [0, 4, 8, 16], and the last client fits none.
BUDGETS = [None, None, 0.0079, 0.0077, 0.001]
EXPECTED_RANKS = {"fedlora": [4, 4, 4, 4, 0], "hetlora": [16, 16, 8, 4, 0], "flora": [16, 16, 8, 4, 0],
                  "flexlora": [16, 16, 8, 4, 0]}
BASE = {
    "name": "fed",
    "seed": 1,
    "model": {"name": "tiny-gpt2"},
    "data": {"name": "e2e-synthetic", "max_length": 32, "train_examples": 40, "eval_examples": 8},
    "algorithm": {"name": "fedlora", "rank": 4, "alpha": 8, "targets": ["q", "v"], "rank_set": [0, 4, 8, 16]},
    "training": {"rounds": ROUNDS, "local_steps": LOCAL_STEPS, "batch_size": 2, "lr": 1e-3},
    "server": {"device": "rtx-3090"},
    "clients": [{"count": 1, "device": "jetson-agx-orin" if k < 3 else "raspberry-pi-5",
                 "link": "wifi-6" if k < 3 else "lte", **({"memory_budget_gb": b} if b else {})}
                for k, b in enumerate(BUDGETS)],
    "runtime": {"client_workers": 1, "torch_device": "cpu"},
}
NAMES = list(EXPECTED_RANKS)



def scenario(out: Path, name: str, *overrides: str):
    return scenario_from_dict(BASE, [f"output.dir={out}", f"algorithm.name={name}", *overrides])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Each algorithm runs once for the whole module."""
    cache = {}

    def get(name: str) -> dict:
        if name not in cache:
            run_dir = run_scenario(scenario(tmp_path_factory.mktemp(name), name), progress=False)
            cache[name] = {t: pd.read_parquet(run_dir / f"{t}.parquet") for t in ("rounds", "events", "clients")}
            cache[name]["summary"] = json.loads((run_dir / "summary.json").read_text())
        return cache[name]

    return get


@pytest.mark.parametrize("name", NAMES)
def test_rounds_complete_with_whole_model_clients_and_a_dropped_one(runs, name):
    run = runs(name)
    assert run["summary"]["status"] == "completed" and run["summary"]["algorithm"] == name
    rounds, events, clients = run["rounds"], run["events"], run["clients"]
    assert rounds["round"].tolist() == list(range(ROUNDS + 1))
    assert rounds["eval_ppl"].map(math.isfinite).all() and rounds["train_loss"][1:].map(math.isfinite).all()
    assert not set(events["kind"]) & {"client_fwd", "upload", "server_queue", "server_step", "download", "client_bwd"}
    ranks = EXPECTED_RANKS[name]
    final = clients[clients["round"] == ROUNDS].sort_values("client")
    assert final["rank"].tolist() == ranks
    assert final["status"].tolist() == ["active"] * 4 + ["dropped"]
    assert set(final["split_layer"]) == {4}
    counts = events.groupby(["kind", "client"]).size()
    for k in range(4):
        assert counts["client_step", k] == ROUNDS * LOCAL_STEPS
        assert counts["adapter_upload", k] == counts["broadcast", k] == ROUNDS
    assert 4 not in set(events["client"])  # the dropped client neither trains nor hears anything
    assert counts["aggregate", -1] == ROUNDS


@pytest.mark.parametrize("name", NAMES)
def test_durations_and_bytes_come_from_the_cost_model(runs, name):
    run = runs(name)
    sc = scenario(Path("unused"), name)
    spec = costs.ModelSpec.from_hf_config(model_hf_config(sc))
    clients = expanded_clients(sc)
    n, b, seq = spec.n_layers, sc.training.batch_size, sc.data.max_length
    ranks = EXPECTED_RANKS[name]

    def layout(rank):
        return costs.uniform_ranks(spec, ["q", "v"], range(n), rank)

    d_in, d_out = costs.module_shape(spec, "attn.c_attn")
    stacked = sum(ranks)  # FLoRA's merge: all active ranks stacked, one c_attn per layer
    merge_bytes = n * min(stacked * (d_in + d_out), d_in * d_out) * costs.FP32
    up = down = 0
    for e in run["events"].itertuples():
        if e.client < 0:
            continue
        client, rank = clients[e.client], ranks[e.client]
        duration = e.end_s - e.start_s
        if e.kind == "client_step":
            flops = (costs.forward_flops(spec, 0, n, b, seq, layout(rank), head=True)
                     + costs.backward_flops(spec, 0, n, b, seq, layout(rank), head=True, input_requires_grad=False))
            forward, backward = costs.segment_work(spec, 0, n, b, seq, layout(rank), True, False)
            step = forward + backward + costs.optimizer_work(spec, layout(rank), sc.training.weight_decay)
            assert e.flops == flops == step.flops
            assert duration == pytest.approx(seconds(step, client.device), rel=1e-9)
        elif e.kind in ("adapter_upload", "broadcast"):
            expected = merge_bytes if (name == "flora" and e.kind == "broadcast") else \
                costs.adapter_bytes(spec, layout(rank))
            rate = client.link.up_mbps if e.kind == "adapter_upload" else client.link.down_mbps
            assert e.bytes == expected, e
            assert duration == pytest.approx(transfer(expected, rate, client.link.latency_ms), rel=1e-9)
            up, down = up + e.bytes * (e.kind == "adapter_upload"), down + e.bytes * (e.kind == "broadcast")
        else:
            assert (name, e.kind) == ("flora", "merge"), e
            assert e.flops == n * 2 * d_out * stacked * d_in
    assert run["rounds"]["bytes_up"].iloc[-1] == up and run["rounds"]["bytes_down"].iloc[-1] == down


def test_aggregation_error_is_zero_only_for_stacking(runs):
    errors = {name: runs(name)["rounds"]["agg_error"][1:] for name in NAMES}
    assert (errors["flora"] < 1e-6).all()
    assert (errors["fedlora"] > 1e-4).all()  # one rank, yet A and B averaged apart: cross terms
    assert (errors["hetlora"] > 1e-4).all()  # mixed ranks: zero-padding, norm weights, cross terms
    assert (errors["flexlora"] > 0).all()  # the rank-16 truncation of a sum of rank 44


def test_no_client_that_can_hold_the_model_fails_preflight(tmp_path):
    starved = scenario(tmp_path, "hetlora", *(f"clients.{k}.memory_budget_gb=0.001" for k in range(len(BUDGETS))))
    with pytest.raises(ScenarioError, match=r"^clients: no client can train the whole model for hetlora even at "
                                            r"rank 4"):
        preflight(starved)
