"""Real tiny model segments, FLOP counting and operation counting, shared by the cost-model tests."""

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode
from transformers import CONFIG_MAPPING, AutoModelForCausalLM

from hsplit_sim.scenario.models import BUILTIN_MODELS


def plain_model(name: str):
    """A built-in tiny model, frozen, in eval mode, with eager attention (every matmul visible)."""
    config = dict(BUILTIN_MODELS[name])
    config = CONFIG_MAPPING[config.pop("model_type")](**config)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    model.requires_grad_(False)
    return model


def counted(fn) -> int:
    """FLOPs of what fn runs, as torch's FlopCounterMode counts them."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _stored(tensor: torch.Tensor) -> int:
    """Values a tensor really holds: a broadcast (stride-0) dimension is one value wide."""
    values = 1
    for size, stride in zip(tensor.shape, tensor.stride()):
        if stride:
            values *= size
    return values


class _Dispatched(TorchDispatchMode):
    """Counts the kernels eager PyTorch runs and the values each reads and writes; views move nothing."""

    SKIPPED = {"detach", "_unsafe_view", "_record_function_enter_new", "_record_function_exit"}

    def __init__(self):
        super().__init__()
        self.values = self.kernels = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view or func.overloadpacket.__name__ in self.SKIPPED:
            return out
        inputs = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        outputs = [a for a in tree_flatten(out)[0] if isinstance(a, torch.Tensor)]
        if func.overloadpacket.__name__ == "embedding":  # reads the looked-up rows, not the whole table
            inputs = inputs[1:] + outputs
        self.values += sum(_stored(t) for t in inputs + outputs)
        self.kernels += 1
        return out


def dispatched(fn) -> tuple[int, int]:
    """(values read and written, kernels) of what fn runs, counted at torch's dispatcher."""
    with _Dispatched() as counter:
        fn()
    return counter.values, counter.kernels
