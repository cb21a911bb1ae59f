"""The layer-by-layer pruning driver shared by every method (introduced in 02-Prune).

Wanda's algorithm (Sun et al. 2023, arXiv 2306.11695), read top to bottom in ``prune_all``:

    capture the first decoder layer's inputs on the calibration tokens
    for each decoder layer:
        prune_layer: run the layer with hooks on its linears to collect their statistic (Σ_t x_tj² for Wanda),
                     then score, mask and apply for every linear
        feed_next_layer: run the *pruned* layer to make the next layer's inputs

Methods live in ``prune.methods``; OWL's per-layer sparsities in ``prune.owl``; the low-memory mode in
``prune.streaming``; disk-streamed pruning in ``prune.disk``; data-parallel calibration in ``prune.parallel``.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Sequence

import pandas as pd
import torch
from torch import nn

from ..core.device import SectionTimer, synchronize
from ..core.errors import BadInput, LabError, is_out_of_memory
from ..core.anatomy import find_decoder_layers, find_linears, find_routers
from ..core.sparse.bits import KeptMasks, record_kept
from ..core.validation import check_flag, check_model, check_positive_int, check_tokens
from .calibration import LayerInputs, collect_statistics
from .masks import SparsityTarget
from .methods import METHODS  # noqa: F401  (re-exported: the driver runs these)
from .owl import layer_outlier_ratios, owl_sparsities
from .parallel import DataParallel, check_ranks_agree
from .sparsity import mask_sha256
from .spec import PruneSpec, check_spec
from .streaming import Placement, calibration_inputs, compute_device, layer_visits

# True-sequential mode re-collects statistics for the sublayers that read other sublayers' outputs directly,
# after everything before them in the block is pruned: the attention output (o_proj; OPT's out_proj), then the MLP
# output (down_proj; OPT's fc2; every expert's and the shared expert's down_proj together), in the order the layer
# registers them.
TRUE_SEQUENTIAL_LATER = ("o_proj", "out_proj", "down_proj", "fc2")


@dataclass
class SublayerReport:
    layer: int
    sublayer: str
    out_features: int
    in_features: int
    pruned: int
    sparsity: float
    tokens: int | None = None  # a routed expert's: calibration tokens its router sent to it (0: pruned by |W|)


@dataclass
class DenseReport:
    """A weight matrix of a decoder layer that was left dense on purpose, and why."""

    layer: int
    weight: str
    shape: tuple[int, ...]
    reason: str


ROUTER_REASON = "router: weighs the experts for each token; never pruned"


@dataclass
class PruneReport:
    """What ``prune_model`` did: the spec it ran, one row per pruned linear, the times and the mask fingerprint."""

    spec: PruneSpec
    nsamples: int = 0
    seqlen: int = 0
    layer_sparsity: list[float] | None = None  # OWL: each layer's own sparsity
    outlier_ratios: list[float] | None = None  # OWL: what they were computed from
    low_memory: bool = False  # the model stayed in CPU memory; layers and activations visited ``device``
    device: str = ""  # where the layers computed
    seconds: float = 0.0  # wall time of the whole call
    method_seconds: float = 0.0  # time inside the method's score / mask / update, without forward passes
    layer_seconds: list[float] = field(default_factory=list)  # each layer's passes and pruning (GPU time on CUDA)
    sublayers: list[SublayerReport] = field(default_factory=list)
    left_dense: list[DenseReport] = field(default_factory=list)  # weights of decoder layers not pruned, and why
    mask_sha256: str = ""

    method = property(lambda self: self.spec.method)
    params = property(lambda self: dict(self.spec.params))
    true_sequential = property(lambda self: self.spec.true_sequential)
    label = property(lambda self: self.spec.label, doc='e.g. "wanda 50%", "magnitude + OWL 70%"')
    target = property(lambda self: self.spec.target.label, doc='the target\'s label: "50%", "2:4"')
    target_sparsity = property(lambda self: self.spec.target.fraction)

    @property
    def nm(self) -> tuple[int, int] | None:
        target = self.spec.target
        return (target.n, target.m) if target.is_nm else None

    @property
    def owl(self) -> dict | None:
        """OWL's parameters and the measured outlier ratios; None without OWL."""
        if self.spec.owl is None:
            return None
        return {**self.spec.to_dict()["owl"], "outlier_ratios": self.outlier_ratios}

    @property
    def measured_sparsity(self) -> float:
        """Share of pruned weights over all pruned linears (and experts)."""
        total = sum(s.out_features * s.in_features for s in self.sublayers)
        return sum(s.pruned for s in self.sublayers) / total if total else 0.0

    @property
    def empty_experts(self) -> list[str]:
        """"layers.{i}.{sublayer}" of every routed expert matrix that received no calibration token."""
        return [f"layers.{s.layer}.{s.sublayer}" for s in self.sublayers if s.tokens == 0]

    def to_frame(self) -> pd.DataFrame:
        """One row per pruned linear; the ``tokens`` column only when the model has routed experts."""
        frame = pd.DataFrame(self.records())
        return frame.astype({"tokens": "Int64"}) if "tokens" in frame else frame

    def records(self) -> list[dict]:
        """The sublayer rows as dicts (report.json); "tokens" only on routed experts' rows."""
        return [{k: v for k, v in asdict(s).items() if k != "tokens" or v is not None} for s in self.sublayers]

    def layer_table(self) -> pd.DataFrame:
        """One row per decoder layer: what was pruned (matrices: linears and routed experts' matrices, their weights,
        how many were pruned, experts that received no calibration token) and what was left dense, and why."""
        rows: dict[int, dict] = {}
        for s in self.sublayers:
            row = rows.setdefault(s.layer, {"matrices": 0, "weights": 0, "pruned": 0, "experts without tokens": 0,
                                            "left dense": ""})
            row["matrices"] += 1
            row["weights"] += s.out_features * s.in_features
            row["pruned"] += s.pruned
            row["experts without tokens"] += s.tokens == 0
        for d in self.left_dense:
            row = rows[d.layer]
            row["left dense"] = "; ".join(filter(None, [row["left dense"], f"{d.weight} ({d.reason})"]))
        frame = pd.DataFrame.from_dict(rows, orient="index").rename_axis("layer")
        frame.insert(3, "sparsity", frame["pruned"] / frame["weights"])
        return frame


def prune_model(model: nn.Module, spec: PruneSpec, tokens: torch.Tensor | None = None, batch_size: int = 8,
                progress: bool = True, *, low_memory: bool | str | torch.device = False,
                fingerprint: bool = True, parallel: DataParallel | None = None) -> PruneReport:
    """Prune every linear of every decoder layer in place as ``spec`` says (embeddings and lm_head are never
    touched): ``lu.prune_model(model, lu.PruneSpec("wanda", 0.5), tokens, batch_size=8)``.

    tokens: (nsamples, seqlen) calibration token ids, needed by every method but magnitude and by OWL.
    low_memory: False — prune where the model is. True, or a device such as "cuda" — the model stays in CPU
    memory; each decoder layer, and each batch of calibration activations (kept in pinned CPU memory), is copied
    to the device (True: the best one here) while the previous one computes (``streaming``). Same masks as the
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
        report = prune_all(model, spec, tokens, batch_size, where, progress, parallel)
        if fingerprint:
            report.mask_sha256 = mask_sha256(model)
            check_ranks_agree(parallel, report.mask_sha256, "the masks")
        return report
    except RuntimeError as exc:
        if not is_out_of_memory(exc):
            raise
        raise out_of_memory_advice(exc, spec.label, where.streamed) from exc


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
def prune_all(model: nn.Module, spec: PruneSpec, tokens: torch.Tensor | None, batch_size: int,
              where: Placement, progress: bool, parallel: DataParallel | None = None) -> PruneReport:
    """The layer loop, on ``where.device``; with ``where.streamed`` the layers and activations stream from CPU
    memory; with ``where.disk`` each layer is read from the checkpoint, and written out once pruned. The report's
    ``mask_sha256`` is left to the caller (``prune_model``, ``disk.prune_from_disk``).

    No host-device syncs inside the loop: times are CUDA events read at the end, pruned counts stay on the GPU
    until then. The host runs ahead and the GPU never waits for Python."""
    device, streamed, disk = where
    synchronize(device)
    start = time.perf_counter()
    layers = find_decoder_layers(model)
    report = PruneReport(spec, *(tokens.shape if tokens is not None else (0, 0)), low_memory=streamed,
                         device=str(device))
    if spec.owl is not None:
        report.outlier_ratios = layer_outlier_ratios(model, tokens, batch_size, spec.owl.m, progress,
                                                     low_memory=device if streamed else False, parallel=parallel,
                                                     disk=None if disk is None else disk.reading())
        report.layer_sparsity = owl_sparsities(report.outlier_ratios, spec.target.sparsity, spec.owl.lam)
    targets = layer_targets(spec, len(layers), report.layer_sparsity)
    inputs = (calibration_inputs(model, tokens, batch_size, device, streamed, parallel)
              if spec.runner.needs_calibration else None)
    method_timer, layer_timer = SectionTimer(device), SectionTimer(device)
    pruned, kept, prefixes = [], KeptMasks(), {id(m): name for name, m in model.named_modules()}
    with layer_visits(layers, device, streamed, spec.label, progress, disk) as visits:
        for i, layer in visits:
            with layer_timer.section():
                masks = {}
                pruned += prune_layer(layer, i, inputs, spec, targets[i], method_timer, masks)
                kept.add_layer(prefixes[id(layer)], layer, find_linears(layer), masks)
                feed_next_layer(inputs, layer, i, len(layers))
            report.left_dense += routers_left_dense(layer, i)
            if disk is not None:  # written out (and hashed) now; the layer is dropped when the visit ends
                disk.store(i, layer, kept.pop_layer(prefixes[id(layer)]))
    if inputs is not None:
        inputs.finish()
    synchronize(device)
    report.seconds = time.perf_counter() - start
    target = spec.target
    kept.nm = (target.n, target.m) if target.is_nm else None
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
                timer: SectionTimer, masks: dict | None = None) -> list[tuple[int, str, torch.Size, torch.Tensor, int | None]]:
    """Prune every linear of one decoder layer: collect each stage's statistics on ``inputs``, then let the method
    score, mask and apply. Returns (layer, sublayer, weight shape, pruned count on the device, tokens routed to it
    or None) per linear; an expert's count is None without calibration. ``masks``, if given, receives each
    sublayer's pruned mask (True = pruned, shaped like its weight)."""
    linears = find_linears(layer)
    method, pruned = spec.runner, []
    for stage in calibration_stages(list(linears), spec.true_sequential):
        stats, routed = {}, {}
        if inputs is not None:
            stats = collect_statistics(layer, index, inputs, {n: linears[n] for n in stage}, method.statistic)
            routed = stats.routed
        for name in stage:
            with timer.section():
                mask = method.apply(linears[name], stats.get(name), target, spec.params)
            if masks is not None:
                masks[name] = mask
            pruned.append((index, name, mask.shape, mask.sum(), routed.get(name)))
    return pruned


def routers_left_dense(layer: nn.Module, index: int) -> list[DenseReport]:
    """One row per weight matrix of the layer's routers (never pruned)."""
    return [DenseReport(index, f"{name}.{param_name}", tuple(param.shape), ROUTER_REASON)
            for name, router in find_routers(layer).items()
            for param_name, param in router.named_parameters() if param.dim() > 1]


def feed_next_layer(inputs: LayerInputs | None, layer: nn.Module, index: int, n_layers: int) -> None:
    """Run the pruned layer on the calibration batches: its outputs become the next layer's inputs (the last
    layer has no next one; a method without calibration has no inputs)."""
    if inputs is not None and index + 1 < n_layers:
        inputs.run(layer, index, advance=True)


def sublayer_reports(pruned: list[tuple[int, str, torch.Size, torch.Tensor, int | None]]) -> list[SublayerReport]:
    """One row per pruned linear; the counts cross from the device in one sync."""
    if not pruned:
        return []
    counts = torch.stack([count for _, _, _, count, _ in pruned]).tolist()
    return [SublayerReport(i, name, *shape, n, n / shape.numel(), tokens)
            for (i, name, shape, _, tokens), n in zip(pruned, counts)]
