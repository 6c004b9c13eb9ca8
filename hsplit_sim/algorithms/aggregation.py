"""Aggregation rules for LoRA adapters as pure numpy functions, and the error each rule makes.

An adapter is a dict of PEFT state-dict arrays; every adapted module has a "<module>.lora_A.weight"
(r x d_in) and a "<module>.lora_B.weight" (d_out x r). Its update is s * B @ A, with one scaling s for every
adapter whatever its rank (algorithm.alpha / algorithm.rank: alpha proportional to rank).
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


def contributions(adapters: list[dict[str, np.ndarray]], weights: np.ndarray,
                  contributors: str = "renormalised") -> dict[str, list[tuple[np.ndarray, np.ndarray, float]]]:
    """module -> [(A_k, B_k, p_k)] over the adapters that hold it (rank 0 or no key: absent).

    Clients of different splits and ranks adapt different modules: "renormalised" rescales p_k to sum to
    one over a module's contributors; "global" keeps the weights as given.
    """
    if contributors not in ("renormalised", "global"):
        raise ValueError(f"contributors must be 'renormalised' or 'global', not {contributors!r}")
    pairs = [lora_pairs(a) for a in adapters]
    found: dict[str, list[tuple[np.ndarray, np.ndarray, float]]] = {}
    for pair, w in zip(pairs, weights):
        for m, (a, b) in pair.items():
            if a.shape[0] > 0:
                found.setdefault(m, []).append((a, b, float(w)))
    if contributors == "renormalised":
        for m, held in found.items():
            held_total = sum(w for _, _, w in held)
            found[m] = [(a, b, w / held_total) for a, b, w in held]
    return dict(sorted(found.items()))


def exact_update(adapters: list[dict[str, np.ndarray]], weights: np.ndarray, scaling: float,
                 contributors: str = "renormalised") -> dict[str, np.ndarray]:
    """s sum_k p_k B_k A_k per module: the update every rule is judged against."""
    return {m: scaling * sum(p * b.astype(np.float64) @ a.astype(np.float64) for a, b, p in held)
            for m, held in contributions(adapters, weights, contributors).items()}


def stack(adapters: list[dict[str, np.ndarray]], weights: np.ndarray, scaling: float,
          contributors: str = "renormalised") -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """module -> (B_stack = [B_1|...|B_K], A_stack = [p_1 s A_1; ...]): NAA's and FLoRA's factors.

    B_stack @ A_stack is exactly s sum_k p_k B_k A_k (no cross terms), whatever the ranks.
    """
    return {m: (np.concatenate([b for _, b, _ in held], axis=1).astype(np.float32),
                np.concatenate([p * scaling * a.astype(np.float64) for a, _, p in held],
                               axis=0).astype(np.float32))
            for m, held in contributions(adapters, weights, contributors).items()}


def factors_update(factors: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, np.ndarray]:
    """B @ A per module in float64: what merging (B, A) factors adds to the base weights."""
    return {m: b.astype(np.float64) @ a.astype(np.float64) for m, (b, a) in factors.items()}


def _padded_average(held: list[tuple[np.ndarray, np.ndarray, float]], rank: int) -> tuple[np.ndarray, np.ndarray]:
    """(sum p_k B_k, sum p_k A_k) with every A zero-padded to rank rows and every B to rank columns."""
    d_in, d_out = held[0][0].shape[1], held[0][1].shape[0]
    a_sum, b_sum = np.zeros((rank, d_in)), np.zeros((d_out, rank))
    for a, b, p in held:
        r = a.shape[0]
        a_sum[:r] += p * a.astype(np.float64)
        b_sum[:, :r] += p * b.astype(np.float64)
    return b_sum, a_sum


def zero_pad_average(adapters: list[dict[str, np.ndarray]], weights: np.ndarray,
                     contributors: str = "renormalised", ranks: dict[str, int] | None = None) -> dict[str, np.ndarray]:
    """An adapter: for every module some adapter holds, each contributor's A and B zero-padded to ranks[module]
    (default: the module's largest contributor rank) and averaged apart with p'_k. Its update s B A has the
    cross terms of averaging factors apart (HSplitLoRA without NAA's global adapter)."""
    averaged = {}
    for m, held in contributions(adapters, weights, contributors).items():
        rank = max(a.shape[0] for a, _, _ in held) if ranks is None else ranks[m]
        if rank < max(a.shape[0] for a, _, _ in held):
            raise ValueError(f"{m}: a contributor's rank exceeds the padded rank {rank}")
        b, a = _padded_average(held, rank)
        averaged[m + LORA_A], averaged[m + LORA_B] = a.astype(np.float32), b.astype(np.float32)
    return averaged


def hetlora_weights(held: list[tuple[np.ndarray, np.ndarray, float]]) -> np.ndarray:
    """HetLoRA's sparsity weights for one module: ||B_k A_k||_F / Z, Z their sum (Cho et al., 2401.06432).

    The paper weights by the norms alone, not by data sizes; only if every norm is zero (no client moved
    its B off zero) do the data weights p_k decide.
    """
    norms = np.array([np.linalg.norm(b.astype(np.float64) @ a.astype(np.float64)) for a, b, _ in held])
    if norms.sum() == 0.0:
        norms = np.array([p for _, _, p in held])
    return norms / norms.sum()


def hetlora_aggregate(adapters: list[dict[str, np.ndarray]], weights: np.ndarray, scaling: float,
                      rank: int | None = None) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(global adapter at r_max, the update it applies): every module zero-padded to `rank` (default: the
    largest rank of any adapter; HetLoRA passes its r_max, which pruned clients no longer reach), A and B
    averaged apart with HetLoRA's norm weights; the global adapter has the clients' scaling, so the error is
    the cross terms of averaging factors apart."""
    held_by_module = contributions(adapters, weights)
    if rank is None:
        rank = max(a.shape[0] for held in held_by_module.values() for a, _, _ in held)
    adapter = {}
    for m, held in held_by_module.items():
        norm_weights = hetlora_weights(held)
        b, a = _padded_average([(a, b, w) for (a, b, _), w in zip(held, norm_weights)], rank)
        adapter[m + LORA_A], adapter[m + LORA_B] = a.astype(np.float32), b.astype(np.float32)
    return adapter, adapter_update(adapter, scaling)


def truncate(adapter: dict[str, np.ndarray], rank: int) -> dict[str, np.ndarray]:
    """The first rank rows of every A and columns of every B: HetLoRA's adapter for a rank-r client."""
    out = {}
    for m, (a, b) in lora_pairs(adapter).items():
        out[m + LORA_A] = np.ascontiguousarray(a[:rank])
        out[m + LORA_B] = np.ascontiguousarray(b[:, :rank])
    return out


def flexlora_aggregate(adapters: list[dict[str, np.ndarray]], weights: np.ndarray, scaling: float,
                       client_ranks: list[int], contributors: str = "renormalised") -> list[dict[str, np.ndarray]]:
    """One adapter per entry of client_ranks: the rank-r truncated SVD of the dense s sum_k p_k B_k A_k.

    With U S V^T that SVD, B = U_r sqrt(S_r) / sqrt(s) and A = sqrt(S_r) V_r^T / sqrt(s), so the client's
    scaling gives s B A = U_r S_r V_r^T, the best rank-r approximation (FlexLoRA, Bai et al., 2402.11505).
    """
    out: list[dict[str, np.ndarray]] = [{} for _ in client_ranks]
    for m, dense in exact_update(adapters, weights, scaling, contributors).items():
        u, s, vt = np.linalg.svd(dense, full_matrices=False)
        for adapter, r in zip(out, client_ranks):
            root = np.sqrt(s[:r] / scaling)
            adapter[m + LORA_A] = (root[:, None] * vt[:r]).astype(np.float32)
            adapter[m + LORA_B] = (u[:, :r] * root).astype(np.float32)
    return out


def adapter_update(adapter: dict[str, np.ndarray], scaling: float) -> dict[str, np.ndarray]:
    """s * B @ A per module of one adapter."""
    return {m: scaling * b.astype(np.float64) @ a.astype(np.float64)
            for m, (a, b) in lora_pairs(adapter).items()}


def relative_error(used: dict[str, np.ndarray], exact: dict[str, np.ndarray]) -> float:
    """||used - exact||_F / ||exact||_F over all modules together; 0 when both are zero."""
    diff = sum(float(np.sum((used[m] - exact[m]) ** 2)) for m in exact)
    norm = sum(float(np.sum(exact[m] ** 2)) for m in exact)
    if norm == 0.0:
        return 0.0 if diff == 0.0 else float("inf")
    return float(np.sqrt(diff / norm))
