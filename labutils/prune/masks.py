"""What to prune and which weights: sparsity targets and mask selection (introduced in 02-Prune).

A mask is a bool tensor shaped like the weight, True where the weight is pruned. Unstructured masks compare
scores within each output row; N:M masks within each group of M consecutive inputs of a row.
"""
from __future__ import annotations

import numbers
import re
from dataclasses import dataclass

import torch
from torch import nn

from ..core.errors import BadInput
from ..core.validation import check_number, describe, is_integer


@dataclass(frozen=True)
class SparsityTarget:
    """What to prune: a fraction of every output row (unstructured), or N:M — at most N non-zeros in every
    group of M consecutive input weights (2:4 keeps 2 of 4). Checked when built, so every instance is valid:
    ``SparsityTarget(0.5)``, ``SparsityTarget(n=2, m=4)``; numpy scalars are stored as Python numbers."""

    sparsity: float | None = None
    n: int | None = None
    m: int | None = None

    def __post_init__(self):
        if (self.n is None) != (self.m is None):
            raise BadInput(f"an N:M target needs both n and m; got n={self.n!r}, m={self.m!r}")
        if (self.sparsity is None) == (self.n is None):
            raise BadInput(f"give exactly one of sparsity or nm (n and m); got sparsity={self.sparsity!r}, "
                           f"n={self.n!r}, m={self.m!r}")
        if self.n is not None:  # frozen: normalise through object.__setattr__
            if not (is_integer(self.n) and is_integer(self.m)):
                raise BadInput(f"N:M pattern must be a pair of integers; got n={self.n!r}, m={self.m!r}")
            n, m = _checked_nm(self.n, self.m)
            object.__setattr__(self, "n", n)
            object.__setattr__(self, "m", m)
            return
        object.__setattr__(self, "sparsity", check_number("sparsity", self.sparsity, 0, 1, interval="[)"))

    @classmethod
    def of(cls, sparsity: float | None = None, nm: str | tuple[int, int] | None = None) -> "SparsityTarget":
        """Validate and build a target from a sparsity in [0, 1) or an N:M pattern ("2:4" or (2, 4))."""
        if (sparsity is None) == (nm is None):
            raise BadInput(f"give exactly one of sparsity or nm; got sparsity={sparsity!r}, nm={nm!r}")
        if nm is not None:
            n, m = parse_nm(nm)
            return cls(n=n, m=m)
        return cls(sparsity=sparsity)

    @property
    def is_nm(self) -> bool:
        return self.n is not None

    @property
    def fraction(self) -> float:
        """The share of weights this target removes."""
        return 1 - self.n / self.m if self.is_nm else self.sparsity

    @property
    def label(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else f"{self.sparsity:.0%}"


def as_target(value) -> SparsityTarget:
    """The SparsityTarget ``value`` stands for — the one place targets are parsed: a SparsityTarget itself, a
    number = unstructured sparsity in [0, 1) (0.5, numpy scalars too), "50%" or "0.5", or an N:M pattern ("2:4")."""
    if isinstance(value, SparsityTarget):
        return value
    if isinstance(value, str) and ":" in value:
        return SparsityTarget.of(nm=value)
    if isinstance(value, str):
        text = value.strip()
        try:
            number = float(text.removesuffix("%")) / (100 if text.endswith("%") else 1)
        except ValueError:
            raise BadInput(f"target must look like '50%', '0.5' or '2:4'; got {value!r}") from None
        return SparsityTarget.of(sparsity=number)
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return SparsityTarget.of(sparsity=value)
    raise BadInput(f"target must be a SparsityTarget, a sparsity in [0, 1) such as 0.5 or '50%', or an N:M pattern "
                   f"such as '2:4'; got {describe(value)}")


def parse_nm(nm: str | tuple[int, int]) -> tuple[int, int]:
    """(N, M) from "N:M" or a pair of integers, with 1 ≤ N < M."""
    if isinstance(nm, str):
        match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", nm)
        if not match:
            raise BadInput(f"N:M pattern must look like '2:4'; got {nm!r}")
        return _checked_nm(int(match[1]), int(match[2]))
    try:
        n, m = nm
    except (TypeError, ValueError):
        n = m = None
    if not (is_integer(n) and is_integer(m)):  # 2.9 must not become 2, nor True become 1
        raise BadInput(f"N:M pattern must be 'N:M' or a pair of integers; got {describe(nm)}")
    return _checked_nm(n, m)


def _checked_nm(n: int, m: int) -> tuple[int, int]:
    if n < 1 or n >= m:
        raise BadInput(f"N:M pattern needs 1 ≤ N < M; got N={n}, M={m}")
    return int(n), int(m)


def unstructured_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """True where a weight is pruned: the ⌊in·sparsity⌋ lowest scores of every output row. (out, in) → bool."""
    k = int(score.shape[1] * sparsity)
    mask = torch.zeros_like(score, dtype=torch.bool)
    if k > 0:
        lowest = torch.topk(score, k, dim=1, largest=False, sorted=False).indices
        mask.scatter_(1, lowest, True)
    return mask


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """True where a weight is pruned: in every group of M consecutive inputs of a row, the M−N lowest scores.
    (out, in) → bool, with in divisible by M."""
    out_features, in_features = score.shape
    if in_features % m:
        raise BadInput(f"N:M pattern {n}:{m} needs the input size to be divisible by M={m}; got {in_features}")
    groups = score.reshape(out_features, in_features // m, m)
    lowest = torch.topk(groups, m - n, dim=2, largest=False, sorted=False).indices
    return torch.zeros_like(groups, dtype=torch.bool).scatter_(2, lowest, True).reshape(out_features, in_features)


def select_mask(score: torch.Tensor, target: SparsityTarget) -> torch.Tensor:
    """The pruning mask for one weight's scores under ``target``."""
    return nm_mask(score, target.n, target.m) if target.is_nm else unstructured_mask(score, target.sparsity)


@torch.no_grad()
def apply_mask(linear: nn.Linear, mask: torch.Tensor) -> None:
    """Zero the masked weights in place."""
    linear.weight.masked_fill_(mask.to(linear.weight.device), 0)


def prune_by_score(linear: nn.Linear, score: torch.Tensor, target: SparsityTarget) -> torch.Tensor:
    """Zero the lowest-scoring weights of ``linear`` under ``target`` and return the mask: the whole ``prune``
    step of every method that only scores and masks (magnitude, Wanda, RIA)."""
    mask = select_mask(score, target)
    apply_mask(linear, mask)
    return mask
