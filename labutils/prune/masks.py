"""What to prune and which weights: sparsity targets and mask selection (introduced in 02-Prune).

A mask is a bool tensor shaped like the weight, True where the weight is pruned. Unstructured masks compare
scores within each output row (group "row", Wanda) or across the whole matrix (group "layer", the magnitude
baseline); N:M masks within each group of M consecutive inputs of a row. Equal scores are pruned in index order
(lower column first), on every device and for every selection.
"""
from __future__ import annotations

import numbers
import re
from dataclasses import dataclass

import torch
from torch import nn

from ..core.errors import BadInput
from ..core.validation import check_choice, check_number, describe, is_integer


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
    def nm(self) -> tuple[int, int] | None:
        """(n, m) for an N:M target, None for a fraction."""
        return (self.n, self.m) if self.is_nm else None

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


GROUPS = ("row", "layer")  # the comparison group of an unstructured target: each output row, or the whole matrix


def lowest_mask(score: torch.Tensor, k: int) -> torch.Tensor:
    """True at the ``k`` lowest scores of each row of ``score`` (rows, n) → bool: the one selection every mask uses.

    Ties follow a rule, not the kernel: among equal scores the one with the lower column index is pruned first,
    the order a stable ascending sort gives, on every device. One ``kthvalue`` selection per row finds the k-th
    lowest score t (no full sort); every score below t is pruned, then the first k − #below of those equal to t.
    """
    if k <= 0:
        return torch.zeros_like(score, dtype=torch.bool)
    if k >= score.shape[1]:
        return torch.ones_like(score, dtype=torch.bool)
    kth = score.kthvalue(k, dim=1, keepdim=True).values  # (rows, 1)
    below = score < kth
    tied = score == kth
    room = k - below.sum(dim=1, keepdim=True, dtype=torch.int32)
    return below | (tied & (tied.cumsum(dim=1, dtype=torch.int32) <= room))


def unstructured_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """True where a weight is pruned: the ⌊in·sparsity⌋ lowest scores of every output row. (out, in) → bool."""
    return lowest_mask(score, int(score.shape[1] * sparsity))


def layer_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """True where a weight is pruned: the ⌊out·in·sparsity⌋ lowest scores of the whole matrix, one threshold for
    all rows (rows end unevenly sparse; ties: lower row-major index first). (out, in) → bool."""
    return lowest_mask(score.reshape(1, -1), int(score.numel() * sparsity)).reshape(score.shape)


SMALL_GROUP = 8  # N:M groups up to this size are ranked by pairwise comparison instead of a selection per group


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """True where a weight is pruned: in every group of M consecutive inputs of a row, the M−N lowest scores
    (ties: lower index first). (out, in) → bool, with in divisible by M."""
    out_features, in_features = score.shape
    if in_features % m:
        raise BadInput(f"N:M pattern {n}:{m} needs the input size to be divisible by M={m}; got {in_features}")
    groups = score.reshape(-1, m)
    mask = group_rank(groups) < m - n if m <= SMALL_GROUP else lowest_mask(groups, m - n)
    return mask.reshape(out_features, in_features)


def group_rank(groups: torch.Tensor) -> torch.Tensor:
    """Each score's place (0 = pruned first) within its row of ``groups`` (G, M) → int, under ``lowest_mask``'s rule:
    lower score first, and among equal scores the lower index. Element j's rank counts the i that come before it,
    M vectorised comparisons of the whole tensor: for 2:4 this replaces ~11 M tiny selections per MLP weight (one
    radix-select block each on CUDA) with 4 elementwise passes."""
    m = groups.shape[1]
    index = torch.arange(m, device=groups.device)
    rank = torch.zeros(groups.shape, dtype=torch.int8 if m < 128 else torch.int32, device=groups.device)
    for i in range(m):
        other = groups[:, i:i + 1]
        rank += (other < groups) | ((other == groups) & (i < index))
    return rank


def select_mask(score: torch.Tensor, target: SparsityTarget, group: str = "row") -> torch.Tensor:
    """The pruning mask for one weight's scores under ``target``. ``group``: what an unstructured target compares
    scores within — "row" (each output row, Wanda's choice) or "layer" (the whole matrix, the magnitude baseline's);
    an N:M target always compares within its groups of M."""
    check_choice("group", group, GROUPS)
    if target.is_nm:
        return nm_mask(score, target.n, target.m)
    return layer_mask(score, target.sparsity) if group == "layer" else unstructured_mask(score, target.sparsity)


@torch.no_grad()
def apply_mask(linear: nn.Linear, mask: torch.Tensor) -> None:
    """Zero the pruned weights in place (``mask``: True = pruned, shaped like the weight)."""
    linear.weight.masked_fill_(mask.to(linear.weight.device), 0)


def prune_by_score(linear: nn.Linear, score: torch.Tensor, target: SparsityTarget, group: str = "row"
                   ) -> torch.Tensor:
    """Zero the lowest-scoring weights of ``linear`` under ``target`` (compared within ``group``) and return the
    pruned mask (True = pruned): the whole ``prune`` step of every method that only scores and masks (magnitude,
    Wanda, RIA)."""
    mask = select_mask(score, target, group)
    apply_mask(linear, mask)
    return mask
