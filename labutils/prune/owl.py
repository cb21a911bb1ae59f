"""OWL — outlier-weighted layer-wise sparsity (Yin et al., ICML 2024, arXiv 2310.05175).

Layers whose Wanda scores |W|·‖X‖ hold more outliers (scores above M × the layer's mean) matter more, so they
are pruned less. Each layer's outlier ratio D_l is min-max normalised to [0, 1] and layer l gets sparsity
S − 2λ·(D̂_l − mean D̂): the spread between the least and most pruned layer is 2λ and the average stays S.
Composes with any unstructured method (Wanda, magnitude, …).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..core.anatomy import find_decoder_layers, find_linears
from ..core.errors import BadInput
from ..core.validation import check_number
from .calibration import CalibrationData
from .methods.wanda import wanda_score
from .placement import Placement, calibration_inputs, layer_visits
from .statistics import INPUT_NORMS, collect_statistics


@dataclass(frozen=True)
class OwlConfig:
    """OWL's two hyper-parameters: the outlier threshold M (× layer mean) and the sparsity spread λ."""

    m: float = 5.0
    lam: float = 0.08

    def __post_init__(self):
        check_number("OWL M", self.m, 0, 1e6, interval="(]", allowed="a number > 0 (the paper uses 5)")
        check_number("OWL lambda", self.lam, 0, 1, allowed="a number in [0, 1) that keeps every layer's sparsity "
                                                           "in [0, 1) (the paper uses 0.08)")


def check_owl_lambda(lam: float, sparsity: float) -> None:
    """Refuse, before any calibration, a λ that no outlier ratios can make work at target ``sparsity``.

    When the layers' ratios differ, the normalised ratios span [0, 1] with some mean μ, so layer sparsities run
    from S − 2λ(1 − μ) to S + 2λμ: 2λ apart, and all must lie in [0, 1). Hence λ < 0.5 at every target (and λ = 0
    at S = 0). The bound is tight: ratios with μ = 1 − S allow every λ < 0.5, so nothing below it is refused here;
    ``owl_sparsities`` checks the exact bound once the ratios are measured.
    """
    flag = "--owl-lambda, OwlConfig(lam=…)"
    if sparsity == 0 and lam > 0:
        raise BadInput(f"OWL lambda {lam!r} moves some layer's sparsity out of [0, 1) at target 0%: the layers average "
                       f"0, so any spread takes one below 0; allowed here: lambda = 0 ({flag})")
    if lam >= 0.5:
        raise BadInput(f"OWL lambda {lam!r} moves some layer's sparsity out of [0, 1) at every target: the most and "
                       f"least pruned layers are 2·lambda apart; allowed here: 0 ≤ lambda < 0.5 ({flag}; the paper "
                       f"uses 0.08)")


@torch.no_grad()
def layer_outlier_ratios(model: nn.Module, data: CalibrationData, m: float, where: Placement,
                         progress: bool = True) -> list[float]:
    """Share of each decoder layer's Wanda scores (over all its linears) above ``m`` × their mean, measured on the
    dense model with one pass per layer: the hooks collect input norms while the layer makes its outputs.
    ``data``: the calibration tokens, batch size and data-parallel share, as ``prune_model`` takes them; ``where``:
    as ``placement.compute_device`` gives it (``where.disk``: a ``disk.DiskLayers`` that only reads each layer from
    the checkpoint; the model itself is then a skeleton)."""
    layers = find_decoder_layers(model)
    inputs = calibration_inputs(model, data.tokens, data.batch_size, where.device, where.offloaded, data.parallel)
    ratios = []
    with layer_visits(layers, where, "OWL outlier ratios", progress) as visits:
        for i, layer in visits:
            linears = find_linears(layer)
            stats = collect_statistics(layer, i, inputs, linears, INPUT_NORMS, advance=True)
            scores = torch.cat([wanda_score(lin.weight, stats[name]).flatten() for name, lin in linears.items()])
            ratios.append((scores > m * scores.mean()).float().mean())
    inputs.finish()
    return torch.stack(ratios).tolist()


def owl_sparsities(ratios: list[float], sparsity: float, lam: float) -> list[float]:
    """Per-layer sparsities whose mean is ``sparsity``: layers with more outliers get less (spread 2λ)."""
    r = torch.tensor(ratios, dtype=torch.float64)
    if len(ratios) < 2 or float(r.max() - r.min()) == 0.0:
        return [float(sparsity)] * len(ratios)
    normed = (r - r.min()) / (r.max() - r.min())
    mean = float(normed.mean())
    # sparsity − 2λ(1 − mean) ≥ 0 for the layer with the most outliers, sparsity + 2λ·mean < 1 for the fewest.
    lam_max = min(sparsity / (2 * (1 - mean)), (1 - sparsity) / (2 * mean))
    if not 0 <= lam < lam_max:
        raise BadInput(f"OWL lambda {lam!r} moves some layer's sparsity out of [0, 1) at target {sparsity:.0%}; "
                       f"allowed here: 0 ≤ lambda < {lam_max:.4f}")
    return (sparsity - 2 * lam * (normed - mean)).tolist()
