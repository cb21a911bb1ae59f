"""The visible half of a check cell: ``lu.sanity("02.1", my_wanda_score)`` tells a student whether an answer has
the right form (a tensor of the right shape and type, a number in range, one of the letters) before it is graded.

It never computes the expected answer: the graded tests sit in the check cell's hidden-test region, which student
copies leave out (``course.py``) and grading runs (``grading.py``). So a passed sanity check says "well formed",
not "right"; a failed one raises ``CheckFailed`` (0 of 0 points) with what was wrong, shown as the same short block.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from ..core.errors import BadInput
from ..core.loading import random_model, tiny_llama_config
from .verdict import CheckFailed, CheckResult, number

HINT = "fix the form first: the graded tests compare values only once the form is right"


@dataclass(frozen=True)
class SanityResult:
    """A passed sanity check: which exercise, and what was seen."""

    exercise: str
    message: str

    def __str__(self) -> str:
        return f"well formed: {self.exercise} — {self.message}. Graded when the notebook is graded."

    def _repr_pretty_(self, printer, cycle) -> None:
        printer.text(str(self))


class NotWellFormed(Exception):
    """A sanity rule broken; its message says what was got."""


def _tensor(value, shape: tuple, dtype: str = "float") -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise NotWellFormed(f"expected a tensor, got {type(value).__name__}")
    if tuple(value.shape) != shape:
        raise NotWellFormed(f"expected shape {shape}, got {tuple(value.shape)}")
    if dtype == "bool" and value.dtype != torch.bool:
        raise NotWellFormed(f"expected a bool tensor (True = pruned), got {value.dtype}")
    if dtype == "float" and not value.is_floating_point():
        raise NotWellFormed(f"expected a floating-point tensor, got {value.dtype}")
    if dtype == "float" and not bool(torch.isfinite(value).all()):
        raise NotWellFormed("the tensor holds inf or nan")
    return value


def _real(value, low: float = -math.inf, high: float = math.inf, what: str = "the value") -> float:
    got = number(value)
    if got is None:
        raise NotWellFormed(f"expected one number for {what}, got {type(value).__name__}")
    if not (low <= got <= high and math.isfinite(got)):
        raise NotWellFormed(f"{what} = {got:.4g} is outside [{low:g}, {high:g}]")
    return got


def _numbers(value, keys: tuple, low: float = 0.0) -> str:
    if not isinstance(value, dict) or set(value) != set(keys):
        got = sorted(value, key=str) if isinstance(value, dict) else type(value).__name__
        raise NotWellFormed(f"expected a dict with keys {list(keys)}, got {got}")
    for key in keys:
        _real(value[key], low, what=f"the value of {key!r}")
    return f"a dict of {len(keys)} numbers"


def _choice(letters: str) -> Callable:
    def rule(value) -> str:
        if not isinstance(value, str) or value.strip().lower() not in letters:
            raise NotWellFormed(f"expected one of {', '.join(map(repr, letters))}, got {value!r}")
        return "one of the letters offered"
    return rule


def _value(what: str, low: float, high: float = math.inf) -> Callable:
    def rule(value) -> str:
        _real(value, low, high, what)
        return f"one number in [{low:g}, {high:g}]" if math.isfinite(high) else f"one number ≥ {low:g}"
    return rule


def _seeded(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _perplexity(fn) -> str:
    model = random_model(tiny_llama_config(), torch.float32, torch.device("cpu"), seed=1)
    _real(fn(model, torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(1))), 1, what="perplexity")
    return "one number ≥ 1 for a 16-token window"


def _score(fn, *extra) -> str:
    score = _tensor(fn(_seeded(3, 8), _seeded(10, 8, seed=1), *extra), (3, 8))
    if bool((score < 0).any()):
        raise NotWellFormed("some scores are negative")
    return "a float (3, 8) score, no negative or missing values"


def _row_mask(fn) -> str:
    mask = _tensor(fn(_seeded(3, 8), 0.5), (3, 8), "bool")
    if mask.sum(dim=1).tolist() != [4, 4, 4]:
        raise NotWellFormed(f"at 50 % each row of 8 prunes 4, got {mask.sum(dim=1).tolist()} per row")
    return "a bool (3, 8) mask, 4 pruned per row at 50 %"


def _nm_mask(fn) -> str:
    mask = _tensor(fn(_seeded(2, 8), 2, 4), (2, 8), "bool")
    if mask.reshape(-1, 4).sum(dim=1).tolist() != [2] * 4:
        raise NotWellFormed("2:4 prunes 2 of every 4 consecutive inputs")
    return "a bool (2, 8) mask, 2 pruned in every group of 4"


def _share(fn) -> str:
    logits = _seeded(1, 5, 7)
    _real(fn(logits, logits + 0.1 * _seeded(1, 5, 7, seed=1)), 0, 1, "the share")
    return "one number in [0, 1]"


def _kl(fn) -> str:
    logits = _seeded(1, 5, 7)
    _real(fn(logits, logits + _seeded(1, 5, 7, seed=1)), 0, what="the KL divergence")
    return "one number ≥ 0"


def _merge(fn) -> str:
    _tensor(fn(_seeded(3, 8), _seeded(2, 8, seed=1), _seeded(3, 2, seed=2), 0.5), (3, 8))
    return "a float (3, 8) weight"


def _windows(fn) -> str:
    tokens = torch.arange(100)
    windows = fn(tokens, 3, 10, 0)
    if not isinstance(windows, torch.Tensor) or tuple(windows.shape) != (3, 10):
        raise NotWellFormed(f"expected a (3, 10) tensor for 3 windows of 10, got {getattr(windows, 'shape', windows)}")
    if not bool((windows.diff(dim=1) == 1).all()):
        raise NotWellFormed("a window is not a run of consecutive tokens")
    return "a (3, 10) tensor of consecutive tokens"


def _q4_0(fn) -> str:
    values = _tensor(fn(_seeded(32)), (32,))
    if len(values.unique()) > 16:
        raise NotWellFormed(f"q4_0 has 16 levels per block, got {len(values.unique())} distinct values")
    return "32 values on at most 16 levels"


def _nll(fn) -> str:
    logits = _seeded(4, 10).double().numpy()
    _real(fn(logits, logits.argmin(axis=1)), 0, what="the negative log-likelihood")
    return "one number ≥ 0 for 4 positions"


RULES: dict[str, Callable] = {  # exercise id → rule(answer) → what was seen, or NotWellFormed
    "01.1": _perplexity, "01.2": _choice("abc"), "01.3": _value("short_ppl", 1),
    "02.1": _score, "02.2": _row_mask, "02.3": _choice("abcd"),
    "02.4": _value("zero_share", 0, 1),
    "03.1": _share, "03.2": _kl, "03.3": _choice("abc"), "03.4": lambda v: _numbers(v, ("forward", "reverse")),
    "04.1": lambda fn: _score(fn, 0.5), "04.2": _nm_mask, "04.3": _choice("abc"),
    "04.4": lambda v: _numbers(v, ("50%", "4:8", "2:4")),
    "05.1": _merge, "05.2": _choice("abc"), "05.3": lambda v: _numbers(v, (0, 5, 20)),
    "06.1": _windows, "06.2": _choice("abc"), "06.3": lambda v: _numbers(v, (1, 16, 128)),
    "07.1": _q4_0, "07.2": _choice("abc"), "07.3": _value("LINEAR_BITS", 0, 32),
    "08.1": _nll, "08.2": _choice("abc"), "08.3": _value("MEMORY_GROWTH", -1, 1),
}


def sanity(exercise: str, answer) -> SanityResult:
    """Check the form of an exercise's answer (a function or a value): returns what was seen, or raises
    ``CheckFailed`` saying what is wrong. Says nothing about whether the answer is right."""
    if exercise not in RULES:
        raise BadInput(f"no sanity rule for exercise {exercise!r}; known: {', '.join(RULES)}")
    try:
        if answer is None or answer is Ellipsis:
            raise NotWellFormed("no answer given yet")
        return SanityResult(exercise, RULES[exercise](answer))
    except NotImplementedError:
        message = "not written yet (the cell still raises NotImplementedError)"
    except NotWellFormed as wrong:
        message = str(wrong)
    except Exception as exc:  # the student's code raised: say which error, as the checks do
        message = f"the code raised {type(exc).__name__}: {exc}"
    raise CheckFailed(CheckResult(f"{exercise} form", 0, 0, message), HINT, "the form the exercise asks for")
