"""Measuring sparsity from the weights themselves (introduced in 02-Prune).

Everything here reads zeros from the model, so it works the same on a freshly pruned model and on one
loaded back from disk.
"""
from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..core.anatomy import ExpertWeight, find_decoder_layers, find_linears
from ..core.sparse.bits import pack_mask


def prunable_linears(model: nn.Module, experts: bool = True) -> dict[str, nn.Linear | ExpertWeight]:
    """Every linear of every decoder layer (``find_linears``: routed experts' matrices included), keyed
    "layers.{i}.{name}", in layer order. ``experts=False``: the linear modules only (what a 2:4 kernel can
    replace)."""
    return {f"layers.{i}.{name}": lin
            for i, layer in enumerate(find_decoder_layers(model))
            for name, lin in find_linears(layer).items() if experts or not isinstance(lin, ExpertWeight)}


def split_linear_name(name: str) -> tuple[int, str]:
    """(layer index, sublayer path) of a ``prunable_linears`` key: "layers.3.mlp.up_proj" → (3, "mlp.up_proj")."""
    _, layer, sublayer = name.split(".", 2)
    return int(layer), sublayer


def mask_sha256(model: nn.Module) -> str:
    """SHA-256 of the zero pattern of all prunable weights: equal hashes mean identical masks.

    What is hashed, per linear in layer order: "layers.{i}.{name}:(out, in)", then its zeros packed as
    ``np.packbits`` packs them. The packing runs where the weights are and the packed bits (1/8 of the weights'
    count: 0.8 GB for Llama-2-7B) cross to the host in one copy, not one blocking copy per linear."""
    linears = prunable_linears(model)
    sizes = [-(-lin.weight.numel() // 8) for lin in linears.values()]
    weights = [lin.weight.detach() for lin in linears.values()]
    device = weights[0].device if weights else torch.device("cpu")
    packed = torch.empty(sum(sizes), dtype=torch.uint8, device=device)
    offsets = np.cumsum([0, *sizes]).tolist()
    for weight, start, end in zip(weights, offsets, offsets[1:]):
        packed[start:end] = pack_mask(weight == 0)
    host = packed.cpu().numpy()  # the one device → host copy
    digest = hashlib.sha256()
    for (name, weight), start, end in zip(zip(linears, weights), offsets, offsets[1:]):
        _hash_mask(digest, name, weight.shape, host[start:end])
    return digest.hexdigest()


def _hash_mask(digest, name: str, shape: torch.Size, packed_zeros: np.ndarray) -> None:
    digest.update(f"{name}:{tuple(shape)}".encode())
    digest.update(packed_zeros)


class MaskDigest:
    """``mask_sha256`` built one decoder layer at a time, in layer order — the same hash for a model that is never
    whole in memory (``prune.disk``) — and the zero count of the prunable weights seen."""

    def __init__(self):
        self._digest = hashlib.sha256()
        self.zeros = self.weights = 0

    def add_layer(self, index: int, layer: nn.Module) -> None:
        for name, lin in find_linears(layer).items():
            zeros = lin.weight.detach() == 0
            _hash_mask(self._digest, f"layers.{index}.{name}", zeros.shape, pack_mask(zeros).cpu().numpy())
            self.zeros += int(torch.count_nonzero(zeros))
            self.weights += zeros.numel()

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


def nm_violations(weight: torch.Tensor, n: int, m: int) -> int:
    """How many groups of M consecutive inputs hold more than N non-zeros (0 means the pattern holds)."""
    out_features, in_features = weight.shape
    if in_features % m:
        return out_features * -(-in_features // m)  # the pattern cannot hold at all
    nonzero = (weight.detach() != 0).reshape(out_features, in_features // m, m).sum(dim=2)
    return int((nonzero > n).sum())


def sparsity_table(model: nn.Module, nm: tuple[int, int] | None = None) -> pd.DataFrame:
    """One row per prunable linear: shape, zeros, sparsity, least and most sparse output row, and, for an
    N:M pattern, how many groups break it."""
    rows = []
    for name, lin in prunable_linears(model).items():
        zeros = lin.weight.detach() == 0
        row_sparsity = zeros.float().mean(dim=1)
        layer, sublayer = split_linear_name(name)
        row = {"layer": layer, "sublayer": sublayer, "shape": tuple(lin.weight.shape),
               "zeros": int(zeros.sum()), "sparsity": float(zeros.float().mean()),
               "row_min": float(row_sparsity.min()), "row_max": float(row_sparsity.max())}
        if nm is not None:
            row[f"{nm[0]}:{nm[1]} violations"] = nm_violations(lin.weight, *nm)
        rows.append(row)
    return pd.DataFrame(rows)


def model_sparsity(model: nn.Module) -> dict[str, float | int]:
    """Totals: parameters, non-zeros, sparsity over the prunable linears and over the whole model."""
    linear_params = linear_zeros = 0
    for lin in prunable_linears(model).values():
        linear_params += lin.weight.numel()
        linear_zeros += int((lin.weight.detach() == 0).sum())
    params = {id(p): p for p in model.parameters()}.values()  # tied embeddings count once
    total = sum(p.numel() for p in params)
    zeros = sum(int((p.detach() == 0).sum()) for p in params)
    return {"parameters": total, "nonzero_parameters": total - zeros,
            "linear_sparsity": linear_zeros / linear_params, "model_sparsity": zeros / total}
