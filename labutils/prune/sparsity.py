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

from ..core.models import find_decoder_layers, find_linears


def prunable_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every linear of every decoder layer, keyed "layers.{i}.{name}", in layer order."""
    return {f"layers.{i}.{name}": lin
            for i, layer in enumerate(find_decoder_layers(model))
            for name, lin in find_linears(layer).items()}


def split_linear_name(name: str) -> tuple[int, str]:
    """(layer index, sublayer path) of a ``prunable_linears`` key: "layers.3.mlp.up_proj" → (3, "mlp.up_proj")."""
    _, layer, sublayer = name.split(".", 2)
    return int(layer), sublayer


def mask_sha256(model: nn.Module) -> str:
    """SHA-256 of the zero pattern of all prunable weights: equal hashes mean identical masks."""
    digest = hashlib.sha256()
    for name, lin in prunable_linears(model).items():
        zeros = (lin.weight.detach() == 0).cpu().numpy()
        digest.update(f"{name}:{zeros.shape}".encode())
        digest.update(np.packbits(zeros).tobytes())
    return digest.hexdigest()


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
