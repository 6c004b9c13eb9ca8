"""Every aggregation rule against brute force on adapters of mixed ranks and module sets."""

import numpy as np
import pytest

from hsplit_sim.algorithms.aggregation import (
    adapter_update,
    data_weights,
    exact_update,
    factors_update,
    fedavg,
    flexlora_aggregate,
    hetlora_aggregate,
    lora_pairs,
    relative_error,
    stack,
    truncate,
    zero_pad_average,
)

D_IN, D_OUT, SCALING = 7, 6, 2.0
# Client 1 does not adapt m1 (a shallower split); ranks differ across clients.
LAYOUT = [{"m0": 2, "m1": 3}, {"m0": 4}, {"m0": 1, "m1": 5}]


def adapter_of(rng, ranks: dict[str, int]) -> dict[str, np.ndarray]:
    adapter = {}
    for m, r in ranks.items():
        adapter[f"{m}.lora_A.weight"] = rng.normal(size=(r, D_IN)).astype(np.float32)
        adapter[f"{m}.lora_B.weight"] = rng.normal(size=(D_OUT, r)).astype(np.float32)
    return adapter


def mixed(seed: int = 0):
    rng = np.random.default_rng(seed)
    return [adapter_of(rng, ranks) for ranks in LAYOUT], data_weights([10, 30, 60])


def brute_force(adapters, weights, module: str, renormalise: bool = True) -> np.ndarray:
    """sum_k p_k s B_k A_k with explicit loops over the rank dimension."""
    holders = [k for k, a in enumerate(adapters) if f"{module}.lora_A.weight" in a]
    total = sum(weights[k] for k in holders) if renormalise else 1.0
    out = np.zeros((D_OUT, D_IN))
    for k in holders:
        a, b = adapters[k][f"{module}.lora_A.weight"], adapters[k][f"{module}.lora_B.weight"]
        r = a.shape[0]
        for j in range(r):
            out += weights[k] / total * SCALING * np.outer(b[:, j].astype(np.float64), a[j].astype(np.float64))
    return out


def test_exact_update_and_stack_are_the_brute_force_sum():
    adapters, weights = mixed()
    exact = exact_update(adapters, weights, SCALING)
    factors = stack(adapters, weights, SCALING)
    assert sorted(exact) == sorted(factors) == ["m0", "m1"]
    for m in ("m0", "m1"):
        brute = brute_force(adapters, weights, m)
        b, a = factors[m]
        assert b.dtype == a.dtype == np.float32
        assert b.shape[1] == a.shape[0] == sum(ranks.get(m, 0) for ranks in LAYOUT)
        assert relative_error({m: exact[m]}, {m: brute}) < 1e-12
        assert relative_error({m: factors_update(factors)[m]}, {m: brute}) < 1e-6
    assert relative_error(factors_update(factors), exact) < 1e-6


def test_contributors_renormalised_or_global():
    adapters, weights = mixed()
    renormalised = exact_update(adapters, weights, SCALING, "renormalised")
    global_ = exact_update(adapters, weights, SCALING, "global")
    # m0 is held by all: both rules agree. m1 misses client 1 (p = 0.3): global weights leave it at 0.7 of the mass.
    np.testing.assert_allclose(renormalised["m0"], global_["m0"])
    np.testing.assert_allclose(global_["m1"], brute_force(adapters, weights, "m1", renormalise=False), rtol=1e-9)
    np.testing.assert_allclose(global_["m1"], 0.7 * renormalised["m1"], rtol=1e-9)
    stacked = factors_update(stack(adapters, weights, SCALING, "global"))
    assert relative_error(stacked, global_) < 1e-6
    with pytest.raises(ValueError, match="contributors"):
        exact_update(adapters, weights, SCALING, "everyone")


def test_rank_zero_module_counts_as_absent():
    adapters, weights = mixed()
    with_empty = [dict(a) for a in adapters]
    with_empty[1]["m1.lora_A.weight"] = np.zeros((0, D_IN), np.float32)
    with_empty[1]["m1.lora_B.weight"] = np.zeros((D_OUT, 0), np.float32)
    np.testing.assert_allclose(exact_update(with_empty, weights, SCALING)["m1"],
                               exact_update(adapters, weights, SCALING)["m1"])


def brute_padded(adapters, weights, m: str, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """(A, B) of module m: each holder's A and B written into rank-row / rank-column zeros and summed with its
    renormalised data weight, one entry at a time."""
    holders = [k for k, ranks in enumerate(LAYOUT) if m in ranks]
    total = sum(weights[k] for k in holders)
    brute_a, brute_b = np.zeros((rank, D_IN)), np.zeros((D_OUT, rank))
    for k in holders:
        a, b = adapters[k][f"{m}.lora_A.weight"], adapters[k][f"{m}.lora_B.weight"]
        for i in range(a.shape[0]):
            for j in range(D_IN):
                brute_a[i, j] += weights[k] / total * float(a[i, j])
            for j in range(D_OUT):
                brute_b[j, i] += weights[k] / total * float(b[j, i])
    return brute_a, brute_b


def test_fedavg_and_zero_padding_are_wrong_on_mixed_ranks():
    adapters, weights = mixed()
    exact = exact_update(adapters, weights, SCALING)
    padded = zero_pad_average(adapters, weights)
    for m, (a, b) in lora_pairs(padded).items():
        brute_a, brute_b = brute_padded(adapters, weights, m, max(ranks.get(m, 0) for ranks in LAYOUT))
        np.testing.assert_allclose(a, brute_a, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(b, brute_b, rtol=1e-5, atol=1e-6)
    assert relative_error(adapter_update(padded, SCALING), exact) > 0.1
    # Same ranks and module sets: FedAvg of the factors still carries cross terms.
    rng = np.random.default_rng(5)
    same = [adapter_of(rng, {"m0": 3}) for _ in range(3)]
    assert relative_error(adapter_update(fedavg(same, weights), SCALING), exact_update(same, weights, SCALING)) > 0.1


def test_zero_padding_to_a_global_rank():
    """HSplitLoRA without NAA pads to its global adapter's rank: ranks no contributor has come out zero."""
    adapters, weights = mixed()
    padded = zero_pad_average(adapters, weights, ranks={"m0": 8, "m1": 6})
    for m, rank in (("m0", 8), ("m1", 6)):
        a, b = padded[f"{m}.lora_A.weight"], padded[f"{m}.lora_B.weight"]
        assert a.shape == (rank, D_IN) and b.shape == (D_OUT, rank) and a.dtype == b.dtype == np.float32
        brute_a, brute_b = brute_padded(adapters, weights, m, rank)
        np.testing.assert_allclose(a, brute_a, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(b, brute_b, rtol=1e-5, atol=1e-6)
        held = max(ranks.get(m, 0) for ranks in LAYOUT)
        assert not a[held:].any() and not b[:, held:].any()
    with pytest.raises(ValueError, match="exceeds the padded rank"):
        zero_pad_average(adapters, weights, ranks={"m0": 3, "m1": 6})


def test_hetlora_weights_by_update_norms_on_two_clients():
    # Client 0: rank 1, B A = 2 * e0 e0^T (norm 2). Client 1: rank 2, B A = e1 e1^T (norm 1). Weights 2/3, 1/3.
    a0, b0 = np.zeros((1, D_IN), np.float32), np.zeros((D_OUT, 1), np.float32)
    a0[0, 0], b0[0, 0] = 1.0, 2.0
    a1, b1 = np.zeros((2, D_IN), np.float32), np.zeros((D_OUT, 2), np.float32)
    a1[0, 1], b1[1, 0] = 1.0, 1.0
    adapters = [{"m.lora_A.weight": a0, "m.lora_B.weight": b0}, {"m.lora_A.weight": a1, "m.lora_B.weight": b1}]
    global_adapter, used = hetlora_aggregate(adapters, data_weights([9, 1]), SCALING)  # data sizes play no part
    a, b = global_adapter["m.lora_A.weight"], global_adapter["m.lora_B.weight"]
    assert a.shape == (2, D_IN) and b.shape == (D_OUT, 2)
    expected_a = np.zeros((2, D_IN))
    expected_a[0, 0], expected_a[0, 1] = 2 / 3, 1 / 3
    expected_b = np.zeros((D_OUT, 2))
    expected_b[0, 0], expected_b[1, 0] = 4 / 3, 1 / 3
    np.testing.assert_allclose(a, expected_a, rtol=1e-6)
    np.testing.assert_allclose(b, expected_b, rtol=1e-6)
    np.testing.assert_allclose(used["m"], SCALING * expected_b @ expected_a, rtol=1e-6)
    small = truncate(global_adapter, 1)
    np.testing.assert_array_equal(small["m.lora_A.weight"], a[:1])
    np.testing.assert_array_equal(small["m.lora_B.weight"], b[:, :1])
    assert small["m.lora_B.weight"].flags.c_contiguous


def test_hetlora_on_mixed_ranks_has_error():
    adapters, weights = mixed()
    global_adapter, used = hetlora_aggregate(adapters, weights, SCALING)
    assert {a.shape[0] for a, _ in lora_pairs(global_adapter).values()} == {5}
    assert relative_error(used, exact_update(adapters, weights, SCALING)) > 0.1


def test_flexlora_gives_each_client_the_best_rank_r_approximation():
    adapters, weights = mixed()
    ranks = [1, 3, 5]
    out = flexlora_aggregate(adapters, weights, SCALING, ranks)
    for adapter, r in zip(out, ranks):
        for m in ("m0", "m1"):
            brute = brute_force(adapters, weights, m)
            u, s, vt = np.linalg.svd(brute)
            best = (u[:, :r] * s[:r]) @ vt[:r]
            a, b = adapter[f"{m}.lora_A.weight"], adapter[f"{m}.lora_B.weight"]
            assert a.shape == (r, D_IN) and b.shape == (D_OUT, r)
            update = adapter_update(adapter, SCALING)[m]
            np.testing.assert_allclose(update, best, rtol=1e-4, atol=1e-4 * np.abs(brute).max())
            assert np.linalg.matrix_rank(update, tol=1e-6 * s[0]) == min(r, np.linalg.matrix_rank(brute))
            np.testing.assert_allclose(np.linalg.svd(update, compute_uv=False)[:r], s[:r], rtol=1e-5)
            # Eckart-Young: the residual is exactly the discarded singular values.
            assert np.linalg.norm(brute - update) == pytest.approx(np.sqrt(np.sum(s[r:] ** 2)), rel=1e-4, abs=1e-6)
    # m0 of the three clients has rank 2 + 4 + 1 = 7 > 6: rank 5 still loses something, rank 6 would not.
    full = flexlora_aggregate(adapters, weights, SCALING, [6])[0]
    assert relative_error(adapter_update(full, SCALING), exact_update(adapters, weights, SCALING)) < 1e-6
    assert relative_error(adapter_update(out[2], SCALING), exact_update(adapters, weights, SCALING)) > 1e-3
