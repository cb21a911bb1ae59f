"""Which weights pruning kept, remembered on the model, and every packing of mask bits (introduced in 02-Prune;
saved by the sparse format).

The lab's one mask vocabulary: a *kept* mask is True where the weight was kept, a *pruned* mask True where it was
removed (``kept = ~pruned``); names say which (``kept…`` / ``pruned…``). Packed bits follow ``np.packbits``: the
row-major flattened mask eight to a byte, the first weight in the highest bit, the last byte padded with zeros.
``pack_mask`` packs with numpy on the CPU and with torch on a GPU (``pack_mask_torch``), byte for byte the same.

A pruned weight is exactly zero, but a zero is not always a pruned weight: SparseGPT zeroes the weights of inputs
that were never active and may update a kept weight to 0.0, and a model's own weights hold a few exact zeros. The
zero pattern therefore cannot tell a kept zero from a pruned one. ``prune_model`` records the true masks here, and
the sparse checkpoint stores and restores them, so that a saved and reloaded model knows which weights it may
update (mask-preserving recovery) as well as what they are.

The record is one attribute of the model, ``KeptMasks``: per parameter name (as in ``model.state_dict()``) the
packed kept bits of the parameter in its own layout (1 = kept). A routed experts' parameter (expert, out, in) is one
entry for all its experts.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

ATTRIBUTE = "lab_kept_masks"


def pack_mask_numpy(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor's bits packed on the CPU by ``np.packbits``: (any shape) bool → (⌈numel / 8⌉,) uint8, CPU."""
    return torch.from_numpy(np.packbits(mask.detach().reshape(-1).cpu().numpy()))


def pack_mask_torch(mask: torch.Tensor) -> torch.Tensor:
    """``np.packbits`` on ``mask``'s own device: the flattened booleans eight to a byte, the first in the highest bit,
    the last byte padded with zeros. (any shape) bool → (⌈numel / 8⌉,) uint8, same device."""
    flat = mask.reshape(-1)
    pad = -flat.numel() % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    octets = flat.view(torch.uint8).view(-1, 8)  # bool is one byte holding 0 or 1
    packed = octets[:, 0] << 7
    for k in range(1, 8):
        packed |= octets[:, k] << (7 - k)
    return packed


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """``np.packbits`` order where ``mask`` is: numpy on the CPU (faster there), ``pack_mask_torch`` on a GPU (the
    bits stay on it until one copy to the host). (any shape) bool → (⌈numel / 8⌉,) uint8, same device."""
    return pack_mask_numpy(mask) if mask.device.type == "cpu" else pack_mask_torch(mask)


def unpack_mask(packed: np.ndarray, count: int) -> np.ndarray:
    """The first ``count`` bits of ``pack_mask``'s bytes: (⌈count / 8⌉,) uint8 → (count,) bool, flattened."""
    return np.unpackbits(packed, count=count).view(np.bool_)


def pack_fields(numbers: torch.Tensor, width: int) -> torch.Tensor:
    """Each of ``numbers`` (count,) int64 written in ``width`` bits, most significant first, all concatenated and
    packed as ``pack_mask`` packs bits: (⌈count · width / 8⌉,) uint8 on the CPU."""
    shifts = torch.arange(width - 1, -1, -1, dtype=torch.int64)
    return pack_mask_numpy((numbers[:, None] >> shifts) & 1 == 1)  # (count, width), most significant first


def unpack_fields(packed: np.ndarray, count: int, width: int) -> torch.Tensor:
    """The ``count`` numbers of ``width`` bits that ``pack_fields`` packed: (count,) int64."""
    fields = np.unpackbits(packed, count=count * width).reshape(count, width).astype(np.int64)
    return torch.from_numpy(fields @ (1 << np.arange(width - 1, -1, -1)))


@dataclass
class KeptMasks:
    """Packed kept bits per parameter name, each parameter's shape, and the N:M pattern every one of them follows
    (None: unstructured, OWL's per-layer sparsities, or unknown). While the driver prunes, the bits are packed where
    each layer computes (no host sync inside the layer loop); ``record_kept`` brings them to the host."""

    packed: dict[str, torch.Tensor] = field(default_factory=dict)  # name → (⌈numel / 8⌉,) uint8
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    nm: tuple[int, int] | None = None

    def kept(self, name: str) -> torch.Tensor:
        """The bool mask of parameter ``name`` in its own shape, True where the weight was kept (bits on the CPU)."""
        shape = self.shapes[name]
        return torch.from_numpy(unpack_mask(self.packed[name].numpy(), int(np.prod(shape)))).reshape(shape)

    def add_layer(self, prefix: str, layer: nn.Module, linears: Mapping[str, Any],
                  pruned: dict[str, torch.Tensor]) -> None:
        """Pack one decoder layer's masks, named ``{prefix}.{parameter name}``. ``linears``: the layer's linears by
        name (anything with a ``weight``: routed experts' matrices too); ``pruned``: their pruned masks (True =
        pruned, each shaped like its weight)."""
        weights = {name: linears[name].weight for name in pruned}
        for name, kept in kept_in_parameters(storage_names(layer), weights, pruned).items():
            self.packed[f"{prefix}.{name}"] = pack_mask(kept)
            self.shapes[f"{prefix}.{name}"] = tuple(kept.shape)

    def pop_layer(self, prefix: str) -> KeptMasks:
        """The kept bits of one layer (``prefix``: its module name), on the host, names relative to the layer;
        forgotten here (disk-streamed pruning writes them out layer by layer)."""
        keys = [k for k in self.packed if k.startswith(f"{prefix}.")]
        return KeptMasks({k[len(prefix) + 1:]: self.packed.pop(k).cpu() for k in keys},
                         {k[len(prefix) + 1:]: self.shapes.pop(k) for k in keys})


def kept_masks(model: nn.Module) -> KeptMasks | None:
    """The masks recorded on ``model`` by ``prune_model`` or ``load_pruned``; None for a model never pruned by
    the lab."""
    return getattr(model, ATTRIBUTE, None)


def record_kept(model: nn.Module, kept: KeptMasks) -> KeptMasks:
    """Add a pruning's kept bits (brought to the host) to ``model``'s record. A parameter pruned before keeps only
    what both prunings kept (a weight pruned once stays zero), and the record's N:M pattern holds only if every
    pruning had it."""
    record = kept_masks(model)
    if record is None:
        record = KeptMasks(nm=kept.nm)
        object.__setattr__(model, ATTRIBUTE, record)  # a plain attribute: not a parameter, buffer or module
    elif record.nm != kept.nm:
        record.nm = None
    for name, bits in kept.packed.items():
        bits = bits.cpu()
        earlier = record.packed.get(name)
        if earlier is not None and record.shapes[name] == kept.shapes[name]:
            bits = earlier & bits  # same packing, so the bitwise AND of the bytes is the AND of the masks
        record.packed[name], record.shapes[name] = bits, tuple(kept.shapes[name])
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
