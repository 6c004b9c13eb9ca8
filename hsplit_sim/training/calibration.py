"""Measured step times of real model segments on this host, for calibrating the time model.

Each step is run the way a worker runs it (training/roles.py): a client's forward of blocks 0..s-1, its
backward (autograd.grad from the server's gradient) and AdamW step, and the server's forward, loss, backward
and AdamW step of blocks s..n-1 with the head. Adapters: rank 8 on q and v of every block.
"""

import statistics
import time
from dataclasses import dataclass

import torch
from peft import get_peft_model

from hsplit_sim import costs
from hsplit_sim.scenario.models import BUILTIN_MODELS
from hsplit_sim.sim.calibration import RANK, TARGETS
from hsplit_sim.training.models import load_model
from hsplit_sim.training.split import SplitLM, family_of, lora_config


@dataclass(frozen=True)
class Shape:
    """One segment shape to time: a model, a split point and a batch of batch x seq tokens."""

    model: str
    split: int
    batch: int
    seq: int


@dataclass(frozen=True)
class Measured:
    shape: Shape
    kind: str
    seconds: float  # median over the repeats


WARM_UPS = 3  # allocator, lazy initialisation, the optimiser's state, thread pools


def _timed(step, repeats: int) -> list[float]:
    for _ in range(WARM_UPS):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def _median_seconds(step, repeats: int) -> float:
    return statistics.median(_timed(step, repeats))


def default_shapes(models: list[str]) -> list[Shape]:
    """A shallow and a deep split at a few batch shapes per model; fewer and smaller for SmolLM2 (seconds a
    step here)."""
    shapes = []
    for model in models:
        n = costs.ModelSpec.from_hf_config(BUILTIN_MODELS[model]).n_layers
        if model in ("tiny-gpt2", "tiny-llama"):
            batches = [(1, 16), (2, 32), (4, 64), (8, 128)]
        else:
            batches = [(1, 32), (2, 64)]
        shapes += [Shape(model, split, b, L) for split in sorted({1, n // 2, n - 1}) for b, L in batches]
    return shapes


def _adapted(name: str):
    """The model with the calibration's adapters on every block, as the cost model is asked about."""
    model = load_model(name, None)
    spec = costs.ModelSpec.from_hf_config(BUILTIN_MODELS[name])
    ranks = costs.uniform_ranks(spec, TARGETS, range(spec.n_layers), RANK)
    torch.manual_seed(0)
    peft = get_peft_model(model, lora_config(family_of(model), ranks, 2.0), adapter_name="c0")
    return peft, spec, ranks


def measure_shapes(shapes: list[Shape], repeats: int, progress=None) -> list[Measured]:
    """The median seconds of each kind of step at each shape; progress(done, total) after each shape."""
    measured, models = [], {}
    for done, shape in enumerate(shapes, 1):
        if shape.model not in models:
            models.clear()  # one model in memory at a time
            models[shape.model] = _adapted(shape.model)
        peft, spec, _ = models[shape.model]
        measured += _measure(peft, spec.vocab_size, shape, repeats)
        if progress:
            progress(done, len(shapes))
    return measured


def _measure(peft, vocab_size: int, shape: Shape, repeats: int) -> list[Measured]:
    lm = SplitLM(peft)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab_size, (shape.batch, shape.seq), generator=generator)
    mask = torch.ones_like(ids)
    client_params = [p for n, p in peft.named_parameters() if "lora_" in n and _layer(n) < shape.split]
    server_params = [p for n, p in peft.named_parameters() if "lora_" in n and _layer(n) >= shape.split]
    for p in client_params + server_params:
        p.requires_grad_(True)
    client_opt = torch.optim.AdamW(client_params, lr=1e-4)
    server_opt = torch.optim.AdamW(server_params, lr=1e-4)
    hidden = lm.client_forward(ids, mask, shape.split).detach()
    upstream = torch.randn(hidden.shape, generator=generator)

    def client_fwd():  # with its graph, as a worker keeps it for the backward
        return lm.client_forward(ids, mask, shape.split)

    def client_bwd(out):
        grads = torch.autograd.grad(out, client_params, grad_outputs=upstream)
        for param, grad in zip(client_params, grads):
            param.grad = grad
        client_opt.step()

    def server_step():
        received = hidden.clone().requires_grad_(True)
        server_opt.zero_grad(set_to_none=True)
        lm.server_loss(received, mask, ids, shape.split).backward()
        server_opt.step()

    forward = _median_seconds(client_fwd, repeats)
    backward = _median_pass(client_fwd, client_bwd, repeats)
    server = _median_seconds(server_step, repeats)
    return [Measured(shape, "client_fwd", forward), Measured(shape, "client_bwd", backward),
            Measured(shape, "server_step", server)]


def _median_pass(forward, backward, repeats: int) -> float:
    """The backward alone: each repeat runs a fresh forward untimed."""
    for _ in range(WARM_UPS):
        backward(forward())
    times = []
    for _ in range(repeats):
        out = forward()
        start = time.perf_counter()
        backward(out)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _layer(parameter_name: str) -> int:
    parts = parameter_name.split(".")
    for before, part in zip(parts, parts[1:]):
        if before in ("layers", "h") and part.isdigit():
            return int(part)
    raise ValueError(f"no layer index in {parameter_name}")


def memory_bandwidth_gbps(values: int = 2**25, repeats: int = 5) -> float:
    """Measured copy bandwidth: c = a + b over three arrays of `values` fp32 values (reads 2, writes 1)."""
    a, b, c = torch.ones(values), torch.ones(values), torch.empty(values)
    seconds = min(_timed(lambda: torch.add(a, b, out=c), repeats))  # the fastest: least disturbed by other work
    return 3 * values * 4 / seconds / 1e9


def matmul_tflops(size: int = 2048, repeats: int = 5) -> float:
    """Measured rate of one large fp32 matmul: the practical peak of this host."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    seconds = min(_timed(lambda: a @ b, repeats))  # the fastest: least disturbed by other work
    return 2 * size**3 / seconds / 1e12


def torch_threads() -> int:
    return torch.get_num_threads()
