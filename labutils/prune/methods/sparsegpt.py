"""SparseGPT (Frantar & Alistarh 2023, arXiv 2301.00774): prune with second-order error compensation.

For one linear with inputs X, the layer-wise Hessian is H = 2 X Xᵀ (in × in). Columns are processed left to
right in blocks; within a block the mask is chosen by w² / [H⁻¹]²_jj (unstructured: the lowest share of the
whole block; N:M: per group of M), and the error each pruned weight causes is pushed onto the not-yet-processed
columns through the upper Cholesky factor of H⁻¹ — lazily, one matrix product per block. Weights change, not
only masks.
"""
import torch
from torch import nn

from ...core.errors import BadInput, LabError
from ...core.validation import check_number
from ..masks import SparsityTarget, lowest_mask, nm_mask
from .base import HESSIAN, Method


def output_error(weight: torch.Tensor, pruned: torch.Tensor, hessian: torch.Tensor) -> float:
    """‖X Wᵀ − X Ŵᵀ‖_F over the calibration tokens, from H = 2 XᵀX alone: sqrt(½ · tr(ΔW H ΔWᵀ)).
    weight, pruned: (out, in); hessian: (in, in)."""
    delta = (weight.detach().float() - pruned.detach().float()).to(hessian.device)
    return float((0.5 * ((delta @ hessian) * delta).sum()).clamp_min(0).sqrt())


def inverse_hessian_factor(hessian: torch.Tensor, dampening: float) -> torch.Tensor:
    """Upper Cholesky factor U of (H + λI)⁻¹ with λ = dampening · mean(diag H); U satisfies UᵀU = (H + λI)⁻¹."""
    h = hessian.float().clone()
    h.diagonal().add_(dampening * h.diagonal().mean())
    try:
        lower = torch.linalg.cholesky(h)
        return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)
    except torch.linalg.LinAlgError as exc:
        raise LabError(f"SparseGPT: the Hessian is not positive definite even with dampening {dampening}; "
                       "use a larger dampening (e.g. 0.1) or more calibration samples") from exc


def sparsegpt_weights(weight: torch.Tensor, hessian: torch.Tensor, target: SparsityTarget, dampening: float = 0.01,
                      blocksize: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """(new weight in float32, mask) for weight (out, in) and hessian (in, in). The weight is not modified."""
    w = weight.detach().float().clone()
    h = hessian.float().clone()
    dead = h.diagonal() == 0  # inputs that were always zero: their weights cannot matter
    h[dead, dead] = 1
    w[:, dead] = 0
    u = inverse_hessian_factor(h, dampening)
    mask = torch.zeros_like(w, dtype=torch.bool)
    if target.is_nm:  # whole N:M groups per block
        blocksize = max(target.m, blocksize // target.m * target.m)
    for start in range(0, w.shape[1], blocksize):
        end = min(start + blocksize, w.shape[1])
        mask[:, start:end] = _prune_block(w, u, start, end, target)
    return w, mask


def _prune_block(w: torch.Tensor, u: torch.Tensor, start: int, end: int, target: SparsityTarget) -> torch.Tensor:
    """Prune columns start..end of ``w`` in place, compensating inside the block and then, lazily, beyond it.

    The column loop runs on the block transposed, so that each column it reads and writes is contiguous in memory
    (about 5× faster on a CPU than strided columns); every value is computed by the same operations as on the
    untransposed block."""
    block, u_block = w[:, start:end].T.contiguous(), u[start:end, start:end]  # block: (columns, out)
    d = u_block.diagonal()
    err = torch.zeros_like(block)
    mask = torch.zeros_like(block, dtype=torch.bool)
    if not target.is_nm:
        k = int(block.numel() * target.sparsity)  # chosen over the block as (out, columns), row-major
        mask = lowest_mask((block.T.pow(2) / d.pow(2)).reshape(1, -1), k).reshape(block.T.shape).T.contiguous()
    for j in range(end - start):
        if target.is_nm and j % target.m == 0:
            group = slice(j, j + target.m)
            mask[group] = nm_mask(block[group].T.pow(2) / d[group].pow(2), target.n, target.m).T
        col_err = err[j]
        torch.mul(block[j], mask[j], out=col_err)  # the weights pruned in this column…
        col_err.div_(d[j])
        block[j:].addr_(u_block[j, j:], col_err, alpha=-1)  # …and their error, spread over later columns
        block[j].masked_fill_(mask[j], 0)  # exact zeros where pruned
    w[:, start:end] = block.T
    w[:, end:] -= err.T.contiguous() @ u[start:end, end:]
    return mask.T


def prune(linear: nn.Linear, hessian: torch.Tensor, target: SparsityTarget, dampening: float,
          blocksize: int) -> torch.Tensor:
    new_weight, mask = sparsegpt_weights(linear.weight, hessian.to(linear.weight.device), target, dampening,
                                         int(blocksize))
    with torch.no_grad():
        linear.weight.copy_(new_weight.to(linear.weight.dtype))
    return mask


def check(params: dict) -> None:
    check_number("SparseGPT dampening", params["dampening"], 0, 10,
                 allowed="a number in [0, 10], a share of the mean Hessian diagonal (the paper uses 0.01)")
    blocksize = params["blocksize"]
    check_number("SparseGPT blocksize", blocksize, 1, 65536, allowed="a whole number of columns in [1, 65536]")
    if not float(blocksize).is_integer():
        raise BadInput(f"SparseGPT blocksize must be a whole number of columns in [1, 65536]; got {blocksize!r}")


METHOD = Method("sparsegpt", HESSIAN, prune, "second-order (OBS) mask and weight update, per block",
                {"dampening": 0.01, "blocksize": 128}, check)
