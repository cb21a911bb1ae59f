"""The lab's 2:4 linear: one direct cuSPARSELt call per forward, with the algorithm searched for its layout (04).

torch's stock path keeps an ``nn.Linear`` whose weight is a ``SparseSemiStructuredTensor``. Every call then goes
through Python: ``F.linear`` decomposes into a transpose and a matmul that reach the subclass's
``__torch_dispatch__``, which builds a transposed wrapper object, checks dtypes and shapes and calls a
``torch.library`` custom op, which pads and finally calls ``torch._cslt_sparse_mm`` (torch 2.13 fuses the output
transpose there, so the result is already row-major). That is Python work on every call, eager, times 224
sparse linears per forward (how much it costs is measured in docs/results.md, not here). It also always uses
cuSPARSELt's algorithm 0 unless one was chosen at compression.

``SparseLinear24`` replaces the whole ``nn.Linear`` and calls ``torch._cslt_sparse_mm`` itself: on xᵀ (a free
view of the row-major activation) with ``transpose_result=True``, so cuSPARSELt writes y = x Wᵀ directly as a
row-major (tokens, out) tensor. It can run cuSPARSELt's search for exactly that operand layout and token count
(cached per weight shape): the search picks an algorithm *and* a split-K setting, kept together as a ``CsltPlan``.
``to_semi_structured`` checks every weight shape against ``F.linear`` once, so a layout mistake fails loudly.

Fusion: q/k/v (and gate/up) read the same input, so their weights can be stacked into one (Σ out, in) 2:4 weight
and multiplied once (``FusedSparse24``): fewer, larger GEMMs. Each projection is then a ``FusedSlice24`` that
returns its column slice of the shared product, which is computed once per input tensor.
Inside a CUDA graph the CPU costs vanish; what remains is the kernel and its plan, which
``labutils.sparse24.shapes`` times shape by shape.
"""
from __future__ import annotations

import functools
import os
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from ..core.anatomy import CompressedLinear
from ..core.errors import LabError


@dataclass(frozen=True)
class CsltPlan:
    """What cuSPARSELt's search chose for one weight and token count: the algorithm id and the split-K setting
    (``split_k`` pieces of the reduction dimension; ``split_k_mode`` as the search returned it: an int mode in torch
    2.13, a bool "one kernel" in some older torch; None: the library default). ``CsltPlan()`` is algorithm 0."""

    alg_id: int = 0
    split_k: int = 1
    split_k_mode: int | bool | None = None

    def mm_kwargs(self) -> dict:
        """The keywords of ``torch._cslt_sparse_mm`` that select this plan, in this torch's spelling."""
        kwargs: dict = {"alg_id": self.alg_id}
        keyword = split_k_keyword()
        if keyword is None:  # a torch whose kernel takes no split-K: only the algorithm can be chosen
            return kwargs
        kwargs["split_k"] = self.split_k
        if self.split_k_mode is not None:
            kwargs[keyword] = bool(self.split_k_mode) if keyword == "split_k_one_kernel" else int(self.split_k_mode)
        return kwargs


@functools.lru_cache(maxsize=None)
def split_k_keyword() -> str | None:
    """How this torch's ``_cslt_sparse_mm`` names the split-K mode: "split_k_mode" (int, torch 2.13),
    "split_k_one_kernel" (bool, some older torch) or None (no split-K arguments at all). Read from the op's schema,
    which the CPU build has too."""
    names = [a.name for a in torch.ops.aten._cslt_sparse_mm.default._schema.arguments]
    if "split_k" not in names:
        return None
    return next((n for n in ("split_k_mode", "split_k_one_kernel") if n in names), None)


def pad_tokens(x2d: torch.Tensor, multiple: int) -> torch.Tensor:
    """x2d (tokens, in) with zero rows appended up to a multiple of ``multiple`` tokens: cuSPARSELt needs 16-bit
    dense operands in multiples of 8. Used by the forward and by the search, so both see the same shapes."""
    pad = -x2d.shape[0] % multiple
    return F.pad(x2d, (0, 0, 0, pad)) if pad else x2d


class SparseMatmul24(nn.Module):
    """y = x Wᵀ (+ b) for a 2:4 weight W (out, in) held compressed (``packed``: kept values + metadata).

    x (..., in) → y (..., out), row-major. Token counts are padded to a multiple of ``pad_to`` and the padding is
    cut off again. ``plan``: the cuSPARSELt algorithm and split-K setting (``CsltPlan``). The product alone; the
    linear layer a model sees is ``SparseLinear24`` (or ``FusedSlice24`` for a fused projection).
    """

    def __init__(self, packed: torch.Tensor, out_features: int, in_features: int, bias: torch.Tensor | None = None,
                 *, plan: CsltPlan | None = None, pad_to: int = 8):
        super().__init__()
        self.out_features, self.in_features = out_features, in_features
        self.plan, self.pad_to = plan or CsltPlan(), pad_to
        self.register_buffer("packed", packed)
        self.register_buffer("bias", bias)

    @property
    def alg_id(self) -> int:
        return self.plan.alg_id

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2d = x.reshape(-1, self.in_features)
        tokens = x2d.shape[0]
        y = torch._cslt_sparse_mm(self.packed, pad_tokens(x2d, self.pad_to).t(), bias=self.bias,
                                  transpose_result=True, **self.plan.mm_kwargs())
        if y.shape[0] != tokens:
            y = y[:tokens]  # a row-major prefix: still contiguous
        return y.view(*lead, self.out_features)

    def values_nonzero(self, rows: slice = slice(None)) -> int:
        """Non-zeros among the kept values of weight ``rows``: the first out · in / 2 elements of ``packed``, one
        row of in / 2 after another (as torch's ``SparseSemiStructuredTensor.values()`` reads them); the rest is
        metadata. Flattened first, so a 2-D ``packed`` counts the same."""
        half = self.in_features // 2
        start, stop, _ = rows.indices(self.out_features)
        return int(self.packed.reshape(-1)[start * half:stop * half].count_nonzero())

    def extra_repr(self) -> str:
        plan = self.plan
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"2:4 cuSPARSELt, alg_id={plan.alg_id}, split_k={plan.split_k}, split_k_mode={plan.split_k_mode}")


class SparseLinear24(SparseMatmul24, CompressedLinear):
    """A decoder linear on its 2:4 compressed weight (``SparseMatmul24``): what ``to_semi_structured`` puts in
    place of an ``nn.Linear``, listed by ``find_linears`` like one."""

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, *, alg_search_tokens: int | None = None, pad_to: int = 8,
                    compress: Callable[[torch.Tensor], torch.Tensor] | None = None,
                    search: Callable[[SparseMatmul24, int], CsltPlan] | None = None) -> "SparseLinear24":
        """Compress ``linear``'s 2:4 weight; with ``alg_search_tokens``, pick cuSPARSELt's fastest plan for
        inputs of that many tokens. The caller checks the pattern, shape, device and dtype first."""
        weight = linear.weight.detach().contiguous()
        bias = None if linear.bias is None else linear.bias.detach().clone()
        module = cls((compress or torch._cslt_compress)(weight), *weight.shape, bias, pad_to=pad_to)
        if alg_search_tokens is not None:
            module.plan = (search or search_plan)(module, alg_search_tokens)
        return module

    def nonzero_weights(self) -> int:
        return self.values_nonzero()


class FusedSparse24(SparseMatmul24):
    """One 2:4 product for several projections of the same input (q, k, v or gate, up): the weight (Σ out, in) is
    their stacked weights, ``splits`` their output sizes. ``take(i, x)`` returns projection i's columns of x Wᵀ,
    computing the product only when x is a new input tensor; the result is dropped once every projection has taken
    its slice, so nothing is held between forwards. Not a linear itself: ``find_linears`` lists the slices."""

    def __init__(self, packed: torch.Tensor, splits: tuple[int, ...], in_features: int,
                 bias: torch.Tensor | None = None, **kwargs):
        super().__init__(packed, sum(splits), in_features, bias, **kwargs)
        self.splits = tuple(splits)
        self.starts = tuple(sum(splits[:i]) for i in range(len(splits)))  # each projection's first row
        self._input: torch.Tensor | None = None
        self._output: torch.Tensor | None = None
        self._waiting: set[int] = set()

    def take(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Projection ``index``'s part (..., splits[index]) of the product with x (..., in)."""
        if x is not self._input or index not in self._waiting:  # a new input (or a second call): compute again
            self._input, self._output = x, self(x)
            self._waiting = set(range(len(self.splits)))
        self._waiting.discard(index)
        start = self.starts[index]
        out = self._output[..., start:start + self.splits[index]]
        if not self._waiting:
            self._input = self._output = None
        return out

    def extra_repr(self) -> str:
        return f"splits={self.splits}, " + super().extra_repr()


class FusedSlice24(CompressedLinear):
    """Projection ``index`` of a ``FusedSparse24``: stands where the ``nn.Linear`` stood and returns its columns
    (..., out) of the shared product, a strided view (splitting its last dimension with ``view`` works, as the
    attention's head reshape does). Counts its own (out, in) weight and the non-zeros of its rows."""

    def __init__(self, fused: FusedSparse24, index: int):
        super().__init__()
        self.fused, self.index = fused, index  # the same module in every slice: its buffers count once
        self.out_features, self.in_features = fused.splits[index], fused.in_features
        self._start = fused.starts[index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fused.take(self.index, x)

    def nonzero_weights(self) -> int:
        return self.fused.values_nonzero(slice(self._start, self._start + self.out_features))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rows {self._start}:"
                f"{self._start + self.out_features} of a fused 2:4 weight")


FUSIBLE = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # sublayers that read the same input


def fusion_groups(linears: dict[str, nn.Module]) -> list[tuple[str, ...]]:
    """The groups of ``linears`` (names as in ``prunable_linears``) that can share one GEMM: q/k/v and gate/up of
    the same layer (Llama, Mistral, Qwen call them on the same input), all present, all ``nn.Linear`` with the
    same in_features, dtype and device, and all with a bias or none."""
    groups = []
    for name in linears:
        parent, _, sub = name.rpartition(".")
        for members in FUSIBLE:
            names = tuple(f"{parent}.{member}" for member in members)
            if sub == members[0] and all(n in linears for n in names) and _fusible([linears[n] for n in names]):
                groups.append(names)
    return groups


def fusion_units(linears: dict[str, nn.Module], fuse: bool) -> list[tuple[str, ...]]:
    """What one GEMM each multiplies, in the order of ``linears``: every fusible group (``fusion_groups``) when
    ``fuse``, every other linear alone. A group stands at its first member's place."""
    groups = fusion_groups(linears) if fuse else []
    grouped = {name for group in groups for name in group}
    order = {name: i for i, name in enumerate(linears)}
    return sorted(groups + [(name,) for name in linears if name not in grouped], key=lambda unit: order[unit[0]])


def _fusible(lins: list[nn.Module]) -> bool:
    if not all(type(lin) is nn.Linear for lin in lins):
        return False
    first = lins[0].weight
    return all(lin.in_features == lins[0].in_features and lin.weight.dtype == first.dtype
               and lin.weight.device == first.device and (lin.bias is None) == (lins[0].bias is None)
               for lin in lins)


# cuSPARSELt versions whose search was seen to fail (torch.backends.cusparselt.version()), and what was seen.
BROKEN_SEARCH = {800: "on an H200 with torch 2.11.0+cu130 (2026-11-30) every cuSPARSELt 0.8.0 search, the old "
                      "and the new entry point alike, failed with 'internal error when calling cusparseLtMatmulSearch' "
                      "and left an illegal-instruction error that ends every later CUDA call of the process"}


NO_SEARCH_VARIABLE = "LAB_NO_CUSPARSELT_SEARCH"  # set (non-empty) by benchmarks/gpu_run.sh in every step


def search_problem() -> str | None:
    """Why cuSPARSELt's search must not run here, or None: the search of a version in ``BROKEN_SEARCH`` is refused
    before it can break the process's CUDA context, and so is every search in a process that measures (the
    environment variable ``LAB_NO_CUSPARSELT_SEARCH``, which the GPU run sets: its numbers must not depend on a
    search that may leave the CUDA context broken)."""
    if os.environ.get(NO_SEARCH_VARIABLE):
        return (f"cuSPARSELt's algorithm search is refused in this process ({NO_SEARCH_VARIABLE} is set: it measures, "
                "and a failed search can break its CUDA context). Run without the search (algorithm 0)")
    seen = BROKEN_SEARCH.get(torch.backends.cusparselt.version())
    return None if seen is None else (f"cuSPARSELt's algorithm search is refused for this version: {seen}. "
                                      "Run without the search (algorithm 0)")


def search_plan(module: SparseMatmul24, tokens: int) -> CsltPlan:
    """cuSPARSELt's fastest plan (algorithm and split-K) for ``module``'s weight times xᵀ, x (tokens, in) padded as
    the forward pads it, result transposed: the layout ``SparseMatmul24`` runs. Uses
    ``torch._C._cusparselt.mm_search`` (all three choices); a torch without it falls back to the deprecated
    ``torch._cslt_sparse_mm_search``, which returns the algorithm only (split_k 1)."""
    problem = search_problem()
    if problem is not None:
        raise LabError(problem)
    x = torch.randn(tokens, module.in_features, dtype=module.packed.dtype, device=module.packed.device)
    dense_t = pad_tokens(x, module.pad_to).t()
    mm_search = getattr(getattr(torch._C, "_cusparselt", None), "mm_search", None)
    if mm_search is not None:
        alg_id, split_k, mode, _ = mm_search(module.packed, dense_t, module.bias, None, None, True)
        return CsltPlan(int(alg_id), int(split_k), mode if isinstance(mode, bool) else int(mode))
    with warnings.catch_warnings():  # newer torch marks this search as deprecated; it still answers
        warnings.filterwarnings("ignore", message=".*_cslt_sparse_mm_search.*")
        return CsltPlan(int(torch._cslt_sparse_mm_search(module.packed, dense_t, bias=module.bias,
                                                          transpose_result=True)))


@torch.no_grad()
def check_against_dense(sparse: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None, name: str,
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
