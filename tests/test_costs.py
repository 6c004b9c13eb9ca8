"""The cost model against the real segments: FLOPs as FlopCounterMode counts them, values moved and kernels as
torch's dispatcher sees them, bytes as the tensors hold them."""

import os
import random
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from peft import get_peft_model

from hsplit_sim import costs
from hsplit_sim.costs import ModelSpec
from hsplit_sim.scenario.models import BUILTIN_MODELS
from hsplit_sim.training.probe import OutputProbe, WeightProbe
from hsplit_sim.training.split import SplitLM, lora_config
from tiny_models import counted, dispatched, plain_model

BATCH, SEQ, SPLIT, RANK = 2, 16, 2, 4
ALL = {"gpt2": ["q", "k", "v", "o", "up", "down"], "llama": ["q", "k", "v", "o", "gate", "up", "down"]}


def spec_of(name: str) -> ModelSpec:
    return ModelSpec.from_hf_config(BUILTIN_MODELS[name])


def lora_model(name: str, targets: list[str], layers: list[int]):
    spec = spec_of(name)
    config = lora_config(spec.family, costs.uniform_ranks(spec, targets, layers, RANK), 2.0)
    return get_peft_model(plain_model(name), config, adapter_name="c0")


def measure(lm: SplitLM, d_model: int, count=counted) -> dict:
    """What `count` finds in each of the four compute steps of one split iteration (FlopCounterMode's FLOPs by
    default)."""
    torch.manual_seed(1)
    ids = torch.randint(3, 1000, (BATCH, SEQ))
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    hidden = lm.client_forward(ids, mask, SPLIT)
    received = torch.randn(BATCH, SEQ, d_model, requires_grad=True)
    loss = lm.server_loss(received, mask, ids, SPLIT)
    gradient = torch.randn_like(hidden)
    return {
        "client_fwd": count(lambda: lm.client_forward(ids, mask, SPLIT)),
        # A client whose blocks carry no adapter and whose embeddings are frozen has nothing to back-propagate.
        "client_bwd": count(lambda: hidden.backward(gradient)) if hidden.requires_grad else count(lambda: None),
        "server_fwd": count(lambda: lm.server_loss(received, mask, ids, SPLIT)),
        "server_bwd": count(loss.backward),
    }


def predict(spec: ModelSpec, ranks: costs.Ranks, full_finetune: bool = False) -> dict[str, int]:
    n = spec.n_layers
    return {
        "client_fwd": costs.forward_flops(spec, 0, SPLIT, BATCH, SEQ, ranks, head=False),
        "client_bwd": costs.backward_flops(spec, 0, SPLIT, BATCH, SEQ, ranks, False, False, full_finetune),
        "server_fwd": costs.forward_flops(spec, SPLIT, n, BATCH, SEQ, ranks, head=True),
        "server_bwd": costs.backward_flops(spec, SPLIT, n, BATCH, SEQ, ranks, True, True, full_finetune),
    }


def predict_work(spec: ModelSpec, ranks: costs.Ranks) -> dict[str, costs.Work]:
    client = costs.segment_work(spec, 0, SPLIT, BATCH, SEQ, ranks, False, False)
    server = costs.segment_work(spec, SPLIT, spec.n_layers, BATCH, SEQ, ranks, True, True)
    return dict(zip(["client_fwd", "client_bwd", "server_fwd", "server_bwd"], [*client, *server]))


def assert_work_matches(predicted: costs.Work, measured: tuple[int, int], kernel_slack: int = 0):
    """Values within 2 % (eager ops the model folds together move slightly different amounts) and kernels
    exact."""
    values, kernels = measured
    assert predicted.values == pytest.approx(values, rel=0.02)
    assert abs(predicted.kernels - kernels) <= kernel_slack


LORA_CASES = [
    ("tiny-gpt2", ["q", "v"], [0, 1]),
    ("tiny-gpt2", ALL["gpt2"], [0, 1, 3]),
    ("tiny-gpt2", ["o"], [1, 2]),  # client block 0 has no adapter
    ("tiny-llama", ["q", "v"], [0, 1]),
    ("tiny-llama", ALL["llama"], [0, 1, 3]),
    ("tiny-llama", ["k", "up"], [1, 2]),  # client block 0 has no adapter
    ("tiny-llama", ["q"], [3]),  # client has no adapter at all: no backward
]


@pytest.mark.parametrize("name, targets, layers", LORA_CASES)
def test_lora_flops_match_flop_counter(name, targets, layers):
    spec = spec_of(name)
    measured = measure(SplitLM(lora_model(name, targets, layers)), spec.d_model)
    assert predict(spec, costs.uniform_ranks(spec, targets, layers, RANK)) == measured


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_full_finetune_flops_match_flop_counter(name):
    spec = spec_of(name)
    model = plain_model(name)
    model.requires_grad_(True)
    measured = measure(SplitLM(model), spec.d_model)
    assert predict(spec, {}, full_finetune=True) == measured
    # Every weight gradient is paid, so backward is about twice forward.
    assert measured["server_bwd"] == 2 * measured["server_fwd"]


@pytest.mark.parametrize("name, targets, layers", LORA_CASES)
def test_lora_values_and_kernels_match_the_dispatcher(name, targets, layers):
    spec = spec_of(name)
    measured = measure(SplitLM(lora_model(name, targets, layers)), spec.d_model, dispatched)
    predicted = predict_work(spec, costs.uniform_ranks(spec, targets, layers, RANK))
    for step, work in predicted.items():
        assert_work_matches(work, measured[step])


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_whole_model_values_and_kernels_match_the_dispatcher(name):
    """The whole model in one pass (the federated and centralised step), LoRA and full fine-tuning: the
    embeddings' and the tied head's dense gradients, LayerNorm and bias gradients."""
    spec = spec_of(name)
    ids = torch.randint(3, 1000, (BATCH, SEQ))
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    full = plain_model(name)
    full.requires_grad_(True)
    ranks = costs.uniform_ranks(spec, ["q", "v"], range(spec.n_layers), RANK)
    for model, ranks, full_finetune in [(full, {}, True), (lora_model(name, ["q", "v"], range(4)), ranks, False)]:
        lm = SplitLM(model)
        loss = lm.loss(ids, mask, ids)
        forward, backward = costs.segment_work(spec, 0, spec.n_layers, BATCH, SEQ, ranks, True, False, full_finetune)
        assert_work_matches(forward, dispatched(lambda: lm.loss(ids, mask, ids)))
        # GPT-2's full backward runs one kernel fewer than modelled: autograd sums the tied matrix's two
        # gradients into one it already holds.
        assert_work_matches(backward, dispatched(loss.backward), kernel_slack=1)


def test_optimizer_work_matches_the_dispatcher():
    """AdamW over two adapters' A and B: nine kernels a tensor, 19 values a parameter (21 with weight decay)."""
    spec = spec_of("tiny-llama")
    ranks = {0: {"self_attn.q_proj": 4}, 1: {"mlp.down_proj": 2}}
    shapes = [(4, 128), (128, 4), (2, 344), (128, 2)]
    for weight_decay in (0.0, 0.1):
        params = [torch.nn.Parameter(torch.randn(shape)) for shape in shapes]
        for p in params:
            p.grad = torch.randn_like(p)
        optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=weight_decay)
        optimizer.step()  # the first step creates the state
        values, kernels = dispatched(optimizer.step)
        work = costs.optimizer_work(spec, ranks, weight_decay)
        assert work.pointwise_values == pytest.approx(values, rel=0.01)
        assert work.kernels == kernels


def test_work_hand_worked():
    """One adapter merged, by hand: B (4 x 2) @ A (2 x 3) is 2*4*2*3 = 48 FLOPs over 8 + 6 + 12 values; the
    addition into W reads W and the product and writes W, 3 x 12 values; two kernels. AdamW on its A and B:
    14 parameters x 19 values, 2 tensors x 9 kernels."""
    merge = costs.merge_work([(4, 2, 3)])
    assert merge == costs.Work(((1, 48, 26),), 36, 2)
    assert (merge.flops, merge.values) == (48, 62)
    spec = ModelSpec("llama", 1, 3, 1, 1, 3, 4, 10)  # d_model 3, d_ff 4: down_proj is 3 x 4
    optimizer = costs.optimizer_work(spec, {0: {"mlp.down_proj": 2}})
    assert optimizer == costs.Work((), 14 * 19, 18)
    both = merge + merge + optimizer
    assert both == costs.Work(((2, 48, 26),), 2 * 36 + 14 * 19, 22)


@pytest.mark.parametrize("name, targets", [("tiny-gpt2", ALL["gpt2"]), ("tiny-llama", ALL["llama"])])
def test_link_bytes_match_tensors(name, targets):
    spec = spec_of(name)
    peft_model = lora_model(name, targets, [0, 2])
    lm = SplitLM(peft_model)
    ids = torch.randint(3, 1000, (BATCH, SEQ))
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    labels = ids.clone()
    hidden = lm.client_forward(ids, mask, SPLIT)
    assert costs.activation_bytes(spec, BATCH, SEQ) == hidden.nbytes
    assert costs.gradient_bytes(spec, BATCH, SEQ) == torch.randn_like(hidden).nbytes
    assert costs.smashed_bytes(spec, BATCH, SEQ) == hidden.nbytes + labels.nbytes + mask.nbytes
    lora = sum(p.nbytes for n, p in peft_model.named_parameters() if "lora_" in n and ".c0." in n)
    assert costs.adapter_bytes(spec, costs.uniform_ranks(spec, targets, [0, 2], RANK)) == lora


def test_adapter_bytes_per_module_ranks():
    spec = spec_of("tiny-llama")  # d 128, 4 heads x 32, 2 kv heads, d_ff 344
    ranks = {0: {"self_attn.q_proj": 8, "self_attn.k_proj": 2}, 3: {"mlp.down_proj": 4}}
    assert costs.adapter_bytes(spec, ranks) == 4 * (8 * (128 + 128) + 2 * (128 + 64) + 4 * (344 + 128))


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_weights_bytes_match_parameters(name):
    spec = spec_of(name)
    lm = SplitLM(plain_model(name))
    embeddings = [lm.backbone.embed_tokens] if spec.family == "llama" else [lm.backbone.wte, lm.backbone.wpe]

    def nbytes(modules):
        unique = {id(p): p for m in modules for p in m.parameters()}  # the tied head is the embedding matrix
        return sum(p.nbytes for p in unique.values())

    client = embeddings + list(lm.blocks[:SPLIT])
    server = list(lm.blocks[SPLIT:]) + [lm.final_norm, lm.head]
    assert costs.weights_bytes(spec, 0, SPLIT, embeddings=True, head=False) == nbytes(client)
    assert costs.weights_bytes(spec, SPLIT, spec.n_layers, embeddings=False, head=True) == nbytes(server)
    assert costs.weights_bytes(spec, 0, spec.n_layers, embeddings=True, head=True) == nbytes([lm.model])


def saved_bytes(lm: SplitLM, fn) -> int:
    """Bytes of the tensors autograd saves while fn runs, parameters excluded, each storage once."""
    params = {p.untyped_storage().data_ptr() for p in lm.model.parameters()}
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return sum(saved.values())


def activations(spec, start, stop, ranks, embeddings, full_finetune=False) -> int:
    """training_memory_bytes less its weights, adapters and optimiser state: the saved activations."""
    trainable = (costs.weights_bytes(spec, start, stop, embeddings, False) // 4 if full_finetune
                 else costs.adapter_params(spec, costs._clip(ranks, start, stop)))
    frozen = 0 if full_finetune else costs.weights_bytes(spec, start, stop, embeddings, False)
    return (costs.training_memory_bytes(spec, start, stop, BATCH, SEQ, ranks, embeddings, False, full_finetune)
            - frozen - 16 * trainable)


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_saved_activations_are_what_autograd_saves(name):
    """Per-weight ranks at random: a server segment (its input requires grad) saves exactly what the model
    says, each adapted projection's input and A's output included; a client segment at most that, and less by
    at most one block's adapter-free saving (its first adapted block needs only part of it). Full fine-tuning
    exactly."""
    spec = spec_of(name)
    rng = random.Random(0)
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    ids = torch.randint(3, 1000, (BATCH, SEQ))
    for _ in range(6):
        ranks = {}
        for layer in range(spec.n_layers):
            for module in set(costs.TARGET_MODULES[spec.family].values()):
                if rng.random() < 0.3:
                    ranks.setdefault(layer, {})[module] = rng.choice([1, 4, 8])
        lm = SplitLM(get_peft_model(plain_model(name), lora_config(spec.family, ranks, 2.0), adapter_name="c0"))
        received = torch.randn(BATCH, SEQ, spec.d_model, requires_grad=True)
        server = saved_bytes(lm, lambda: lm.blocks_forward(received, mask, SPLIT, spec.n_layers))
        assert activations(spec, SPLIT, spec.n_layers, ranks, embeddings=False) == server
        client = saved_bytes(lm, lambda: lm.client_forward(ids, mask, SPLIT))
        modelled = activations(spec, 0, SPLIT, ranks, embeddings=True)
        assert client <= modelled <= client + 4 * BATCH * SEQ * costs.block_saved_values(spec, SEQ)
    full = plain_model(name)
    full.requires_grad_(True)
    lm = SplitLM(full)
    received = torch.randn(BATCH, SEQ, spec.d_model, requires_grad=True)
    assert (activations(spec, 0, spec.n_layers, {}, embeddings=False, full_finetune=True)
            == saved_bytes(lm, lambda: lm.blocks_forward(received, mask, 0, spec.n_layers)))


def test_trained_input_values_by_hand():
    llama = spec_of("tiny-llama")  # d 128, d_ff 344
    # q, k and v read one normed input; down reads the 344-wide activation; each adapter adds its rank.
    assert costs.trained_input_values(llama, {"self_attn.q_proj": 4, "self_attn.k_proj": 8}) == 128 + 12
    assert costs.trained_input_values(llama, {"mlp.down_proj": 2, "self_attn.o_proj": 1}) == 344 + 128 + 3
    # block_saved_values: norms (2 x (128 + 1)), q, k, v (3 x 128), probabilities (4 heads x seq), 3 x d_ff.
    assert costs.block_saved_values(llama, 16) == 258 + 384 + 64 + 1032


def test_training_memory_composition():
    spec = spec_of("tiny-llama")
    weights = costs.weights_bytes(spec, 0, SPLIT, True, False)
    # Frozen embeddings and adapter-free client blocks save no activations.
    server_only = costs.uniform_ranks(spec, ["q"], [2, 3], RANK)
    assert costs.training_memory_bytes(spec, 0, SPLIT, BATCH, SEQ, server_only, True, False) == weights
    ranks = costs.uniform_ranks(spec, ["q"], [1], RANK)
    tokens = BATCH * SEQ
    block = tokens * (costs.block_saved_values(spec, SEQ)) * 4
    rotary = 2 * SEQ * spec.head_dim * 4
    q_kept = tokens * (spec.d_model + RANK) * 4  # q's input and A's output
    adapters = costs.adapter_bytes(spec, ranks)
    assert (costs.training_memory_bytes(spec, 0, SPLIT, BATCH, SEQ, ranks, True, False)
            == weights + 4 * adapters + block + q_kept + rotary)
    # Full fine-tuning: every weight is trained (value, gradient, Adam m, v) and every block saves, with every
    # projection's input and both normalised inputs for the RMSNorm weights.
    full = costs.training_memory_bytes(spec, 0, SPLIT, BATCH, SEQ, {}, True, False, full_finetune=True)
    inputs = tokens * (3 * spec.d_model + spec.d_ff + 2 * spec.d_model) * 4
    assert full == 4 * weights + SPLIT * (block + inputs) + rotary
    # The head adds logits and their gradient.
    head = costs.training_memory_bytes(spec, spec.n_layers, spec.n_layers, BATCH, SEQ, {}, False, True)
    head_weights = costs.weights_bytes(spec, spec.n_layers, spec.n_layers, False, True)
    assert head == head_weights + 2 * tokens * spec.vocab_size * 4


def test_from_hf_config_defaults():
    smol = spec_of("smollm2-135m")
    shape = (smol.n_layers, smol.d_model, smol.n_heads, smol.n_kv_heads, smol.head_dim, smol.d_ff)
    assert shape == (30, 576, 9, 3, 64, 1536)
    gpt2 = ModelSpec.from_hf_config(
        {"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 4, "n_inner": None, "vocab_size": 50}
    )
    assert (gpt2.d_ff, gpt2.head_dim, gpt2.n_kv_heads, gpt2.tied_embeddings) == (256, 16, 4, True)
    llama = ModelSpec.from_hf_config(
        {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
         "intermediate_size": 100, "vocab_size": 50}
    )
    assert (llama.n_kv_heads, llama.head_dim, llama.tied_embeddings) == (4, 16, False)
    with pytest.raises(ValueError, match="unsupported"):
        ModelSpec.from_hf_config({"model_type": "bert"})


def test_uniform_ranks_and_shapes():
    gpt2, llama = spec_of("tiny-gpt2"), spec_of("tiny-llama")
    assert costs.uniform_ranks(gpt2, ["q", "v", "o"], [0, 1], 8) == {
        0: {"attn.c_attn": 8, "attn.c_proj": 8},
        1: {"attn.c_attn": 8, "attn.c_proj": 8},
    }
    assert costs.module_shape(gpt2, "attn.c_attn") == (128, 384)
    assert costs.module_shape(llama, "self_attn.k_proj") == (128, 64)
    assert costs.module_shape(llama, "mlp.down_proj") == (344, 128)
    with pytest.raises(ValueError, match="no module"):
        costs.module_shape(llama, "attn.c_attn")


def test_costs_do_not_import_torch():
    code = "import sys, hsplit_sim.costs; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


PROBED_RANKS = [
    ("tiny-gpt2", {}),
    ("tiny-gpt2", {0: {"attn.c_attn": 4}, 3: {"mlp.c_fc": 8, "attn.c_proj": 2}}),
    ("tiny-gpt2", {1: {"mlp.c_proj": 4}, 2: {"attn.c_attn": 16}}),  # client block 0 has no adapter
    ("tiny-gpt2", {1: {"mlp.c_fc": 4, "attn.c_attn": 2}, 3: {"mlp.c_fc": 8}}),  # GELU reads the adapted sum
    ("tiny-llama", {}),
    ("tiny-llama", {0: {"self_attn.q_proj": 4, "mlp.down_proj": 8}, 2: {"self_attn.v_proj": 16}}),
    ("tiny-llama", {1: {"mlp.up_proj": 4}, 3: {"self_attn.k_proj": 8}}),
    ("tiny-llama", {1: {"mlp.gate_proj": 4, "self_attn.o_proj": 2}, 2: {"mlp.gate_proj": 4, "mlp.up_proj": 8}}),
]


def probed_bytes(lm: SplitLM, spec: ModelSpec, side: str, probe) -> int:
    """Bytes a probed step holds beside its parameters, each storage once: what autograd saves in the forward,
    the outputs the probe keeps, and the gradients autograd returns for them (for WeightProbe, the weights'),
    as if all were alive at once. Every saved tensor is held here, so no storage is freed and reused."""
    params = {p.untyped_storage().data_ptr() for p in lm.model.parameters()}
    held, found = [], {}

    def count(tensor):
        storage = tensor.untyped_storage()
        held.append(tensor)
        if storage.data_ptr() not in params:
            found[storage.data_ptr()] = storage.nbytes()
        return tensor

    torch.manual_seed(1)
    ids = torch.randint(3, 1000, (BATCH, SEQ))
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    received = torch.randn(BATCH, SEQ, spec.d_model, requires_grad=True)
    trained = [p for p in lm.model.parameters() if p.requires_grad]
    with torch.autograd.graph.saved_tensors_hooks(count, lambda tensor: tensor), probe:
        if side == "client":
            out, inputs = lm.client_forward(ids, mask, SPLIT), []
        else:
            out, inputs = lm.blocks_forward(received, mask, SPLIT, spec.n_layers), [received]
    for output in getattr(probe, "outputs", {}).values():  # the output probe's kept outputs (the weights are params)
        count(output)
    with probe:
        grads = torch.autograd.grad(out, inputs + trained + probe.inputs(), torch.randn_like(out), allow_unused=True)
    for grad in grads[len(inputs) + len(trained):]:
        count(grad)
    return sum(found.values())


@pytest.mark.parametrize("name, ranks", PROBED_RANKS)
def test_probed_memory_is_what_autograd_and_the_probe_hold(name, ranks):
    """IWI's probe step, both measures, a client segment (frozen embeddings, adapters from any block or none,
    as round 0's probe of the base model) and a server segment: training_memory_bytes(probe=...) less weights
    and adapter state is exactly the saved tensors, kept outputs and returned gradients."""
    spec = spec_of(name)
    model = plain_model(name)
    if ranks:
        model = get_peft_model(model, lora_config(spec.family, ranks, 2.0), adapter_name="c0")
    lm = SplitLM(model)
    for side, (start, stop, embeddings) in [("client", (0, SPLIT, True)), ("server", (SPLIT, spec.n_layers, False))]:
        beside = (costs.weights_bytes(spec, start, stop, embeddings, False)
                  + 16 * costs.adapter_params(spec, costs._clip(ranks, start, stop)))
        for measure, probe in [("abs_sum", OutputProbe), ("sum_abs", WeightProbe)]:
            modelled = costs.training_memory_bytes(spec, start, stop, BATCH, SEQ, ranks, embeddings, False,
                                                   probe=measure) - beside
            assert modelled == probed_bytes(lm, spec, side, probe(lm, start, stop)), (side, measure)
        # The probe holds more than a plain step.
        assert (costs.training_memory_bytes(spec, start, stop, BATCH, SEQ, ranks, embeddings, False, probe="abs_sum")
                > costs.training_memory_bytes(spec, start, stop, BATCH, SEQ, ranks, embeddings, False))


def test_probe_output_values_by_hand():
    llama, gpt2 = spec_of("tiny-llama"), spec_of("tiny-gpt2")  # llama: d 128, kv 64, d_ff 344; gpt2: d_ff 512
    # Every output but gate's and up's (SiLU and its product save those already) kept until scored: q 128, k 64,
    # v 64, o 128, down 128; the roots autograd returns, on a client: block 0's q, k and v.
    assert costs.probe_output_values(llama, {}) == 512
    assert costs.probe_output_values(llama, {"mlp.gate_proj": 4}) == 512 + 344
    assert costs.probe_root_values(llama) == 256
    # GPT-2: c_attn 384, c_proj 128, c_fc 512 (GELU saves it), mlp c_proj 128.
    assert costs.probe_output_values(gpt2, {}) == 1152 - 512
    assert costs.probe_output_values(gpt2, {"mlp.c_fc": 8, "attn.c_attn": 4}) == 1152
    assert costs.probe_root_values(gpt2) == 384
    assert costs.projection_params(llama) == 2 * 128 * 128 + 2 * 128 * 64 + 3 * 128 * 344
    with pytest.raises(ValueError, match="probe"):
        costs.training_memory_bytes(llama, 0, 1, 1, 1, {}, True, False, probe="abs")
