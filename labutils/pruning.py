"""Wanda and magnitude pruning, split into its natural steps (introduced in 02-Prune).

score (|W| or |W|·‖X‖) → mask per output row (unstructured) or per group of M inputs (N:M) → apply.
The driver ``prune_model`` walks the decoder layers one at a time: calibration inputs are run through
the layer with hooks on its linears to collect input norms, every linear is pruned, and the pruned layer is
run again to make the next layer's inputs (Sun et al. 2023, "A Simple and Effective Pruning Approach for
Large Language Models", arXiv 2306.11695).
"""
from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from .calibration import InputNormAccumulator, capture_layer_inputs, run_layer
from .config import check_positive_int
from .errors import BadInput, LabError
from .models import find_decoder_layers, find_linears
from .sparsity import mask_sha256

METHODS = ("magnitude", "wanda")
NEEDS_CALIBRATION = {"magnitude": False, "wanda": True}


@dataclass(frozen=True)
class SparsityTarget:
    """What to prune: a fraction of every output row (unstructured), or N:M — at most N non-zeros in every
    group of M consecutive input weights (2:4 keeps 2 of 4)."""

    sparsity: float | None = None
    n: int | None = None
    m: int | None = None

    @classmethod
    def of(cls, sparsity: float | None = None, nm: str | tuple[int, int] | None = None) -> "SparsityTarget":
        """Validate and build a target from a sparsity in [0, 1) or an N:M pattern ("2:4" or (2, 4))."""
        if (sparsity is None) == (nm is None):
            raise BadInput(f"give exactly one of sparsity or nm; got sparsity={sparsity!r}, nm={nm!r}")
        if nm is not None:
            n, m = parse_nm(nm)
            return cls(n=n, m=m)
        if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
            raise BadInput(f"sparsity must be a number in [0, 1); got {sparsity!r}")
        return cls(sparsity=float(sparsity))

    @property
    def is_nm(self) -> bool:
        return self.n is not None

    @property
    def fraction(self) -> float:
        """The share of weights this target removes."""
        return 1 - self.n / self.m if self.is_nm else self.sparsity

    @property
    def label(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else f"{self.sparsity:.0%}"


def parse_nm(nm: str | tuple[int, int]) -> tuple[int, int]:
    """(N, M) from "N:M" or a pair, with 1 ≤ N < M."""
    if isinstance(nm, str):
        match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", nm)
        if not match:
            raise BadInput(f"N:M pattern must look like '2:4'; got {nm!r}")
        n, m = int(match[1]), int(match[2])
    else:
        try:
            n, m = (int(v) for v in nm)
        except (TypeError, ValueError):
            raise BadInput(f"N:M pattern must be 'N:M' or a pair of integers; got {nm!r}") from None
    if n < 1 or n >= m:
        raise BadInput(f"N:M pattern needs 1 ≤ N < M; got N={n}, M={m}")
    return n, m


def magnitude_score(weight: torch.Tensor) -> torch.Tensor:
    """|W| in float32. weight: (out, in) → (out, in)."""
    return weight.detach().abs().float()


def wanda_score(weight: torch.Tensor, sq_norm: torch.Tensor) -> torch.Tensor:
    """Wanda's importance |W_ij| · ‖X_j‖₂, in float32.

    weight: (out, in); sq_norm: (in,) — the sum over calibration tokens of x_j², so ‖X_j‖₂ = sqrt(sq_norm).
    """
    if sq_norm.shape != (weight.shape[1],):
        raise BadInput(f"sq_norm must have shape ({weight.shape[1]},) to match weight {tuple(weight.shape)}; "
                       f"got {tuple(sq_norm.shape)}")
    return weight.detach().abs().float() * sq_norm.float().sqrt().to(weight.device).unsqueeze(0)


def unstructured_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """True where a weight is pruned: the ⌊in·sparsity⌋ lowest scores of every output row. (out, in) → bool."""
    k = int(score.shape[1] * sparsity)
    mask = torch.zeros_like(score, dtype=torch.bool)
    if k > 0:
        lowest = torch.topk(score, k, dim=1, largest=False, sorted=False).indices
        mask.scatter_(1, lowest, True)
    return mask


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """True where a weight is pruned: in every group of M consecutive inputs of a row, the M−N lowest scores.
    (out, in) → bool, with in divisible by M."""
    out_features, in_features = score.shape
    if in_features % m:
        raise BadInput(f"N:M pattern {n}:{m} needs the input size to be divisible by M={m}; got {in_features}")
    groups = score.reshape(out_features, in_features // m, m)
    lowest = torch.topk(groups, m - n, dim=2, largest=False, sorted=False).indices
    return torch.zeros_like(groups, dtype=torch.bool).scatter_(2, lowest, True).reshape(out_features, in_features)


def select_mask(score: torch.Tensor, target: SparsityTarget) -> torch.Tensor:
    """The pruning mask for one weight's scores under ``target``."""
    return nm_mask(score, target.n, target.m) if target.is_nm else unstructured_mask(score, target.sparsity)


@torch.no_grad()
def apply_mask(linear: nn.Linear, mask: torch.Tensor) -> None:
    """Zero the masked weights in place."""
    linear.weight.masked_fill_(mask.to(linear.weight.device), 0)


@dataclass
class SublayerReport:
    layer: int
    sublayer: str
    out_features: int
    in_features: int
    pruned: int
    sparsity: float


@dataclass
class PruneReport:
    """What ``prune_model`` did: one row per pruned linear, the total time and the mask fingerprint."""

    method: str
    target: str
    target_sparsity: float
    nm: tuple[int, int] | None
    nsamples: int
    seqlen: int
    seconds: float
    layer_seconds: list[float] = field(default_factory=list)
    sublayers: list[SublayerReport] = field(default_factory=list)
    mask_sha256: str = ""

    @property
    def measured_sparsity(self) -> float:
        """Share of zeros over all pruned linears."""
        total = sum(s.out_features * s.in_features for s in self.sublayers)
        return sum(s.pruned for s in self.sublayers) / total if total else 0.0

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame([asdict(s) for s in self.sublayers])

    def to_dict(self) -> dict:
        d = asdict(self)
        d["measured_sparsity"] = self.measured_sparsity
        d["nm"] = None if self.nm is None else f"{self.nm[0]}:{self.nm[1]}"
        return d


def check_prunable(model: nn.Module, target: SparsityTarget) -> None:
    """Refuse an N:M target that some linear's input size cannot take, before anything is changed."""
    if not target.is_nm:
        return
    for i, layer in enumerate(find_decoder_layers(model)):
        for name, lin in find_linears(layer).items():
            if lin.in_features % target.m:
                raise BadInput(f"N:M pattern {target.label} needs every input size divisible by M={target.m}; "
                               f"layer {i} {name} has {lin.in_features} inputs")


def prune_model(model: nn.Module, method: str, target: SparsityTarget, tokens: torch.Tensor | None = None,
                batch_size: int = 8, progress: bool = True) -> PruneReport:
    """Prune every linear of every decoder layer in place (embeddings and lm_head are never touched).

    tokens: (nsamples, seqlen) calibration token ids, needed by Wanda. Returns a ``PruneReport``.
    """
    if method not in METHODS:
        raise BadInput(f"unknown method {method!r}; allowed: {', '.join(METHODS)}")
    needs_tokens = NEEDS_CALIBRATION[method]
    if needs_tokens and (tokens is None or tokens.ndim != 2 or tokens.numel() == 0):
        raise BadInput(f"method {method!r} needs calibration tokens of shape (nsamples, seqlen); got "
                       f"{None if tokens is None else tuple(tokens.shape)}")
    check_positive_int("batch_size", batch_size)
    check_prunable(model, target)
    try:
        return _prune_layers(model, method, target, tokens if needs_tokens else None, batch_size, progress)
    except torch.OutOfMemoryError as exc:
        raise LabError(f"out of GPU memory while pruning with {method} {target.label}: use fewer calibration "
                       "samples (--nsamples), shorter windows (--seqlen) or a smaller --batch-size") from exc


@torch.no_grad()
def _prune_layers(model, method, target, tokens, batch_size, progress) -> PruneReport:
    start = time.perf_counter()
    layers = find_decoder_layers(model)
    inputs = capture_layer_inputs(model, tokens, batch_size) if tokens is not None else None
    report = PruneReport(method=method, target=target.label, target_sparsity=target.fraction,
                         nm=(target.n, target.m) if target.is_nm else None,
                         nsamples=0 if tokens is None else tokens.shape[0],
                         seqlen=0 if tokens is None else tokens.shape[1], seconds=0.0)
    for i, layer in enumerate(tqdm(layers, desc=f"{method} {target.label}", unit="layer", disable=not progress)):
        layer_start = time.perf_counter()
        linears = find_linears(layer)
        if inputs is not None:
            with InputNormAccumulator(linears) as acc:
                run_layer(layer, i, inputs)
        for name, lin in linears.items():
            score = wanda_score(lin.weight, acc.sq_norms[name]) if inputs is not None else magnitude_score(lin.weight)
            mask = select_mask(score, target)
            apply_mask(lin, mask)
            report.sublayers.append(SublayerReport(i, name, lin.out_features, lin.in_features,
                                                   int(mask.sum()), float(mask.float().mean())))
        if inputs is not None and i + 1 < len(layers):
            inputs.hidden = run_layer(layer, i, inputs)
        report.layer_seconds.append(time.perf_counter() - layer_start)
    report.seconds = time.perf_counter() - start
    report.mask_sha256 = mask_sha256(model)
    return report
