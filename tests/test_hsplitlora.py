"""HSplitLoRA end to end on tiny models: NAA's exact aggregation, IWI's probe and table, ARMSC's plans
within each client's budget, the ablations, and every compute duration from the cost model."""

import itertools
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from durations import seconds
from hsplit_sim import costs
from hsplit_sim.algorithms import importance as iwi
from hsplit_sim.algorithms.aggregation import exact_update, factors_update, relative_error, stack
from hsplit_sim.algorithms.hsplitlora import HSplitLoRA, server_pieces
from hsplit_sim.algorithms.plans import ClientPlan, ranks_key
from hsplit_sim.algorithms.protocols.split import PlanCosts, iteration_estimate, probe_iteration
from hsplit_sim.errors import ScenarioError
from hsplit_sim.experiment.run import run_scenario
from hsplit_sim.scenario import expanded_clients, model_hf_config, resolve_device, scenario_from_dict
from hsplit_sim.scenario.catalog import DeviceSpec
from hsplit_sim.scenario.models import BUILTIN_MODELS

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROUNDS, LOCAL_STEPS, BATCH, SEQ = 3, 2, 2, 32
Q = [0, 4, 8, 16]



def spec_of(name: str) -> costs.ModelSpec:
    return costs.ModelSpec.from_hf_config(BUILTIN_MODELS[name])


def memory(spec, split, ranks) -> int:
    """What a client's plan needs with IWI on: the larger of its training step and its probe step (abs_sum)."""
    return max(costs.training_memory_bytes(spec, 0, split, BATCH, SEQ, ranks, embeddings=True, head=False,
                                           probe=step) for step in (None, "abs_sum"))


def heterogeneous_budgets(name: str) -> list[float]:
    """Three budgets in GB: block 0, blocks 0-1 with 40 % less adapter memory than every weight at the top
    rank (so importance decides the ranks), and every block with room to spare."""
    spec = spec_of(name)
    modules = sorted(set(costs.TARGET_MODULES[spec.family].values()))

    def tight(split, cut):
        ranks = {layer: {m: max(Q) for m in modules} for layer in range(split)}
        return (memory(spec, split, ranks) - cut * 16 * costs.adapter_params(spec, ranks)) / 1e9

    return [tight(1, 0.4), tight(2, 0.4), tight(3, -0.5)]


def base(name: str, budgets: list[float] | None) -> dict:
    groups = [{"count": 1, "device": "jetson-agx-orin", "link": "wifi-6", **({"memory_budget_gb": b} if b else {})}
              for b in (budgets or [None, None])]
    return {
        "name": "h", "seed": 1, "model": {"name": name},
        "data": {"name": "e2e-synthetic", "max_length": SEQ, "train_examples": 36, "eval_examples": 8},
        "algorithm": {"name": "hsplitlora", "rank": 8, "alpha": 16, "rank_set": Q},
        "training": {"rounds": ROUNDS, "local_steps": LOCAL_STEPS, "batch_size": BATCH, "lr": 5e-3},
        "server": {"device": "rtx-3090", "accelerators": 1},
        "clients": groups,
        "runtime": {"client_workers": 1, "torch_device": "cpu"},
    }


CASES = {
    "gpt2-het": ("tiny-gpt2", True, ()),
    "llama-het": ("tiny-llama", True, ()),
    "no-naa": ("tiny-gpt2", True, ("algorithm.naa=false",)),
    "no-iwi": ("tiny-gpt2", True, ("algorithm.iwi=false",)),
    "no-armsc": ("tiny-gpt2", True, ("algorithm.armsc=false",)),
    "per-client": ("tiny-llama", True, ("algorithm.server_adapters=per_client",)),
}


def scenario_of(key: str, out: Path):
    name, heterogeneous, overrides = CASES[key]
    raw = base(name, heterogeneous_budgets(name) if heterogeneous else None)
    return scenario_from_dict(raw, [f"output.dir={out}", *overrides])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Each case runs once for the module: (scenario, tables)."""
    cache = {}

    def get(key: str):
        if key not in cache:
            sc = scenario_of(key, tmp_path_factory.mktemp(key))
            run_dir = run_scenario(sc, progress=False)
            tables = {p.stem: pd.read_parquet(p) for p in run_dir.glob("*.parquet")}
            cache[key] = (sc, tables)
        return cache[key]

    return get


@pytest.mark.parametrize("key", ["gpt2-het", "llama-het", "per-client"])
def test_hsplitlora_runs_with_exact_aggregation_and_plans_within_budget(runs, key):
    sc, tables = runs(key)
    rounds, clients = tables["rounds"], tables["clients"]
    assert rounds["round"].tolist() == list(range(ROUNDS + 1))
    assert (rounds["agg_error"][1:] < 1e-6).all(), rounds["agg_error"].tolist()
    # A merged update changes the base weights: the global model after round 1 is not the initial one.
    assert rounds["eval_loss"][1] != rounds["eval_loss"][0]
    assert rounds["eval_loss"].iloc[-1] < rounds["eval_loss"][0]
    # IWI: one row per candidate weight for every round, from the probe before training (round 0) on.
    importance = tables["importance"]
    spec = costs.ModelSpec.from_hf_config(model_hf_config(sc))
    n_candidates = len(iwi.candidate_weights(spec, 0, spec.n_layers))
    assert importance.groupby("round").size().to_dict() == {r: n_candidates for r in range(ROUNDS + 1)}
    assert (importance["smoothed"] > 0).all() and (importance["measured"] > 0).all()
    # ARMSC: a plan for every client in every round, within its budget, memory recomputed here.
    n = len(expanded_clients(sc))
    assert clients.groupby("round").size().to_dict() == {r: n for r in range(ROUNDS + 1)}
    assert (clients["memory_bytes"] <= clients["memory_budget_bytes"]).all()
    assert (clients["adapter_params"] > 0).all() and clients["split_layer"].between(1, spec.n_layers - 1).all()
    # memory_bytes is the plan's probe step, which holds more than its training step.
    plans = tables["plans"]
    for _, row in clients.iterrows():
        plan = plans[(plans["client"] == row["client"]) & (plans["round"] <= row["round"])].sort_values("round")
        ranks = ClientPlan.from_row(plan.iloc[-1]).client_ranks
        assert row["memory_bytes"] == memory(spec, row["split_layer"], ranks) == costs.training_memory_bytes(
            spec, 0, row["split_layer"], BATCH, SEQ, ranks, embeddings=True, head=False, probe="abs_sum")


@pytest.mark.parametrize("key", ["gpt2-het", "llama-het"])
def test_heterogeneous_budgets_give_different_plans(runs, key):
    _, tables = runs(key)
    clients = tables["clients"]
    for _, plans in clients.groupby("round"):
        assert plans["split_layer"].nunique() > 1 or plans["adapter_params"].nunique() > 1



@pytest.mark.parametrize("key", ["gpt2-het", "llama-het"])
def test_each_split_is_the_fastest_estimated_one_within_budget(runs, key):
    """ARMSC's splits against a brute-force search over every split: the least estimated iteration time among
    splits where the client's memory holds the segment and the selection leaves both sides an adapter
    (shallowest on ties); under uniform importance for the probe before training (round 0), under the probe's
    importance for round 1. The plans table gives each plan's estimate, recomputed here from its ranks."""
    sc, tables = runs(key)
    spec = costs.ModelSpec.from_hf_config(model_hf_config(sc))
    clients = expanded_clients(sc)
    probed = tables["importance"][tables["importance"]["round"] == 0]
    importance_of_round = {
        0: {k: 1.0 for k in iwi.candidate_weights(spec, 0, spec.n_layers)},
        1: {iwi.weight_key(layer, m): v for layer, m, v in zip(probed["layer"], probed["module"], probed["smoothed"])}}
    plans = tables["plans"]
    block = HSplitLoRA.block_adapter_budget(sc, spec)

    def estimate(c, plan):
        iteration = PlanCosts(spec, plan, BATCH, SEQ, c.element_bytes, sc.training.weight_decay).iteration
        return iteration_estimate(sc, c, len(clients), iteration)

    for (r, importance), c in itertools.product(importance_of_round.items(), clients):
        seconds = {}
        for split in range(1, spec.n_layers):
            if memory(spec, split, {}) > c.memory_budget_gb * 1e9:
                break
            client, server = iwi.split_ranks(spec, importance, block, c.memory_budget_gb * 1e9, Q, BATCH, SEQ,
                                             split, probe="abs_sum")
            if client and server:
                seconds[split] = estimate(c, ClientPlan(split, client, server)).total_s
        row = plans[(plans["round"] <= r) & (plans["client"] == c.index)].sort_values("round").iloc[-1]
        assert row["split"] == min(seconds, key=lambda s: (seconds[s], s)), (r, c.index, seconds)
        in_force = estimate(c, ClientPlan.from_row(row))
        # The plan holds its probe step, and so round 0's probe of the base model at its split.
        assert memory(spec, row["split"], ClientPlan.from_row(row).client_ranks) <= c.memory_budget_gb * 1e9
        assert costs.training_memory_bytes(spec, 0, row["split"], BATCH, SEQ, {}, embeddings=True, head=False,
                                           probe="abs_sum") <= c.memory_budget_gb * 1e9
        assert row["estimated_iteration_s"] == pytest.approx(in_force.total_s)
        assert row["estimated_server_s"] == pytest.approx(in_force.server_s)
        assert row["estimated_iteration_s"] == pytest.approx(
            row["estimated_client_s"] + row["estimated_upload_s"] + row["estimated_server_s"]
            + row["estimated_download_s"])


def test_without_naa_mixed_ranks_aggregate_with_error(runs):
    _, tables = runs("no-naa")
    clients = tables["clients"]
    assert clients[clients["round"] == 0]["adapter_params"].nunique() > 1
    assert (tables["rounds"]["agg_error"][1:] > 1e-3).all(), tables["rounds"]["agg_error"].tolist()


def test_without_armsc_every_client_has_one_plan(runs):
    _, tables = runs("no-armsc")
    clients = tables["clients"]
    assert clients["split_layer"].nunique() == 1 and clients["rank"].nunique() == 1
    assert clients["adapter_params"].nunique() == 1
    assert (clients["memory_bytes"] <= clients["memory_budget_bytes"]).all()
    assert (tables["rounds"]["agg_error"][1:] < 1e-6).all()


def split_in_force(tables, r: int, k: int) -> int:
    """The split client k trained with in round r: from the plans table (rows from the round a plan comes
    into force) where the run has one, else from the clients table."""
    plans = tables.get("plans")
    if plans is not None and not plans.empty:
        mine = plans[(plans["client"] == k) & (plans["round"] <= r)].sort_values("round")
        return int(mine["split"].iloc[-1])
    clients = tables["clients"]
    return int(clients[(clients["round"] == r) & (clients["client"] == k)]["split_layer"].iloc[0])


def plans_by_round(sc, tables) -> dict[tuple[int, int], object]:
    """(round, client) -> the plan it trained with (round 0: its probe's), solved here from the run's own
    importance table: round 0 from uniform importance, round 1 from the probe's over every split, later rounds
    from the previous round's smoothed importance."""
    spec = costs.ModelSpec.from_hf_config(model_hf_config(sc))
    clients = expanded_clients(sc)
    plans = {(0, c.index): p for c, p in zip(clients, HSplitLoRA.initial_plans(sc, spec, clients))}
    importance = tables.get("importance")
    for r in range(1, ROUNDS + 1):
        if not sc.algorithm.armsc or importance is None or importance.empty:
            plans.update({(r, c.index): plans[0, c.index] for c in clients})
            continue
        previous = importance[importance["round"] == r - 1]
        smoothed = {iwi.weight_key(layer, m): v for layer, m, v in
                    zip(previous["layer"], previous["module"], previous["smoothed"])}
        solved = [HSplitLoRA.solve(sc, spec, c, len(clients), smoothed,
                                   list(range(1, spec.n_layers)) if r == 1 else [split_in_force(tables, r, c.index)])
                  for c in clients]
        # a shared server-side adapter holds each weight at the largest rank any plan gives it
        plans.update({(r, c.index): p for c, p in zip(clients, HSplitLoRA.shared_server_side(sc, solved))})
    return plans


def test_clients_table_reports_the_plan_each_round_trained_with(runs):
    sc, tables = runs("gpt2-het")
    spec = costs.ModelSpec.from_hf_config(model_hf_config(sc))
    rows = tables["clients"].set_index(["round", "client"])
    plans = plans_by_round(sc, tables)
    # Importance re-plans the ranks between rounds, so the check below compares changing plans.
    assert len({(ranks_key(p.client_ranks), ranks_key(p.server_ranks)) for p in plans.values()}) > len(
        {k for _, k in plans})
    for (r, k), plan in plans.items():
        assert rows.loc[(r, k), "split_layer"] == plan.split
        assert rows.loc[(r, k), "adapter_params"] == costs.adapter_params(spec, plan.client_ranks), (r, k)


@pytest.mark.parametrize("key", ["gpt2-het", "llama-het", "no-iwi"])
def test_every_compute_duration_comes_from_the_cost_model(runs, key):
    sc, tables = runs(key)
    spec = costs.ModelSpec.from_hf_config(model_hf_config(sc))
    clients = expanded_clients(sc)
    server = resolve_device(sc.server.device)
    plans = plans_by_round(sc, tables)
    events = tables["events"]
    probing = sc.algorithm.iwi
    n = spec.n_layers
    for (r, k), plan in plans.items():
        if r == 0:
            continue  # the probe before training: test_the_probe_before_training_is_charged_as_it_runs
        own = events[(events["round"] == r) & (events["client"] == k)]
        fwd = own[own["kind"] == "client_fwd"]
        bwd = own[own["kind"] == "client_bwd"].sort_values("start_s")
        step = own[own["kind"] == "server_step"].sort_values("start_s")
        assert len(fwd) == len(bwd) == len(step) == LOCAL_STEPS
        s = plan.split
        expected_fwd = costs.forward_flops(spec, 0, s, BATCH, SEQ, plan.client_ranks, head=False)
        assert (fwd["flops"] == expected_fwd).all()
        for i, (b, st) in enumerate(zip(bwd.itertuples(), step.itertuples())):
            probe = probing and i == 0
            client_work = (costs.segment_work(spec, 0, s, BATCH, SEQ, plan.client_ranks, False, False,
                                              output_grads=probe)[1]
                           + costs.optimizer_work(spec, plan.client_ranks))
            server_fwd, server_bwd = costs.segment_work(spec, s, n, BATCH, SEQ, plan.server_ranks, True, True,
                                                        output_grads=probe)
            server_work = server_fwd + server_bwd + costs.optimizer_work(spec, plan.server_ranks)
            assert b.flops == client_work.flops, (r, k, i)
            assert st.flops == server_work.flops, (r, k, i)
            assert b.end_s - b.start_s == pytest.approx(seconds(client_work, clients[k].device), rel=1e-9)
            assert st.end_s - st.start_s == pytest.approx(seconds(server_work, server), rel=1e-9)
        if probing:  # the probe really costs more than a plain step (though it may add no matmul FLOPs)
            for kind in (bwd, step):
                seconds_taken = kind["end_s"] - kind["start_s"]
                assert seconds_taken.iloc[0] > seconds_taken.iloc[1]


@pytest.mark.parametrize("key", ["gpt2-het", "llama-het"])
def test_the_probe_before_training_is_charged_as_it_runs(runs, key):
    """Round 0: each client's one probe iteration of the base model at its round-0 split (forward, upload,
    server step, download, backward: no adapter, no optimiser step), durations from the cost model, then the
    upload of its side's scores; no training loss; round 1 starts after it."""
    sc, tables = runs(key)
    spec = costs.ModelSpec.from_hf_config(model_hf_config(sc))
    clients = expanded_clients(sc)
    server = resolve_device(sc.server.device)
    plans = plans_by_round(sc, tables)
    events = tables["events"]
    for c in clients:
        split = plans[0, c.index].split
        own = events[(events["round"] == 0) & (events["client"] == c.index)].set_index("kind")
        assert sorted(own.index) == sorted(["client_fwd", "upload", "server_queue", "server_step", "download",
                                             "client_bwd", "importance_upload"])
        probe = probe_iteration(spec, split, BATCH, SEQ, c.element_bytes)
        for kind, work, device in [("client_fwd", probe.client_fwd, c.device),
                                   ("client_bwd", probe.client_bwd[1], c.device),
                                   ("server_step", probe.server[1], server)]:
            assert own.loc[kind, "flops"] == work.flops, kind
            assert own.loc[kind, "end_s"] - own.loc[kind, "start_s"] == pytest.approx(seconds(work, device),
                                                                                      rel=1e-9)
        assert own.loc["importance_upload", "bytes"] == 4 * len(iwi.candidate_weights(spec, 0, split))
        assert own.loc["importance_upload", "start_s"] >= own.loc["client_bwd", "end_s"]
    rounds = tables["rounds"]
    assert np.isnan(rounds["train_loss"][0]) and rounds["sim_time_s"][0] == events[events["round"] == 0]["end_s"].max()
    assert events[events["round"] == 1]["start_s"].min() >= rounds["sim_time_s"][0]
    assert (tables["participation"].query("round == 0")["outcome"] == "reported").all()


@pytest.mark.parametrize("key", ["gpt2-het", "no-iwi"])
def test_a_rounds_adapter_upload_carries_the_scores_its_first_step_measured(runs, key):
    """With IWI on, every round's first step is also the probe: its client-side scores (one fp32 value per
    client-side projection) go up with the client's adapter at the round's end; without IWI nothing is scored."""
    sc, tables = runs(key)
    spec = costs.ModelSpec.from_hf_config(model_hf_config(sc))
    plans = plans_by_round(sc, tables)
    uploads = tables["events"].query("kind == 'adapter_upload'")
    assert len(uploads) == ROUNDS * len(expanded_clients(sc))
    for r, k, nbytes in zip(uploads["round"], uploads["client"], uploads["bytes"]):
        plan = plans[r, k]
        adapter = PlanCosts(spec, plan, BATCH, SEQ, 4, 0.0).adapter
        scores = 4 * len(iwi.candidate_weights(spec, 0, plan.split)) if sc.algorithm.iwi else 0
        assert nbytes == adapter + scores


def test_the_time_budget_bounds_the_probe_step_too():
    """time_budget_s bounds a client's longest iteration: with IWI on, every round's first, which also probes.
    A budget between a split's training step and its probe step rules that split out with IWI on only."""
    spec = spec_of("tiny-gpt2")
    raw = base("tiny-gpt2", None)
    sc = scenario_from_dict(raw)
    (client, _) = expanded_clients(sc)
    plain, probing = (iwi.client_work(spec, spec.n_layers - 1, BATCH, SEQ, {}, 0.0, probe)
                      for probe in (None, "abs_sum"))
    assert probing.flops > plain.flops
    deepest = spec.n_layers - 1
    budget = (seconds(plain, client.device) + seconds(probing, client.device)) / 2
    for iwi_on in (True, False):
        sc = scenario_from_dict(base("tiny-gpt2", None), [f"algorithm.time_budget_s={budget!r}",
                                                          f"algorithm.iwi={str(iwi_on).lower()}"])
        uniform = {key: 1.0 for key in iwi.candidate_weights(spec, 0, spec.n_layers)}
        plan = HSplitLoRA.solve(sc, spec, client, 2, uniform, [deepest])
        assert (plan is None) == iwi_on


def test_clients_alike_are_solved_once_and_get_the_plan_each_would_get_alone(monkeypatch):
    """solve_each solves one client per kind (group, memory budget, number format, splits) and gives every
    client what solving it alone gives."""
    spec = spec_of("tiny-llama")
    budgets = heterogeneous_budgets("tiny-llama")
    raw = base("tiny-llama", None)
    raw["clients"] = [{"count": 3, "device": "jetson-agx-orin", "link": "wifi-6", "memory_budget_gb": budgets[0]},
                      {"count": 2, "device": "jetson-orin-nano", "link": "lte", "memory_budget_gb": budgets[2]},
                      {"count": 2, "device": "jetson-agx-orin", "link": "wifi-6", "memory_budget_gb": budgets[2]}]
    sc = scenario_from_dict(raw)
    clients = expanded_clients(sc)
    importance = {key: 1.0 + i % 5 for i, key in enumerate(iwi.candidate_weights(spec, 0, spec.n_layers))}
    every = list(range(1, spec.n_layers))
    splits = [every, every, [1], every, every, every, [2]]
    alone = [HSplitLoRA.solve(sc, spec, c, len(clients), importance, s) for c, s in zip(clients, splits)]
    solved = []
    solve = HSplitLoRA.solve.__func__
    monkeypatch.setattr(HSplitLoRA, "solve", classmethod(
        lambda cls, *args: solved.append(args[2].index) or solve(cls, *args)))
    assert HSplitLoRA.solve_each(sc, spec, clients, importance, splits) == alone
    assert solved == [0, 2, 3, 5, 6]
    assert len({p.split for p in alone if p}) > 1  # the kinds do get different plans


def test_the_servers_memory_check_counts_its_probe_step():
    """The server holds the whole model with every projection at max(Q); with IWI on its step is also the
    probe, which holds more: a server between the two fits only without IWI."""
    spec = spec_of("tiny-gpt2")
    everything = {layer: {m: max(Q) for m in set(costs.TARGET_MODULES[spec.family].values())}
                  for layer in range(spec.n_layers)}
    plain, probing = (costs.training_memory_bytes(spec, 0, spec.n_layers, BATCH, SEQ, everything, embeddings=True,
                                                  head=True, probe=probe) for probe in (None, "abs_sum"))
    assert probing > plain
    server = DeviceSpec(tflops=10.0, efficiency=0.5, memory_gb=(plain + probing) / 2 / 1e9)
    for iwi_on in (True, False):
        sc = scenario_from_dict(base("tiny-gpt2", None), [f"algorithm.iwi={str(iwi_on).lower()}"])
        if iwi_on:
            with pytest.raises(ScenarioError, match="at most"):
                HSplitLoRA.check_memory(sc, spec, expanded_clients(sc), server)
        else:
            assert HSplitLoRA.check_memory(sc, spec, expanded_clients(sc), server) == 1


def busy_at_once(steps: pd.DataFrame) -> int:
    """The most server steps running at one instant."""
    edges = sorted([(t, 1) for t in steps["start_s"]] + [(t, -1) for t in steps["end_s"]], key=lambda e: (e[0], e[1]))
    running = most = 0
    for _, change in edges:
        running += change
        most = max(most, running)
    return most


def test_the_probes_before_training_use_every_accelerator_while_training_steps_take_turns(tmp_path):
    """Round 0's probes run the base model, no adapter: they share no server-side state, so they need not wait
    for one another as steps on the shared server-side adapter do."""
    raw = base("tiny-gpt2", None)
    raw["clients"] = [{"count": 4, "device": "jetson-agx-orin", "link": "wifi-6"}]
    raw["server"]["accelerators"] = 2
    sc = scenario_from_dict(raw, [f"output.dir={tmp_path}", "runtime.timing_only=true", "training.rounds=1"])
    events = pd.read_parquet(run_scenario(sc, progress=False) / "events.parquet")
    steps = events[events["kind"] == "server_step"]
    assert busy_at_once(steps[steps["round"] == 0]) == 2
    assert busy_at_once(steps[steps["round"] == 1]) == 1


def test_without_armsc_there_is_no_probe_before_training(runs):
    _, tables = runs("no-armsc")
    events = tables["events"]
    assert events[events["round"] == 0]["kind"].tolist() == ["eval"]
    assert tables["rounds"]["sim_time_s"][0] == 0


def test_without_iwi_there_is_no_probe_and_no_importance(runs):
    _, tables = runs("no-iwi")
    assert tables.get("importance") is None or tables["importance"].empty
    clients = tables["clients"]
    # Plans stay where uniform importance put them.
    for _, plans in clients.groupby("client"):
        assert plans["split_layer"].nunique() == 1 and plans["adapter_params"].nunique() == 1
    assert (tables["rounds"]["agg_error"][1:] < 1e-6).all()


def lora(rng, path: str, rank: int, d: int = 6) -> dict[str, np.ndarray]:
    return {f"{path}.lora_A.weight": rng.normal(size=(rank, d)), f"{path}.lora_B.weight": rng.normal(size=(d, rank))}


def test_a_shared_server_adapter_aggregates_as_the_clients_it_stands_for():
    """Block b of the shared adapter counts once, with the data weight of every client whose server side holds
    b; NAA's stacked factors then give exactly the hand-written weighted sum."""
    rng = np.random.default_rng(0)
    splits, weights, scaling = [1, 2, 3], np.array([0.5, 0.3, 0.2]), 2.0
    block = "model.layers.{}.mlp.up_proj"
    clients = [{k: v for b in range(split) for k, v in lora(rng, block.format(b), 2 + i).items()}
               for i, split in enumerate(splits)]
    server = {k: v for b in range(1, 4) for k, v in lora(rng, block.format(b), 4).items()}
    pieces, piece_weights = server_pieces(server, splits, weights)
    assert piece_weights.tolist() == [0.5, 0.8, 1.0]  # blocks 1, 2, 3: clients with split <= b

    def update(adapter, b):
        a, bb = adapter[f"{block.format(b)}.lora_A.weight"], adapter[f"{block.format(b)}.lora_B.weight"]
        return scaling * bb @ a

    by_hand = {}
    for b in range(4):
        total = sum(w * update(c, b) for w, c, split in zip(weights, clients, splits) if b < split)
        total = total + (sum(w for w, split in zip(weights, splits) if split <= b) * update(server, b) if b else 0)
        by_hand[block.format(b)] = total
    adapters, all_weights = clients + pieces, np.concatenate([weights, piece_weights])
    exact = exact_update(adapters, all_weights, scaling)
    assert relative_error(exact, by_hand) < 1e-12
    assert relative_error(factors_update(stack(adapters, all_weights, scaling)), by_hand) < 1e-6


def test_shared_server_adapter_runs_exact_with_one_server_plan(runs):
    _, tables = runs("llama-het")  # the default: one shared server-side adapter
    rounds, plans = tables["rounds"], tables["plans"]
    assert plans[plans["round"] == 1]["split"].nunique() > 1  # the shared adapter stands for different clients
    assert (rounds["agg_error"][1:] < 1e-6).all(), rounds["agg_error"].tolist()
    assert rounds["eval_loss"].iloc[-1] < rounds["eval_loss"][0]
    for _, rows in plans.groupby("round"):  # every client's server side is a part of one set of ranks
        seen = {}
        for ranks in rows["server_ranks"]:
            for layer, module, rank in json.loads(ranks):
                assert seen.setdefault((layer, module), rank) == rank
