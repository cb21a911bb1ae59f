"""2:4 speed one linear at a time: which weight shapes, prompt lengths and cuSPARSELt algorithms gain (04).

A whole-model prefill mixes the linears with attention, norms, rotary embeddings and the residual stream; only
the linears can get faster with 2:4 weights. ``linear_speedup_table`` times each weight shape of a model alone —
dense ``F.linear`` against the lab's ``SparseLinear24`` with cuSPARSELt's default algorithm and with the one its
search picks for that token count — so a whole-model number can be read against it: if every shape gains and the
model does not, the cost is outside the linears.
"""
from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch
from torch.nn import functional as F
from tqdm import tqdm  # plain text everywhere: a saved notebook shows the finished bar, not a widget

from ..core.errors import LabError
from ..core.validation import check_not_empty, check_positive_ints
from ..prune.masks import nm_mask
from ..prune.sparsity import prunable_linears, split_linear_name
from ..speed.timing import time_interleaved
from .convert import kernel_problem, min_shape
from .kernel import SparseLinear24, search_alg_id


def linear_shapes(model: torch.nn.Module) -> dict[tuple[int, int], list[str]]:
    """Each distinct (out, in) weight shape of the decoder linears, with the sublayer names that have it."""
    shapes: dict[tuple[int, int], list[str]] = {}
    for name, lin in prunable_linears(model).items():
        _, sub = split_linear_name(name)
        names = shapes.setdefault((lin.out_features, lin.in_features), [])
        if sub not in names:
            names.append(sub)
    return shapes


@torch.inference_mode()
def linear_speedup_table(shapes: Sequence[tuple[int, int]], lengths: Sequence[int], *,
                         dtype: torch.dtype = torch.float16, device: torch.device | str = "cuda", warmup: int = 3,
                         repeats: int = 10, search: bool = True, seed: int = 0,
                         progress: bool = True) -> pd.DataFrame:
    """One row per (shape, tokens): P50 ms of y = x Wᵀ dense and 2:4 (algorithm 0, and the searched one), and
    "× dense" = dense ms / 2:4 ms. W is a random weight pruned 2:4 by magnitude; x (tokens, in)."""
    check_not_empty("shapes", shapes, "(out, in) weight shape")
    shapes = [check_positive_ints(f"shapes[{i}] (out, in)", shape, length=2) for i, shape in enumerate(shapes)]
    lengths = check_positive_ints("lengths", lengths)
    device = torch.device(device)
    problem = kernel_problem(device)
    if problem is not None:
        raise LabError(f"cannot time 2:4 kernels: {problem}")
    generator = torch.Generator(device=device).manual_seed(seed)
    rows = []
    for out_features, in_features in tqdm(shapes, desc="linear shapes", unit="shape", disable=not progress):
        weight = torch.randn(out_features, in_features, dtype=dtype, device=device, generator=generator)
        weight.masked_fill_(nm_mask(weight.abs().float(), 2, 4), 0)
        linear = torch.nn.Linear(in_features, out_features, bias=False, device=device, dtype=dtype)
        linear.weight.copy_(weight)
        default = SparseLinear24.from_linear(linear, pad_to=min_shape(dtype, dense=True)[0])
        for tokens in lengths:
            x = torch.randn(tokens, in_features, dtype=dtype, device=device, generator=generator)
            fns = {"dense": lambda: F.linear(x, weight), "2:4 alg 0": lambda: default(x)}
            searched = None
            if search:
                alg_id = search_alg_id(default.packed, in_features, tokens, dtype, device)
                searched = SparseLinear24(default.packed, out_features, in_features, alg_id=alg_id,
                                          pad_to=default.pad_to)
                fns["2:4 searched"] = lambda: searched(x)
            stats = time_interleaved(fns, warmup=warmup, repeats=repeats, device=device)
            row = {"shape (out, in)": f"{out_features}×{in_features}", "tokens": tokens,
                   "dense ms": stats["dense"].p50 * 1e3}
            for label in ("2:4 alg 0", "2:4 searched"):
                if label in stats:
                    row[f"{label} ms"] = stats[label].p50 * 1e3
                    row[f"{label} × dense"] = stats["dense"].p50 / stats[label].p50
            if searched is not None:
                row["searched alg id"] = searched.alg_id
            rows.append(row)
    return pd.DataFrame(rows).set_index(["shape (out, in)", "tokens"])
