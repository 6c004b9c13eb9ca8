"""HSplitLoRA's weight importance (IWI) and its rank and split configuration (ARMSC) as pure functions.

Weights are keyed "<layer>.<module suffix>", e.g. "3.self_attn.q_proj". Formulas: ALGORITHMS.md.
"""

import math
from collections.abc import Callable

from hsplit_sim import costs

EPSILON = 1e-12


def weight_key(layer: int, module: str) -> str:
    return f"{layer}.{module}"


def parse_key(key: str) -> tuple[int, str]:
    layer, module = key.split(".", 1)
    return int(layer), module


def candidate_weights(spec: costs.ModelSpec, start: int, stop: int) -> list[str]:
    """Every attention and MLP projection of blocks start..stop-1 (GPT-2's fused q, k, v are one)."""
    modules = sorted(set(costs.TARGET_MODULES[spec.family].values()))
    return [weight_key(layer, m) for layer in range(start, stop) for m in modules]


def weight_cost(spec: costs.ModelSpec, key: str, reference_rank: int, batch: int, seq: int) -> float:
    """C(W): bytes of a reference-rank adapter on W with its gradient and Adam state (16 bytes a parameter),
    plus the fp32 activation it adds (A's output, batch x seq x r)."""
    d_in, d_out = costs.module_shape(spec, parse_key(key)[1])
    return 16 * reference_rank * (d_in + d_out) + 4 * batch * seq * reference_rank


def smooth(previous: dict[str, float] | None, current: dict[str, float], t: int, total_rounds: int) -> dict[str, float]:
    """I_bar_t = gamma_t I_bar_{t-1} + (1 - gamma_t) I_tilde_t, gamma_t = 1 - exp(-(I_tilde_t t) / (I_bar_{t-1} T)).

    The first measurement stands as it is; weights measured earlier but not now keep their value.
    """
    if previous is None:
        return dict(current)
    smoothed = dict(previous)
    for key, now in current.items():
        before = previous.get(key, now)
        gamma = 1 - math.exp(-(now * t) / ((before + EPSILON) * total_rounds))
        smoothed[key] = gamma * before + (1 - gamma) * now
    return smoothed


def client_side_share(importance: dict[str, float], split: int) -> float:
    """The share of global importance that lies on the client side of a split."""
    total = sum(importance.values())
    return sum(v for k, v in importance.items() if parse_key(k)[0] < split) / total if total > 0 else 0.0


def assign_ranks(keys: list[str], importance: dict[str, float], cost: dict[str, float], rank_set: list[int],
                 fits) -> costs.Ranks:
    """Greedy: weights in descending importance / cost, each the highest rank of Q that still fits."""
    ranks: costs.Ranks = {}
    positive = sorted((r for r in rank_set if r > 0), reverse=True)
    for key in sorted(keys, key=lambda k: (-importance[k] / cost[k], k)):
        layer, module = parse_key(key)
        for rank in positive:
            trial = {**ranks, layer: {**ranks.get(layer, {}), module: rank}}
            if fits(trial):
                ranks = trial
                break
    return ranks


def score(ranks: costs.Ranks, importance: dict[str, float], rank_set: list[int]) -> float:
    """sum over adapted weights of I_bar(W) * phi(r), phi(r) = r / max(Q) (choice)."""
    top = max(rank_set)
    return sum(importance[weight_key(layer, m)] * r / top for layer, ms in ranks.items() for m, r in ms.items())


def configure_client(spec: costs.ModelSpec, importance: dict[str, float], cost: dict[str, float],
                     budget_bytes: float, rank_set: list[int], batch: int, seq: int,
                     splits: list[int], within_time: Callable[[int, costs.Ranks], bool] | None = None,
                     element_bytes: int = costs.FP32) -> tuple[int, costs.Ranks] | None:
    """ARMSC for one client: the best (split, client-side ranks) within its memory budget (and, if given, a
    per-iteration compute budget: `within_time(split, ranks)` says whether the client's iteration fits it);
    ties go deeper.

    splits: the split points to consider (all of them, or only the current one when not re-splitting).
    None when no split holds even the bare segment.

    The first adapted block decides how many blocks save activations (the segment's largest memory
    term, which no per-weight C(W) carries), so for each split the greedy also runs with adapters
    only from block f on, for every f: without that, a larger budget could let the greedy put an
    adapter early, pay every block's activations, and end with a lower score than a smaller budget.
    """
    best = None
    for split in sorted(splits):
        memory = segment_memory(spec, split, batch, seq, element_bytes)

        def fits(ranks, split=split, memory=memory):
            if memory(ranks) > budget_bytes:
                return False
            return within_time is None or within_time(split, ranks)

        if not fits({}):
            break
        for first in range(split):
            ranks = assign_ranks(candidate_weights(spec, first, split), importance, cost, rank_set, fits)
            value = score(ranks, importance, rank_set)
            if best is None or value >= best[0]:
                best = (value, split, ranks)
    return None if best is None else (best[1], best[2])


def segment_memory(spec: costs.ModelSpec, split: int, batch: int, seq: int, element_bytes: int = costs.FP32):
    """costs.training_memory_bytes of the client segment as a fast function of its ranks (ARMSC calls it
    hundreds of thousands of times): the bare segment, plus the activations saved from the first adapted
    block on, plus 16 bytes per adapter parameter."""
    bare = costs.training_memory_bytes(spec, 0, split, batch, seq, {}, embeddings=True, head=False,
                                       element_bytes=element_bytes)
    probe = next(iter(costs.TARGET_MODULES[spec.family].values()))
    saved = [costs.training_memory_bytes(spec, 0, split, batch, seq, {first: {probe: 1}}, embeddings=True,
                                         head=False, element_bytes=element_bytes)
             - bare - 16 * costs.adapter_params(spec, {first: {probe: 1}})
             for first in range(split)]
    sizes = {m: sum(costs.module_shape(spec, m)) for m in set(costs.TARGET_MODULES[spec.family].values())}

    def memory(ranks: costs.Ranks) -> int:
        adapted = [layer for layer, modules in ranks.items() if any(modules.values())]
        if not adapted:
            return bare
        params = sum(rank * sizes[m] for modules in ranks.values() for m, rank in modules.items())
        return bare + saved[min(adapted)] + 16 * params

    return memory


def client_work(spec: costs.ModelSpec, split: int, batch: int, seq: int, ranks: costs.Ranks,
                weight_decay: float = 0.0) -> costs.Work:
    """A client's compute in one local iteration: forward, backward and optimiser step of its segment."""
    forward, backward = costs.segment_work(spec, 0, split, batch, seq, ranks, False, False)
    return forward + backward + costs.optimizer_work(spec, ranks, weight_decay)


def server_ranks(keys: list[str], importance: dict[str, float], cost: dict[str, float],
                 rank_set: list[int]) -> costs.Ranks:
    """Server-side weights have no budget: rank by importance quantile over Q (least important: Q's lowest)."""
    order = sorted(keys, key=lambda k: (importance[k] / cost[k], k))
    ranks: costs.Ranks = {}
    for position, key in enumerate(order):
        rank = rank_set[min(len(rank_set) - 1, position * len(rank_set) // len(order))]
        if rank > 0:
            layer, module = parse_key(key)
            ranks.setdefault(layer, {})[module] = rank
    return ranks
