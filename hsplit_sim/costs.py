"""FLOPs, bytes and memory of model segments from a config alone (no torch), for the simulated clock.

FLOPs count matrix multiplications only, 2*m*k*n each, the way `torch.utils.flop_counter.FlopCounterMode`
counts them on the real modules (eager attention, PEFT LoRA), so the simulated clock and a profiler agree.
Bytes take the size of one value as a parameter (the simulated precision); by default fp32, which is what the
host trains in and what real frames carry.
"""

from dataclasses import dataclass

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


def _matmul(n: int, d_in: int, d_out: int, rank: int, x_grad: bool, trainable: bool) -> tuple[int, int, bool]:
    """(forward, backward, output requires grad) of x (n x d_in) @ W (d_in x d_out) plus a rank-r LoRA path.

    Autograd computes an input's gradient only if it requires grad: W's input gradient only when x
    requires grad, W's weight gradient only when W is trained. LoRA's A and B are always trained, and
    A's output always requires grad, so B's input gradient is always paid.
    """
    base = 2 * n * d_in * d_out
    forward = base
    backward = base * x_grad + base * trainable
    if rank:
        a, b = 2 * n * d_in * rank, 2 * n * rank * d_out
        forward += a + b
        backward += a * x_grad + a + 2 * b
    return forward, backward, x_grad or trainable or rank > 0


def _attention(spec: ModelSpec, batch: int, seq: int, q_grad: bool, k_grad: bool, v_grad: bool):
    """(forward, backward, output requires grad) of QK^T and PV; GQA repeats kv heads, so all n_heads count."""
    one = 2 * batch * spec.n_heads * seq * seq * spec.head_dim
    p_grad = q_grad or k_grad
    return 2 * one, one * (q_grad + k_grad + p_grad + v_grad), p_grad or v_grad


def _block(spec: ModelSpec, layer: int, batch: int, seq: int, ranks: Ranks, x_grad: bool, weight_grads: bool):
    """(forward, backward, output requires grad) of one transformer block, following requires-grad through it."""
    names, layer_ranks, n = TARGET_MODULES[spec.family], ranks.get(layer, {}), batch * seq

    def proj(target: str, grad: bool):
        module = names[target]
        return _matmul(n, *module_shape(spec, module), layer_ranks.get(module, 0), grad, weight_grads)

    if spec.family == "gpt2":
        q = k = v = proj("q", x_grad)  # fused c_attn: q, k and v share one output
        parts = [q]
    else:
        q, k, v = proj("q", x_grad), proj("k", x_grad), proj("v", x_grad)
        parts = [q, k, v]
    attention = _attention(spec, batch, seq, q[2], k[2], v[2])
    out = proj("o", attention[2])
    h_grad = x_grad or out[2]  # residual
    if spec.family == "gpt2":
        up = proj("up", h_grad)
        down = proj("down", up[2])
        parts += [attention, out, up, down]
    else:
        gate, up = proj("gate", h_grad), proj("up", h_grad)
        down = proj("down", gate[2] or up[2])
        parts += [attention, out, gate, up, down]
    return sum(p[0] for p in parts), sum(p[1] for p in parts), h_grad or down[2]


def _segment_flops(
    spec: ModelSpec, start: int, stop: int, batch: int, seq: int, ranks: Ranks, head: bool,
    input_requires_grad: bool, full_finetune: bool, weight_grads: bool = False,
) -> tuple[int, int]:
    """(forward, backward) FLOPs of blocks start..stop-1 and, if head, the LM head."""
    forward = backward = 0
    grad = input_requires_grad or full_finetune
    for layer in range(start, stop):
        f, b, grad = _block(spec, layer, batch, seq, ranks, grad, full_finetune or weight_grads)
        forward, backward = forward + f, backward + b
    if head:
        f, b, _ = _matmul(batch * seq, spec.d_model, spec.vocab_size, 0, grad, full_finetune)
        forward, backward = forward + f, backward + b
    return forward, backward


def forward_flops(spec: ModelSpec, start: int, stop: int, batch: int, seq: int, ranks: Ranks, head: bool) -> int:
    """Matmul FLOPs of the forward pass of blocks start..stop-1 (+ the LM head over every position if head)."""
    return _segment_flops(spec, start, stop, batch, seq, ranks, head, False, False)[0]


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
    """Matmul FLOPs of the backward pass of a segment: gradients are computed only where they are needed.

    input_requires_grad: the segment's input needs a gradient (a server segment sends it back to the
    client; a client segment starting at the frozen embeddings does not). Full fine-tuning trains the
    embeddings too, so there the input always requires grad and every weight gradient is paid.
    weight_grads: the blocks' frozen projections get gradients too (IWI's probe), embeddings and head not.
    """
    return _segment_flops(spec, start, stop, batch, seq, ranks, head, input_requires_grad, full_finetune,
                          weight_grads)[1]


def activation_bytes(spec: ModelSpec, batch: int, seq: int, element_bytes: int = FP32) -> int:
    """Hidden states at a block boundary (what the client sends up), `element_bytes` a value."""
    return batch * seq * spec.d_model * element_bytes


def smashed_bytes(spec: ModelSpec, batch: int, seq: int, element_bytes: int = FP32) -> int:
    """One upload: activations plus int64 labels and attention mask."""
    return activation_bytes(spec, batch, seq, element_bytes) + 2 * batch * seq * INT64


def gradient_bytes(spec: ModelSpec, batch: int, seq: int, element_bytes: int = FP32) -> int:
    """One download: the gradient of the activations, same shape and dtype."""
    return activation_bytes(spec, batch, seq, element_bytes)


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
    shapes = [module_shape(spec, m) for m in set(TARGET_MODULES[spec.family].values())]
    projections = sum(d_in * d_out for d_in, d_out in shapes)
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
) -> int:
    """Estimated peak memory of training a segment: weights, optimiser state and saved activations.

    Trainable parameters cost 16 bytes each: in fp32 value, gradient, Adam m and v; in mixed precision (fp16,
    bf16) a half-precision value and gradient and an fp32 master copy, m and v. Frozen parameters and saved
    activations cost `element_bytes` a value.
    Activations are an estimate: a block that gradients flow through saves, per token,
    8 d_model-sized + 4 d_ff-sized tensors plus n_heads * seq attention probabilities; blocks
    before the first trained one (client side, frozen embeddings) save nothing. The head adds the
    logits and their gradient, 2 * tokens * vocab_size values. A segment without embeddings is a
    server segment, whose input requires grad.
    """
    tokens = batch * seq
    weights = _segment_params(spec, start, stop, embeddings, head)
    trainable = weights if full_finetune else adapter_params(spec, _clip(ranks, start, stop))
    frozen = 0 if full_finetune else weights
    per_block = tokens * (8 * spec.d_model + 4 * spec.d_ff + spec.n_heads * seq)
    saving = (not embeddings) or full_finetune
    activations = 0
    for layer in range(start, stop):
        saving = saving or bool(ranks.get(layer))
        activations += per_block * saving
    if head:
        activations += 2 * tokens * spec.vocab_size
    return (frozen + activations) * element_bytes + trainable * 16


def _clip(ranks: Ranks, start: int, stop: int) -> Ranks:
    """The adapters that live in blocks start..stop-1."""
    return {layer: r for layer, r in ranks.items() if start <= layer < stop}
