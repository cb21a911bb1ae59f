"""Magnitude pruning: drop the smallest |W_ij| of every output row. Needs no calibration (02-Prune)."""
import torch
from torch import nn

from ..masks import SparsityTarget, apply_mask, select_mask
from .base import NO_STATISTIC, Method


def magnitude_score(weight: torch.Tensor) -> torch.Tensor:
    """|W| in float32. weight: (out, in) → (out, in)."""
    return weight.detach().abs().float()


def prune(linear: nn.Linear, statistic: None, target: SparsityTarget) -> torch.Tensor:
    mask = select_mask(magnitude_score(linear.weight), target)
    apply_mask(linear, mask)
    return mask


METHOD = Method("magnitude", NO_STATISTIC, prune, "|W|: the smallest weights of each row go")
