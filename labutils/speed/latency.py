"""Latency and memory of whole models, why zeros alone are not faster, and how long a saved model takes to load
(introduced in 04-Benchmark).

Each table times its candidates with the fair, interleaved loops of ``timing``; the first model of a table is the
reference of its "× dense" columns.
"""
from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from ..core.anatomy import CompressedLinear, check_seqlen, model_device
from ..core.device import get_device
from ..core.saved import load_pruned, load_report, model_file_bytes
from ..core.validation import check_not_empty, check_number, check_positive_int, check_seed, check_tensor
from ..prune.masks import unstructured_mask
from .timing import decode_interleaved, measure, time_interleaved


def random_prompt(model: nn.Module, prompt_len: int, batch_size: int = 1, seed: int = 0) -> torch.Tensor:
    """Fixed random token ids for timing, on the model's device: (batch_size, prompt_len) int64."""
    return random_token_ids(model.config.vocab_size, prompt_len, batch_size, seed).to(model_device(model))


def random_token_ids(vocab_size: int, prompt_len: int, batch_size: int = 1, seed: int = 0) -> torch.Tensor:
    """``random_prompt``'s ids for a vocabulary of ``vocab_size``, on the CPU (also what 08-Deploy gives
    llama.cpp, so both engines decode after the same prompt)."""
    check_positive_int("prompt_len", prompt_len)
    check_positive_int("batch_size", batch_size)
    generator = torch.Generator().manual_seed(check_seed(seed))
    return torch.randint(0, vocab_size, (batch_size, prompt_len), generator=generator)


def prefill_fn(model: nn.Module, input_ids: torch.Tensor) -> Callable[[], object]:
    """One prefill forward over ``input_ids`` (batch, seq) without a KV cache. Like ``generate()``, only the last
    position's logits are computed (``logits_to_keep=1``), so the vocabulary projection does not dominate."""
    def run():
        with torch.inference_mode():
            return model(input_ids=input_ids, use_cache=False, logits_to_keep=1).logits
    return run


def latency_table(models: dict[str, nn.Module], *, prompt_len: int, new_tokens: int, warmup: int = 2,
                  repeats: int = 5, progress: bool = True) -> pd.DataFrame:
    """Prefill and decode speed of each model; the first model is the reference for the "× dense" columns
    (> 1 means faster than it). Prefills and decodes are each timed in interleaved, rotated rounds
    (``time_interleaved``), so no model systematically gets the cooler GPU or the warmer cache.

    Columns: prefill ms P50 / P95 (batch 1, ``prompt_len`` tokens), decode ms per token P50 / P95 (the typical and
    the slow steps), and the two speed ratios against the first model: "× dense" = the first model's P50 time ÷
    this model's. Each model's prompt is the fixed random one of ``random_prompt`` (seed 0), for prefill and decode
    alike.
    """
    check_not_empty("models", models, "model")
    check_positive_int("prompt_len", prompt_len)
    check_positive_int("new_tokens", new_tokens)
    for name, model in models.items():
        check_seqlen(model, f"model {name!r}: prompt_len + new_tokens", prompt_len + new_tokens)
    prompts = {name: random_prompt(m, prompt_len, 1) for name, m in models.items()}
    prefill = time_interleaved({name: prefill_fn(m, prompts[name]) for name, m in models.items()},
                               warmup=warmup, repeats=repeats, device=model_device(next(iter(models.values()))),
                               progress=progress)
    decode = decode_interleaved(models, prompts, new_tokens, warmup=warmup, repeats=repeats, progress=progress)
    table = pd.DataFrame({
        "prefill ms P50": [prefill[n].p50 * 1e3 for n in models],
        "prefill ms P95": [prefill[n].p95 * 1e3 for n in models],
        "decode ms/token P50": [decode[n].p50 * 1e3 for n in models],
        "decode ms/token P95": [decode[n].p95 * 1e3 for n in models],
    }, index=pd.Index(list(models), name="model"))
    first = table.iloc[0]
    table["prefill × dense"] = first["prefill ms P50"] / table["prefill ms P50"]
    table["decode × dense"] = first["decode ms/token P50"] / table["decode ms/token P50"]
    table.attrs.update(prompt_len=prompt_len, new_tokens=new_tokens, repeats=repeats,
                       device=str(model_device(next(iter(models.values())))))
    return table


def _tensor_bytes(t: torch.Tensor) -> int:
    if isinstance(t, torch.sparse.SparseSemiStructuredTensor):  # compressed values + metadata, not the dense shape
        names, _ = t.__tensor_flatten__()
        return sum(getattr(t, n).numel() * getattr(t, n).element_size() for n in names)
    return t.numel() * t.element_size()


def _count_nonzero(t: torch.Tensor) -> int:
    if isinstance(t, torch.sparse.SparseSemiStructuredTensor):  # the kept half of every group of 4
        if t.meta is None:  # cuSPARSELt: kept values, then metadata, in one buffer (2-D on some torch versions)
            rows, cols = t.shape
            return int(t.packed.reshape(-1)[:rows * cols // 2].count_nonzero())
        return int(t.values().count_nonzero())
    return int(t.detach().count_nonzero())


def memory_table(models: dict[str, nn.Module], *, prompt_len: int = 128, seed: int = 0) -> pd.DataFrame:
    """Size of each model in memory. Tied weights (SmolLM2 ties embedding and output) count once.

    Columns: parameters (logical: a 2:4 compressed weight counts its dense shape), non-zero parameters, zero share
    (rounded to 4 decimals: a dense model's few exact zeros read 0.00, not 3e-05), MiB of parameters + buffers as
    stored (a 2:4 compressed weight counts its packed values and metadata), and, when a model is on a GPU,
    "peak prefill MiB (CUDA)": the peak memory allocated there during one prefill of ``prompt_len`` tokens,
    weights included (``torch.cuda.max_memory_allocated``; NaN for a model off CUDA). On a CPU torch tracks no such
    peak, and the column is left out.
    """
    check_not_empty("models", models, "model")
    rows = []
    for name, model in models.items():
        params = list({id(p): p for p in model.parameters()}.values())
        buffers = list({id(b): b for b in model.buffers()}.values())
        compressed = [m for m in model.modules() if isinstance(m, CompressedLinear)]  # weights held as buffers
        total = sum(p.numel() for p in params) + sum(m.out_features * m.in_features for m in compressed)
        nonzero = (sum(_count_nonzero(p) for p in params)
                   + sum(m.nonzero_weights() for m in compressed))
        rows.append({"model": name, "parameters": total, "non-zero parameters": nonzero,
                     "zero share": round(1 - nonzero / total, 4) if total else math.nan,
                     "MiB (params + buffers)": sum(_tensor_bytes(t) for t in params + buffers) / 2**20,
                     "peak prefill MiB (CUDA)": _peak_prefill_mib(model, prompt_len, seed)})
    table = pd.DataFrame(rows).set_index("model")
    return table if table["peak prefill MiB (CUDA)"].notna().any() else table.drop(columns="peak prefill MiB (CUDA)")


def _peak_prefill_mib(model: nn.Module, prompt_len: int, seed: int) -> float:
    device = model_device(model)
    if device.type != "cuda":
        return math.nan
    check_seqlen(model, "prompt_len", prompt_len)
    return measure(device, prefill_fn(model, random_prompt(model, prompt_len, 1, seed))).peak_gib * 1024


@torch.inference_mode()
def zeros_matmul_table(weight: torch.Tensor, tokens: int, *, sparsity: float = 0.5, warmup: int = 3,
                       repeats: int = 20, seed: int = 0) -> pd.DataFrame:
    """Why zeros alone give no speedup: time y = x Wᵀ for x (tokens, in) with

    - the dense weight W (out, in),
    - the same W with ``sparsity`` of every row zeroed by magnitude, still stored densely (a dense GEMM multiplies
      zeros like any other number),
    - that zeroed W stored as CSR (``torch.sparse``), which skips the zeros but reads a column index for every
      kept value.

    On the CPU the product runs in float32. Returns P50 / P95 ms and the speed ratio against the dense weight.
    """
    check_tensor("weight", weight, 2, "(out, in)")
    check_positive_int("tokens", tokens)
    check_number("sparsity", sparsity, 0, 1, interval="()")
    w = weight.detach().float() if weight.device.type == "cpu" else weight.detach()
    zeroed = w.masked_fill(unstructured_mask(w.abs().float(), sparsity), 0)
    with warnings.catch_warnings():  # torch warns once that CSR support is "beta"; the timing is what we show
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        csr = zeroed.to_sparse_csr()
    generator = torch.Generator().manual_seed(check_seed(seed))
    x = torch.randn(tokens, w.shape[1], generator=generator).to(w.device, w.dtype)
    x_t = x.t().contiguous()  # CSR @ dense wants the dense operand as (in, tokens); prepared once, untimed
    labels = {"dense weight, dense matmul": lambda: F.linear(x, w),
              f"{sparsity:.0%} zeros, dense matmul": lambda: F.linear(x, zeroed),
              f"{sparsity:.0%} zeros, CSR sparse matmul": lambda: torch.sparse.mm(csr, x_t)}
    stats = time_interleaved(labels, warmup=warmup, repeats=repeats, device=w.device)
    zero_share = [round(float((m == 0).float().mean()), 4) for m in (w, zeroed, zeroed)]  # 0.0003, not 3.41e-04
    table = pd.DataFrame({"zero share": zero_share, "P50 ms": [s.p50 * 1e3 for s in stats.values()],
                          "P95 ms": [s.p95 * 1e3 for s in stats.values()]},
                         index=pd.Index(list(labels), name="weight, kernel"))
    table["× dense"] = table["P50 ms"].iloc[0] / table["P50 ms"]
    table.attrs.update(shape=tuple(w.shape), tokens=tokens, device=str(w.device), dtype=str(w.dtype))
    return table


def load_time_table(folders: dict[str, str | os.PathLike], *, device: torch.device | str | None = None,
                    warmup: int = 1, repeats: int = 3, progress: bool = False) -> pd.DataFrame:
    """How long ``lu.load_pruned`` takes for each saved folder (sparse or dense), interleaved: one row per folder
    with its format, the bytes of its model file and the median and P95 seconds; "× first" is this folder's
    median over the first folder's (the reference, e.g. the dense copy)."""
    check_not_empty("folders", folders, "folder")
    reports = {name: load_report(path) for name, path in folders.items()}  # BadInput for a non-lab folder
    fns = {name: (lambda path=path: load_pruned(path, device)) for name, path in folders.items()}
    stats = time_interleaved(fns, warmup=warmup, repeats=repeats, device=get_device(device), progress=progress)
    first = stats[next(iter(folders))].p50
    rows = {name: {"format": reports[name]["disk"]["format"], "model bytes": model_file_bytes(folders[name]),
                   "seconds P50": s.p50, "seconds P95": s.p95, "× first": s.p50 / first}
            for name, s in stats.items()}
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("folder")
