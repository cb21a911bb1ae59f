"""The lab's 2:4 linear: one direct cuSPARSELt call per forward, with the algorithm searched for its layout (04).

torch's stock path keeps an ``nn.Linear`` whose weight is a ``SparseSemiStructuredTensor``. Every call then goes
through Python: ``F.linear`` decomposes into a transpose and a matmul that reach the subclass's
``__torch_dispatch__``, which builds a transposed wrapper object, checks dtypes and shapes and calls a
``torch.library`` custom op, which pads and finally calls ``torch._cslt_sparse_mm`` (torch 2.13 fuses the output
transpose there, so the result is already row-major). That is Python work on every call, eager, times 224
sparse linears per forward (how much it costs is measured in the README, not here). It also always uses
cuSPARSELt's algorithm 0 unless one was chosen at compression.

``SparseLinear24`` replaces the whole ``nn.Linear`` and calls ``torch._cslt_sparse_mm`` itself: on xᵀ (a free
view of the row-major activation) with ``transpose_result=True``, so cuSPARSELt writes y = x Wᵀ directly as a
row-major (tokens, out) tensor. It can run cuSPARSELt's algorithm search for exactly that operand layout and
token count (cached per weight shape), and ``to_semi_structured`` checks every weight shape against ``F.linear``
once, so a layout mistake fails loudly. Inside a CUDA graph the CPU costs vanish for both paths; what remains is
the kernel and its algorithm, which ``labutils.sparse24.shapes`` times shape by shape.
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from ..core.errors import LabError
from ..core.models import CompressedLinear

# cuSPARSELt's own entry points; a CPU test passes emulations with the same signature.
SparseMM = Callable[..., torch.Tensor]


def _cslt_mm(packed, dense_t, *, bias, transpose_result, alg_id):
    return torch._cslt_sparse_mm(packed, dense_t, bias=bias, transpose_result=transpose_result, alg_id=alg_id)


class SparseLinear24(CompressedLinear):
    """y = x Wᵀ (+ b) for a 2:4 weight W (out, in) held compressed (``packed``: kept values + metadata).

    x (..., in) → y (..., out), row-major. Token counts are padded to a multiple of ``pad_to`` (cuSPARSELt needs
    dense operands in multiples of 8 for 16-bit types) and the padding is cut off again.
    """

    def __init__(self, packed: torch.Tensor, out_features: int, in_features: int, bias: torch.Tensor | None = None,
                 *, alg_id: int = 0, pad_to: int = 8, mm: SparseMM = _cslt_mm):
        super().__init__()
        self.out_features, self.in_features = out_features, in_features
        self.alg_id, self.pad_to, self._mm = alg_id, pad_to, mm
        self.register_buffer("packed", packed)
        self.register_buffer("bias", bias)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, *, alg_search_tokens: int | None = None, pad_to: int = 8,
                    compress: Callable[[torch.Tensor], torch.Tensor] | None = None, mm: SparseMM = _cslt_mm,
                    search: Callable[..., int] | None = None) -> "SparseLinear24":
        """Compress ``linear``'s 2:4 weight; with ``alg_search_tokens``, pick cuSPARSELt's fastest algorithm for
        inputs of that many tokens. The caller checks the pattern, shape, device and dtype first."""
        weight = linear.weight.detach().contiguous()
        packed = (compress or torch._cslt_compress)(weight)
        alg_id = 0
        if alg_search_tokens is not None:
            alg_id = (search or search_alg_id)(packed, weight.shape[1], alg_search_tokens, weight.dtype, weight.device)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(packed, weight.shape[0], weight.shape[1], bias, alg_id=alg_id, pad_to=pad_to, mm=mm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2d = x.reshape(-1, self.in_features)
        tokens = x2d.shape[0]
        pad = -tokens % self.pad_to
        if pad:
            x2d = F.pad(x2d, (0, 0, 0, pad))
        y = self._mm(self.packed, x2d.t(), bias=self.bias, transpose_result=True, alg_id=self.alg_id)
        if pad:
            y = y[:tokens]  # a row-major prefix: still contiguous
        return y.view(*lead, self.out_features)

    def nonzero_weights(self) -> int:
        """Non-zeros among the kept values (the first out · in / 2 elements of ``packed``; the rest is metadata)."""
        return int(self.packed[:self.out_features * self.in_features // 2].count_nonzero())

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"2:4 cuSPARSELt, alg_id={self.alg_id}")


def search_alg_id(packed: torch.Tensor, in_features: int, tokens: int, dtype: torch.dtype,
                  device: torch.device) -> int:
    """cuSPARSELt's fastest algorithm id for this weight times xᵀ (in, tokens), result transposed: the layout
    ``SparseLinear24`` uses."""
    x = torch.randn(tokens, in_features, dtype=dtype, device=device)
    with warnings.catch_warnings():  # newer torch marks the search as deprecated; it still answers
        warnings.filterwarnings("ignore", message=".*_cslt_sparse_mm_search.*")
        return int(torch._cslt_sparse_mm_search(packed, x.t(), transpose_result=True))


@torch.no_grad()
def check_against_dense(sparse: SparseLinear24, weight: torch.Tensor, bias: torch.Tensor | None, name: str,
                        tokens: int = 37) -> None:
    """LabError unless ``sparse`` reproduces F.linear with the masked dense weight on random inputs (an odd token
    count, so the padding is exercised too): a wrong operand layout shows up here, not as a slow garbage model."""
    x = torch.randn(2, tokens, weight.shape[1], dtype=weight.dtype, device=weight.device)
    expected = F.linear(x, weight, bias).float()
    try:
        got = sparse(x).float()
    except RuntimeError as exc:  # e.g. a result in the other layout cannot be viewed as (batch, tokens, out)
        raise LabError(f"2:4 kernel for {name} failed on a (2, {tokens}, {weight.shape[1]}) input: {exc}") from exc
    if got.shape != expected.shape:
        raise LabError(f"2:4 kernel for {name} returned shape {tuple(got.shape)}, expected {tuple(expected.shape)}")
    err, scale = float((got - expected).abs().max()), float(expected.abs().max())
    if err > 1e-2 + 1e-2 * scale:
        raise LabError(f"2:4 kernel for {name} differs from the dense product by {err:.3g} (max |y| {scale:.3g})")
