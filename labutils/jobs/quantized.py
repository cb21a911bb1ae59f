"""Pruning plus 4-bit weights, measured (07-Quantize): each model at 16, 8 and 4 bits, its bytes on disk and its
perplexity; which quantizers keep a pruned model's zeros; the smallest checkpoint a 1-bit mask allows.

The 16-bit rows are the float16 files (the dense model as an ordinary safetensors file, a pruned one in the lab's
sparse format), their perplexity that of the float32 model the lab runs on a CPU; the 8- and 4-bit rows are the
lab's version-2 sparse files (``quant``), saved and measured on disk, and evaluated as saved.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from torch import nn
from tqdm import tqdm  # plain text everywhere: a saved notebook shows the finished bar, not a widget

from ..core.anatomy import find_decoder_layers, find_linears
from ..core.errors import BadInput
from ..core.saved import save_pruned
from ..core.sparse.bits import kept_masks
from ..core.sparse.model import prunable_parameter_names, quantizable_parameter_names, quantize_model
from ..core.sparse.quant import BITS, QUANTS, STORED_QUANTS, quantize_dequantize
from ..core.validation import check_choice
from ..evaluate.perplexity import perplexity

TARGET_OF_FP16 = 0.20  # issue L1's goal for Wanda 50 % + 4-bit: at most a fifth of the float16 dense model


@dataclass(frozen=True)
class QuantStudySettings:
    """How ``quantization_rows`` evaluates and where it saves: the quantizations (besides float16), perplexity
    windows, and the folder the checkpoints are written to (one sub-folder per row)."""

    out: str | os.PathLike
    eval_seqlen: int
    batch_size: int = 4
    quants: tuple[str, ...] = ("q8_0", "q4_0")

    def __post_init__(self):
        for quant in self.quants:
            check_choice("quant", quant, STORED_QUANTS)


def fp16_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters in float16, each shared tensor once: the dense float16 checkpoint."""
    seen = {}
    for param in model.parameters():
        seen[param.untyped_storage().data_ptr()] = param.numel()
    return 2 * sum(seen.values())


def quantization_rows(label: str, load: Callable[[], nn.Module], test: torch.Tensor,
                      settings: QuantStudySettings) -> list[dict]:
    """One row per weight format of the model ``load()`` gives (a fresh copy each time; ``label``: "dense",
    "wanda 50%", …): float16, then each of ``settings.quants``. A row: bytes on disk, bits per parameter, perplexity
    on ``test`` (N,) token ids."""
    rows = []
    for quant in tqdm((None, *settings.quants), desc=label, unit="format"):
        model = load()
        if quant is not None:
            quantize_model(model, quant, progress=False)
        ppl = perplexity(model, test, settings.eval_seqlen, settings.batch_size, progress=False)
        folder = Path(settings.out) / f"{label.replace(' ', '-').replace('%', '').replace(':', '-')}-{quant or 'f16'}"
        if quant is None:
            model = model.to(torch.float16)
        fmt = "dense" if quant is None and kept_masks(model) is None else "sparse"  # the dense model: its own file
        saved = save_pruned(model, folder, None, {"label": label, "quant": quant}, format=fmt)
        disk = sum(f.stat().st_size for f in saved.iterdir() if f.suffix == ".safetensors")
        params = fp16_bytes(model) // 2
        rows.append({"model": label, "weights": quant or "f16", "bytes": disk, "bits per parameter": 8 * disk / params,
                     "perplexity": ppl})
    return rows


def quantization_table(rows: list[dict], dense_fp16_bytes: int) -> pd.DataFrame:
    """The rows of ``quantization_rows`` as a table indexed by (model, weights), with each row's bytes as a share of
    the float16 dense model and its perplexity against the dense float16 row's."""
    table = pd.DataFrame(rows).set_index(["model", "weights"])
    table["÷ f16 dense bytes"] = table["bytes"] / dense_fp16_bytes
    table["÷ dense perplexity"] = table["perplexity"] / table.loc[("dense", "f16"), "perplexity"]
    return table


def mask_bound(model: nn.Module, sparsity: float, bits: int) -> float:
    """The least share of the float16 dense model any checkpoint of ``model`` can take with a 1-bit-per-weight mask,
    ``bits``-bit codes for the kept values of the pruned linears and for the embeddings (no scales at all), and the
    rest in float16."""
    params = dict(model.named_parameters())  # each shared tensor once
    pruned = set(prunable_parameter_names(model))
    quantized = set(quantizable_parameter_names(model)) - pruned
    least = sum(p.numel() * (1 + (1 - sparsity) * bits if n in pruned else bits if n in quantized else 16)
                for n, p in params.items())
    return least / (16 * sum(p.numel() for p in params.values()))


def target_line(table: pd.DataFrame, label: str, quant: str, bound: float) -> str:
    """One line: is ``label`` + ``quant`` within ``TARGET_OF_FP16`` of the float16 dense model, and the bound."""
    share = table.loc[(label, quant), "÷ f16 dense bytes"]
    verdict = "met" if share <= TARGET_OF_FP16 else "missed"
    return (f"{label} + {quant}: {table.loc[(label, quant), 'bytes'] / 1e6:.1f} MB, {share:.1%} of the float16 dense "
            f"model ({1 / share:.1f}× smaller; {2 / share:.1f}× against float32). Target ≤ {TARGET_OF_FP16:.0%}: "
            f"{verdict}. No checkpoint with a 1-bit mask and {BITS[quant]}-bit codes, scales free, goes below "
            f"{bound:.1%} on this model.")


def zeros_table(layer: nn.Module) -> pd.DataFrame:
    """For each quantizer, applied to every linear of one pruned decoder ``layer`` as a tool that knows nothing of
    the mask would (whole weights, zeros included): how many of the zeros stay exactly zero, and the mean error on
    the kept weights. The layer is not changed."""
    rows = []
    for quant in QUANTS:
        zeros = kept_zero = 0
        errors, kept_count = 0.0, 0
        for linear in find_linears(layer).values():
            weight = linear.weight.detach().float()
            pruned = weight == 0
            after = quantize_dequantize(weight, quant)
            zeros += int(pruned.sum())
            kept_zero += int((after[pruned] == 0).sum())
            errors += float((after - weight)[~pruned].abs().sum())
            kept_count += int((~pruned).sum())
        rows.append({"quant": quant, "zeros": zeros, "zeros still zero": kept_zero,
                     "share still zero": kept_zero / zeros if zeros else float("nan"),
                     "mean |error| on kept weights": errors / kept_count})
    return pd.DataFrame(rows).set_index("quant")


def layer_of(model: nn.Module, index: int) -> nn.Module:
    """Decoder layer ``index`` of ``model``; BadInput naming the range otherwise."""
    layers = find_decoder_layers(model)
    if not isinstance(index, int) or not 0 <= index < len(layers):
        raise BadInput(f"layer must be an integer in [0, {len(layers) - 1}]; got {index!r}")
    return layers[index]
