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
    plus the fp32 activations it makes the device keep for backward: W's input and A's output (batch x seq x
    (d_in + r)). Projections that read one tensor share that input; each W is charged it as if alone."""
    d_in, d_out = costs.module_shape(spec, parse_key(key)[1])
    return 16 * reference_rank * (d_in + d_out) + 4 * batch * seq * (d_in + reference_rank)


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


def assign_ranks(keys: list[str], importance: dict[str, float], rank_set: list[int],
                 fits: Callable[[costs.Ranks, int, str, int], bool]) -> costs.Ranks:
    """Greedy: weights in descending importance (already per unit cost C(W)), each the highest rank of Q that
    `fits(ranks, layer, module, rank)` allows beside those already given; rank 0 (no adapter) when none does."""
    ranks: costs.Ranks = {}
    positive = sorted((r for r in rank_set if r > 0), reverse=True)
    for key in sorted(keys, key=lambda k: (-importance[k], parse_key(k))):  # ties: shallower block first
        layer, module = parse_key(key)
        for rank in positive:
            if fits(ranks, layer, module, rank):
                ranks.setdefault(layer, {})[module] = rank
                break
    return ranks


def score(ranks: costs.Ranks, importance: dict[str, float], rank_set: list[int]) -> float:
    """sum over adapted weights of I_bar(W) * phi(r), phi(r) = r / max(Q) (choice)."""
    top = max(rank_set)
    return sum(importance[weight_key(layer, m)] * r / top for layer, ms in ranks.items() for m, r in ms.items())


def configure_client(spec: costs.ModelSpec, importance: dict[str, float], block_params: int,
                     budget_bytes: float, rank_set: list[int], batch: int, seq: int, splits: list[int],
                     iteration_seconds: Callable[[int, costs.Ranks, costs.Ranks], float],
                     within_time: Callable[[int, costs.Ranks], bool] | None = None,
                     element_bytes: int = costs.FP32,
                     probe: str | None = None) -> tuple[int, costs.Ranks, costs.Ranks] | None:
    """ARMSC for one client: at every split within its budgets, IWI's ranks there (split_ranks); of those
    splits, the one whose iteration is estimated fastest (`iteration_seconds(split, client ranks, server
    ranks)`); ties go shallower. A memory or time budget is a cap: it bounds the splits, it does not pull the
    cut towards it. Returns (split, client-side ranks, server-side ranks).

    splits: the split points to consider (all of them, or only the current one when not re-splitting).
    probe: IWI's measure where the plan's steps include its probe (SegmentMemory), else None.
    None when no split leaves both sides at least one adapter (the client side within its budgets).
    """
    best = None
    for split in sorted(splits):
        found = split_ranks(spec, importance, block_params, budget_bytes, rank_set, batch, seq, split,
                            within_time, element_bytes, probe)
        if found is None:
            break
        client, server = found
        if not client or not server:  # a side with nothing to train (as in SplitLoRA, both sides train)
            continue
        seconds = iteration_seconds(split, client, server)
        if best is None or seconds < best[0]:
            best = (seconds, split, client, server)
    return None if best is None else best[1:]


def split_ranks(spec: costs.ModelSpec, importance: dict[str, float], block_params: int, budget_bytes: float,
                rank_set: list[int], batch: int, seq: int, split: int,
                within_time: Callable[[int, costs.Ranks], bool] | None = None,
                element_bytes: int = costs.FP32, probe: str | None = None) -> tuple[costs.Ranks, costs.Ranks] | None:
    """IWI's selection at one split, each side under its own adapter budget of `block_params` trainable
    parameters per block it holds (so moving the cut moves budget with the blocks and changes no capacity),
    filled greedily in importance order; the client side also within the client's memory (and compute)
    budget. (client ranks, server ranks); None when even the bare client segment does not fit.

    The first adapted client block decides how many blocks save activations (the segment's largest memory
    term, which no per-weight C(W) carries), so the client greedy also runs with adapters only from block f
    on, for every f, and the best score stands: without that, the greedy could put an early adapter on the
    client, pay every block's activations, and crowd out the rest. With a probe (IWI's measure) the client
    side must also fit its probe step (SegmentMemory).
    """
    memory = SegmentMemory(spec, split, batch, seq, element_bytes, probe)
    if memory({}) > budget_bytes or (within_time is not None and not within_time(split, {})):
        return None

    def within_params(cap: int, used: dict):
        def fits(ranks, layer, module, rank):
            params = rank * memory.sizes[module]
            if used["params"] + params > cap:
                return False
            used["params"] += params
            return True
        return fits

    server = assign_ranks(candidate_weights(spec, split, spec.n_layers), importance, rank_set,
                          within_params(block_params * (spec.n_layers - split), {"params": 0}))
    best = None
    first = 0
    while first < split:
        used = {"params": 0, "kept": 0, "first adapted": split}
        params_fit = within_params(block_params * split, used)

        def fits(ranks, layer, module, rank, used=used, params_fit=params_fit):
            first_adapted = min(used["first adapted"], layer)
            kept = memory.kept_with(ranks.get(layer, {}), module, rank)
            if memory.of(first_adapted, used["params"] + rank * memory.sizes[module],
                         used["kept"] + kept) > budget_bytes:
                return False
            if within_time is not None and not within_time(split, {**ranks, layer: {**ranks.get(layer, {}),
                                                                                      module: rank}}):
                return False
            if not params_fit(ranks, layer, module, rank):
                return False
            used["first adapted"] = first_adapted
            used["kept"] += kept
            return True

        client = assign_ranks(candidate_weights(spec, first, split), importance, rank_set, fits)
        value = score(client, importance, rank_set)
        if best is None or value > best[0]:
            best = (value, client)
        # A candidate the greedy turns down changes nothing it holds, so if it took nothing from blocks first..g-1
        # (g: its first adapted block), starting from any of them gives the same choices: go on from g + 1.
        first = max(first, used["first adapted"]) + 1
    return best[1], server


class SegmentMemory:
    """The memory a client segment's plan needs, as a fast function of its ranks (ARMSC asks it hundreds of
    thousands of times): costs.training_memory_bytes of its training step or, where the plan's steps include
    IWI's probe (`probe`: its measure), of its probe step, the larger of the two (every block saves there, and
    the probe holds more besides; tests/test_importance.py checks it is the larger).

    Training step: the bare segment, plus the block activations saved from the first adapted block on, plus 16
    bytes per adapter parameter, plus what adapters make each block keep (inputs and A's outputs:
    costs.trained_input_values). Probe step: the bare probed segment, plus 16 bytes per adapter parameter, plus
    what adapters add to their blocks there, wherever the first one is."""

    def __init__(self, spec: costs.ModelSpec, split: int, batch: int, seq: int, element_bytes: int = costs.FP32,
                 probe: str | None = None):
        self.probe = probe
        self.bare = costs.training_memory_bytes(spec, 0, split, batch, seq, {}, embeddings=True, head=False,
                                                element_bytes=element_bytes, probe=probe)
        self.token_bytes = batch * seq * element_bytes
        self.saved = [0] * split  # the probe step saves every block, wherever the first adapter is
        if probe is None:
            one = next(iter(costs.TARGET_MODULES[spec.family].values()))
            one_extra = 16 * costs.adapter_params(spec, {0: {one: 1}}) + self.token_bytes * costs.trained_input_values(
                spec, {one: 1})
            self.saved = [costs.training_memory_bytes(spec, 0, split, batch, seq, {first: {one: 1}}, embeddings=True,
                                                      head=False, element_bytes=element_bytes) - self.bare - one_extra
                          for first in range(split)]
        self.sizes = {m: sum(costs.module_shape(spec, m)) for m in set(costs.TARGET_MODULES[spec.family].values())}
        self.reads = {m: (costs.PROJECTION_INPUTS[spec.family][m], costs.module_shape(spec, m)[0]) for m in self.sizes}
        # abs_sum: an adapter on a projection whose output autograd saves makes the probe keep that output apart.
        self.kept_output = {m: costs.probe_output_values(spec, {m: 1}) - costs.probe_output_values(spec, {})
                            if probe == "abs_sum" else 0 for m in self.sizes}

    def of(self, first_adapted: int, params: int, kept: int) -> int:
        """With adapters from block first_adapted on (the split itself: none) holding `params` parameters and
        making their blocks keep `kept` values per token."""
        if first_adapted >= len(self.saved):
            return self.bare
        return self.bare + self.saved[first_adapted] + 16 * params + self.token_bytes * kept

    def kept_with(self, layer_ranks: dict[str, int], module: str, rank: int) -> int:
        """What giving `module` (not yet in layer_ranks) rank `rank` adds to its block's kept values per token:
        the difference of costs.trained_input_values (and, for abs_sum, of probe_output_values), without
        building them twice on ARMSC's hot path. sum_abs's probe keeps every projection's input already, so
        there an adapter adds only A's output."""
        if self.probe == "sum_abs":
            return rank
        tensor, width = self.reads[module]
        shared = any(self.reads[m][0] == tensor for m in layer_ranks)
        return rank + (0 if shared else width) + self.kept_output[module]

    def __call__(self, ranks: costs.Ranks) -> int:
        params = kept = 0
        for modules in ranks.values():
            held = {}
            for module, rank in modules.items():
                if rank:
                    kept += self.kept_with(held, module, rank)
                    params += rank * self.sizes[module]
                    held[module] = rank
        adapted = [layer for layer, modules in ranks.items() if any(modules.values())]
        return self.of(min(adapted, default=len(self.saved)), params, kept)


def client_work(spec: costs.ModelSpec, split: int, batch: int, seq: int, ranks: costs.Ranks,
                weight_decay: float = 0.0, probe: str | None = None) -> costs.Work:
    """A client's compute in one local iteration: forward, backward and optimiser step of its segment; with
    `probe` (IWI's measure), of the iteration that is also the probe."""
    forward, backward = costs.segment_work(spec, 0, split, batch, seq, ranks, False, False, **costs.probe_flags(probe))
    return forward + backward + costs.optimizer_work(spec, ranks, weight_decay)
