"""The layer-by-layer pruning driver shared by every method (introduced in 02-Prune).

Wanda's algorithm (Sun et al. 2023, arXiv 2306.11695), read top to bottom in ``prune_all``:

    capture the first decoder layer's inputs on the calibration tokens
    for each decoder layer:
        prune_layer: run the layer with hooks on its linears to collect their statistic (Σ_t x_tj² for Wanda),
                     then score, mask and apply for every linear
        feed_next_layer: run the *pruned* layer to make the next layer's inputs

Where the layers and activations live: ``prune.placement`` (the low-memory mode's machinery: ``prune.offload``;
disk-streamed pruning: ``prune.disk``). The statistic: ``prune.statistics``; the methods: ``prune.methods``; OWL's
per-layer sparsities: ``prune.owl``; data-parallel calibration: ``prune.parallel``; the report: ``prune.report``.
"""
from __future__ import annotations

import time
from typing import Sequence

import torch
from torch import nn

from ..core.anatomy import find_decoder_layers, find_linears
from ..core.device import SectionTimer, synchronize
from ..core.errors import BadInput, LabError, is_out_of_memory
from ..core.sparse.bits import KeptMasks, record_kept
from ..core.validation import check_flag, check_model, check_positive_int, check_tokens
from .calibration import CalibrationData, LayerInputs
from .masks import SparsityTarget
from .methods import METHODS  # noqa: F401  (re-exported: the driver runs these)
from .owl import layer_outlier_ratios, owl_sparsities
from .parallel import DataParallel, check_ranks_agree
from .placement import Placement, calibration_inputs, compute_device, layer_visits
from .report import PruneReport, routers_left_dense, sublayer_reports
from .sparsity import mask_sha256
from .spec import PruneSpec, check_spec
from .statistics import collect_statistics

# True-sequential mode re-collects statistics for the sublayers that read other sublayers' outputs directly,
# after everything before them in the block is pruned: the attention output (o_proj; OPT's out_proj), then the MLP
# output (down_proj; OPT's fc2; every expert's and the shared expert's down_proj together), in the order the layer
# registers them.
TRUE_SEQUENTIAL_LATER = ("o_proj", "out_proj", "down_proj", "fc2")


def prune_model(model: nn.Module, spec: PruneSpec, tokens: torch.Tensor | None = None, batch_size: int = 8,
                progress: bool = True, *, low_memory: bool | str | torch.device = False,
                fingerprint: bool = True, parallel: DataParallel | None = None) -> PruneReport:
    """Prune every linear of every decoder layer in place as ``spec`` says (embeddings and lm_head are never
    touched): ``lu.prune_model(model, lu.PruneSpec("wanda", 0.5), tokens, batch_size=8)``.

    tokens: (nsamples, seqlen) calibration token ids, needed by every method but magnitude and by OWL.
    low_memory: False — prune where the model is. True, or a device such as "cuda" — the model stays in CPU
    memory; each decoder layer, and each batch of calibration activations (kept in pinned CPU memory), is copied
    to the device (True: the best one here) while the previous one computes (``offload``). Same masks as the
    default mode for the same ``batch_size``; GPU memory holds a few layers and batches, not a model.
    fingerprint: fill ``report.mask_sha256`` (after ``report.seconds`` is taken). False leaves it "" — for a
    benchmark that times pruning alone and hashes the masks afterwards (``lu.mask_sha256(model)``).
    parallel: this process's place among torchrun's processes (``parallel.start_data_parallel``): it runs its share
    of the calibration batches and the statistics are summed in one process's order, so the masks are the same.
    """
    check_model(model)
    check_spec(spec)
    check_flag("fingerprint", fingerprint)
    tokens = calibration_tokens(model, spec, tokens)
    check_positive_int("batch_size", batch_size)
    check_prunable(model, spec.target)
    where = compute_device(model, low_memory)
    try:
        report = prune_all(model, spec, CalibrationData(tokens, batch_size, parallel), where, progress)
        if fingerprint:
            report.mask_sha256 = mask_sha256(model)
            check_ranks_agree(parallel, report.mask_sha256, "the masks")
        return report
    except RuntimeError as exc:
        if not is_out_of_memory(exc):
            raise
        raise out_of_memory_advice(exc, spec.label, where.offloaded) from exc


def check_prunable(model: nn.Module, target: SparsityTarget) -> None:
    """Refuse an N:M target that some linear's input size cannot take, before anything is changed."""
    if not target.is_nm:
        return
    for i, layer in enumerate(find_decoder_layers(model)):
        for name, lin in find_linears(layer).items():
            if lin.in_features % target.m:
                raise BadInput(f"N:M pattern {target.label} needs every input size divisible by M={target.m}; "
                               f"layer {i} {name} has {lin.in_features} inputs")


def calibration_tokens(model: nn.Module, spec: PruneSpec, tokens) -> torch.Tensor | None:
    """The validated (nsamples, seqlen) token ids the method or OWL needs, as long; None when nothing needs them
    (given tokens are then ignored)."""
    if not spec.needs_calibration:
        return None
    if tokens is None or (isinstance(tokens, torch.Tensor) and (tokens.ndim != 2 or tokens.numel() == 0)):
        raise BadInput(f"method {spec.method!r}{' with OWL' if spec.owl else ''} needs calibration tokens of shape "
                       f"(nsamples, seqlen); got {None if tokens is None else tuple(tokens.shape)}")
    return check_tokens("calibration tokens", tokens, model.config.vocab_size, ndim=2)


def out_of_memory_advice(exc: RuntimeError, variant: str, low_memory: bool) -> LabError:
    """What to change after running out of GPU memory (``torch.OutOfMemoryError``) or CPU memory while pruning."""
    if isinstance(exc, torch.OutOfMemoryError):
        advice = "" if low_memory else ", or prune with low_memory=True (--low-memory)"
        return LabError(f"out of GPU memory while pruning with {variant}: use fewer calibration samples "
                        f"(--nsamples), shorter windows (--seqlen) or a smaller --batch-size{advice}")
    return LabError(f"out of CPU memory while pruning with {variant}: use a smaller --batch-size, fewer --nsamples, "
                    f"shorter --seqlen")


@torch.no_grad()
def prune_all(model: nn.Module, spec: PruneSpec, data: CalibrationData, where: Placement,
              progress: bool) -> PruneReport:
    """The layer loop, on ``where.device``; with ``where.offloaded`` the layers and activations visit it from CPU
    memory; with ``where.disk`` each layer is read from the checkpoint, and written out once pruned. The report's
    ``mask_sha256`` is left to the caller (``prune_model``, ``disk.prune_streamed``).

    No host-device syncs inside the loop: times are CUDA events read at the end, pruned counts stay on the GPU
    until then. The host runs ahead and the GPU never waits for Python."""
    device, offloaded, disk = where
    synchronize(device)
    start = time.perf_counter()
    layers = find_decoder_layers(model)
    report = PruneReport(spec, *(data.tokens.shape if data.tokens is not None else (0, 0)), low_memory=offloaded,
                         device=str(device))
    if spec.owl is not None:
        owl_where = where if disk is None else where._replace(disk=disk.reading())
        report.outlier_ratios = layer_outlier_ratios(model, data, spec.owl.m, owl_where, progress)
        report.layer_sparsity = owl_sparsities(report.outlier_ratios, spec.target.sparsity, spec.owl.lam)
    targets = layer_targets(spec, len(layers), report.layer_sparsity)
    inputs = (calibration_inputs(model, data.tokens, data.batch_size, device, offloaded, data.parallel)
              if spec.runner.needs_calibration else None)
    method_timer, layer_timer = SectionTimer(device), SectionTimer(device)
    pruned, kept, prefixes = [], KeptMasks(nm=spec.target.nm), {id(m): name for name, m in model.named_modules()}
    with layer_visits(layers, where, spec.label, progress) as visits:
        for i, layer in visits:
            with layer_timer.section():
                layer_pruned, masks = prune_layer(layer, i, inputs, spec, targets[i], method_timer)
                pruned += layer_pruned
                kept.add_layer(prefixes[id(layer)], layer, find_linears(layer), masks)
                feed_next_layer(inputs, layer, i, len(layers))
            report.left_dense += routers_left_dense(layer, i)
            if disk is not None:  # written out (and hashed) now; the layer is dropped when the visit ends
                disk.store(i, layer, kept.pop_layer(prefixes[id(layer)]))
    if inputs is not None:
        inputs.finish()
    synchronize(device)
    report.seconds = time.perf_counter() - start
    record_kept(model, kept)
    report.sublayers = sublayer_reports(pruned)
    report.method_seconds = sum(method_timer.seconds())
    report.layer_seconds = layer_timer.seconds()
    return report


def layer_targets(spec: PruneSpec, n_layers: int, layer_sparsity: list[float] | None) -> list[SparsityTarget]:
    """Each decoder layer's target: the spec's own, or OWL's per-layer sparsities."""
    if layer_sparsity is None:
        return [spec.target] * n_layers
    return [SparsityTarget(sparsity=s) for s in layer_sparsity]


def calibration_stages(names: Sequence[str], true_sequential: bool) -> list[list[str]]:
    """Groups of sublayers whose statistics are collected in one pass, in order: with ``true_sequential``, first
    all but the later ones, then each later kind (``TRUE_SEQUENTIAL_LATER``: o_proj, then every down_proj …)."""
    if not true_sequential:
        return [list(names)]
    later: dict[str, list[str]] = {}
    for name in names:
        kind = name.rpartition(".")[2]
        if kind in TRUE_SEQUENTIAL_LATER:
            later.setdefault(kind, []).append(name)
    first = [n for n in names if n.rpartition(".")[2] not in later]
    return [first, *later.values()]


def prune_layer(layer: nn.Module, index: int, inputs: LayerInputs | None, spec: PruneSpec, target: SparsityTarget,
                timer: SectionTimer) -> tuple[list[tuple[int, str, torch.Size, torch.Tensor, int | None]],
                                              dict[str, torch.Tensor]]:
    """Prune every linear of one decoder layer: collect each stage's statistics on ``inputs``, then let the method
    score, mask and apply. Returns (layer, sublayer, weight shape, pruned count on the device, tokens routed to it
    or None) per linear — an expert's count is None without calibration — and each sublayer's pruned mask
    (True = pruned, shaped like its weight)."""
    linears = find_linears(layer)
    method, pruned, masks = spec.runner, [], {}
    for stage in calibration_stages(list(linears), spec.true_sequential):
        stats, routed = {}, {}
        if inputs is not None:
            stats = collect_statistics(layer, index, inputs, {n: linears[n] for n in stage}, method.statistic)
            routed = stats.routed
        for name in stage:
            with timer.section():
                mask = method.apply(linears[name], stats.get(name), target, spec.params)
            masks[name] = mask
            pruned.append((index, name, mask.shape, mask.sum(), routed.get(name)))
    return pruned, masks


def feed_next_layer(inputs: LayerInputs | None, layer: nn.Module, index: int, n_layers: int) -> None:
    """Run the pruned layer on the calibration batches: its outputs become the next layer's inputs (the last
    layer has no next one; a method without calibration has no inputs)."""
    if inputs is not None and index + 1 < n_layers:
        inputs.run(layer, index, advance=True)
