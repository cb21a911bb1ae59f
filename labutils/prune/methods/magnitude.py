"""Magnitude pruning: drop the smallest |W_ij|, by default across the whole matrix (one threshold per linear, the
baseline of the Wanda paper and its authors' code); ``group="row"`` compares within each output row. Needs no
calibration (02-Prune)."""
import torch
from torch import nn

from ..masks import SparsityTarget, prune_by_score
from .base import NO_STATISTIC, Method, check_group


def magnitude_score(weight: torch.Tensor) -> torch.Tensor:
    """|W| in float32. weight: (out, in) → (out, in)."""
    return weight.detach().abs().float()


def prune(linear: nn.Linear, statistic: None, target: SparsityTarget, group: str) -> torch.Tensor:
    return prune_by_score(linear, magnitude_score(linear.weight), target, group)


METHOD = Method("magnitude", NO_STATISTIC, prune, "|W|: the smallest weights of each matrix go",
                {"group": "layer"}, check_group)
