"""Perplexity on non-overlapping windows of test text (introduced in 01-Setup, used in 02-Prune), and the windows
themselves, which the drift measurements of ``generation`` (03-Inference) share."""
from __future__ import annotations

import math
import sys
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm  # plain text everywhere: a saved notebook shows the finished bar, not a widget

from ..core.anatomy import check_seqlen, model_device
from ..core.errors import BadInput, LabError, is_out_of_memory
from ..core.validation import check_count, check_model, check_positive_int, check_tokens

MAX_LOG_PERPLEXITY = math.log(sys.float_info.max)  # math.exp overflows above this


def window_batches(tokens: torch.Tensor, seqlen: int, batch_size: int, device: torch.device, *, what: str,
                   desc: str | None = None) -> Iterator[torch.Tensor]:
    """Non-overlapping windows of ``seqlen`` tokens cut from ``tokens`` (N,), as batches (≤ batch_size, seqlen) on
    ``device``; the last N mod seqlen tokens are dropped. BadInput at once when not even one window fits (``what``
    names the tokens in the message). ``desc`` labels a progress bar; None shows none."""
    n_windows = tokens.numel() // seqlen
    if n_windows == 0:
        raise BadInput(f"need at least seqlen={seqlen} {what}; got {tokens.numel()}")
    windows = tokens[: n_windows * seqlen].reshape(n_windows, seqlen)
    batches = tqdm(windows.split(batch_size), desc=desc, unit="batch", disable=desc is None)
    return (batch.to(device) for batch in batches)


def next_token_logits(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """float32 logits (batch, seqlen − 1, vocab) of ``model`` on windows (batch, seqlen): position t predicts token
    t + 1, so the targets are ``batch[:, 1:]``. Each window is scored on its own: its first token is never
    predicted."""
    return model(input_ids=batch, use_cache=False).logits[:, :-1].float()


@torch.no_grad()
def perplexity(model: nn.Module, tokens: torch.Tensor, seqlen: int, batch_size: int = 4,
               progress: bool = True, desc: str = "perplexity") -> float:
    """exp(mean negative log-likelihood) over non-overlapping windows of ``seqlen`` tokens (``window_batches``).

    tokens: (N,) token ids; the last N mod seqlen tokens are dropped. Each window is scored on its own, so
    its first token is never predicted: seqlen−1 predictions per window.
    LabError when the model runs out of memory or its logits are not finite (NaN, inf).
    """
    check_model(model)
    tokens = check_tokens("tokens", tokens, model.config.vocab_size, ndim=1)
    check_count("seqlen", seqlen, minimum=2)  # a window of one token predicts nothing
    check_positive_int("batch_size", batch_size)
    check_seqlen(model, "eval seqlen", seqlen)
    batches = window_batches(tokens, seqlen, batch_size, model_device(model),
                             what="test tokens (--eval-tokens) for one window (--eval-seqlen)",
                             desc=desc if progress else None)
    try:
        total, count = total_nll(model, batches)
    except RuntimeError as exc:
        if not is_out_of_memory(exc):
            raise
        where = "GPU" if isinstance(exc, torch.OutOfMemoryError) else "CPU"
        raise LabError(f"out of {where} memory while evaluating ({desc}, batch_size={batch_size}, seqlen={seqlen}): "
                       f"use a smaller --batch-size or --eval-seqlen") from exc
    return perplexity_of(total, count)


def perplexity_of(total_nll: float, count: int) -> float:
    """exp(total_nll / count); LabError when that overflows."""
    mean_nll = total_nll / count
    if mean_nll > MAX_LOG_PERPLEXITY:
        raise _not_finite("inf", f"the mean loss of {mean_nll:.4g} nats per token overflows exp()")
    return math.exp(mean_nll)


def total_nll(model: nn.Module, batches: Iterator[torch.Tensor]) -> tuple[float, int]:
    """Summed negative log-likelihood and prediction count over batches of token windows (batch, seqlen)."""
    total_nll, total_count = 0.0, 0
    for batch in batches:
        logits = next_token_logits(model, batch)
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
        total_nll += nll.item()
        if not math.isfinite(total_nll):  # NaN or inf logits make the summed loss NaN or inf; stop at once
            raise _not_finite(total_nll)
        total_count += batch[:, 1:].numel()
    return total_nll, total_count


def _not_finite(value, cause: str = "the model's logits hold NaN or inf values") -> LabError:
    return LabError(f"perplexity is not finite ({value}): {cause} — its weights are damaged or overflowed (for the "
                    f"cached default model run `python -m labutils prepare`)")
