"""The 2:4 model against the masked dense model, prefill and decode, on the GPU (04-Benchmark).

``prefill_speedup_table`` times each prompt length eager and replayed from CUDA graphs (``sparse24.graphs``), in
interleaved rounds so both models see the same GPU state, and decode token by token. What makes the 2:4 model
(``sparse24.convert.to_semi_structured``) is elsewhere; this module only measures.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import pandas as pd
import torch
from torch import nn
from tqdm import tqdm  # plain text everywhere: a saved notebook shows the finished bar, not a widget

from ..core.anatomy import max_sequence_length, model_device
from ..core.device import synchronize
from ..core.errors import LabError
from ..core.validation import check_count, check_positive_int, check_positive_ints
from ..speed.latency import prefill_fn, random_prompt
from ..speed.timing import decode_interleaved, time_interleaved
from .convert import kernel_problem
from .graphs import GraphedForward, graphed_forward
from .kernel import SparseMatmul24


@dataclass(frozen=True)
class PrefillSettings:
    """How ``prefill_speedup_table`` measures: untimed and timed rounds per prefill length, CUDA graphs or eager
    only, the decode row (``decode_tokens`` steps after a ``decode_prompt_len`` prefill, ``decode_repeats`` timed
    runs; ``decode_tokens=0`` leaves it out) and the seed of the random prompts (04-Benchmark)."""

    warmup: int = 2
    repeats: int = 5
    graphs: bool = True
    decode_prompt_len: int = 128
    decode_tokens: int = 32
    decode_repeats: int = 3
    seed: int = 0


def prefill_speedup_table(dense_model: nn.Module, sparse_model: nn.Module,
                          lengths: Sequence[int] = (512, 1024, 2048, 4096, 8192),
                          settings: PrefillSettings | None = None, *, progress: bool = True,
                          on_row: Callable[[dict], None] | None = None) -> pd.DataFrame:
    """Batch-1 speed of the 2:4 model against the masked dense model, on the GPU.

    One row per prefill length: P50 ms of dense and 2:4, eager and replayed from a CUDA graph
    (``graphed_forward``), and "× dense" = dense ms / 2:4 ms (> 1: the sparse model is faster). Each length
    times its four variants in interleaved, rotated rounds (``time_interleaved``) on one fixed prompt;
    only the last position's logits are computed, as in ``generate()``. A length above the models' maximum
    positions, or one that runs out of GPU memory, gets a note instead of numbers. The last row is decode:
    P50 ms per token over ``settings.decode_tokens`` steps after a ``decode_prompt_len`` prefill, one untimed
    warm-up run then ``decode_repeats`` timed runs, eager only (replaying decode from a graph needs a static KV
    cache); ``decode_tokens=0`` leaves it out. ``settings``: ``PrefillSettings()`` when None. ``on_row(row)``, if
    given, receives each row as soon as it is measured (a benchmark saves it at once: a run cut short keeps the
    rows it finished).
    """
    settings = PrefillSettings() if settings is None else settings
    lengths = check_positive_ints("lengths", lengths)
    check_positive_int("decode_repeats", settings.decode_repeats)
    check_count("decode_tokens", settings.decode_tokens)
    for name, model in (("dense_model", dense_model), ("sparse_model", sparse_model)):
        problem = kernel_problem(model_device(model))
        if problem is not None:
            raise LabError(f"cannot time 2:4 kernels ({name}): {problem}")
    limit = min(max_sequence_length(dense_model), max_sequence_length(sparse_model))
    report = on_row or (lambda row: None)
    rows = []
    for n in tqdm(lengths, desc="prefill lengths", unit="length", disable=not progress):
        rows.append(_prefill_row(dense_model, sparse_model, n, limit, settings))
        report(rows[-1])
    if settings.decode_tokens:
        rows.append(_decode_row(dense_model, sparse_model, settings.decode_prompt_len, settings.decode_tokens,
                                settings.decode_repeats, settings.seed))
        report(rows[-1])
    table = pd.DataFrame(rows).set_index(["phase", "tokens"])
    table.attrs.update(warmup=settings.warmup, repeats=settings.repeats,
                       device=torch.cuda.get_device_name(model_device(dense_model)))
    return table


@torch.inference_mode()
def first_calls(model: nn.Module, token_counts: Sequence[int], *, seed: int = 0, on_row=None) -> list[dict]:
    """Call each distinct 2:4 GEMM of ``model`` (one module per weight shape: ``SparseMatmul24``, fused or not, or
    a stock ``SparseSemiStructuredTensor`` weight) once for every token count, before anything is timed.

    On an H200 with cuSPARSELt 0.8.0 the first call of a new (shape, token count) took tens of seconds (a 256-token
    check of the 7B model: 46 s), so a benchmark warms exactly the shapes and token counts it will time, and these
    rows record what each first call cost ("first call s") next to a second call ("next call ms")."""
    token_counts = check_positive_ints("token_counts", token_counts)
    device = model_device(model)
    generator = torch.Generator(device=device).manual_seed(seed)
    report, rows, seen = on_row or (lambda row: None), [], set()
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, SparseMatmul24):
            shape, call = (module.out_features, module.in_features), module
        elif isinstance(weight, torch.sparse.SparseSemiStructuredTensor):
            shape, call = tuple(weight.shape), partial(torch.nn.functional.linear, weight=weight)
        else:
            continue
        if shape in seen:
            continue
        seen.add(shape)
        dtype = module.packed.dtype if isinstance(module, SparseMatmul24) else weight.dtype
        for tokens in token_counts:
            x = torch.randn(tokens, shape[1], dtype=dtype, device=device, generator=generator)
            seconds = [_synchronized_seconds(call, x, device) for _ in range(2)]
            rows.append({"shape (out, in)": f"{shape[0]}×{shape[1]}", "first module": name, "tokens": tokens,
                         "first call s": seconds[0], "next call ms": seconds[1] * 1e3})
            report(rows[-1])
    return rows


def _synchronized_seconds(fn, x: torch.Tensor, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn(x)
    synchronize(device)
    return time.perf_counter() - start


def _prefill_row(dense: nn.Module, sparse: nn.Module, length: int, limit: int, settings: PrefillSettings) -> dict:
    row = {"phase": "prefill", "tokens": length}
    if length > limit:
        return {**row, "note": f"skipped: {length} tokens exceed the models' {limit} positions"}
    ids = random_prompt(dense, length, 1, settings.seed)
    captured: list[GraphedForward] = []
    try:
        fns = {"dense eager": prefill_fn(dense, ids), "2:4 eager": prefill_fn(sparse, ids)}
        if settings.graphs:
            for label, model in (("dense graphed", dense), ("2:4 graphed", sparse)):
                captured.append(graphed_forward(model, ids, logits_to_keep=1))
                fns[label] = partial(captured[-1], ids)
        stats = time_interleaved(fns, warmup=settings.warmup, repeats=settings.repeats, device=ids.device)
    except torch.cuda.OutOfMemoryError:
        return {**row, "note": f"skipped: out of GPU memory at {length} tokens"}
    finally:
        for graph in captured:
            graph.release()
        torch.cuda.empty_cache()
    return {**row, **_speed_columns(stats), "note": ""}


def _speed_columns(stats: dict) -> dict:
    columns = {}
    for mode in ("eager", "graphed"):
        if f"dense {mode}" in stats:
            dense_ms, sparse_ms = stats[f"dense {mode}"].p50 * 1e3, stats[f"2:4 {mode}"].p50 * 1e3
            columns.update({f"dense {mode} ms": dense_ms, f"2:4 {mode} ms": sparse_ms,
                            f"{mode} × dense": dense_ms / sparse_ms})
    return columns


def _decode_row(dense: nn.Module, sparse: nn.Module, prompt_len: int, new_tokens: int, repeats: int,
                seed: int) -> dict:
    row = {"phase": "decode", "tokens": new_tokens}
    try:
        models = {"dense eager": dense, "2:4 eager": sparse}
        prompts = {label: random_prompt(model, prompt_len, 1, seed) for label, model in models.items()}
        stats = decode_interleaved(models, prompts, new_tokens, warmup=1, repeats=repeats)
    except torch.cuda.OutOfMemoryError:
        return {**row, "note": "skipped: out of GPU memory while decoding"}
    note = f"ms per token (P50) after a {prompt_len}-token prompt, batch 1, eager only"
    return {**row, **_speed_columns(stats), "note": note}
