"""Checks of values at the lab's public boundary: each one returns the value (normalised) or raises BadInput
with one line naming what was given and what is allowed. Every module validates through these."""
from __future__ import annotations

import math
import numbers

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
