"""Fair timing loops with percentile statistics (introduced in 04-Benchmark).

Every timing synchronises the device before reading the clock on both sides, because CUDA kernels run
asynchronously: without it a "forward" would only measure how long it takes to queue kernels. Callables that are
compared run interleaved (``time_interleaved``; decode steps: ``decode_interleaved``) so that slow drift of the
machine is shared fairly. The tables built on them are in ``latency``.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from tqdm import tqdm  # plain text everywhere: a saved notebook shows the finished bar, not a widget

from ..core.anatomy import check_seqlen
from ..core.device import synchronize
from ..core.errors import BadInput
from ..core.validation import check_callable, check_count, check_not_empty, check_positive_int, check_tokens

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
        values = check_not_empty("seconds", sorted(float(s) for s in seconds), "timing")
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


def _interleave(runs: Mapping[str, Callable[[bool], list[float]]], warmup: int, repeats: int, desc: str,
                progress: bool) -> dict[str, TimingStats]:
    """The one fair timing loop: round r calls every ``runs[name](timed)`` once, in an order rotated by r; each call
    returns the seconds it measured. The first ``warmup`` rounds run with ``timed=False`` and are not kept."""
    check_count("warmup", warmup)
    check_positive_int("repeats", repeats)
    names = list(runs)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in tqdm(range(warmup + repeats), desc=desc, unit="round", disable=not progress):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            seconds = runs[name](r >= warmup)
            if r >= warmup:
                times[name].extend(seconds)
    return {name: TimingStats.of(times[name]) for name in names}


def _time_call(fn: Callable[[], object], device: torch.device, clock: Clock, timed: bool) -> list[float]:
    """[seconds of one call of ``fn``], the device synchronised before each clock read; [] and no clock read when
    not ``timed`` (a warm-up call)."""
    if not timed:
        fn()
        return []
    synchronize(device)
    start = clock()
    fn()
    synchronize(device)
    return [clock() - start]


def time_interleaved(fns: Mapping[str, Callable[[], object]], *, warmup: int, repeats: int, device: torch.device,
                     clock: Clock = time.perf_counter, progress: bool = False) -> dict[str, TimingStats]:
    """Time several callables fairly: round r runs every callable once, in an order rotated by r.

    Interleaving (rather than all repeats of A, then all of B) spreads slow drift — a GPU clocking down as it
    heats, a background job — over every callable alike; rotating the order means none always runs first (right
    after another one's caches were filled). The first ``warmup`` rounds are run the same way but not timed
    (caches, allocator, kernel selection). The device is synchronised before each clock read, so queued GPU work is
    inside the interval; ``clock`` is injectable so tests can feed known times.
    """
    check_not_empty("fns", fns, "callable")
    runs = {name: partial(_time_call, check_callable(f"fns[{name!r}]", fn), device, clock) for name, fn in fns.items()}
    return _interleave(runs, warmup, repeats, "timing", progress)


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


def decode_interleaved(models: Mapping[str, nn.Module], prompts: Mapping[str, torch.Tensor], new_tokens: int, *,
                       warmup: int = 1, repeats: int = 3, progress: bool = False) -> dict[str, TimingStats]:
    """Per-step decode seconds of each model (n = repeats · new_tokens samples) after a prefill of ``prompts[name]``
    (batch, prompt_len) token ids on that model's device (``random_prompt``), rounds interleaved and rotated as in
    ``time_interleaved``. tokens/s per sequence = ``stats.rate_p50``; for the batch, times batch."""
    check_not_empty("models", models, "model")
    check_positive_int("new_tokens", new_tokens)
    runs = {}
    for name, model in models.items():
        prompt = check_tokens(f"prompts[{name!r}]", prompts.get(name), model.config.vocab_size, ndim=2)
        check_seqlen(model, "prompt_len + new_tokens", prompt.shape[1] + new_tokens)
        runs[name] = partial(_decode_steps, model, prompt, new_tokens)
    return _interleave(runs, warmup, repeats, "decoding", progress)


def _decode_steps(model: nn.Module, prompt: torch.Tensor, new_tokens: int, timed: bool) -> list[float]:
    """Seconds of each decode step of one greedy continuation of ``prompt`` (warm-up runs are timed too, and
    dropped)."""
    return timed_greedy_decode(model, prompt, new_tokens)[1]


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
