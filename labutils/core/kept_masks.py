"""Which weights pruning kept, remembered on the model (introduced in 02-Prune; saved by the sparse format).

A pruned weight is exactly zero, but a zero is not always a pruned weight: SparseGPT zeroes the weights of inputs
that were never active and may update a kept weight to 0.0, and a model's own weights hold a few exact zeros. The
zero pattern therefore cannot tell a kept zero from a pruned one. ``prune_model`` records the true masks here, and
the sparse checkpoint stores and restores them, so that a saved and reloaded model knows which weights it may
update (mask-preserving recovery) as well as what they are.

The record is one attribute of the model, ``KeptMasks``: per parameter name (as in ``model.state_dict()``) the
kept bits of the parameter in its own layout, packed as ``np.packbits`` packs them (row-major, first weight in
the highest bit; 1 = kept). A routed experts' parameter (expert, out, in) is one entry for all its experts.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

ATTRIBUTE = "lab_kept_masks"


@dataclass
class KeptMasks:
    """Packed kept bits per parameter name, each parameter's shape, and the N:M pattern every one of them follows
    (None: unstructured, OWL's per-layer sparsities, or unknown)."""

    packed: dict[str, torch.Tensor] = field(default_factory=dict)  # name → (⌈numel / 8⌉,) uint8 on the CPU
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    nm: tuple[int, int] | None = None

    def kept(self, name: str) -> torch.Tensor:
        """The bool mask of parameter ``name`` in its own shape, True where the weight was kept."""
        shape = self.shapes[name]
        bits = np.unpackbits(self.packed[name].numpy(), count=int(np.prod(shape)))
        return torch.from_numpy(bits.view(np.bool_)).reshape(shape)


def pack_kept(kept: torch.Tensor) -> torch.Tensor:
    """A bool tensor's bits, packed on the CPU as ``np.packbits`` packs them: (⌈numel / 8⌉,) uint8."""
    return torch.from_numpy(np.packbits(kept.detach().reshape(-1).cpu().numpy()))


def kept_masks(model: nn.Module) -> KeptMasks | None:
    """The masks recorded on ``model`` by ``prune_model`` or ``load_pruned``; None for a model never pruned by
    the lab."""
    return getattr(model, ATTRIBUTE, None)


def record_kept(model: nn.Module, packed: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]],
                nm: tuple[int, int] | None) -> KeptMasks:
    """Add a pruning's kept bits to ``model``'s record. A parameter pruned before keeps only what both prunings
    kept (a weight pruned once stays zero), and the record's N:M pattern holds only if every pruning had it."""
    record = kept_masks(model)
    if record is None:
        record = KeptMasks(nm=nm)
        object.__setattr__(model, ATTRIBUTE, record)  # a plain attribute: not a parameter, buffer or module
    elif record.nm != nm:
        record.nm = None
    for name, bits in packed.items():
        earlier = record.packed.get(name)
        if earlier is not None and record.shapes[name] == shapes[name]:
            bits = earlier & bits  # same packing, so the bitwise AND of the bytes is the AND of the masks
        record.packed[name], record.shapes[name] = bits, tuple(shapes[name])
    return record


def storage_names(module: nn.Module) -> dict[int, tuple[str, nn.Parameter]]:
    """Each parameter of ``module`` by the address of its storage: how a weight view (a routed expert's matrix)
    finds the parameter it lives in."""
    return {p.untyped_storage().data_ptr(): (name, p) for name, p in module.named_parameters()}


def kept_in_parameters(params: dict[int, tuple[str, nn.Parameter]], weights: dict[str, torch.Tensor],
                       pruned: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per parameter name, the kept mask in the parameter's own layout, from the pruned masks (True = pruned, each
    shaped like its weight) of ``weights`` (name → the weight, a parameter or a view into one). Positions of a
    parameter that no weight covers count as kept."""
    kept = {}
    for name, mask in pruned.items():
        weight = weights[name]
        pname, param = params[weight.untyped_storage().data_ptr()]
        if weight.shape == param.shape and weight.stride() == param.stride():
            kept[pname] = ~mask.reshape(param.shape)
            continue
        full = kept.setdefault(pname, torch.ones_like(param, dtype=torch.bool))  # same strides as the parameter
        offset = full.storage_offset() + weight.storage_offset() - param.storage_offset()
        full.as_strided(weight.shape, weight.stride(), offset).copy_(~mask)
    return kept
