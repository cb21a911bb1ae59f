"""Perplexity on non-overlapping windows of test text (introduced in 01-Setup, used in 02-Prune)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .validation import check_positive_int
from .errors import BadInput
from .models import check_seqlen, model_device


@torch.no_grad()
def perplexity(model: nn.Module, tokens: torch.Tensor, seqlen: int, batch_size: int = 4,
               progress: bool = True, desc: str = "perplexity") -> float:
    """exp(mean negative log-likelihood) over non-overlapping windows of ``seqlen`` tokens.

    tokens: (N,) token ids; the last N mod seqlen tokens are dropped. Each window is scored on its own, so
    its first token is never predicted: seqlen−1 predictions per window.
    """
    check_positive_int("seqlen", seqlen)
    check_positive_int("batch_size", batch_size)
    check_seqlen(model, "seqlen", seqlen)
    if seqlen < 2:
        raise BadInput(f"seqlen must be at least 2 to predict anything; got {seqlen}")
    n_windows = tokens.numel() // seqlen
    if n_windows == 0:
        raise BadInput(f"need at least seqlen={seqlen} test tokens; got {tokens.numel()}")
    windows = tokens[: n_windows * seqlen].reshape(n_windows, seqlen)
    device = model_device(model)
    total_nll, total_count = 0.0, 0
    for batch in tqdm(windows.split(batch_size), desc=desc, unit="batch", disable=not progress):
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
        total_nll += nll.item()
        total_count += batch[:, 1:].numel()
    return math.exp(total_nll / total_count)
