"""Latency and memory of models on the device at hand (introduced in 04-Benchmark).

Every timing synchronises the device before reading the clock on both sides, because CUDA kernels run
asynchronously: without it a "forward" would only measure how long it takes to queue kernels. Models that are
compared are run interleaved (see ``time_interleaved``) so that slow drift of the machine is shared fairly.
"""
from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm  # plain text everywhere: a saved notebook shows the finished bar, not a widget

from ..core.validation import check_positive_int
from ..core.device import synchronize
from ..core.errors import BadInput
from ..prune.masks import unstructured_mask
from ..core.models import CompressedLinear, check_seqlen, model_device

Clock = Callable[[], float]


@dataclass(frozen=True)
class TimingStats:
    """Summary of repeated timings, all in seconds. Percentiles interpolate linearly between order statistics:
    the q-th percentile of sorted x[0..n-1] sits at position (n−1)·q (NumPy's default, "linear")."""

    n: int
    mean: float
    p50: float
    p95: float
    min: float
    max: float

    @classmethod
    def of(cls, seconds: Sequence[float]) -> TimingStats:
        """Stats of ``seconds`` (at least one value, each finite and ≥ 0)."""
        values = sorted(float(s) for s in seconds)
        if not values:
            raise BadInput("TimingStats.of needs at least one timing; got an empty sequence")
        bad = [v for v in values if not math.isfinite(v) or v < 0]
        if bad:
            raise BadInput(f"timings must be finite and ≥ 0 seconds; got {bad[:3]}")
        return cls(n=len(values), mean=sum(values) / len(values), p50=_percentile(values, 0.50),
                   p95=_percentile(values, 0.95), min=values[0], max=values[-1])

    @property
    def rate_p50(self) -> float:
        """Calls per second at the median time (tokens/s when each call makes one token per sequence)."""
        return 1.0 / self.p50 if self.p50 > 0 else math.inf


def _percentile(sorted_values: list[float], q: float) -> float:
    position = (len(sorted_values) - 1) * q
    low = math.floor(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (position - low) * (sorted_values[high] - sorted_values[low])


def _check_counts(warmup: int, repeats: int) -> None:
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise BadInput(f"warmup must be an integer ≥ 0; got {warmup!r}")
    check_positive_int("repeats", repeats)


def _time_once(fn: Callable[[], object], device: torch.device, clock: Clock) -> float:
    synchronize(device)
    start = clock()
    fn()
    synchronize(device)
    return clock() - start


def time_calls(fn: Callable[[], object], *, warmup: int, repeats: int, device: torch.device,
               clock: Clock = time.perf_counter) -> TimingStats:
    """Call ``fn`` ``warmup`` times untimed (caches, allocator, kernel selection), then ``repeats`` times timed.

    The device is synchronised before each clock read, so queued GPU work is inside the interval.
    ``clock`` is injectable so tests can feed known times.
    """
    if not callable(fn):
        raise BadInput(f"fn must be callable; got {type(fn).__name__}")
    return time_interleaved({"fn": fn}, warmup=warmup, repeats=repeats, device=device, clock=clock)["fn"]


def time_interleaved(fns: Mapping[str, Callable[[], object]], *, warmup: int, repeats: int, device: torch.device,
                     clock: Clock = time.perf_counter, progress: bool = False) -> dict[str, TimingStats]:
    """Time several callables fairly: round r runs every callable once, in an order rotated by r.

    Interleaving (rather than all repeats of A, then all of B) spreads slow drift — a GPU clocking down as it
    heats, a background job — over every callable alike; rotating the order means none always runs first (right
    after another one's caches were filled). The first ``warmup`` rounds are run the same way but not timed.
    """
    _check_counts(warmup, repeats)
    if not fns:
        raise BadInput("time_interleaved needs at least one callable; got none")
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in tqdm(range(warmup + repeats), desc="timing", unit="round", disable=not progress):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            if r < warmup:
                fns[name]()
            else:
                times[name].append(_time_once(fns[name], device, clock))
    return {name: TimingStats.of(times[name]) for name in names}


def random_prompt(model: nn.Module, prompt_len: int, batch_size: int = 1, seed: int = 0) -> torch.Tensor:
    """Fixed random token ids for timing, on the model's device: (batch_size, prompt_len) int64."""
    check_positive_int("prompt_len", prompt_len)
    check_positive_int("batch_size", batch_size)
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch_size, prompt_len), generator=generator)
    return ids.to(model_device(model))


def prefill_fn(model: nn.Module, input_ids: torch.Tensor) -> Callable[[], object]:
    """One prefill forward over ``input_ids`` (batch, seq) without a KV cache. Like ``generate()``, only the last
    position's logits are computed (``logits_to_keep=1``), so the vocabulary projection does not dominate."""
    def run():
        with torch.inference_mode():
            return model(input_ids=input_ids, use_cache=False, logits_to_keep=1).logits
    return run


def prefill_latency(model: nn.Module, prompt_len: int, *, batch_size: int = 1, warmup: int = 2, repeats: int = 5,
                    seed: int = 0, clock: Clock = time.perf_counter) -> TimingStats:
    """Seconds for one forward over a fixed random prompt of (batch_size, prompt_len) tokens."""
    check_seqlen(model, "prompt_len", prompt_len)
    ids = random_prompt(model, prompt_len, batch_size, seed)
    return time_calls(prefill_fn(model, ids), warmup=warmup, repeats=repeats, device=ids.device, clock=clock)


@torch.inference_mode()
def timed_greedy_decode(model: nn.Module, input_ids: torch.Tensor, new_tokens: int,
                        clock: Clock = time.perf_counter) -> tuple[torch.Tensor, list[float]]:
    """Greedy decoding with the model's KV cache, timing each decode step.

    The prefill over ``input_ids`` (batch, seq) is not timed; it predicts the first token. Then exactly
    ``new_tokens`` decode steps each feed the last token and predict the next one. Returns the continuation
    (batch, new_tokens + 1) — the prefill's token, then one per step — and the seconds of each step.
    """
    check_positive_int("new_tokens", new_tokens)
    out = model(input_ids=input_ids, use_cache=True, logits_to_keep=1)
    tokens = [out.logits[:, -1].argmax(dim=-1, keepdim=True)]
    cache, seconds = out.past_key_values, []
    for _ in range(new_tokens):
        synchronize(input_ids.device)
        start = clock()
        out = model(input_ids=tokens[-1], past_key_values=cache, use_cache=True)
        tokens.append(out.logits[:, -1].argmax(dim=-1, keepdim=True))
        synchronize(input_ids.device)
        seconds.append(clock() - start)
        cache = out.past_key_values
    return torch.cat(tokens, dim=1), seconds


def decode_interleaved(models: Mapping[str, nn.Module], prompt_len: int, new_tokens: int, *, batch_size: int = 1,
                       warmup: int = 1, repeats: int = 3, seed: int = 0, clock: Clock = time.perf_counter,
                       progress: bool = False) -> dict[str, TimingStats]:
    """Per-step decode seconds of each model (n = repeats · new_tokens samples), rounds interleaved and rotated
    as in ``time_interleaved``. tokens/s per sequence = ``stats.rate_p50``; for the batch, times batch_size."""
    _check_counts(warmup, repeats)
    check_positive_int("new_tokens", new_tokens)
    if not models:
        raise BadInput("decode_interleaved needs at least one model; got none")
    prompts = {}
    for name, model in models.items():
        check_seqlen(model, "prompt_len + new_tokens", prompt_len + new_tokens)
        prompts[name] = random_prompt(model, prompt_len, batch_size, seed)
    names = list(models)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in tqdm(range(warmup + repeats), desc="decoding", unit="round", disable=not progress):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            _, seconds = timed_greedy_decode(models[name], prompts[name], new_tokens, clock=clock)
            if r >= warmup:
                times[name].extend(seconds)
    return {name: TimingStats.of(times[name]) for name in names}


def decode_throughput(model: nn.Module, prompt_len: int, new_tokens: int, *, batch_size: int = 1, warmup: int = 1,
                      repeats: int = 3, seed: int = 0, clock: Clock = time.perf_counter) -> TimingStats:
    """Seconds per decode step after a ``prompt_len`` prefill (tokens/s per sequence = ``.rate_p50``)."""
    return decode_interleaved({"model": model}, prompt_len, new_tokens, batch_size=batch_size, warmup=warmup,
                              repeats=repeats, seed=seed, clock=clock)["model"]


def latency_table(models: dict[str, nn.Module], *, prompt_len: int, new_tokens: int, warmup: int = 2,
                  repeats: int = 5, seed: int = 0, progress: bool = True) -> pd.DataFrame:
    """Prefill and decode speed of each model; the first model is the reference for the "× dense" columns
    (> 1 means faster than it). Prefills and decodes are each timed in interleaved, rotated rounds
    (``time_interleaved``), so no model systematically gets the cooler GPU or the warmer cache.

    Columns: prefill ms P50 / P95 (batch 1, ``prompt_len`` tokens), decode tokens/s at the P50 step time,
    decode ms per token P95 (the slow steps), and the two speed ratios against the first model.
    """
    if not models:
        raise BadInput("latency_table needs at least one model; got an empty dict")
    for name, model in models.items():
        check_seqlen(model, f"model {name!r}: prompt_len + new_tokens", prompt_len + new_tokens)
    prefills = {name: prefill_fn(m, random_prompt(m, prompt_len, 1, seed)) for name, m in models.items()}
    prefill = time_interleaved(prefills,
                               warmup=warmup, repeats=repeats, device=model_device(next(iter(models.values()))),
                               progress=progress)
    decode = decode_interleaved(models, prompt_len, new_tokens, warmup=warmup, repeats=repeats, seed=seed,
                                progress=progress)
    table = pd.DataFrame({
        "prefill ms P50": [prefill[n].p50 * 1e3 for n in models],
        "prefill ms P95": [prefill[n].p95 * 1e3 for n in models],
        "decode tokens/s P50": [decode[n].rate_p50 for n in models],
        "decode ms/token P95": [decode[n].p95 * 1e3 for n in models],
    }, index=pd.Index(list(models), name="model"))
    first = table.iloc[0]
    table["prefill × dense"] = first["prefill ms P50"] / table["prefill ms P50"]
    table["decode × dense"] = table["decode tokens/s P50"] / first["decode tokens/s P50"]
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
        return int(t.values().count_nonzero())
    return int(t.detach().count_nonzero())


def memory_table(models: dict[str, nn.Module], *, prompt_len: int = 128, seed: int = 0) -> pd.DataFrame:
    """Size of each model in memory. Tied weights (SmolLM2 ties embedding and output) count once.

    Columns: parameters (logical: a 2:4 compressed weight counts its dense shape), non-zero parameters, zero share,
    MiB of parameters + buffers as stored (a 2:4 compressed weight counts its packed values and metadata), and
    "peak prefill MiB (CUDA)": the peak memory allocated on the GPU during one prefill of ``prompt_len`` tokens,
    weights included (``torch.cuda.max_memory_allocated``); NaN off CUDA, where torch does not track it.
    """
    if not models:
        raise BadInput("memory_table needs at least one model; got an empty dict")
    rows = []
    for name, model in models.items():
        params = list({id(p): p for p in model.parameters()}.values())
        buffers = list({id(b): b for b in model.buffers()}.values())
        compressed = [m for m in model.modules() if isinstance(m, CompressedLinear)]  # weights held as buffers
        total = sum(p.numel() for p in params) + sum(m.out_features * m.in_features for m in compressed)
        nonzero = (sum(_count_nonzero(p) for p in params)
                   + sum(m.nonzero_weights() for m in compressed))
        rows.append({"model": name, "parameters": total, "non-zero parameters": nonzero,
                     "zero share": 1 - nonzero / total if total else math.nan,
                     "MiB (params + buffers)": sum(_tensor_bytes(t) for t in params + buffers) / 2**20,
                     "peak prefill MiB (CUDA)": _peak_prefill_mib(model, prompt_len, seed)})
    return pd.DataFrame(rows).set_index("model")


def _peak_prefill_mib(model: nn.Module, prompt_len: int, seed: int) -> float:
    device = model_device(model)
    if device.type != "cuda":
        return math.nan
    check_seqlen(model, "prompt_len", prompt_len)
    return measure(device, prefill_fn(model, random_prompt(model, prompt_len, 1, seed))).peak_gib * 1024


@dataclass
class Measured:
    """One ``measure`` call: wall seconds, peak GPU GiB and what the function returned."""

    seconds: float
    peak_gib: float  # peak GPU memory allocated by torch; NaN off CUDA
    result: object = None


def measure(device: torch.device, fn: Callable[[], object]) -> Measured:
    """Wall time of ``fn()`` with the device idle before and after, and the peak GPU memory it allocated."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else math.nan
    return Measured(seconds, peak, result)


@torch.inference_mode()
def zeros_matmul_table(weight: torch.Tensor, tokens: int, *, sparsity: float = 0.5, warmup: int = 3,
                       repeats: int = 20, seed: int = 0) -> pd.DataFrame:
    """Why zeros alone give no speedup: time y = x Wᵀ for x (tokens, in) with

    - the dense weight W (out, in),
    - the same W with ``sparsity`` of every row zeroed by magnitude, still stored densely (the GEMM multiplies
      zeros like any other number, so the time is the same),
    - that zeroed W stored as CSR (``torch.sparse``): at 50 % zeros the index overhead makes it slower.

    On the CPU the product runs in float32. Returns P50 / P95 ms and the speed ratio against the dense weight.
    """
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise BadInput(f"weight must be a 2-D (out, in) tensor; got {getattr(weight, 'shape', type(weight))}")
    check_positive_int("tokens", tokens)
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 < sparsity < 1:
        raise BadInput(f"sparsity must be a number in (0, 1); got {sparsity!r}")
    w = weight.detach().float() if weight.device.type == "cpu" else weight.detach()
    zeroed = w.masked_fill(unstructured_mask(w.abs().float(), sparsity), 0)
    with warnings.catch_warnings():  # torch warns once that CSR support is "beta"; the timing is what we show
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        csr = zeroed.to_sparse_csr()
    x = torch.randn(tokens, w.shape[1], generator=torch.Generator().manual_seed(seed)).to(w.device, w.dtype)
    x_t = x.t().contiguous()  # CSR @ dense wants the dense operand as (in, tokens); prepared once, untimed
    labels = {"dense weight, dense matmul": lambda: F.linear(x, w),
              f"{sparsity:.0%} zeros, dense matmul": lambda: F.linear(x, zeroed),
              f"{sparsity:.0%} zeros, CSR sparse matmul": lambda: torch.sparse.mm(csr, x_t)}
    stats = time_interleaved(labels, warmup=warmup, repeats=repeats, device=w.device)
    zero_share = [float((w == 0).float().mean()), float((zeroed == 0).float().mean()),
                  float((zeroed == 0).float().mean())]
    table = pd.DataFrame({"zero share": zero_share, "P50 ms": [s.p50 * 1e3 for s in stats.values()],
                          "P95 ms": [s.p95 * 1e3 for s in stats.values()]},
                         index=pd.Index(list(labels), name="weight, kernel"))
    table["× dense"] = table["P50 ms"].iloc[0] / table["P50 ms"]
    table.attrs.update(shape=tuple(w.shape), tokens=tokens, device=str(w.device), dtype=str(w.dtype))
    return table
