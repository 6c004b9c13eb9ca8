"""IWI and ARMSC as pure functions, each against a hand-worked number or an independent computation,
and the probe's FLOPs against FlopCounterMode on the real segments."""

import itertools
import math
import os
import random

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from peft import get_peft_model

from hsplit_sim import costs
from hsplit_sim.algorithms import importance as iwi
from hsplit_sim.scenario.models import BUILTIN_MODELS
from hsplit_sim.training.split import SplitLM, lora_config
from tiny_models import counted, plain_model

Q = [0, 4, 8, 16]
BATCH, SEQ = 4, 48


def spec_of(name: str) -> costs.ModelSpec:
    return costs.ModelSpec.from_hf_config(BUILTIN_MODELS[name])


def memory(spec, split, ranks):
    return costs.training_memory_bytes(spec, 0, split, BATCH, SEQ, ranks, embeddings=True, head=False)


def all_modules(spec) -> list[str]:
    return sorted(set(costs.TARGET_MODULES[spec.family].values()))


# --- smoothing ------------------------------------------------------------------------------------


def test_smooth_first_call_returns_the_measurement():
    current = {"0.attn.c_attn": 0.5, "1.mlp.c_fc": 2.0}
    smoothed = iwi.smooth(None, current, 1, 10)
    assert smoothed == current and smoothed is not current


def test_smooth_hand_worked():
    # I_bar_{t-1} = 2, I_tilde_t = 1, t = 1, T = 4:
    # gamma = 1 - exp(-(1 * 1) / (2 * 4)) = 1 - exp(-0.125) = 0.11750309741540454
    # I_bar_t = 0.11750309741540454 * 2 + 0.8824969025845955 * 1 = 1.1175030974154045
    # Second weight, I_bar_{t-1} = 1, I_tilde_t = 3, t = 3, T = 4:
    # gamma = 1 - exp(-(3 * 3) / (1 * 4)) = 1 - exp(-2.25) = 0.8946007754381357
    # I_bar_t = 0.8946007754381357 * 1 + 0.10539922456186433 * 3 = 1.2107984491237287
    previous = {"0.a": 2.0, "1.a": 1.0, "2.a": 7.0}
    smoothed = iwi.smooth(previous, {"0.a": 1.0, "1.a": 3.0}, 1, 4)
    assert smoothed["0.a"] == pytest.approx(1.1175030974154045, rel=1e-9)
    smoothed = iwi.smooth(previous, {"0.a": 1.0, "1.a": 3.0}, 3, 4)
    assert smoothed["1.a"] == pytest.approx(1.2107984491237287, rel=1e-9)
    assert smoothed["2.a"] == 7.0  # not measured now: keeps its value
    # A first measurement of a weight stands as it is (I_bar_{t-1} = I_tilde_t, so any gamma gives it).
    assert iwi.smooth(previous, {"5.a": 0.25}, 2, 4)["5.a"] == pytest.approx(0.25)


def test_smooth_guards_a_zero_previous_value():
    smoothed = iwi.smooth({"0.a": 0.0}, {"0.a": 1.0}, 1, 2)
    # gamma = 1 - exp(-huge) = 1: the previous value (0) stands, and nothing divides by zero.
    assert math.isfinite(smoothed["0.a"]) and smoothed["0.a"] == pytest.approx(0.0, abs=1e-9)


# --- costs, shares, server ranks --------------------------------------------------------------------


def test_weight_cost_by_hand():
    # 16 bytes a parameter of a rank-8 adapter (A 8 x d_in, B d_out x 8) plus A's fp32 output, 4 x 48 x 8.
    llama, gpt2 = spec_of("tiny-llama"), spec_of("tiny-gpt2")
    # tiny-llama k_proj: 128 -> 2 kv heads x 32 = 64.
    assert iwi.weight_cost(llama, "2.self_attn.k_proj", 8, BATCH, SEQ) == 16 * 8 * (128 + 64) + 4 * 4 * 48 * 8
    assert iwi.weight_cost(llama, "2.self_attn.k_proj", 8, BATCH, SEQ) == 30720
    # tiny-gpt2 fused c_attn: 128 -> 3 x 128.
    assert iwi.weight_cost(gpt2, "0.attn.c_attn", 8, BATCH, SEQ) == 16 * 8 * (128 + 384) + 4 * 4 * 48 * 8
    assert iwi.weight_cost(gpt2, "0.attn.c_attn", 8, BATCH, SEQ) == 71680


def test_candidate_weights():
    gpt2 = spec_of("tiny-gpt2")
    assert iwi.candidate_weights(gpt2, 1, 3) == [
        "1.attn.c_attn", "1.attn.c_proj", "1.mlp.c_fc", "1.mlp.c_proj",
        "2.attn.c_attn", "2.attn.c_proj", "2.mlp.c_fc", "2.mlp.c_proj"]
    assert len(iwi.candidate_weights(spec_of("tiny-llama"), 0, 4)) == 4 * 7
    assert iwi.parse_key("12.self_attn.q_proj") == (12, "self_attn.q_proj")


def test_client_side_share_by_hand():
    importance = {"0.a": 1.0, "0.b": 1.0, "1.a": 2.0, "2.a": 2.0, "3.a": 4.0}
    assert iwi.client_side_share(importance, 1) == pytest.approx(2 / 10)
    assert iwi.client_side_share(importance, 2) == pytest.approx(4 / 10)
    assert iwi.client_side_share(importance, 4) == pytest.approx(1.0)
    assert iwi.client_side_share(importance, 0) == 0.0
    assert iwi.client_side_share({"0.a": 0.0, "1.a": 0.0}, 1) == 0.0


def test_server_ranks_quantiles_by_hand():
    # Eight weights, equal costs: importance order w0 < w1 < ... < w7; four ranks, two weights each.
    keys = [f"{layer}.{m}" for layer in (2, 3) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    order = [5, 0, 7, 2, 1, 6, 3, 4]  # importance rank of each key
    importance = {k: float(v) for k, v in zip(keys, order)}
    cost = {k: 1.0 for k in keys}
    ranks = iwi.server_ranks(keys, importance, cost, Q)
    # least important two (importance 0, 1): rank 0, i.e. no adapter; 2, 3: 4; 4, 5: 8; 6, 7: 16.
    expected = {0: 0, 1: 0, 2: 4, 3: 4, 4: 8, 5: 8, 6: 16, 7: 16}
    flat = {f"{layer}.{m}": r for layer, ms in ranks.items() for m, r in ms.items()}
    assert flat == {k: expected[v] for k, v in zip(keys, order) if expected[v] > 0}
    # Importance is per unit cost: the most important weight, made 100 times dearer, drops to the bottom.
    dear = dict(cost, **{keys[2]: 100.0})
    flat = {f"{layer}.{m}": r for layer, ms in iwi.server_ranks(keys, importance, dear, Q).items()
            for m, r in ms.items()}
    assert keys[2] not in flat
    # Without a zero in Q every weight gets an adapter, the least important the lowest rank.
    flat = {f"{layer}.{m}": r for layer, ms in iwi.server_ranks(keys, importance, cost, [2, 4]).items()
            for m, r in ms.items()}
    assert flat == {k: (2 if v < 4 else 4) for k, v in zip(keys, order)}


# --- ARMSC --------------------------------------------------------------------------------------------


def random_importance(spec, seed: int) -> tuple[dict[str, float], dict[str, float]]:
    keys = iwi.candidate_weights(spec, 0, spec.n_layers)
    cost = {k: iwi.weight_cost(spec, k, 8, BATCH, SEQ) for k in keys}
    rng = random.Random(seed)
    return {k: rng.random() * cost[k] * rng.random() ** 3 for k in keys}, cost


def budgets(spec, n: int) -> list[float]:
    low = memory(spec, 1, {})
    high = memory(spec, spec.n_layers - 1, costs.uniform_ranks(spec, list(costs.TARGET_MODULES[spec.family]),
                                                               range(spec.n_layers - 1), max(Q)))
    return [low + (high - low) * 1.1 * i / n for i in range(n + 1)]


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_configure_client_fits_and_more_budget_never_scores_less(name):
    spec = spec_of(name)
    splits = list(range(1, spec.n_layers))
    for seed in range(3):
        importance, cost = random_importance(spec, seed)
        previous = -1.0
        for budget in budgets(spec, 60):
            found = iwi.configure_client(spec, importance, cost, budget, Q, BATCH, SEQ, splits)
            assert found is not None
            split, ranks = found
            assert split in splits
            assert memory(spec, split, ranks) <= budget
            assert all(layer < split and r in Q and r > 0 for layer, ms in ranks.items() for r in ms.values())
            value = iwi.score(ranks, importance, Q)
            assert value >= previous - 1e-12 * abs(previous), (seed, budget)
            previous = value


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_configure_client_without_room_for_the_bare_segment_is_none(name):
    spec = spec_of(name)
    importance, cost = random_importance(spec, 0)
    bare = memory(spec, 1, {})
    assert iwi.configure_client(spec, importance, cost, bare - 1, Q, BATCH, SEQ, [1, 2, 3]) is None
    # The bare segment fits but no adapter does: a split, without any adapter.
    assert iwi.configure_client(spec, importance, cost, bare, Q, BATCH, SEQ, [1]) == (1, {})


@pytest.mark.parametrize("ranks_q", [Q, [0, 1, 2, 3, 5]])
def test_greedy_equals_brute_force_for_equal_costs(ranks_q):
    """One split, three weights of equal shape (tiny-llama's gate, up, down: d_in + d_out = 472 each).

    Memory is then the bare segment plus one block's activations (once any adapter exists) plus 16 bytes
    per adapter parameter, a function of the sum of ranks alone: highest importance first is optimal.
    """
    spec = spec_of("tiny-llama")
    keys = ["0.mlp.down_proj", "0.mlp.gate_proj", "0.mlp.up_proj"]
    assert len({sum(costs.module_shape(spec, iwi.parse_key(k)[1])) for k in keys}) == 1
    importance = {"0.mlp.down_proj": 1.7, "0.mlp.gate_proj": 3.1, "0.mlp.up_proj": 0.45}
    cost = {k: iwi.weight_cost(spec, k, 8, BATCH, SEQ) for k in keys}
    full = {0: {iwi.parse_key(k)[1]: max(ranks_q) for k in keys}}
    smallest = min(r for r in ranks_q if r > 0)
    low, high = memory(spec, 1, {0: {"mlp.up_proj": smallest}}) - 1, memory(spec, 1, full)
    others = {k: 0.0 for k in iwi.candidate_weights(spec, 0, spec.n_layers) if k not in keys}
    checked = 0
    for i in range(41):
        budget = low + (high - low) * i / 36  # up to 10 % past everything

        def fits(ranks):
            return memory(spec, 1, ranks) <= budget

        best_value, best_ranks = -1.0, None
        for choice in itertools.product(ranks_q, repeat=len(keys)):
            ranks = {0: {iwi.parse_key(k)[1]: r for k, r in zip(keys, choice) if r > 0}}
            ranks = {layer: ms for layer, ms in ranks.items() if ms}
            if not fits(ranks):
                continue
            value = sum(importance[k] * r for k, r in zip(keys, choice)) / max(ranks_q)
            if value > best_value:
                best_value, best_ranks = value, ranks
        greedy = iwi.assign_ranks(keys, importance, cost, ranks_q, fits)
        assert greedy == best_ranks, budget
        assert iwi.score(greedy, importance, ranks_q) == pytest.approx(best_value)
        # The whole solver on that one split: zero-importance weights only take what is left over.
        _, ranks = iwi.configure_client(spec, {**importance, **others}, {**cost, **{k: 1.0 for k in others}},
                                        budget, ranks_q, BATCH, SEQ, [1])
        assert iwi.score(ranks, {**importance, **others}, ranks_q) == pytest.approx(best_value)
        checked += best_value > 0
    assert checked == 40


def test_ties_go_to_the_deeper_split():
    spec = spec_of("tiny-llama")
    keys = iwi.candidate_weights(spec, 0, spec.n_layers)
    cost = {k: iwi.weight_cost(spec, k, 8, BATCH, SEQ) for k in keys}
    # Only block 0 matters: every split that holds block 0's adapters at the top rank scores the same.
    importance = {k: (1.0 if iwi.parse_key(k)[0] == 0 else 0.0) for k in keys}
    layer0 = {0: {m: max(Q) for m in all_modules(spec)}}
    for split in (1, 2, 3):
        # The deepest split whose block-0 adapters fit wins.
        budget = memory(spec, split, layer0)
        found = iwi.configure_client(spec, importance, cost, budget, Q, BATCH, SEQ, [1, 2, 3])
        assert found[0] == split and found[1].get(0) == layer0[0]
    # Uniform importance, a budget where block 0 alone (split 1) and block 1 alone (split 2) tie at 7 x 16.
    uniform = {k: 1.0 for k in keys}
    budget = memory(spec, 2, {1: {m: max(Q) for m in all_modules(spec)}})
    assert memory(spec, 1, layer0) <= budget < memory(spec, 3, {2: {m: max(Q) for m in all_modules(spec)}})
    split, ranks = iwi.configure_client(spec, uniform, cost, budget, Q, BATCH, SEQ, [1, 2, 3])
    assert split == 2 and iwi.score(ranks, uniform, Q) == pytest.approx(7.0)


# --- the probe's FLOPs ----------------------------------------------------------------------------------

PROBE_BATCH, PROBE_SEQ, SPLIT = 2, 16, 2


def projection_weights(lm: SplitLM, spec, start: int, stop: int) -> list[torch.nn.Parameter]:
    """The frozen base weights of every attention and MLP projection of blocks start..stop-1."""
    found = []
    for layer in range(start, stop):
        for name in all_modules(spec):
            module = lm.blocks[layer].get_submodule(name)
            found.append(getattr(module, "base_layer", module).weight)
    return found


PROBE_CASES = [
    ("tiny-gpt2", {0: {"attn.c_attn": 4}, 3: {"mlp.c_fc": 8, "attn.c_proj": 2}}),
    ("tiny-gpt2", {1: {"mlp.c_proj": 4}, 2: {"attn.c_attn": 16}}),  # client block 0 has no adapter
    ("tiny-llama", {0: {"self_attn.q_proj": 4, "mlp.down_proj": 8}, 2: {"self_attn.v_proj": 16}}),
    ("tiny-llama", {1: {"mlp.up_proj": 4}, 3: {"self_attn.k_proj": 8}}),
]


@pytest.mark.parametrize("name, ranks", PROBE_CASES)
def test_probe_backward_flops_match_flop_counter(name, ranks):
    spec = spec_of(name)
    model = get_peft_model(plain_model(name), lora_config(spec.family, ranks, 16), adapter_name="c0")
    lm = SplitLM(model)
    n = spec.n_layers
    torch.manual_seed(1)
    ids = torch.randint(3, 1000, (PROBE_BATCH, PROBE_SEQ))
    mask = torch.ones(PROBE_BATCH, PROBE_SEQ, dtype=torch.long)

    # Client segment: the input (frozen embeddings) needs no gradient; the blocks' projections do.
    probed = projection_weights(lm, spec, 0, SPLIT)
    for weight in probed:
        weight.requires_grad_(True)
    hidden = lm.client_forward(ids, mask, SPLIT)
    client = counted(lambda: hidden.backward(torch.randn_like(hidden)))
    assert all(w.grad is not None for w in probed)
    for weight in probed:
        weight.requires_grad_(False)
    assert client == costs.backward_flops(spec, 0, SPLIT, PROBE_BATCH, PROBE_SEQ, ranks, head=False,
                                          input_requires_grad=False, weight_grads=True)

    # Server segment: the received activations need their gradient, and so do its projections.
    probed = projection_weights(lm, spec, SPLIT, n)
    for weight in probed:
        weight.requires_grad_(True)
    received = torch.randn(PROBE_BATCH, PROBE_SEQ, spec.d_model, requires_grad=True)
    loss = lm.server_loss(received, mask, ids, SPLIT)
    server = counted(loss.backward)
    assert all(w.grad is not None for w in probed)
    assert server == costs.backward_flops(spec, SPLIT, n, PROBE_BATCH, PROBE_SEQ, ranks, head=True,
                                          input_requires_grad=True, weight_grads=True)
    # The probe costs more than a plain step: every frozen projection's weight gradient is paid.
    assert server > costs.backward_flops(spec, SPLIT, n, PROBE_BATCH, PROBE_SEQ, ranks, head=True,
                                         input_requires_grad=True)


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama", "smollm2-135m"])
def test_segment_memory_is_the_cost_model(name):
    spec = costs.ModelSpec.from_hf_config(BUILTIN_MODELS[name])
    rng = random.Random(0)
    for _ in range(50):
        split = rng.randint(1, spec.n_layers - 1)
        ranks = {}
        for key in iwi.candidate_weights(spec, 0, split):
            if rng.random() < 0.3:
                layer, module = iwi.parse_key(key)
                ranks.setdefault(layer, {})[module] = rng.choice([1, 4, 16])
        assert iwi.segment_memory(spec, split, 2, 16)(ranks) == costs.training_memory_bytes(
            spec, 0, split, 2, 16, ranks, embeddings=True, head=False)


def test_a_time_budget_bounds_the_client_compute():
    spec = costs.ModelSpec.from_hf_config(BUILTIN_MODELS["tiny-llama"])
    keys = iwi.candidate_weights(spec, 0, spec.n_layers)
    importance = {k: 1.0 + i for i, k in enumerate(keys)}
    cost = {k: iwi.weight_cost(spec, k, 8, 2, 16) for k in keys}
    splits = list(range(1, spec.n_layers))
    free_split, free_ranks = iwi.configure_client(spec, importance, cost, 1e12, Q, 2, 16, splits)
    work = iwi.client_work(spec, free_split, 2, 16, free_ranks)
    free = work.flops + work.values + work.kernels
    asked = []

    def within(budget):
        def fits(split, ranks):
            work = iwi.client_work(spec, split, 2, 16, ranks)
            asked.append((split, ranks))
            return work.flops + work.values + work.kernels <= budget
        return fits

    for share in (0.9, 0.5, 0.3):
        asked.clear()
        found = iwi.configure_client(spec, importance, cost, 1e12, Q, 2, 16, splits, within(share * free))
        assert asked
        if found is not None:
            work = iwi.client_work(spec, found[0], 2, 16, found[1])
            assert work.flops + work.values + work.kernels <= share * free
    assert iwi.configure_client(spec, importance, cost, 1e12, Q, 2, 16, splits, within(1.0)) is None
