"""A causal LM cut at a block boundary: client segment (embeddings + blocks 0..s-1), server segment (the rest + loss)."""

import torch
import torch.nn.functional as F
from peft import LoraConfig

from hsplit_sim.costs import TARGET_MODULES

LAYERS_PATTERN = {"llama": "layers", "gpt2": "h"}


def family_of(model) -> str:
    model_type = model.config.model_type
    if model_type not in TARGET_MODULES:
        raise ValueError(f"unsupported model family {model_type!r}")
    return model_type


def module_key(family: str, layer: int, module: str) -> str:
    """The name suffix of one weight in a block, e.g. "layers.3.self_attn.q_proj"."""
    return f"{LAYERS_PATTERN[family]}.{layer}.{module}"


def lora_config(family: str, ranks: dict[int, dict[str, int]], scaling: float) -> LoraConfig:
    """LoRA with its own rank on every listed weight (layer -> {module suffix: rank}); dropout 0 keeps
    split and unsplit runs identical. Every weight updates with the same scaling (its alpha is scaling x its
    rank; PEFT's scaling is alpha / rank)."""
    pattern = {module_key(family, layer, module): rank
               for layer, modules in ranks.items() for module, rank in modules.items() if rank > 0}
    if not pattern:
        raise ValueError("an adapter needs at least one weight with a positive rank")
    return LoraConfig(
        r=max(pattern.values()),
        lora_alpha=scaling * max(pattern.values()),
        lora_dropout=0.0,
        target_modules=sorted(pattern),
        rank_pattern=pattern,
        alpha_pattern={key: scaling * rank for key, rank in pattern.items()},
        bias="none",
        fan_in_fan_out=family == "gpt2",
    )


class SplitLM:
    """Runs any range of blocks of a (possibly PEFT-wrapped) Hugging Face causal LM."""

    def __init__(self, model):
        self.model = model
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.family = family_of(inner)
        self.backbone = inner.model if self.family == "llama" else inner.transformer
        self.blocks = self.backbone.layers if self.family == "llama" else self.backbone.h
        self.final_norm = self.backbone.norm if self.family == "llama" else self.backbone.ln_f
        self.head = inner.lm_head
        self.n_layers = len(self.blocks)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.family == "llama":
            return self.backbone.embed_tokens(input_ids)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.backbone.wte(input_ids) + self.backbone.wpe(positions)[None]

    def blocks_forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        mask = additive_causal_mask(attention_mask, hidden.dtype)
        kwargs = {}
        if self.family == "llama":
            position_ids = torch.arange(hidden.shape[1], device=hidden.device)[None]
            kwargs = {"position_ids": position_ids, "position_embeddings": self.backbone.rotary_emb(hidden, position_ids)}
        for block in self.blocks[start:stop]:
            hidden = block(hidden, attention_mask=mask, **kwargs)
        return hidden

    def client_forward(self, input_ids, attention_mask, split: int) -> torch.Tensor:
        return self.blocks_forward(self.embed(input_ids), attention_mask, 0, split)

    def server_logits(self, hidden, attention_mask, split: int) -> torch.Tensor:
        hidden = self.blocks_forward(hidden, attention_mask, split, self.n_layers)
        return self.head(self.final_norm(hidden))

    def server_loss(self, hidden, attention_mask, labels, split: int) -> torch.Tensor:
        return causal_lm_loss(self.server_logits(hidden, attention_mask, split), labels)

    def loss(self, input_ids, attention_mask, labels) -> torch.Tensor:
        """The whole model in one pass (one causal mask, as the cost model charges it)."""
        return self.server_loss(self.embed(input_ids), attention_mask, labels, 0)


def additive_causal_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(b, 1, L, L) mask: 0 where a query may attend (causal and not padding), the dtype's minimum elsewhere."""
    length = attention_mask.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=attention_mask.device).tril()
    allowed = causal[None, None] & attention_mask[:, None, None, :].bool()
    return torch.zeros(allowed.shape, dtype=dtype, device=attention_mask.device).masked_fill(
        ~allowed, torch.finfo(dtype).min
    )


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss over labelled positions (-100 marks prompt and padding)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
