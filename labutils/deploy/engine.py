"""llama.cpp as the lab's second engine (08-Deploy): a GGUF file opened through ``llama-cpp-python``, its
perplexity on the lab's own test windows from llama.cpp's logits, greedy generation, and decode speed.

``llama-cpp-python`` builds llama.cpp from source with this machine's compiler, so it is an optional install
(``make setup-deploy``); every function here says so in one line when it is missing.
"""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..core.errors import BadInput, LabError
from ..core.validation import check_count, check_positive_int
from ..evaluate.perplexity import perplexity_of

LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"  # requirements-deploy.txt pins the same (a test holds them equal)
INSTALL_HINT = f"llama-cpp-python is not installed: run `make setup-deploy` (builds {LLAMA_CPP_PYTHON} from source)"


def llama_cpp_module():
    """The ``llama_cpp`` module, or LabError saying how to install it."""
    try:
        import llama_cpp
    except ImportError:
        raise LabError(INSTALL_HINT) from None
    return llama_cpp


def default_threads() -> int:
    """Half the cores this process may use, at least one: llama-cpp-python's own default. llama.cpp's worker threads
    spin while they wait for each other, so one thread per core collapses as soon as anything else runs: on the
    lab's 2-core machine with another job running, decoding measured 0.4 tokens/s with 2 threads and 74 with 1."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // 2)


def check_gguf_file(path: str | os.PathLike, what: str = "GGUF") -> Path:
    """``path`` as a Path if it is a readable file that starts with GGUF's magic; BadInput in one line if not."""
    if not isinstance(path, (str, os.PathLike)):
        raise BadInput(f"{what} must be a path to a .gguf file; got {type(path).__name__}")
    given = Path(path).expanduser()
    if not given.is_file():
        raise BadInput(f"{what} {str(path)!r}: no such file; allowed: a .gguf file (python -m labutils export "
                       "FOLDER OUT.gguf --format gguf writes one)")
    with open(given, "rb") as f:
        if f.read(4) != b"GGUF":
            raise BadInput(f"{what} {str(path)!r} is not a GGUF file (it does not start with the bytes GGUF)")
    return given


def open_gguf(path: str | os.PathLike, *, n_ctx: int = 512, threads: int | None = None, logits_all: bool = False):
    """A ``llama_cpp.Llama`` for the GGUF file at ``path``, quiet (llama.cpp's log off). ``logits_all`` keeps every
    position's logits (perplexity needs them; generation does not). LabError when llama.cpp cannot load the file."""
    llama_cpp = llama_cpp_module()
    path = check_gguf_file(path)
    threads = threads or default_threads()
    check_positive_int("threads", threads)
    try:
        return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=threads,
                               n_threads_batch=threads, logits_all=logits_all, verbose=False, seed=0)
    except (ValueError, RuntimeError) as exc:
        raise LabError(f"llama.cpp cannot load {str(path)!r} ({str(exc).splitlines()[0]}): the file is damaged or "
                       "not a model llama.cpp knows; export it again") from None


def last_logits(llama) -> np.ndarray:
    """(vocab,) float32 logits llama.cpp computed for the last token it evaluated (without ``logits_all`` too)."""
    llama_cpp = llama_cpp_module()
    pointer = llama_cpp.llama_get_logits_ith(llama.ctx, -1)
    return np.ctypeslib.as_array(pointer, shape=(llama.n_vocab(),)).copy()


def nll_of_logits(logits: np.ndarray, targets) -> float:
    """Summed negative log-likelihood of ``targets`` (T,) under ``logits`` (T, vocab): row t scores target t. The
    log-softmax in float64, its maximum subtracted first (exp of a large logit overflows otherwise)."""
    logits = np.asarray(logits, dtype=np.float64)
    targets = np.asarray(targets)
    if logits.ndim != 2 or targets.shape != (logits.shape[0],):
        raise BadInput(f"logits must be (T, vocab) and targets (T,); got {logits.shape} and {targets.shape}")
    if not np.isfinite(logits).all():
        raise LabError("llama.cpp's logits hold NaN or inf values: the GGUF file's weights are damaged")
    top = logits.max(axis=1, keepdims=True)
    log_norm = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
    return float((log_norm - logits[np.arange(len(targets)), targets]).sum())


def window_nll(llama, window: list[int]) -> float:
    """Summed negative log-likelihood of ``window[1:]`` given what precedes each token, from a fresh context."""
    llama.reset()
    llama.eval(window)
    return nll_of_logits(llama.scores[: len(window) - 1], window[1:])


def gguf_perplexity(path: str | os.PathLike, tokens: torch.Tensor, seqlen: int, *, threads: int | None = None,
                    progress: bool = True) -> float:
    """Perplexity of the GGUF model on ``tokens`` (N,) in non-overlapping windows of ``seqlen``, each scored on its
    own — the windows and formula of ``lu.perplexity``, with llama.cpp computing the logits."""
    from tqdm import tqdm

    check_count("seqlen", seqlen, minimum=2)
    if not isinstance(tokens, torch.Tensor) or tokens.ndim != 1:
        raise BadInput(f"tokens must be a 1-D tensor of token ids; got {getattr(tokens, 'shape', type(tokens))}")
    n_windows = tokens.numel() // seqlen
    if n_windows == 0:
        raise BadInput(f"need at least seqlen={seqlen} tokens; got {tokens.numel()}")
    windows = tokens[: n_windows * seqlen].reshape(n_windows, seqlen).tolist()
    llama = open_gguf(path, n_ctx=seqlen, threads=threads, logits_all=True)
    try:
        total = sum(window_nll(llama, w) for w in tqdm(windows, desc=f"llama.cpp {Path(path).name}", unit="window",
                                                      disable=not progress))
    finally:
        llama.close()
    return perplexity_of(total, n_windows * (seqlen - 1))


@dataclass(frozen=True)
class DecodeSpeed:
    """Greedy decoding in llama.cpp: prompt tokens per second (prefill) and new tokens per second (decode), median
    over ``repeats``; ``tokens`` the ids generated (the same in every repeat)."""

    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    tokens: tuple[int, ...]


def greedy_tokens(llama, prompt: list[int], new_tokens: int) -> tuple[list[int], float, list[float]]:
    """(generated ids, prefill seconds, seconds of each decode step): argmax decoding of ``new_tokens`` ids after
    ``prompt``, never stopping early (end-of-text included), so every model decodes the same number of tokens."""
    llama.reset()
    start = time.perf_counter()
    llama.eval(prompt)
    prefill = time.perf_counter() - start
    out, steps = [], []
    for _ in range(new_tokens):
        start = time.perf_counter()
        logits = last_logits(llama)
        if not np.isfinite(logits).all():
            raise LabError("llama.cpp's logits hold NaN or inf values: the GGUF file's weights are damaged")
        out.append(int(logits.argmax()))
        llama.eval([out[-1]])
        steps.append(time.perf_counter() - start)
    return out, prefill, steps


def decode_speeds(paths: dict[str, str | os.PathLike], prompt: list[int], new_tokens: int = 64, *,
                  repeats: int = 3, threads: int | None = None, progress: bool = True) -> dict[str, DecodeSpeed]:
    """Prefill and decode speed of each GGUF model in ``paths`` ({label: file}): every model open at once, one
    warm-up run each, then ``repeats`` rounds in a rotated order (as ``lu.latency_table`` does for PyTorch), so no
    model always runs first or last. Prefill: the median over rounds; decode: one over the median decode step of
    all rounds (``lu.latency_table``'s P50 per token), which a burst of other work on the machine moves little."""
    from tqdm import tqdm

    check_positive_int("new_tokens", new_tokens)
    check_positive_int("repeats", repeats)
    labels = list(paths)
    runs: dict[str, list] = {label: [] for label in labels}
    with contextlib.ExitStack() as stack:
        models = {label: stack.enter_context(opened(paths[label], n_ctx=len(prompt) + new_tokens + 1,
                                                    threads=threads)) for label in labels}
        for llama in models.values():
            greedy_tokens(llama, prompt, new_tokens)
        for r in tqdm(range(repeats), desc="llama.cpp decoding", unit="round", disable=not progress):
            for label in labels[r % len(labels):] + labels[: r % len(labels)]:
                runs[label].append(greedy_tokens(models[label], prompt, new_tokens))
    return {label: DecodeSpeed(float(np.median([len(prompt) / r[1] for r in rs])),
                               float(1 / np.median([step for r in rs for step in r[2]])), tuple(rs[0][0]))
            for label, rs in runs.items()}


def gguf_generate(path: str | os.PathLike, texts: list[str], new_tokens: int = 32, *,
             threads: int | None = None) -> list[tuple[str, list[int]]]:
    """Greedy continuations of ``texts`` by the GGUF model, cut at its end-of-text token: (text, token ids) each,
    as 03-Inference's ``greedy_generate`` does in PyTorch."""
    check_positive_int("new_tokens", new_tokens)
    with opened(path, n_ctx=512, threads=threads) as llama:
        out = []
        for text in texts:
            ids, _, _ = greedy_tokens(llama, llama.tokenize(text.encode(), add_bos=False), new_tokens)
            if llama.token_eos() in ids:
                ids = ids[: ids.index(llama.token_eos())]
            out.append((llama.detokenize(ids).decode(errors="replace"), ids))
    return out


def llama_cpp_version() -> str:
    """The installed llama-cpp-python's version (LabError saying how to install it when it is missing)."""
    return llama_cpp_module().__version__


@contextlib.contextmanager
def opened(path: str | os.PathLike, **kwargs):
    """``open_gguf`` as a context manager that frees llama.cpp's memory at exit."""
    llama = open_gguf(path, **kwargs)
    try:
        yield llama
    finally:
        llama.close()
