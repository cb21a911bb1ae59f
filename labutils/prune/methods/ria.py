"""RIA — relative importance and activations (Zhang et al., ICLR 2024, "Plug-and-Play").

score_ij = (|W_ij| / Σ_k |W_ik| + |W_ij| / Σ_k |W_kj|) · ‖X_j‖₂^a: a weight counts relative to the other
weights of its output row and of its input column, so no row or column is emptied wholesale.
"""
import torch
from torch import nn

from ...core.validation import check_number
from ..masks import SparsityTarget, prune_by_score
from .base import INPUT_NORMS, Method, check_group
from .wanda import check_norm_shape


def ria_score(weight: torch.Tensor, sq_norm: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """RIA importance in float32. weight: (out, in); sq_norm: (in,) sums of x_j² over calibration tokens."""
    check_norm_shape(weight, sq_norm)
    a = weight.detach().abs().float()
    tiny = torch.finfo(torch.float32).tiny  # an all-zero row or column has relative importance 0, not NaN
    relative = a / a.sum(dim=1, keepdim=True).clamp_min(tiny) + a / a.sum(dim=0, keepdim=True).clamp_min(tiny)
    return relative * sq_norm.float().sqrt().to(weight.device).pow(alpha).unsqueeze(0)


def prune(linear: nn.Linear, sq_norm: torch.Tensor, target: SparsityTarget, alpha: float, group: str
          ) -> torch.Tensor:
    return prune_by_score(linear, ria_score(linear.weight, sq_norm, alpha), target, group)


def check(params: dict) -> None:
    check_number("RIA alpha", params["alpha"], 0, 10, allowed="a number in [0, 10] (the paper uses 0.5)")
    check_group(params)


# Per matrix by default, as the RIA authors' released code selects (per output row is its option).
METHOD = Method("ria", INPUT_NORMS, prune, "relative importance × ‖X‖^a, per matrix", {"alpha": 0.5, "group": "layer"},
                check)
