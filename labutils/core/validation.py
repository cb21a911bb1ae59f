"""Checks of values at the lab's public boundary: each one returns the value (normalised) or raises BadInput
with one line naming what was given and what is allowed. Every module validates through these."""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
from torch import nn

from .errors import BadInput


def is_integer(value) -> bool:
    """An int (numpy integers too), but not a bool."""
    return not isinstance(value, bool) and isinstance(value, numbers.Integral)


def check_positive_int(name: str, value) -> int:
    """``value`` if it is an int ≥ 1, else a BadInput naming ``name`` and the value."""
    if not is_integer(value) or value <= 0:
        raise BadInput(f"{name} must be a positive integer (≥ 1); got {value!r}")
    return int(value)


def check_count(name: str, value, minimum: int = 0) -> int:
    """``value`` if it is an int ≥ ``minimum`` (a number of warm-up rounds may be 0), else BadInput."""
    if not is_integer(value) or value < minimum:
        raise BadInput(f"{name} must be an integer ≥ {minimum}; got {value!r}")
    return int(value)


def check_positive_ints(name: str, values, length: int | None = None) -> tuple[int, ...]:
    """``values`` as a tuple if it is a non-empty sequence (exactly ``length`` long, if given) of ints ≥ 1, such as
    prompt lengths or an (out, in) shape, else BadInput."""
    ok = (isinstance(values, Sequence) and not isinstance(values, str) and len(values) > 0
          and (length is None or len(values) == length) and all(is_integer(v) and v >= 1 for v in values))
    if not ok:
        size = "non-empty" if length is None else f"{length}-long"
        raise BadInput(f"{name} must be a {size} sequence of positive integers; got {describe(values)}")
    return tuple(int(v) for v in values)


def check_number(name: str, value, low: float = -math.inf, high: float = math.inf, *, interval: str = "[]",
                 allowed: str | None = None) -> float:
    """``value`` as a float if it is a finite real number between ``low`` and ``high``, ends included or not as
    ``interval`` says ("[]", "[)", "(]" or "()"), else BadInput. numpy scalars count as numbers; bools do not."""
    ok = not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)
    ok = ok and (value > low if interval[0] == "(" else value >= low)
    ok = ok and (value < high if interval[1] == ")" else value <= high)
    if not ok:
        raise BadInput(f"{name} must be {allowed or f'a number in {interval[0]}{low:g}, {high:g}{interval[1]}'}; "
                       f"got {value!r}")
    return float(value)


def check_flag(name: str, value) -> bool:
    """``value`` if it is True or False (not 0, 1 or "yes"), else BadInput."""
    if not isinstance(value, bool):
        raise BadInput(f"{name} must be True or False; got {describe(value)}")
    return value


SEED_MAX = 2**63 - 1  # torch.Generator.manual_seed takes a 64-bit integer; NumPy gets seed mod 2**32


def check_seed(value) -> int:
    """``value`` if it is an int in [0, 2**63 − 1] (what every random generator of the lab accepts), else BadInput."""
    if not is_integer(value) or not 0 <= value <= SEED_MAX:
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
    if not isinstance(model, nn.Module) or not is_integer(vocab_size):
        raise BadInput(f"model must be a causal language model (a torch nn.Module whose config has vocab_size, as "
                       f"lu.load_model gives); got {describe(model)}")
    return model


def check_tensor(name: str, value, ndim: int, dims: str = "") -> torch.Tensor:
    """``value`` if it is a tensor with ``ndim`` dimensions, else BadInput; ``dims`` names them for the message,
    e.g. "(out, in)"."""
    if not isinstance(value, torch.Tensor) or value.ndim != ndim:
        raise BadInput(f"{name} must be a {ndim}-D {dims + ' ' if dims else ''}tensor; got {describe(value)}")
    return value


def check_shape(name: str, value, shape: tuple[int, ...], hint: str = "") -> torch.Tensor:
    """``value`` if it is a tensor of exactly ``shape``, else BadInput (with ``hint`` in parentheses, if given)."""
    if not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(shape):
        raise BadInput(f"{name} must be a tensor of shape {tuple(shape)}; got {describe(value)}"
                       + (f" ({hint})" if hint else ""))
    return value


def check_callable(name: str, value):
    """``value`` if it can be called, else BadInput naming what was given."""
    if not callable(value):
        raise BadInput(f"{name} must be callable; got {describe(value)}")
    return value


def check_not_empty(name: str, value, what: str):
    """``value`` if it holds at least one item (a dict of models, a list of timings), else BadInput; ``what`` names
    one item."""
    if not value:
        raise BadInput(f"{name} must hold at least one {what}; got an empty {type(value).__name__}")
    return value


def check_choice(name: str, value, choices: Sequence[str]) -> str:
    """``value`` if it is one of ``choices``, else BadInput listing them."""
    if not isinstance(value, str) or value not in choices:
        raise BadInput(f"{name} must be one of {', '.join(choices)}; got {describe(value)}")
    return value


def check_names(name: str, values, allowed: Sequence[str], source: str) -> list[str]:
    """``values`` as a list if it is a non-empty list of names, each one of ``allowed``, else BadInput showing a few
    allowed names; ``source`` says where they come from, e.g. "prunable_linears(model)"."""
    if isinstance(values, str) or not isinstance(values, Sequence) or not values:
        raise BadInput(f"{name} must be a non-empty list of names from {source}; got {describe(values)}")
    unknown = [v for v in values if v not in allowed]
    if unknown:
        raise BadInput(f"{name} has unknown name(s) {unknown[:3]}; allowed: names from {source}, e.g. "
                       f"{', '.join(list(allowed)[:3])}, … ({len(allowed)} in all)")
    return list(values)


def check_no_problems(summary: str, problems: Sequence[str], limit: int = 5) -> None:
    """BadInput "``summary``: problem; problem; … (and k more)" listing the first ``limit`` of ``problems``, if there
    are any: for checks that look at every layer before changing any."""
    if problems:
        more = f" (and {len(problems) - limit} more)" if len(problems) > limit else ""
        raise BadInput(f"{summary}: " + "; ".join(problems[:limit]) + more)
