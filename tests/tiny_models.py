"""Real tiny model segments and FLOP counting, shared by the cost-model tests."""

import torch
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
