"""Work, bytes and memory of model segments from a config alone (no torch), for the simulated clock.

Work is what eager PyTorch runs on the real modules (eager attention, PEFT LoRA, AdamW): matmuls with their
FLOPs (2*m*k*n each, the way `torch.utils.flop_counter.FlopCounterMode` counts them) and the values they move,
the values memory-bound operations move, and kernels, so the simulated clock and a profiler agree.
Bytes take the size of one value as a parameter (the simulated precision); by default fp32, which is what the
host trains in and what real frames carry.
"""

from collections import Counter
from dataclasses import dataclass
from functools import cached_property

# Logical weight names -> module-name suffixes per architecture family.
TARGET_MODULES = {
    "llama": {
        "q": "self_attn.q_proj",
        "k": "self_attn.k_proj",
        "v": "self_attn.v_proj",
        "o": "self_attn.o_proj",
        "gate": "mlp.gate_proj",
        "up": "mlp.up_proj",
        "down": "mlp.down_proj",
    },
    # GPT-2 fuses q, k and v into one Conv1D (c_attn): any of them adapts the fused weight.
    "gpt2": {"q": "attn.c_attn", "k": "attn.c_attn", "v": "attn.c_attn", "o": "attn.c_proj", "up": "mlp.c_fc", "down": "mlp.c_proj"},
}

# Layer index -> {module-name suffix: LoRA rank}; a module absent from a layer has no adapter.
Ranks = dict[int, dict[str, int]]

FP32 = 4
INT64 = 8


@dataclass(frozen=True)
class ModelSpec:
    """The shapes that decide a causal LM's costs."""

    family: str  # "gpt2" or "llama"
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    vocab_size: int
    n_positions: int = 0  # learned position embeddings (GPT-2 only); they count towards memory
    tied_embeddings: bool = True  # LM head shares the token-embedding matrix

    @classmethod
    def from_hf_config(cls, config: dict) -> "ModelSpec":
        """Read a Hugging Face config dict, filling the defaults its config class would."""
        family = config["model_type"]
        if family == "gpt2":
            d, heads = config["n_embd"], config["n_head"]
            return cls(
                family=family,
                n_layers=config["n_layer"],
                d_model=d,
                n_heads=heads,
                n_kv_heads=heads,
                head_dim=d // heads,
                d_ff=config.get("n_inner") or 4 * d,
                vocab_size=config["vocab_size"],
                n_positions=config.get("n_positions", 1024),
                tied_embeddings=config.get("tie_word_embeddings", True),
            )
        if family == "llama":
            d, heads = config["hidden_size"], config["num_attention_heads"]
            return cls(
                family=family,
                n_layers=config["num_hidden_layers"],
                d_model=d,
                n_heads=heads,
                n_kv_heads=config.get("num_key_value_heads") or heads,
                head_dim=config.get("head_dim") or d // heads,
                d_ff=config["intermediate_size"],
                vocab_size=config["vocab_size"],
                tied_embeddings=config.get("tie_word_embeddings", False),
            )
        raise ValueError(f"unsupported model family {family!r} (gpt2 or llama)")


def module_shape(spec: ModelSpec, module: str) -> tuple[int, int]:
    """(d_in, d_out) of an adaptable projection, by module-name suffix."""
    d, q, kv, ff = spec.d_model, spec.n_heads * spec.head_dim, spec.n_kv_heads * spec.head_dim, spec.d_ff
    shapes = {
        "llama": {
            "self_attn.q_proj": (d, q),
            "self_attn.k_proj": (d, kv),
            "self_attn.v_proj": (d, kv),
            "self_attn.o_proj": (q, d),
            "mlp.gate_proj": (d, ff),
            "mlp.up_proj": (d, ff),
            "mlp.down_proj": (ff, d),
        },
        "gpt2": {"attn.c_attn": (d, 3 * d), "attn.c_proj": (d, d), "mlp.c_fc": (d, ff), "mlp.c_proj": (ff, d)},
    }[spec.family]
    if module not in shapes:
        raise ValueError(f"no module {module!r} in the {spec.family} family (known: {sorted(shapes)})")
    return shapes[module]


def uniform_ranks(spec: ModelSpec, targets: list[str], layers, rank: int) -> Ranks:
    """One rank on the given logical targets (q, k, v, ...) of the given layers."""
    names = TARGET_MODULES[spec.family]
    modules = sorted({names[t] for t in targets})  # GPT-2's q, k and v are one module
    return {layer: {m: rank for m in modules} for layer in layers}


@dataclass(frozen=True)
class Work:
    """What a device computes, for the roofline time model: matrix multiplications grouped by shape as
    (count, FLOPs, values moved), the values memory-bound operations read and write, and the kernels launched.

    Values, not bytes: the simulated precision sets the bytes of a value (sim/timemodel.py).
    """

    matmuls: tuple[tuple[int, int, int], ...] = ()
    pointwise_values: int = 0
    kernels: int = 0

    @cached_property  # on every simulated step's event
    def flops(self) -> int:
        return sum(count * flops for count, flops, _ in self.matmuls)

    @property
    def values(self) -> int:
        """Every value read and written, by matmuls and memory-bound operations alike."""
        return self.pointwise_values + sum(count * values for count, _, values in self.matmuls)

    def __add__(self, other: "Work") -> "Work":
        grouped = Counter()
        for count, flops, values in self.matmuls + other.matmuls:
            grouped[flops, values] += count
        return Work(tuple((count, f, v) for (f, v), count in sorted(grouped.items())),
                    self.pointwise_values + other.pointwise_values, self.kernels + other.kernels)

    @classmethod
    def compute_bound(cls, flops: int) -> "Work":
        """Arithmetic charged by FLOPs alone (aggregation's products and factorisations)."""
        return cls(((1, flops, 0),)) if flops else cls()


class _Tape:
    """Records the operations eager PyTorch runs, one kernel each unless said otherwise."""

    def __init__(self):
        self.matmuls: Counter = Counter()
        self.pointwise_values = 0
        self.kernels = 0

    def matmul(self, m: int, k: int, n: int, batch: int = 1, extra_values: int = 0) -> None:
        """(m x k) @ (k x n), `batch` times in one kernel; extra_values: a bias read."""
        self.matmuls[2 * batch * m * k * n, batch * (m * k + k * n + m * n) + extra_values] += 1
        self.kernels += 1

    def pointwise(self, values: int, kernels: int = 1) -> None:
        """Memory-bound operations reading and writing `values` values in all."""
        self.pointwise_values += values
        self.kernels += kernels

    def work(self) -> Work:
        return Work(tuple((count, f, v) for (f, v), count in sorted(self.matmuls.items())),
                    self.pointwise_values, self.kernels)


# Eager PyTorch's operations per norm (values moved per token-wide element, kernels): RMSNorm is pow, mean, add,
# rsqrt and two muls forward, twelve operations backward; LayerNorm is one fused kernel each way.
_NORM = {"llama": ((7, 6), (20, 12)), "gpt2": ((2, 1), (3, 1))}
# AdamW's single-tensor step (torch's default off CUDA): step count, lerp_, mul_, addcmul_, a scalar read,
# sqrt, div, add_ and addcdiv_ per tensor, moving 19 values per parameter (+ mul_ for weight decay).
_ADAM_KERNELS, _ADAM_VALUES = 9, 19


def _linear(fwd: _Tape, bwd: _Tape, n: int, d_in: int, d_out: int, rank: int, x_grad: bool, trainable: bool,
            bias: bool, output_grad: bool = False) -> bool:
    """x (n x d_in) @ W (d_in x d_out) (+ bias) plus a rank-r LoRA path scaled and added; returns whether the
    output requires grad.

    Autograd computes an input's gradient only if it requires grad: W's input gradient only when x
    requires grad, W's weight gradient only when W is trained. LoRA's A and B are always trained, and
    A's output always requires grad, so B's input gradient is always paid.
    output_grad: IWI's output probe needs dL/dy of W's output y and then scores sum(dL/dy * (y - bias)): a
    subtraction (with a bias), a product, a sum and the scalar's read.
    """
    fwd.matmul(n, d_in, d_out, extra_values=d_out if bias else 0)
    if x_grad:
        bwd.matmul(n, d_out, d_in)
    if trainable:
        bwd.matmul(d_in, n, d_out)
        if bias:
            bwd.pointwise(n * d_out + d_out)  # bias gradient: a sum over tokens
    if rank:
        fwd.matmul(n, d_in, rank)
        fwd.matmul(n, rank, d_out)
        fwd.pointwise(2 * n * d_out + 3 * n * d_out, kernels=2)  # scaling, then the add to the base output
        bwd.pointwise(2 * n * d_out)  # the scaling's gradient
        bwd.matmul(rank, n, d_out)  # B's gradient
        bwd.matmul(n, d_out, rank)  # (x A)'s gradient
        bwd.matmul(d_in, n, rank)  # A's gradient
        if x_grad:
            bwd.matmul(n, rank, d_in)
            bwd.pointwise(3 * n * d_in)  # summed with the base path's input gradient
    if output_grad:
        if bias:
            bwd.pointwise(2 * n * d_out + d_out)
        bwd.pointwise(3 * n * d_out + n * d_out + 1 + 1, kernels=3)
    return x_grad or trainable or rank > 0 or output_grad


def _norm(spec: ModelSpec, fwd: _Tape, bwd: _Tape, n: int, x_grad: bool, trainable: bool) -> None:
    (fwd_values, fwd_kernels), (bwd_values, bwd_kernels) = _NORM[spec.family]
    fwd.pointwise(fwd_values * n * spec.d_model, fwd_kernels)
    if x_grad:
        bwd.pointwise(bwd_values * n * spec.d_model, bwd_kernels)
    if trainable and spec.family == "llama":
        bwd.pointwise(4 * n * spec.d_model, kernels=2)  # the weight's gradient: a product summed over tokens


def _attention(spec: ModelSpec, fwd: _Tape, bwd: _Tape, batch: int, seq: int, q_grad: bool, k_grad: bool,
               v_grad: bool) -> bool:
    """Rotary embeddings (LLaMA), the key/value repeat of grouped-query attention, QK^T, scale, mask, softmax,
    PV and the copies eager attention makes around them; returns whether the output requires grad."""
    n, heads, hd = batch * seq, spec.n_heads, spec.head_dim
    tq, tkv = n * heads * hd, n * spec.n_kv_heads * hd
    scores, groups = batch * heads, batch * heads * seq * seq
    gqa = spec.n_kv_heads < heads
    if spec.family == "llama":
        fwd.pointwise(10 * (tq + tkv), kernels=10)  # rotary: mul, neg, cat, mul, add on q and on k
        if gqa:
            fwd.pointwise(2 * (tkv + tq), kernels=2)  # keys and values repeated to every query head
        fwd.pointwise(2 * tq)  # a contiguous copy for QK^T
    else:
        fwd.pointwise(3 * 2 * tq, kernels=3)  # contiguous q, k^T and v out of the fused projection
    fwd.matmul(seq, spec.head_dim, seq, batch=scores)
    fwd.pointwise(2 * groups + 2 * groups + batch * seq * seq + 2 * groups, kernels=3)  # scale, mask, softmax
    fwd.matmul(seq, seq, spec.head_dim, batch=scores)
    fwd.pointwise(2 * tq)  # heads back to tokens
    p_grad = q_grad or k_grad
    if not (p_grad or v_grad):
        return False
    bwd.pointwise(2 * tq)
    if p_grad:
        bwd.matmul(seq, hd, seq, batch=scores)
        bwd.pointwise(3 * groups + 2 * groups, kernels=2)  # softmax and scale gradients
    if v_grad:
        bwd.matmul(seq, seq, hd, batch=scores)
    if q_grad:
        bwd.matmul(seq, seq, hd, batch=scores)
    if k_grad:
        bwd.matmul(hd, seq, seq, batch=scores)
    if spec.family == "llama":
        for grad, width in ((q_grad, tq), (k_grad, tkv), (v_grad, tkv)):
            if grad:
                bwd.pointwise(2 * width)  # tokens back to heads, contiguous
                if width == tkv and gqa:
                    bwd.pointwise(tq + tkv)  # the repeat's gradient: a sum over the repeated heads
        bwd.pointwise(14 * tq * q_grad + 14 * tkv * k_grad, kernels=7 * (q_grad + k_grad))  # rotary
    else:
        bwd.pointwise(2 * 2 * tq + 6 * n * spec.d_model, kernels=3)  # copies, and q, k, v joined for c_attn
    return True


def _block(spec: ModelSpec, layer: int, batch: int, seq: int, ranks: Ranks, x_grad: bool, weight_grads: bool,
           output_grads: bool, full_finetune: bool, fwd: _Tape, bwd: _Tape) -> bool:
    """One transformer block, following requires-grad through it; returns whether its output requires grad."""
    names, layer_ranks, n, d = TARGET_MODULES[spec.family], ranks.get(layer, {}), batch * seq, spec.d_model
    gpt2 = spec.family == "gpt2"

    def proj(target: str, grad: bool) -> bool:
        module = names[target]
        return _linear(fwd, bwd, n, *module_shape(spec, module), layer_ranks.get(module, 0), grad,
                       weight_grads or full_finetune, gpt2, output_grads)

    def residual(grad: bool) -> None:
        fwd.pointwise(3 * n * d)
        if grad:
            bwd.pointwise(3 * n * d)  # the branch's gradient summed into the stream's

    _norm(spec, fwd, bwd, n, x_grad, full_finetune)
    if gpt2:
        q = k = v = proj("q", x_grad)  # fused c_attn: q, k and v share one output
    else:
        q, k, v = proj("q", x_grad), proj("k", x_grad), proj("v", x_grad)
        if x_grad:
            bwd.pointwise(2 * 3 * n * d, kernels=2)  # three input gradients of one normed input summed
    attended = _attention(spec, fwd, bwd, batch, seq, q, k, v)
    out = proj("o", attended)
    residual(x_grad)
    h_grad = x_grad or out
    _norm(spec, fwd, bwd, n, h_grad, full_finetune)
    f = n * spec.d_ff
    if gpt2:
        up = proj("up", h_grad)
        fwd.pointwise(18 * f, kernels=8)  # GELU (tanh form) as eight element-wise operations
        if up:
            bwd.pointwise(28 * f, kernels=11)
        down = proj("down", up)
    else:
        gate, up = proj("gate", h_grad), proj("up", h_grad)
        fwd.pointwise(2 * f + 3 * f, kernels=2)  # SiLU of gate, times up
        bwd.pointwise(3 * f * (gate + up) + 3 * f * gate, kernels=gate + up + gate)
        if h_grad:
            bwd.pointwise(3 * n * d)  # gate's and up's input gradients summed
        down = proj("down", gate or up)
    residual(h_grad)
    return h_grad or down


def probe_flags(measure: str | None) -> dict[str, bool]:
    """segment_work's flags for a step that is also IWI's probe with `measure` (none: a plain step)."""
    if measure not in (None, "abs_sum", "sum_abs"):
        raise ValueError(f"probe: abs_sum, sum_abs or None, not {measure!r}")
    return {} if measure is None else {"output_grads": True} if measure == "abs_sum" else {"weight_grads": True}


def segment_work(
    spec: ModelSpec, start: int, stop: int, batch: int, seq: int, ranks: Ranks, head: bool,
    input_requires_grad: bool, full_finetune: bool = False, weight_grads: bool = False, output_grads: bool = False,
) -> tuple[Work, Work]:
    """(forward, backward) of blocks start..stop-1 as eager PyTorch runs them; a segment starting at block 0
    looks up the embeddings, one with the head adds the final norm, the LM head and the loss.

    input_requires_grad: the segment's input needs a gradient (a server segment sends it back to the
    client; a client segment starting at the frozen embeddings does not). Full fine-tuning trains the
    embeddings too, so there the input always requires grad and every weight gradient is paid.
    weight_grads: the blocks' frozen projections get gradients too (IWI's sum |w * dL/dw| probe), embeddings
    and head not. output_grads: every projection's output gets its gradient and a score (IWI's |sum w * dL/dw|
    probe, which needs no weight gradient).
    Every segment's forward first builds the causal mask (and LLaMA's rotary tables): a few small kernels.
    """
    fwd, bwd = _Tape(), _Tape()
    n, d = batch * seq, spec.d_model
    fwd.pointwise(8 * batch * seq * seq, kernels=7)
    if spec.family == "llama":
        fwd.pointwise(6 * seq * spec.head_dim, kernels=8)
    if start == 0:
        lookups = 2 if spec.n_positions else 1  # GPT-2 adds learned positions
        fwd.pointwise(lookups * (n + 2 * n * d) + (lookups - 1) * 3 * n * d,
                      kernels=1 if lookups == 1 else 4)  # GPT-2: positions, two lookups and their sum
        if full_finetune:  # dense gradients of the tables
            bwd.pointwise(lookups * n * d + (spec.vocab_size + spec.n_positions) * d, kernels=lookups)
    grad = input_requires_grad or full_finetune
    for layer in range(start, stop):
        grad = _block(spec, layer, batch, seq, ranks, grad, weight_grads, output_grads, full_finetune, fwd, bwd)
    if head:
        predicted = batch * (seq - 1) * spec.vocab_size  # the loss drops each sequence's last position
        _norm(spec, fwd, bwd, n, grad, full_finetune)
        _linear(fwd, bwd, n, d, spec.vocab_size, 0, grad, full_finetune, False)
        fwd.pointwise(2 * predicted + 2 * predicted + predicted, kernels=4)  # shifted copies, log-softmax, NLL
        bwd.pointwise(2 * predicted + 3 * predicted + predicted + n * spec.vocab_size, kernels=4)
        if full_finetune and start == 0 and spec.tied_embeddings:
            bwd.pointwise(3 * spec.vocab_size * d)  # the tied matrix's two gradients summed
    return fwd.work(), bwd.work()


def optimizer_work(spec: ModelSpec, ranks: Ranks, weight_decay: float = 0.0, full_finetune: bool = False) -> Work:
    """One AdamW step over what trains: A and B of every adapter in `ranks` or, in full fine-tuning, every
    tensor of the model."""
    if full_finetune:
        per_block = 12 if spec.family == "gpt2" else 9  # GPT-2: 4 weights, 4 biases, 2 LayerNorms of 2
        outside = (4 if spec.family == "gpt2" else 2) + (0 if spec.tied_embeddings else 1)
        params, tensors = _segment_params(spec, 0, spec.n_layers, True, True), spec.n_layers * per_block + outside
    else:
        params = adapter_params(spec, ranks)
        tensors = 2 * sum(1 for modules in ranks.values() for rank in modules.values() if rank)
    decay = weight_decay > 0
    return Work((), params * (_ADAM_VALUES + 2 * decay), tensors * (_ADAM_KERNELS + decay))


def merge_work(shapes) -> Work:
    """Adapters merged into their weights: per weight (d_out, rank, d_in), B @ A as one matmul and its
    addition into the weight."""
    tape = _Tape()
    for d_out, rank, d_in in shapes:
        tape.matmul(d_out, rank, d_in)
        tape.pointwise(3 * d_out * d_in)
    return tape.work()


def forward_flops(spec: ModelSpec, start: int, stop: int, batch: int, seq: int, ranks: Ranks, head: bool) -> int:
    """Matmul FLOPs of the forward pass of blocks start..stop-1 (+ the LM head over every position if head)."""
    return segment_work(spec, start, stop, batch, seq, ranks, head, False)[0].flops


def backward_flops(
    spec: ModelSpec,
    start: int,
    stop: int,
    batch: int,
    seq: int,
    ranks: Ranks,
    head: bool,
    input_requires_grad: bool,
    full_finetune: bool = False,
    weight_grads: bool = False,
) -> int:
    """Matmul FLOPs of the backward pass of a segment: gradients are computed only where they are needed
    (segment_work says how)."""
    return segment_work(spec, start, stop, batch, seq, ranks, head, input_requires_grad, full_finetune,
                        weight_grads)[1].flops


def activation_bytes(spec: ModelSpec, batch: int, seq: int, element_bytes: int = FP32) -> int:
    """Hidden states at a block boundary (what the client sends up), `element_bytes` a value."""
    return batch * seq * spec.d_model * element_bytes


def smashed_bytes(spec: ModelSpec, batch: int, seq: int, element_bytes: int = FP32) -> int:
    """One upload: activations plus int64 labels and attention mask."""
    return activation_bytes(spec, batch, seq, element_bytes) + 2 * batch * seq * INT64


def dataset_bytes(examples: int, seq: int) -> int:
    """A client's training partition as the server trains on it: int64 input ids, labels and attention mask."""
    return 3 * examples * seq * INT64


def gradient_bytes(spec: ModelSpec, batch: int, seq: int, element_bytes: int = FP32) -> int:
    """One download: the gradient of the activations, same shape and dtype."""
    return activation_bytes(spec, batch, seq, element_bytes)


def largest_frame_bytes(spec: ModelSpec, batch: int, seq: int, max_rank: int, clients: int,
                        train_examples: int) -> int:
    """The largest tensor a real run puts in one ZeroMQ frame (each tensor is a frame; the JSON header frame has
    its own cap), in fp32 as the host trains: the activations at a split or their gradient (batch x seq x
    d_model), labels or attention mask (batch x seq int64), a LoRA factor stacked over every client plus a shared
    server-side piece (NAA, FLoRA: rank at most (clients + 1) x max_rank, times the widest projection; a single
    adapter's factor is smaller), or a client's partition (int64 indices of the training examples)."""
    widest = max(max(module_shape(spec, m)) for m in set(TARGET_MODULES[spec.family].values()))
    return max(activation_bytes(spec, batch, seq), batch * seq * INT64,
               (clients + 1) * max_rank * widest * FP32, train_examples * INT64)


def adapter_params(spec: ModelSpec, ranks: Ranks) -> int:
    """LoRA parameters: A (r x d_in) and B (d_out x r) for every adapted module."""
    total = 0
    for layer_ranks in ranks.values():
        for module, rank in layer_ranks.items():
            d_in, d_out = module_shape(spec, module)
            total += rank * (d_in + d_out)
    return total


def adapter_bytes(spec: ModelSpec, ranks: Ranks, element_bytes: int = FP32) -> int:
    """Size of the adapters (what a round uploads and broadcasts), `element_bytes` a value."""
    return adapter_params(spec, ranks) * element_bytes


def _block_params(spec: ModelSpec) -> int:
    """Parameters of one block: projections plus norms (and GPT-2's biases)."""
    projections = projection_params(spec)
    if spec.family == "gpt2":
        biases = 3 * spec.d_model + spec.d_model + spec.d_ff + spec.d_model  # c_attn, c_proj, c_fc, mlp c_proj
        return projections + biases + 2 * 2 * spec.d_model  # two LayerNorms with weight and bias
    return projections + 2 * spec.d_model  # two RMSNorms


def _segment_params(spec: ModelSpec, start: int, stop: int, embeddings: bool, head: bool) -> int:
    """Parameters a device holds for a segment; a tied head held with the embeddings is one matrix."""
    d, vocab_matrix = spec.d_model, spec.vocab_size * spec.d_model
    total = (stop - start) * _block_params(spec)
    if embeddings:
        total += vocab_matrix + spec.n_positions * d
    if head:
        final_norm = 2 * d if spec.family == "gpt2" else d
        shared = spec.tied_embeddings and embeddings
        total += final_norm + (0 if shared else vocab_matrix)
    return total


def weights_bytes(spec: ModelSpec, start: int, stop: int, embeddings: bool, head: bool,
                  element_bytes: int = FP32) -> int:
    """Weights of blocks start..stop-1, optionally the embeddings and the final norm + LM head."""
    return _segment_params(spec, start, stop, embeddings, head) * element_bytes


# The tensor each projection reads, by module-name suffix: projections reading one tensor save it once.
PROJECTION_INPUTS = {
    "llama": {"self_attn.q_proj": "attention input", "self_attn.k_proj": "attention input",
              "self_attn.v_proj": "attention input", "self_attn.o_proj": "attention output",
              "mlp.gate_proj": "MLP input", "mlp.up_proj": "MLP input", "mlp.down_proj": "MLP activation"},
    "gpt2": {"attn.c_attn": "attention input", "attn.c_proj": "attention output", "mlp.c_fc": "MLP input",
             "mlp.c_proj": "MLP activation"},
}


def block_saved_values(spec: ModelSpec, seq: int) -> int:
    """Values per token a block saves for its backward when gradients flow through it and none of its
    projections trains: the norms' inputs and statistics, q, k and v (keys and values repeated to every query
    head), the attention probabilities, and the MLP's activation inputs (LLaMA: gate, up and SiLU(gate); GPT-2:
    the four tensors of tanh-GELU). A frozen projection keeps nothing: its input gradient needs only W."""
    q = spec.n_heads * spec.head_dim
    mlp = 3 * spec.d_ff if spec.family == "llama" else 4 * spec.d_ff
    return 2 * norm_saved_values(spec) + 3 * q + spec.n_heads * seq + mlp


def norm_saved_values(spec: ModelSpec) -> int:
    """Values per token a norm saves when its input requires grad: the input and its statistics (RMSNorm:
    1/rms; LayerNorm: mean and 1/std)."""
    return spec.d_model + (1 if spec.family == "llama" else 2)


# Projections whose output autograd already saves when no adapter adds to it (the activation reads it, and
# LLaMA's product reads up): IWI's output probe keeps these for free.
SAVED_OUTPUTS = {"llama": {"mlp.gate_proj", "mlp.up_proj"}, "gpt2": {"mlp.c_fc"}}


def probe_output_values(spec: ModelSpec, adapted: dict[str, int]) -> int:
    """Values per token IWI's output probe (abs_sum) adds to a block: every output the probe keeps until the
    backward scores it that autograd does not already save (an adapter on a SAVED_OUTPUTS projection makes the
    activation read the sum, so the probe's base output is then extra). The output gradients are scored as
    they arrive and let go (training/probe.py). `adapted`: the block's modules with an adapter."""
    outputs = {m: module_shape(spec, m)[1] for m in TARGET_MODULES[spec.family].values()}
    free = sum(width for m, width in outputs.items() if m in SAVED_OUTPUTS[spec.family] and m not in adapted)
    return sum(outputs.values()) - free


def probe_root_values(spec: ModelSpec) -> int:
    """Values per token of the output gradients autograd returns to IWI's output probe on a client segment:
    those of the first block's projections that read its attention input, whose input needs no gradient (so
    their outputs are made to require one and are what autograd is asked for)."""
    reads = PROJECTION_INPUTS[spec.family]
    return sum(module_shape(spec, m)[1] for m in set(TARGET_MODULES[spec.family].values())
               if reads[m] == "attention input")


def projection_params(spec: ModelSpec) -> int:
    """Weights of one block's projections: the weight gradients IWI's sum_abs probe takes."""
    shapes = [module_shape(spec, m) for m in set(TARGET_MODULES[spec.family].values())]
    return sum(d_in * d_out for d_in, d_out in shapes)


def trained_input_values(spec: ModelSpec, modules: dict[str, int]) -> int:
    """Values per token a block saves only because projections train (`modules`: suffix -> rank; rank 0 with
    full fine-tuning): each trained projection's input, once per tensor read, and each adapter's rank-wide
    output of A, which B's gradient needs."""
    reads = PROJECTION_INPUTS[spec.family]
    inputs = {reads[m]: module_shape(spec, m)[0] for m in modules}
    return sum(inputs.values()) + sum(modules.values())


def training_memory_bytes(
    spec: ModelSpec,
    start: int,
    stop: int,
    batch: int,
    seq: int,
    ranks: Ranks,
    embeddings: bool,
    head: bool,
    full_finetune: bool = False,
    element_bytes: int = FP32,
    probe: str | None = None,
) -> int:
    """Estimated peak memory of training a segment: weights, optimiser state and saved activations.

    Trainable parameters cost 16 bytes each: in fp32 value, gradient, Adam m and v; in mixed precision (fp16,
    bf16) a half-precision value and gradient and an fp32 master copy, m and v. Frozen parameters and saved
    activations cost `element_bytes` a value.
    Saved activations follow autograd: a block that gradients flow through saves block_saved_values per token,
    blocks before the first trained one (client side, frozen embeddings) save nothing, and every trained
    projection adds trained_input_values (LLaMA's rotary tables, 2 seq head_dim values, once per segment). The
    head adds the logits and their gradient, 2 * tokens * vocab_size values. A segment without embeddings is a
    server segment, whose input requires grad. The first trained block counts its whole block_saved_values,
    though some of it may need no saving there (an upper bound: tests/test_costs.py).
    probe: the step is also IWI's probe (its measure, "abs_sum" or "sum_abs"; training/probe.py). Gradients then
    flow from the first block's projections on, so every block saves, all but a client's first norm (its
    input needs no grad); abs_sum adds probe_output_values per block and, on a client segment,
    probe_root_values, sum_abs every projection's input and its weight gradient (projection_params). Exact,
    checked against autograd in tests/test_costs.py: the saved tensors, the kept outputs and the returned
    gradients counted as if all alive at once (the returned gradients exist only at the backward's end, when
    most saved tensors are freed: a bound).
    """
    tokens = batch * seq
    weights = _segment_params(spec, start, stop, embeddings, head)
    trainable = weights if full_finetune else adapter_params(spec, _clip(ranks, start, stop))
    frozen = 0 if full_finetune else weights
    every_projection = {m: 0 for m in TARGET_MODULES[spec.family].values()}
    # Full fine-tuning of LLaMA's RMSNorm weights keeps both norms' normalised inputs as well.
    norm_inputs = 2 * spec.d_model if full_finetune and spec.family == "llama" else 0
    if probe not in (None, "abs_sum", "sum_abs"):
        raise ValueError(f"probe: abs_sum, sum_abs or None, not {probe!r}")
    saving = (not embeddings) or full_finetune or probe is not None
    activations = weight_grads = 0
    for layer in range(start, stop):
        adapted = {m: r for m, r in ranks.get(layer, {}).items() if r}
        trained = every_projection if full_finetune else adapted
        if probe == "sum_abs":
            trained = {**every_projection, **adapted}
            weight_grads += projection_params(spec)
        saving = saving or bool(trained)
        if saving:
            activations += tokens * (block_saved_values(spec, seq) + trained_input_values(spec, trained) + norm_inputs)
        if probe == "abs_sum":
            activations += tokens * probe_output_values(spec, adapted)
    if probe is not None and embeddings and not full_finetune and stop > start:
        activations -= tokens * norm_saved_values(spec)  # the first norm's input is the frozen embeddings'
        if probe == "abs_sum":
            activations += tokens * probe_root_values(spec)
    if saving and spec.family == "llama" and stop > start:
        activations += 2 * seq * spec.head_dim
    if head:
        activations += 2 * tokens * spec.vocab_size
    return (frozen + weight_grads + activations) * element_bytes + trainable * 16


def _clip(ranks: Ranks, start: int, stop: int) -> Ranks:
    """The adapters that live in blocks start..stop-1."""
    return {layer: r for layer, r in ranks.items() if start <= layer < stop}
