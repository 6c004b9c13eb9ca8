"""Aggregation rules for LoRA adapters as pure numpy functions, and the error each rule makes.

An adapter is a dict of PEFT state-dict arrays; every adapted module has a "<module>.lora_A.weight"
(r x d_in) and a "<module>.lora_B.weight" (d_out x r). Its update is scaling * B @ A.
"""

import numpy as np

LORA_A, LORA_B = ".lora_A.weight", ".lora_B.weight"


def lora_pairs(adapter: dict[str, np.ndarray]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """module -> (A, B); a key that is not half of a pair is an error, not something to skip."""
    modules = {key[: -len(LORA_A)] for key in adapter if key.endswith(LORA_A)}
    expected = {m + LORA_A for m in modules} | {m + LORA_B for m in modules}
    if set(adapter) != expected:
        raise ValueError(f"adapter keys are not LoRA A/B pairs: {sorted(set(adapter) ^ expected)[:4]}")
    return {m: (adapter[m + LORA_A], adapter[m + LORA_B]) for m in sorted(modules)}


def data_weights(sizes: list[int]) -> np.ndarray:
    """p_k = n_k / sum n: FedAvg's weights."""
    sizes = np.asarray(sizes, dtype=np.float64)
    return sizes / sizes.sum()


def fedavg(adapters: list[dict[str, np.ndarray]], weights: np.ndarray) -> dict[str, np.ndarray]:
    """Average every tensor separately (A and B apart): FedAvg of the factors."""
    return {key: sum(w * a[key].astype(np.float64) for w, a in zip(weights, adapters)).astype(adapters[0][key].dtype)
            for key in adapters[0]}


def exact_update(adapters: list[dict[str, np.ndarray]], weights: np.ndarray,
                 scalings: list[float]) -> dict[str, np.ndarray]:
    """sum_k p_k s_k B_k A_k per module: the update every rule is judged against."""
    pairs = [lora_pairs(a) for a in adapters]
    return {m: sum(w * s * p[m][1].astype(np.float64) @ p[m][0].astype(np.float64)
                   for w, s, p in zip(weights, scalings, pairs))
            for m in pairs[0]}


def adapter_update(adapter: dict[str, np.ndarray], scaling: float) -> dict[str, np.ndarray]:
    """s * B @ A per module of one adapter."""
    return {m: scaling * b.astype(np.float64) @ a.astype(np.float64) for m, (a, b) in lora_pairs(adapter).items()}


def relative_error(used: dict[str, np.ndarray], exact: dict[str, np.ndarray]) -> float:
    """||used - exact||_F / ||exact||_F over all modules together; 0 when both are zero."""
    diff = sum(float(np.sum((used[m] - exact[m]) ** 2)) for m in exact)
    norm = sum(float(np.sum(exact[m] ** 2)) for m in exact)
    if norm == 0.0:
        return 0.0 if diff == 0.0 else float("inf")
    return float(np.sqrt(diff / norm))
