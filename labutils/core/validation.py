"""Checks of values at the lab's public boundary: each one returns the value (normalised) or raises BadInput
with one line naming what was given and what is allowed. Every module validates through these."""
from __future__ import annotations

import math
import numbers

import torch
from torch import nn

from .errors import BadInput


def check_positive_int(name: str, value) -> int:
    """``value`` if it is an int ≥ 1, else a BadInput naming ``name`` and the value."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise BadInput(f"{name} must be a positive integer (≥ 1); got {value!r}")
    return int(value)


def check_number(name: str, value, low: float = -math.inf, high: float = math.inf, *, low_open: bool = False,
                 allowed: str | None = None) -> float:
    """``value`` as a float if it is a finite real number in [low, high] (or (low, high] with ``low_open``), else
    BadInput. numpy scalars count as numbers; bools do not."""
    ok = (not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)
          and (value > low if low_open else value >= low) and value <= high)
    if not ok:
        raise BadInput(f"{name} must be {allowed or f'a number in [{low}, {high}]'}; got {value!r}")
    return float(value)


SEED_MAX = 2**63 - 1  # torch.Generator.manual_seed takes a 64-bit integer; NumPy gets seed mod 2**32


def check_seed(value) -> int:
    """``value`` if it is an int in [0, 2**63 − 1] (what every random generator of the lab accepts), else BadInput."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= value <= SEED_MAX:
        raise BadInput(f"seed must be an integer in [0, 2**63 − 1] = [0, {SEED_MAX}]; got {value!r}")
    return int(value)


def describe(value, limit: int = 60) -> str:
    """One short line naming ``value`` in an error message: a tensor's shape and dtype (never its values), else its
    repr cut to ``limit`` characters."""
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    text = " ".join(repr(value).split())
    return text if len(text) <= limit else f"{type(value).__name__} {text[:limit]}…"


TOKEN_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def check_tokens(name: str, tokens, vocab_size: int, ndim: int) -> torch.Tensor:
    """``tokens`` as a long tensor if it is a non-empty ``ndim``-d tensor of integer ids in [0, vocab_size), else
    BadInput naming its type, dtype, shape or range (never its values)."""
    if not isinstance(tokens, torch.Tensor):
        raise BadInput(f"{name} must be a torch.Tensor of integer token ids (make one with torch.tensor(ids)); "
                       f"got {describe(tokens)}")
    if tokens.dtype not in TOKEN_DTYPES:
        raise BadInput(f"{name} must hold integer token ids (torch.long or another integer dtype); "
                       f"got dtype {tokens.dtype}")
    if tokens.ndim != ndim or tokens.numel() == 0:
        raise BadInput(f"{name} must be a non-empty {ndim}-d tensor of token ids; got shape {tuple(tokens.shape)}")
    low, high = torch.stack(torch.aminmax(tokens)).tolist()  # one host sync
    if low < 0 or high >= vocab_size:
        raise BadInput(f"{name} must be token ids in [0, {vocab_size}) (the model's vocab_size); "
                       f"got min {low}, max {high}")
    return tokens.long()


def check_model(model) -> nn.Module:
    """``model`` if it is a torch module with a ``config`` that has an integer ``vocab_size`` (a Hugging Face
    causal language model, as ``load_model`` gives), else BadInput naming what was given."""
    vocab_size = getattr(getattr(model, "config", None), "vocab_size", None)
    if not isinstance(model, nn.Module) or isinstance(vocab_size, bool) or not isinstance(vocab_size, numbers.Integral):
        raise BadInput(f"model must be a causal language model (a torch nn.Module whose config has vocab_size, as "
                       f"lu.load_model gives); got {describe(model)}")
    return model
