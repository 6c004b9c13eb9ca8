"""Aggregation rules against brute force, and the batch schedule."""

import numpy as np
import pytest

from hsplit_sim.algorithms import ALGORITHMS
from hsplit_sim.algorithms.aggregation import (
    adapter_update,
    data_weights,
    exact_update,
    fedavg,
    lora_pairs,
    relative_error,
)
from hsplit_sim.backends.real import batch_indices
from hsplit_sim.scenario import scenario_from_dict


def random_adapter(rng, rank, modules=("m0", "m1"), d_in=6, d_out=5):
    adapter = {}
    for m in modules:
        adapter[f"{m}.lora_A.weight"] = rng.normal(size=(rank, d_in)).astype(np.float32)
        adapter[f"{m}.lora_B.weight"] = rng.normal(size=(d_out, rank)).astype(np.float32)
    return adapter


def test_every_registered_algorithm_validates_with_its_own_config_class():
    from test_scenario import quickstart_data

    for name, cls in ALGORITHMS.items():
        scenario = scenario_from_dict(quickstart_data(), [f"algorithm.name={name}"])
        assert type(scenario.algorithm) is cls.Config and scenario.algorithm.name == name


def test_exact_update_is_the_brute_force_sum():
    rng = np.random.default_rng(0)
    adapters = [random_adapter(rng, r) for r in (2, 3, 5)]
    weights, scaling = data_weights([10, 30, 60]), 2.0
    scalings = [scaling] * 3  # one scaling whatever the rank (alpha proportional to rank)
    exact = exact_update(adapters, weights, scaling)
    for m in ("m0", "m1"):
        brute = np.zeros((5, 6))
        for w, s, a in zip(weights, scalings, adapters):
            for i in range(5):
                for j in range(6):
                    brute[i, j] += w * s * sum(a[f"{m}.lora_B.weight"][i, k] * a[f"{m}.lora_A.weight"][k, j]
                                               for k in range(a[f"{m}.lora_A.weight"].shape[0]))
        np.testing.assert_allclose(exact[m], brute, rtol=1e-5, atol=1e-6)


def test_fedavg_of_factors_has_the_cross_term_error():
    rng = np.random.default_rng(1)
    adapters = [random_adapter(rng, 4) for _ in range(3)]
    weights = data_weights([1, 1, 2])
    merged = fedavg(adapters, weights)
    np.testing.assert_allclose(merged["m0.lora_A.weight"],
                               sum(w * a["m0.lora_A.weight"] for w, a in zip(weights, adapters)), rtol=1e-6)
    exact = exact_update(adapters, weights, 2.0)
    used = adapter_update(merged, 2.0)
    # (sum p B)(sum p A) = sum p^2 BA + cross terms: not the weighted sum of updates.
    assert relative_error(used, exact) > 0.1
    assert relative_error(exact, exact) == 0.0


def test_identical_clients_average_without_error():
    rng = np.random.default_rng(2)
    adapter = random_adapter(rng, 3)
    weights = data_weights([5, 7])
    merged = fedavg([adapter, adapter], weights)
    assert relative_error(adapter_update(merged, 2.0), exact_update([adapter, adapter], weights, 2.0)) < 1e-6


def test_lora_pairs_rejects_half_pairs():
    with pytest.raises(ValueError, match="not LoRA A/B pairs"):
        lora_pairs({"m.lora_A.weight": np.zeros((1, 2))})


def test_batch_indices_deterministic_and_wraps_epochs():
    client = np.arange(10, 20)
    batches = [batch_indices(client, 4, step, seed=7) for step in range(5)]
    assert all(len(b) == 4 for b in batches)
    assert np.array_equal(batches[3], batch_indices(client, 4, 3, seed=7))
    assert sorted(np.concatenate(batches[:2] + [batches[2][:2]]).tolist()) == list(range(10, 20))
    small = batch_indices(np.array([1, 2, 3]), 8, 0, seed=0)
    assert len(small) == 8 and set(small.tolist()) == {1, 2, 3}


