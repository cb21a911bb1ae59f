"""The layer-by-layer pruning driver shared by every method (introduced in 02-Prune).

``prune_model`` walks the decoder layers in order. For each layer it runs the calibration batches through the
layer with hooks on its linears to collect the statistic the method needs (input norms for Wanda and RIA, the
Hessian for SparseGPT), lets the method prune every linear, and runs the pruned layer to make the next layer's
inputs (Sun et al. 2023, arXiv 2306.11695). Methods live in ``labutils.methods``; OWL's per-layer sparsities
in ``labutils.owl``.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Sequence

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from .calibration import capture_layer_inputs, collect_statistics, run_layer
from .config import check_positive_int
from .device import synchronize
from .errors import BadInput, LabError
from .masks import SparsityTarget
from .methods import REGISTRY, Method, get_method
from .models import find_decoder_layers, find_linears
from .owl import OwlConfig, layer_outlier_ratios, owl_sparsities
from .sparsity import mask_sha256

METHODS = tuple(REGISTRY)
# True-sequential mode re-collects statistics for the sublayers that read other sublayers' outputs directly,
# after everything before them in the block is pruned: o_proj (attention output), then down_proj (gated MLP).
TRUE_SEQUENTIAL_LATER = ("self_attn.o_proj", "mlp.down_proj")


def variant_label(method: str, target: str, true_sequential: bool = False, owl: bool = False) -> str:
    """The name of a pruned model in tables: method, its options, then the target label ("50%", "2:4")."""
    variant = method + (" (true-sequential)" if true_sequential else "") + (" + OWL" if owl else "")
    return f"{variant} {target}"


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
    """What ``prune_model`` did: one row per pruned linear, the times and the mask fingerprint."""

    method: str
    target: str
    target_sparsity: float
    nm: tuple[int, int] | None
    nsamples: int
    seqlen: int
    params: dict = field(default_factory=dict)
    true_sequential: bool = False
    owl: dict | None = None
    layer_sparsity: list[float] | None = None
    seconds: float = 0.0
    method_seconds: float = 0.0  # time inside the method's score / mask / update, without forward passes
    layer_seconds: list[float] = field(default_factory=list)
    sublayers: list[SublayerReport] = field(default_factory=list)
    mask_sha256: str = ""

    @property
    def label(self) -> str:
        """e.g. "wanda 50%", "wanda (true-sequential) 50%", "magnitude + OWL 70%"."""
        return variant_label(self.method, self.target, self.true_sequential, bool(self.owl))

    @property
    def measured_sparsity(self) -> float:
        """Share of pruned weights over all pruned linears."""
        total = sum(s.out_features * s.in_features for s in self.sublayers)
        return sum(s.pruned for s in self.sublayers) / total if total else 0.0

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame([asdict(s) for s in self.sublayers])


def check_prunable(model: nn.Module, target: SparsityTarget) -> None:
    """Refuse an N:M target that some linear's input size cannot take, before anything is changed."""
    if not target.is_nm:
        return
    for i, layer in enumerate(find_decoder_layers(model)):
        for name, lin in find_linears(layer).items():
            if lin.in_features % target.m:
                raise BadInput(f"N:M pattern {target.label} needs every input size divisible by M={target.m}; "
                               f"layer {i} {name} has {lin.in_features} inputs")


def calibration_stages(names: Sequence[str], true_sequential: bool) -> list[list[str]]:
    """Groups of sublayers whose statistics are collected in one pass, in order."""
    if not true_sequential:
        return [list(names)]
    first = [n for n in names if n not in TRUE_SEQUENTIAL_LATER]
    return [first] + [[n] for n in TRUE_SEQUENTIAL_LATER if n in names]


def check_options(method: str, target: SparsityTarget, params: dict | None, true_sequential: bool,
                  owl: OwlConfig | None) -> tuple[Method, dict]:
    """The method and its validated parameters, or BadInput for a combination the driver cannot run."""
    meth = get_method(method)
    resolved = meth.resolve(params)
    if true_sequential and not meth.needs_calibration:
        raise BadInput(f"true-sequential mode re-collects calibration statistics; method {method!r} uses none")
    if owl is not None and target.is_nm:
        raise BadInput(f"OWL sets a different sparsity per layer and needs an unstructured target; got {target.label}")
    return meth, resolved


def prune_model(model: nn.Module, method: str, target: SparsityTarget, tokens: torch.Tensor | None = None,
                batch_size: int = 8, progress: bool = True, *, params: dict | None = None,
                true_sequential: bool = False, owl: OwlConfig | None = None) -> PruneReport:
    """Prune every linear of every decoder layer in place (embeddings and lm_head are never touched).

    tokens: (nsamples, seqlen) calibration token ids, needed by every method but magnitude and by OWL.
    params: the method's parameters (``lu.get_method(name).params`` lists them). true_sequential: re-collect
    statistics of o_proj and down_proj after the sublayers before them are pruned. owl: give each layer its
    own sparsity from its outlier ratio (unstructured targets only).
    """
    meth, resolved = check_options(method, target, params, true_sequential, owl)
    needs_tokens = meth.needs_calibration or owl is not None
    if needs_tokens and (tokens is None or tokens.ndim != 2 or tokens.numel() == 0):
        raise BadInput(f"method {method!r}{' with OWL' if owl else ''} needs calibration tokens of shape "
                       f"(nsamples, seqlen); got {None if tokens is None else tuple(tokens.shape)}")
    check_positive_int("batch_size", batch_size)
    check_prunable(model, target)
    try:
        return _prune_layers(model, meth, resolved, target, tokens if needs_tokens else None, batch_size,
                             progress, true_sequential, owl)
    except torch.OutOfMemoryError as exc:
        raise LabError(f"out of GPU memory while pruning with {method} {target.label}: use fewer calibration "
                       "samples (--nsamples), shorter windows (--seqlen) or a smaller --batch-size") from exc


def _layer_targets(model, target, tokens, batch_size, progress, owl, report) -> list[SparsityTarget]:
    layers = find_decoder_layers(model)
    if owl is None:
        return [target] * len(layers)
    ratios = layer_outlier_ratios(model, tokens, batch_size, owl.m, progress)
    report.layer_sparsity = owl_sparsities(ratios, target.sparsity, owl.lam)
    report.owl = {"M": owl.m, "lambda": owl.lam, "outlier_ratios": ratios}
    return [SparsityTarget(sparsity=s) for s in report.layer_sparsity]


@torch.no_grad()
def _prune_layers(model, meth: Method, params, target, tokens, batch_size, progress, true_sequential, owl):
    start = time.perf_counter()
    layers = find_decoder_layers(model)
    device = next(model.parameters()).device
    report = PruneReport(method=meth.name, target=target.label, target_sparsity=target.fraction,
                         nm=(target.n, target.m) if target.is_nm else None,
                         nsamples=0 if tokens is None else tokens.shape[0],
                         seqlen=0 if tokens is None else tokens.shape[1], params=params,
                         true_sequential=true_sequential)
    targets = _layer_targets(model, target, tokens, batch_size, progress, owl, report)
    inputs = capture_layer_inputs(model, tokens, batch_size) if meth.needs_calibration else None
    for i, layer in enumerate(tqdm(layers, desc=report.label, unit="layer", disable=not progress)):
        layer_start = time.perf_counter()
        linears = find_linears(layer)
        for stage in calibration_stages(list(linears), true_sequential):
            stats = {}
            if inputs is not None:
                stats, _ = collect_statistics(layer, i, inputs, {n: linears[n] for n in stage}, meth.statistic)
            for name in stage:
                synchronize(device)
                method_start = time.perf_counter()
                mask = meth.apply(linears[name], stats.get(name), targets[i], params)
                synchronize(device)
                report.method_seconds += time.perf_counter() - method_start
                report.sublayers.append(SublayerReport(i, name, *mask.shape, int(mask.sum()),
                                                       float(mask.float().mean())))
        if inputs is not None and i + 1 < len(layers):
            inputs.hidden = run_layer(layer, i, inputs)
        report.layer_seconds.append(time.perf_counter() - layer_start)
    synchronize(device)
    report.seconds = time.perf_counter() - start
    report.mask_sha256 = mask_sha256(model)
    return report
