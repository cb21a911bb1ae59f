"""The models behind the lab's server and the fallback between them (08-Deploy).

A ``Served`` model passed (or failed) a start-up check: its perplexity on a fixed passage of held-out text, computed
by llama.cpp from the file being served, must be finite and below ``MAX_HEALTH_PERPLEXITY`` — a damaged file (NaN
weights, bytes overwritten) fails it, an intact pruned model passes. ``ModelRouter`` is what llama-cpp-python's
OpenAI-compatible routes receive as their model proxy: every request goes to the primary (pruned) model while it is
healthy, and to the fallback (dense) model when the primary failed its check, raises, or produces non-finite
logits; the response's ``model`` field and ``/metrics`` say which one answered.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

from ..core.data import corpus_split
from ..core.errors import LabError
from .engine import last_logits, open_gguf, opened, window_nll
from .metrics import ServerMetrics

HEALTH_TOKENS = 128  # tokens of held-out text the start-up check scores
MAX_HEALTH_PERPLEXITY = 1000.0  # the embedded model: ~15 dense, ~40 at 50 %, ~200 at 2:4 + q4_0; uniform: 49 152


class NoModel(LabError):
    """No model could answer a request; the server answers HTTP 503 with this message."""


@dataclass
class Served:
    """One model of the server: ``name`` (the response's ``model`` field), ``role`` (primary or fallback), its
    file, the share of zeros in its decoder linears, and its start-up check."""

    name: str
    role: str
    path: Path
    sparsity: float
    perplexity: float
    problem: str | None  # why it failed its check; None when healthy
    llama: object | None = field(default=None, repr=False)

    @property
    def healthy(self) -> bool:
        return self.problem is None


def health_tokens(llama) -> list[int]:
    """The check's text: the first ``HEALTH_TOKENS`` tokens of the corpus' test split, in the model's own
    tokenizer."""
    text = "\n\n".join(article.text for article in corpus_split("test")[:4])
    return llama.tokenize(text.encode(), add_bos=False, special=False)[:HEALTH_TOKENS]


def check_health(path: Path, threads: int | None = None) -> tuple[float, str | None]:
    """(perplexity of the check's text, None) for a healthy file, or (NaN or the perplexity, why it failed)."""
    try:
        with opened(path, n_ctx=HEALTH_TOKENS, threads=threads, logits_all=True) as llama:
            tokens = health_tokens(llama)
            perplexity = math.exp(window_nll(llama, tokens) / (len(tokens) - 1))
    except LabError as exc:
        return math.nan, str(exc)
    except OverflowError:
        perplexity = math.inf
    if not perplexity < MAX_HEALTH_PERPLEXITY:
        return perplexity, (f"perplexity {perplexity:.4g} on the check's held-out text is above "
                            f"{MAX_HEALTH_PERPLEXITY:g}: the weights are damaged")
    return perplexity, None


def gguf_sparsity(path: Path) -> float:
    """The share of exact zeros in the decoder layers' 2-D weights of a GGUF file, measured from its tensors (what
    is served, not what a report says)."""
    reader = gguf.GGUFReader(path)
    zeros = total = 0
    for tensor in reader.tensors:
        if tensor.name.startswith("blk.") and len(tensor.shape) == 2:
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
            zeros, total = zeros + int(values.size - np.count_nonzero(values)), total + int(values.size)
    return zeros / total if total else 0.0


def load_served(name: str, role: str, path: Path, threads: int | None, n_ctx: int) -> Served:
    """Check one model and, when healthy, open it for serving."""
    perplexity, problem = check_health(path, threads)
    try:
        sparsity = gguf_sparsity(path)
    except (ValueError, OSError, KeyError) as exc:  # gguf's reader on a truncated or garbled file
        sparsity, problem = math.nan, problem or f"unreadable GGUF ({str(exc).splitlines()[0]})"
    llama = open_gguf(path, n_ctx=n_ctx, threads=threads) if problem is None else None
    return Served(name, role, path, sparsity, perplexity, problem, llama)


class FallbackLlama:
    """Stands in for one ``llama_cpp.Llama`` in llama-cpp-python's routes: completions and chat completions go to the
    first healthy model that answers with finite logits; anything else (tokenize, token_eos) to the first healthy
    model."""

    def __init__(self, models: list[Served], metrics: ServerMetrics, error=NoModel) -> None:
        self.models, self.metrics, self.error = models, metrics, error  # error(message): what a 503 raises

    def __getattr__(self, name: str):
        return getattr(self._healthy()[0].llama, name)

    def __call__(self, *args, **kwargs):
        return self.create_completion(*args, **kwargs)

    def create_completion(self, *args, **kwargs):
        return self._answer("create_completion", args, kwargs)

    def create_chat_completion(self, *args, **kwargs):
        return self._answer("create_chat_completion", args, kwargs)

    def _healthy(self) -> list[Served]:
        healthy = [m for m in self.models if m.healthy]
        if not healthy:
            self._unavailable("no healthy model: " + "; ".join(f"{m.name}: {m.problem}" for m in self.models))
        return healthy

    def _unavailable(self, detail: str):
        self.metrics.unanswered.inc()
        raise self.error(detail)

    def _answer(self, method: str, args, kwargs):
        for model in self._healthy():
            start = time.perf_counter()
            try:
                result = getattr(model.llama, method)(*args, **kwargs)
                if kwargs.get("stream"):
                    return self._stream(model, result, start)
                if not np.isfinite(last_logits(model.llama)).all():
                    model.problem = "non-finite logits while answering a request"
                    raise LabError(model.problem)
            except (RuntimeError, LabError, OSError):
                self.metrics.failed(model.name)
                continue
            result["model"] = model.name
            tokens = result.get("usage", {}).get("completion_tokens", 0)
            self.metrics.answered(model.name, tokens, time.perf_counter() - start, model.role == "fallback")
            return result
        self._unavailable("every model failed this request (see lab_model_errors in /metrics)")

    def _stream(self, model: Served, chunks, start: float):
        tokens = 0
        for chunk in chunks:
            chunk["model"] = model.name
            tokens += 1
            yield chunk
        self.metrics.answered(model.name, tokens, time.perf_counter() - start, model.role == "fallback")


class ModelRouter:
    """The ``llama_proxy`` of llama-cpp-python's routes: whatever model a request names, the router answers it."""

    def __init__(self, models: list[Served], metrics: ServerMetrics, error=NoModel) -> None:
        self.models = models
        self.llama = FallbackLlama(models, metrics, error)

    def __call__(self, model: str | None = None) -> FallbackLlama:
        return self.llama

    def __iter__(self):
        return iter(m.name for m in self.models if m.healthy)

    def __getitem__(self, name: str) -> dict:
        served = next(m for m in self.models if m.name == name)
        return {"model": os.fspath(served.path), "model_alias": name}

    def free(self) -> None:
        for model in self.models:
            if model.llama is not None:
                model.llama.close()
                model.llama = None
