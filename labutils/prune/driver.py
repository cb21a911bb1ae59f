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

from .calibration import layer_statistics
from ..core.validation import check_model, check_positive_int, check_tokens, describe
from ..core.device import SectionTimer, get_device, synchronize
from ..core.errors import BadInput, LabError, is_out_of_memory
from .masks import SparsityTarget, as_target
from .methods import REGISTRY, Method, get_method
from ..core.models import find_decoder_layers, find_linears, model_device
from .owl import OwlConfig, check_owl_lambda, layer_outlier_ratios, owl_sparsities
from .sparsity import mask_sha256
from .streaming import calibration_inputs, layer_visits

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
    low_memory: bool = False  # the model stayed in CPU memory; layers and activations visited ``device``
    device: str = ""  # where the layers computed
    seconds: float = 0.0  # wall time of the whole call
    method_seconds: float = 0.0  # time inside the method's score / mask / update, without forward passes
    layer_seconds: list[float] = field(default_factory=list)  # each layer's passes and pruning (GPU time on CUDA)
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
    if not isinstance(method, str):
        raise BadInput(f"method must be a method's name, one of {', '.join(REGISTRY)}; got {describe(method)}")
    meth = get_method(method)
    resolved = meth.resolve(params)
    if true_sequential and not meth.needs_calibration:
        raise BadInput(f"true-sequential mode re-collects calibration statistics; method {method!r} uses none")
    if owl is not None and target.is_nm:
        raise BadInput(f"OWL sets a different sparsity per layer and needs an unstructured target; got {target.label}")
    if owl is not None:
        check_owl_lambda(owl.lam, target.sparsity)
    return meth, resolved


def resolve_device(model: nn.Module, device: torch.device | str | None, low_memory: bool) -> torch.device:
    """Where the layers compute. Default mode: where the model is. Low-memory mode: the model must be in CPU
    memory and the layers visit ``device`` (default: the best one here, ``get_device``)."""
    home = model_device(model)
    if low_memory:
        if home.type != "cpu":
            raise BadInput(f"low_memory keeps the model in CPU memory and moves one layer at a time to the GPU; the "
                           f"model is on {home}: load it on the CPU (or move it with model.to('cpu')) first")
        return get_device(None if device is None else str(device))
    if device is not None and torch.device(device).type != home.type:
        raise BadInput(f"the model is on {home} and the default mode prunes where the model is; got device={device!r}."
                       " Move the model there first, or pass low_memory=True to stream it from CPU memory")
    return home


def prune_model(model: nn.Module, method: str, target: SparsityTarget | float | str,
                tokens: torch.Tensor | None = None, batch_size: int = 8, progress: bool = True, *,
                params: dict | None = None, true_sequential: bool = False, owl: OwlConfig | None = None,
                device: torch.device | str | None = None, low_memory: bool = False) -> PruneReport:
    """Prune every linear of every decoder layer in place (embeddings and lm_head are never touched).

    target: a SparsityTarget, a sparsity in [0, 1) such as 0.5, or an "N:M" pattern such as "2:4" (``as_target``).
    tokens: (nsamples, seqlen) calibration token ids, needed by every method but magnitude and by OWL.
    params: the method's parameters (``lu.get_method(name).params`` lists them). true_sequential: re-collect
    statistics of o_proj and down_proj after the sublayers before them are pruned. owl: give each layer its
    own sparsity from its outlier ratio (unstructured targets only).
    low_memory: the model stays in CPU memory; each decoder layer, and each batch of calibration activations
    (kept in pinned CPU memory), is copied to ``device`` while the previous one computes (``streaming``). Same
    masks as the default mode for the same ``batch_size``; GPU memory holds a few layers and batches, not a model.
    """
    check_model(model)
    target = as_target(target)
    meth, resolved = check_options(method, target, params, true_sequential, owl)
    tokens = calibration_tokens(model, meth, owl, tokens)
    check_positive_int("batch_size", batch_size)
    check_prunable(model, target)
    compute = resolve_device(model, device, low_memory)
    try:
        return _prune_layers(model, meth, resolved, target, tokens, batch_size, progress, true_sequential, owl,
                             compute, low_memory)
    except RuntimeError as exc:
        if not is_out_of_memory(exc):
            raise
        raise out_of_memory_advice(exc, f"{method} {target.label}", low_memory) from exc


def out_of_memory_advice(exc: RuntimeError, variant: str, low_memory: bool) -> LabError:
    """What to change after running out of GPU memory (``torch.OutOfMemoryError``) or CPU memory while pruning."""
    if isinstance(exc, torch.OutOfMemoryError):
        advice = "" if low_memory else ", or prune with low_memory=True (--low-memory)"
        return LabError(f"out of GPU memory while pruning with {variant}: use fewer calibration samples "
                        f"(--nsamples), shorter windows (--seqlen) or a smaller --batch-size{advice}")
    return LabError(f"out of CPU memory while pruning with {variant}: use a smaller --batch-size, fewer --nsamples, "
                    f"shorter --seqlen")


def calibration_tokens(model: nn.Module, meth: Method, owl: OwlConfig | None, tokens) -> torch.Tensor | None:
    """The validated (nsamples, seqlen) token ids the method or OWL needs, as long; None when nothing needs them
    (given tokens are then ignored)."""
    if not (meth.needs_calibration or owl is not None):
        return None
    if tokens is None or (isinstance(tokens, torch.Tensor) and (tokens.ndim != 2 or tokens.numel() == 0)):
        raise BadInput(f"method {meth.name!r}{' with OWL' if owl else ''} needs calibration tokens of shape "
                       f"(nsamples, seqlen); got {None if tokens is None else tuple(tokens.shape)}")
    return check_tokens("calibration tokens", tokens, model.config.vocab_size, ndim=2)


def _layer_targets(model, target, tokens, batch_size, progress, owl, report, device, low_memory
                   ) -> list[SparsityTarget]:
    layers = find_decoder_layers(model)
    if owl is None:
        return [target] * len(layers)
    ratios = layer_outlier_ratios(model, tokens, batch_size, owl.m, progress, device=device, low_memory=low_memory)
    report.layer_sparsity = owl_sparsities(ratios, target.sparsity, owl.lam)
    report.owl = {"M": owl.m, "lambda": owl.lam, "outlier_ratios": ratios}
    return [SparsityTarget(sparsity=s) for s in report.layer_sparsity]


@torch.no_grad()
def _prune_layers(model, meth: Method, params, target, tokens, batch_size, progress, true_sequential, owl,
                  device: torch.device, low_memory: bool):
    # No host-device syncs inside the layer loop: times are CUDA events read at the end, pruned counts stay on
    # the GPU until then. The host runs ahead and the GPU never waits for Python.
    synchronize(device)
    start = time.perf_counter()
    layers = find_decoder_layers(model)
    report = PruneReport(method=meth.name, target=target.label, target_sparsity=target.fraction,
                         nm=(target.n, target.m) if target.is_nm else None,
                         nsamples=0 if tokens is None else tokens.shape[0],
                         seqlen=0 if tokens is None else tokens.shape[1], params=params,
                         true_sequential=true_sequential, low_memory=low_memory, device=str(device))
    targets = _layer_targets(model, target, tokens, batch_size, progress, owl, report, device, low_memory)
    inputs = calibration_inputs(model, tokens, batch_size, device, low_memory) if meth.needs_calibration else None
    method_timer, layer_timer = SectionTimer(device), SectionTimer(device)
    pruned: list[tuple[int, str, torch.Size, torch.Tensor]] = []
    with layer_visits(layers, device, low_memory, report.label, progress) as visits:
        for i, layer in visits:
            with layer_timer.section():
                linears = find_linears(layer)
                for stage in calibration_stages(list(linears), true_sequential):
                    stats = {}
                    if inputs is not None:
                        stats = layer_statistics(layer, i, inputs, {n: linears[n] for n in stage}, meth.statistic)
                    for name in stage:
                        with method_timer.section():
                            mask = meth.apply(linears[name], stats.get(name), targets[i], params)
                        pruned.append((i, name, mask.shape, mask.sum()))
                if inputs is not None and i + 1 < len(layers):
                    inputs.run(layer, i, advance=True)
    if inputs is not None:
        inputs.finish()
    synchronize(device)
    report.seconds = time.perf_counter() - start
    counts = torch.stack([count for *_, count in pruned]).tolist()
    report.sublayers = [SublayerReport(i, name, *shape, n, n / shape.numel())
                        for (i, name, shape, _), n in zip(pruned, counts)]
    report.method_seconds = sum(method_timer.seconds())
    report.layer_seconds = layer_timer.seconds()
    report.mask_sha256 = mask_sha256(model)
    return report
