"""One LoRA scaling for every rank: what an adapter adds to a projection's output is s * B @ A x whatever its rank
(alpha proportional to rank), as the aggregation rules assume."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from peft import get_peft_model

from hsplit_sim.training.split import lora_config
from tiny_models import plain_model

SCALING = 2.0


@pytest.mark.parametrize("name, ranks", [
    ("tiny-llama", {0: {"self_attn.q_proj": 4, "mlp.down_proj": 16}, 2: {"self_attn.v_proj": 8}}),
    ("tiny-gpt2", {1: {"attn.c_attn": 16}, 3: {"mlp.c_fc": 4}}),
])
def test_every_rank_updates_with_the_same_scaling(name, ranks):
    model = get_peft_model(plain_model(name), lora_config(model_family(name), ranks, SCALING), adapter_name="c0")
    torch.manual_seed(3)
    checked = 0
    for module in model.modules():
        if not hasattr(module, "lora_A") or "c0" not in module.lora_A:
            continue
        a, b = module.lora_A["c0"].weight, module.lora_B["c0"].weight
        with torch.no_grad():
            b.copy_(torch.randn_like(b))  # B starts at zero: give the adapter an update to see
            x = torch.randn(3, a.shape[1])
            with_adapter = module(x)
            with model.disable_adapter():
                base = module(x)
        assert module.scaling["c0"] == pytest.approx(SCALING)
        torch.testing.assert_close(with_adapter - base, SCALING * x @ a.T @ b.T, rtol=1e-5, atol=1e-5)
        checked += 1
    assert checked == sum(len(modules) for modules in ranks.values())


def model_family(name: str) -> str:
    return "llama" if "llama" in name else "gpt2"
