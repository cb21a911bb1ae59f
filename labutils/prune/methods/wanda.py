"""Wanda (Sun et al. 2023, arXiv 2306.11695): score |W_ij| · ‖X_j‖₂, compared within each output row (02-Prune)."""
import torch
from torch import nn

from ...core.errors import BadInput
from ..masks import SparsityTarget, prune_by_score
from .base import INPUT_NORMS, Method, check_group


def check_norm_shape(weight: torch.Tensor, sq_norm: torch.Tensor) -> None:
    """BadInput unless ``sq_norm`` holds one value per input of ``weight``: (in,) for (out, in)."""
    if sq_norm.shape != (weight.shape[1],):
        raise BadInput(f"sq_norm must have shape ({weight.shape[1]},) to match weight {tuple(weight.shape)}; "
                       f"got {tuple(sq_norm.shape)}")


def wanda_score(weight: torch.Tensor, sq_norm: torch.Tensor) -> torch.Tensor:
    """Wanda's importance |W_ij| · ‖X_j‖₂, in float32.

    weight: (out, in); sq_norm: (in,) — the sum over calibration tokens of x_j², so ‖X_j‖₂ = sqrt(sq_norm).
    """
    check_norm_shape(weight, sq_norm)
    return weight.detach().abs().float() * sq_norm.float().sqrt().to(weight.device).unsqueeze(0)


def prune(linear: nn.Linear, sq_norm: torch.Tensor, target: SparsityTarget, group: str) -> torch.Tensor:
    return prune_by_score(linear, wanda_score(linear.weight, sq_norm), target, group)


METHOD = Method("wanda", INPUT_NORMS, prune, "|W|·‖X‖: weights times input norms, per row", {"group": "row"},
                check_group)
