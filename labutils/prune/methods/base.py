"""The shape every pruning method has: one linear's weight and calibration statistic in, pruned weight out."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ...core.errors import BadInput
from ...core.validation import check_choice
from ..masks import GROUPS, SparsityTarget

# Which calibration statistic a method needs for each linear, collected by the shared layer-by-layer driver:
# NO_STATISTIC; INPUT_NORMS (in,) = Σ_t x_tj²; HESSIAN (in, in) = 2 · Σ_t x_t x_tᵀ. Re-exported for the methods.
from ..statistics import HESSIAN, INPUT_NORMS, NO_STATISTIC  # noqa: F401


@dataclass(frozen=True)
class Method:
    """A pruning method.

    ``prune(linear, statistic, target, **params)`` zeroes (and, for SparseGPT, updates) ``linear.weight`` in
    place and returns the bool mask of pruned weights, shape (out, in). ``params`` maps each parameter the
    method takes to its default; ``check`` validates given values.
    """

    name: str
    statistic: str
    prune: Callable[..., torch.Tensor]
    description: str
    params: dict[str, float | str] = field(default_factory=dict)
    check: Callable[[dict], None] | None = None

    @property
    def needs_calibration(self) -> bool:
        return self.statistic != NO_STATISTIC

    def resolve(self, given: dict | None) -> dict:
        """The method's parameters: defaults updated with ``given``, validated."""
        if given is not None and not isinstance(given, dict):
            raise BadInput(f"params of method {self.name!r} must be a dict of parameter → value; got "
                           f"{type(given).__name__}")
        given = {k: v for k, v in (given or {}).items() if v is not None}
        unknown = set(given) - set(self.params)
        if unknown:
            takes = ", ".join(f"{k} (default {v})" for k, v in self.params.items()) or "no parameters"
            raise BadInput(f"method {self.name!r} does not take {', '.join(sorted(unknown))}; it takes {takes}")
        params = {**self.params, **given}
        if self.check is not None:
            self.check(params)
        return params

    def apply(self, linear: nn.Linear, statistic: torch.Tensor | None, target: SparsityTarget, params: dict):
        return self.prune(linear, statistic, target, **params)


def check_group(params: dict) -> None:
    """The comparison group of a score-and-mask method: "row" (each output row) or "layer" (the whole matrix)."""
    check_choice("group", params["group"], GROUPS)
