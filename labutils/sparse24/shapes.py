"""2:4 speed one linear at a time: which weight shapes, prompt lengths and cuSPARSELt algorithms gain (04).

A whole-model prefill mixes the linears with attention, norms, rotary embeddings and the residual stream; only
the linears can get faster with 2:4 weights. ``linear_speedup_table`` times each weight shape of a model alone —
dense ``F.linear`` against the lab's ``SparseLinear24`` with cuSPARSELt's default algorithm and with the plan its
search picks for that token count (algorithm and split-K) — so a whole-model number can be read against it: if
every shape gains and the model does not, the cost is outside the linears. ``linear_shapes(model, fused=True)``
lists the stacked q/k/v and gate/up shapes that ``to_semi_structured(..., fuse=True)`` multiplies instead.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import pandas as pd
import torch
from torch.nn import functional as F
from tqdm import tqdm  # plain text everywhere: a saved notebook shows the finished bar, not a widget

from ..core.errors import LabError
from ..core.validation import check_flag, check_not_empty, check_positive_ints
from ..prune.masks import nm_mask
from ..prune.sparsity import prunable_linears, split_linear_name
from ..speed.timing import time_interleaved
from .convert import kernel_problem, min_shape
from .kernel import SparseLinear24, SparseMatmul24, fusion_units, search_plan, search_problem


def linear_shapes(model: torch.nn.Module, fused: bool = False) -> dict[tuple[int, int], list[str]]:
    """Each distinct (out, in) weight shape of the decoder linears, with the sublayer names that have it. With
    ``fused``, the shapes ``to_semi_structured(..., fuse=True)`` multiplies: each fusible group (``fusion_groups``)
    as one stacked weight (Σ out, in) named like "self_attn.q_proj+k_proj+v_proj", the other linears as they are."""
    check_flag("fused", fused)
    linears = prunable_linears(model, experts=False)
    units = fusion_units(linears, fused)
    shapes: dict[tuple[int, int], list[str]] = {}
    for unit in units:
        _, sub = split_linear_name(unit[0])
        label = "+".join([sub] + [name.rpartition(".")[2] for name in unit[1:]])
        shape = (sum(linears[name].out_features for name in unit), linears[unit[0]].in_features)
        names = shapes.setdefault(shape, [])
        if label not in names:
            names.append(label)
    return shapes


@dataclass(frozen=True)
class LinearTimingSettings:
    """How ``linear_speedup_table`` measures: untimed and timed interleaved rounds per (shape, tokens), whether
    cuSPARSELt's search adds a searched plan's columns (off by default: the search of cuSPARSELt 0.8.0 broke the
    CUDA context on an H200, see ``kernel.BROKEN_SEARCH``), and the seed of the random weights and inputs (04)."""

    warmup: int = 3
    repeats: int = 10
    search: bool = False
    seed: int = 0


@torch.inference_mode()
def linear_speedup_table(shapes: Sequence[tuple[int, int]], lengths: Sequence[int],
                         settings: LinearTimingSettings | None = None, *, dtype: torch.dtype = torch.float16,
                         device: torch.device | str = "cuda", progress: bool = True) -> pd.DataFrame:
    """One row per (shape, tokens): P50 ms of y = x Wᵀ dense and 2:4 (algorithm 0, and the plan cuSPARSELt's search
    picks: algorithm and split-K), and "× dense" = dense ms / 2:4 ms. W is a random weight pruned 2:4 by magnitude;
    x (tokens, in). For the fused shapes of a model, pass ``list(linear_shapes(model, fused=True))``. ``settings``:
    ``LinearTimingSettings()`` when None; its ``search`` adds the searched plan's columns."""
    settings = LinearTimingSettings() if settings is None else settings
    check_not_empty("shapes", shapes, "(out, in) weight shape")
    shapes = [check_positive_ints(f"shapes[{i}] (out, in)", shape, length=2) for i, shape in enumerate(shapes)]
    lengths = check_positive_ints("lengths", lengths)
    device = torch.device(device)
    problem = kernel_problem(device)
    if problem is not None:
        raise LabError(f"cannot time 2:4 kernels: {problem}")
    if settings.search and (problem := search_problem()) is not None:
        raise LabError(f"search=True: {problem}")
    generator = torch.Generator(device=device).manual_seed(settings.seed)
    rows = []
    for out_features, in_features in tqdm(shapes, desc="linear shapes", unit="shape", disable=not progress):
        weight = torch.randn(out_features, in_features, dtype=dtype, device=device, generator=generator)
        weight.masked_fill_(nm_mask(weight.abs().float(), 2, 4), 0)
        inputs = {n: torch.randn(n, in_features, dtype=dtype, device=device, generator=generator) for n in lengths}
        rows += _shape_rows(weight, inputs, settings.search, {"warmup": settings.warmup, "repeats": settings.repeats,
                                                     "device": device})
    return pd.DataFrame(rows).set_index(["shape (out, in)", "tokens"])


def _shape_rows(weight: torch.Tensor, inputs: dict[int, torch.Tensor], search: bool, timing: dict) -> list[dict]:
    """Rows for one 2:4 weight (out, in), one per token count (``inputs``: tokens → x). Every search runs before
    anything is timed, on its own compressed copy of the weight: the algorithm-0 module never shares a tensor with
    a searched one, so whatever a search leaves behind cannot change what "alg 0" measures."""
    out_features, in_features = weight.shape
    linear = torch.nn.Linear(in_features, out_features, bias=False, device=weight.device, dtype=weight.dtype)
    linear.weight.copy_(weight)
    pad_to = min_shape(weight.dtype, dense=True)[0]
    searched: dict[int, SparseMatmul24] = {}
    if search:
        copy = SparseLinear24.from_linear(linear, pad_to=pad_to)
        searched = {n: SparseMatmul24(copy.packed, out_features, in_features, plan=search_plan(copy, n),
                                      pad_to=pad_to) for n in inputs}
    default = SparseLinear24.from_linear(linear, pad_to=pad_to)
    rows = []
    for tokens, x in inputs.items():
        fns = {"dense": partial(F.linear, x, weight), "2:4 alg 0": partial(default, x)}
        if tokens in searched:
            fns["2:4 searched"] = partial(searched[tokens], x)
        stats = time_interleaved(fns, **timing)
        row = {"shape (out, in)": f"{out_features}×{in_features}", "tokens": tokens,
               "dense ms": stats["dense"].p50 * 1e3}
        for label in ("2:4 alg 0", "2:4 searched"):
            if label in stats:
                row[f"{label} ms"] = stats[label].p50 * 1e3
                row[f"{label} × dense"] = stats["dense"].p50 / stats[label].p50
        if tokens in searched:
            plan = searched[tokens].plan
            row.update({"searched alg id": plan.alg_id, "searched split_k": plan.split_k,
                        "searched split_k_mode": plan.split_k_mode})
        rows.append(row)
    return rows
