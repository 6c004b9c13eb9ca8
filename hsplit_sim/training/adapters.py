"""Adapters that own their tensors, lent to a PEFT model's LoRA slots while they run.

A worker hosts up to thousands of virtual clients. As named PEFT adapters, every switch, read and write of one
would walk all of them (PEFT's set_adapter and state-dict functions visit every adapter of every module). So the
PEFT model holds one adapter slot per layout (ranks per module and scaling), and a second copy only where two
adapters of one layout are active together; every adapter owns its nn.Parameters, and running it puts them into
its slot's LoRA modules: O(modules), whatever the number of adapters.
"""

from dataclasses import dataclass

import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer


@dataclass
class Adapter:
    """One adapter's own weights: A then B of every module of its layout, in PEFT's parameter order."""

    layout: tuple
    keys: list[str]  # PEFT's state-dict keys (get_peft_model_state_dict), one per parameter
    params: list[torch.nn.Parameter]

    def state(self) -> dict[str, torch.nn.Parameter]:
        return dict(zip(self.keys, self.params))


@dataclass
class _Layout:
    config: LoraConfig
    keys: list[str]
    initial: list[torch.Tensor]  # what PEFT gave the first slot: every adapter of the layout starts from it
    rng: torch.Tensor  # torch's CPU random state once that slot was made
    slots: list[tuple[str, list[torch.nn.Module]]]  # per copy, its name and the LoRA A and B modules it lends


class AdapterSlots:
    """The PEFT model around the frozen base model, and its slots, made on first need."""

    def __init__(self, model: torch.nn.Module, seed: int):
        self.model, self.seed = model, seed
        self.peft = None
        self.layouts: dict[tuple, _Layout] = {}

    def new(self, config: LoraConfig) -> Adapter:
        """A fresh adapter (A random, B zero) as PEFT makes one right after torch.manual_seed(seed): every adapter
        of a layout starts the same, and torch's random state afterwards is the same as if PEFT had made it."""
        key = (tuple(sorted(config.rank_pattern.items())), tuple(sorted(config.alpha_pattern.items())))
        torch.manual_seed(self.seed)
        layout = self.layouts.get(key)
        if layout is None:
            name, modules = slot = self._slot(config)
            keys = [f"{path}.{part}.weight" for path, module in self.peft.named_modules()
                    if isinstance(module, LoraLayer) and name in module.lora_A for part in ("lora_A", "lora_B")]
            layout = self.layouts[key] = _Layout(config, keys, [m.weight.detach().clone() for m in modules],
                                                 torch.get_rng_state(), [slot])
        else:
            torch.set_rng_state(layout.rng)
        return Adapter(key, layout.keys, [torch.nn.Parameter(t.clone()) for t in layout.initial])

    def _slot(self, config: LoraConfig) -> tuple[str, list[torch.nn.Module]]:
        name = f"slot{sum(len(layout.slots) for layout in self.layouts.values())}"
        if self.peft is None:
            self.peft = get_peft_model(self.model, config, adapter_name=name)
        else:
            self.peft.add_adapter(name, config)
        modules = [m for module in self.peft.modules() if isinstance(module, LoraLayer) and name in module.lora_A
                   for m in (module.lora_A[name], module.lora_B[name])]
        return name, modules

    def activate(self, adapters: list[Adapter]) -> None:
        """Make these adapters the active ones, in this order (their contributions add up in it)."""
        names, taken = [], {}
        for adapter in adapters:
            layout = self.layouts[adapter.layout]
            copy = taken[adapter.layout] = taken.get(adapter.layout, -1) + 1
            if copy == len(layout.slots):  # two adapters of one layout at once: another slot, made off the record
                rng = torch.get_rng_state()
                layout.slots.append(self._slot(layout.config))
                torch.set_rng_state(rng)
            name, modules = layout.slots[copy]
            for module, param in zip(modules, adapter.params):
                module.weight = param
            names.append(name)
        self.peft.base_model.set_adapter(names)
