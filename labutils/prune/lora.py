"""peft's LoRA linear with a masked update, for mask-preserving recovery (``recovery.recover``, 05-Recover).

Its own module because importing peft is costly (about a second and ~170 MB of memory): ``recover`` imports it
when it runs, so ``import labutils`` — and the memory a disk-streamed run of a large model needs — stays without it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model  # noqa: F401  (re-exported for ``recover``)
from peft.tuners.lora import Linear as LoraLinear
from torch import nn

KEPT_ATTRIBUTE = "lab_lora_kept"  # the kept mask a target linear carries while peft wraps it (set by ``recover``)


class MaskedLoraLinear(LoraLinear):
    """peft's LoRA linear whose update keeps the base weight's pruned weights at zero: W + (B·A · scale) ⊙ M."""

    def __init__(self, base_layer: nn.Linear, adapter_name: str, **kwargs):
        super().__init__(base_layer, adapter_name, **kwargs)
        kept = getattr(base_layer, KEPT_ATTRIBUTE)
        self.register_buffer("kept", kept.to(base_layer.weight.device), persistent=False)

    def get_delta_weight(self, adapter) -> torch.Tensor:
        return super().get_delta_weight(adapter) * self.kept

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disable_adapters or self.merged:
            return super().forward(x, *args, **kwargs)
        base = self.get_base_layer()
        weight = base.weight.float()  # adapters train in float32 (peft casts them up for 16-bit bases)
        for name in self.active_adapters:
            if name in self.lora_A:
                weight = weight + self.get_delta_weight(name).float()
        bias = None if base.bias is None else base.bias.float()
        return F.linear(x.float(), weight, bias).to(x.dtype)
