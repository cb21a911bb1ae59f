"""Figures compared with the committed reference run, within tolerances measured across CPU kernels.

The notebooks' float figures (perplexities, accuracies, KL) depend on the last bits of float32 kernels, which differ
between CPUs (AVX-512, AVX2, ARM) and torch's kernel sets: a rounding difference flips a near-tied mask entry and
the flip carries through every later layer (Wanda 2:4 perplexity 146.5 with AVX2 kernels, 150.8 with AVX-512 ones,
on one machine). So a notebook shows its raw table (not compared by nbval) and, beside it, the one line
``compare_with_reference`` prints: whether each figure lies within a stated tolerance of the reference run — the
committed ``results/`` that ``make notebooks`` wrote. That line is the same on every correct machine.

Each tolerance is a small multiple of the spread measured across kernel variants of one machine (docs/testing.md
"Portability"; ``benchmarks/portability.py`` measures it): wide enough for any CPU's rounding, narrow enough that a
broken method (Wanda scored by |W| alone, a mask shifted by one row) fails by a factor of several.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ..core.config import Profile
from ..core.errors import BadInput
from ..jobs.compare import table_records

REFERENCE_ENV = "LAB_REFERENCE"  # another folder of results files to compare with (default: the repository's results/)
FLOOR = 1e-9  # results files keep 10 significant digits: anything closer is equal


@dataclass(frozen=True)
class Tolerance:
    """``|got − reference| ≤ absolute + relative · |reference|``. ``spread``: the largest relative (or, for an
    absolute tolerance, absolute) difference measured across kernel variants, which the tolerance is a multiple of."""

    relative: float = 0.0
    absolute: float = 0.0
    spread: float = 0.0

    def allows(self, got, reference) -> bool:
        if isinstance(got, str) or isinstance(reference, str):  # text (a greedy answer): equal or not
            return got == reference
        got, reference = _float(got), _float(reference)
        if math.isnan(got) or math.isnan(reference):
            return math.isnan(got) and math.isnan(reference)
        return abs(got - reference) <= self.absolute + max(self.relative, FLOOR) * abs(reference)

    @property
    def text(self) -> str:
        parts = [f"{self.relative * 100:g} %"] if self.relative else []
        if self.absolute:
            parts.append(f"±{self.absolute:g}")
        return " + ".join(parts) or "exactly"


EXACT = Tolerance()  # exact figures (counts, bytes) and text


@dataclass(frozen=True)
class Figures:
    """What is compared in one results file: a tolerance per column, and rows left out, with the reason (figures
    that no tolerance can hold, such as a perplexity of ten thousand that moves by 2× between kernels)."""

    columns: dict[str, Tolerance]
    left_out: dict[str, str] = field(default_factory=dict)  # row → why no column of it is compared
    only: dict[str, tuple[str, ...]] = field(default_factory=dict)  # column → the only rows compared in it
    # (column, first word of a row) → its own tolerance: a method whose figures move more (SparseGPT's sweep)
    rows: dict[tuple[str, str], Tolerance] = field(default_factory=dict)

    def compared(self, column: str, row: str) -> bool:
        return row not in self.left_out and (column not in self.only or row in self.only[column])

    def tolerance(self, column: str, row: str) -> Tolerance:
        return self.rows.get((column, row.split(" ")[0]), self.columns[column])

    def text(self, column: str) -> str:
        """The column's tolerance in words, with any row's own: "10 % (sparsegpt: 25 %)"."""
        special = [f"{row}: {t.text}" for (c, row), t in self.rows.items() if c == column]
        return self.columns[column].text + (f" ({'; '.join(special)})" if special else "")


# results file (its name in write_results) → what is compared. Each tolerance is about 3× the largest spread measured
# across the kernel variants of docs/testing.md "Portability" (its ``spread``), rounded up; counts and text are exact.
TOLERANCES: dict[str, Figures] = {
    "trained": Figures({"perplexity": Tolerance(relative=3e-5, spread=7.9e-6)}),  # 01
    "outliers": Figures({"median ‖X_j‖": Tolerance(relative=1e-6, spread=2.9e-7),  # 02
                         "max ‖X_j‖": Tolerance(relative=1e-6, spread=1.4e-7),
                         "channels > 5× median": EXACT}),
    "prune": Figures({"perplexity": Tolerance(relative=0.05, spread=0.0145)}),  # 02, 03
    "groups": Figures({"perplexity": Tolerance(relative=0.025, spread=0.0084)}),  # 02
    "answers": Figures({"dense": EXACT}),  # 03: greedy answers of the dense model
    "drift": Figures({"top-1 agreement": Tolerance(absolute=0.025, spread=0.0083),  # 03
                      "KL(dense ‖ model)": Tolerance(relative=0.025, spread=0.0084),
                      "perplexity": Tolerance(relative=0.025, spread=0.0082),
                      "repeated 3-gram ratio": EXACT,
                      "continuations with a 3-gram 3+ times": EXACT},
                     # a pruned model's 48 greedy tokens follow the first token that changes: dense only
                     only={"repeated 3-gram ratio": ("dense",), "continuations with a 3-gram 3+ times": ("dense",)}),
    "perplexity": Figures({"perplexity": Tolerance(relative=0.09, spread=0.0285),  # 04
                           "sparsity": Tolerance(relative=1e-6, spread=2.7e-8)},  # OWL's per-layer counts
                          left_out={"wanda 80%": "10,124 to 24,083 between kernel sets"},
                          rows={("perplexity", "sparsegpt"): Tolerance(relative=0.25, spread=0.0765)}),
    "layer-errors": Figures({"output error ‖XWᵀ − XŴᵀ‖": Tolerance(relative=4e-4, spread=1.2e-4)}),  # 04
    "zeroshot": Figures({"acc": Tolerance(absolute=0.1, spread=0.03), "n": EXACT}),  # 04
    "admm-layer": Figures({"output error ‖XWᵀ − XŴᵀ‖": Tolerance(relative=2.5e-4, spread=7.4e-5)}),  # 05
    "admm": Figures({"perplexity": Tolerance(relative=0.09, spread=0.0285),  # 05
                     "sparsity": Tolerance(relative=1e-6, spread=2.7e-8)},
                    rows={("perplexity", "sparsegpt"): Tolerance(relative=0.25, spread=0.0765)}),
    # 06: windows are token ids (exact); perplexity at 04's Wanda tolerance (docs/testing.md "Portability")
    "calibration": Figures({"perplexity (wiki)": Tolerance(relative=0.09, spread=0.0285), "tokens": EXACT,
                            "windows": EXACT}),
    "calibration-domain": Figures({"perplexity (wiki)": Tolerance(relative=0.09, spread=0.0285),
                                   "perplexity (code)": Tolerance(relative=0.09, spread=0.0285), "tokens": EXACT,
                                   "windows": EXACT}),
    # 07: the quantizers are numpy (the same bits everywhere); the perplexities are float32 forward passes like 04's
    "quantization": Figures({"perplexity": Tolerance(relative=0.09, spread=0.0285), "bytes": EXACT}),
    "recovery": Figures({"perplexity before": Tolerance(relative=0.09, spread=0.0285),  # 05
                         "perplexity after": Tolerance(relative=0.09, spread=0.0285),
                         "mask hash unchanged": EXACT, "sparsity after": EXACT, "LoRA parameters": EXACT}),
}


@dataclass
class ColumnCheck:
    """One column of a table against the reference: which rows were compared and which were not within tolerance."""

    column: str
    tolerance: Tolerance
    tolerance_text: str
    rows: int
    outside: list[str] = field(default_factory=list)  # "row: got vs reference (+x %)"
    missing: list[str] = field(default_factory=list)  # rows the reference run does not have
    left_out: list[str] = field(default_factory=list)  # rows not compared on purpose (``Figures.left_out``)

    @property
    def passed(self) -> bool:
        return self.rows > len(self.left_out) and not self.outside and not self.missing

    def line(self) -> str:
        compared = self.rows - len(self.left_out)
        how = "equal to" if self.tolerance == EXACT else f"within {self.tolerance_text} of"
        text = (f"{self.column} {how} the reference run for {compared - len(self.outside) - len(self.missing)} of "
                f"{compared} rows: {self.passed}")
        if self.left_out:
            text += f" ({', '.join(self.left_out)} left out: no tolerance holds it)"
        if self.missing:
            text += f" — not in the reference run: {', '.join(self.missing)}"
        if self.outside:
            text += f" — outside: {'; '.join(self.outside)}"
        return text


@dataclass
class ReferenceCheck:
    """What ``compare_with_reference`` found: one ``ColumnCheck`` per compared column, shown one line each."""

    name: str
    columns: list[ColumnCheck]
    note: str = ""  # why nothing was compared (no reference run for this profile)

    @property
    def passed(self) -> bool:
        return bool(self.columns) and all(c.passed for c in self.columns)

    def __str__(self) -> str:
        return self.note or "\n".join(c.line() for c in self.columns)

    def _repr_pretty_(self, printer, cycle) -> None:  # IPython shows a returned check as its lines
        printer.text(str(self))


def reference_dir() -> Path:
    """The folder of the reference run: ``$LAB_REFERENCE``, else the repository's committed ``results/``."""
    if os.environ.get(REFERENCE_ENV):
        return Path(os.environ[REFERENCE_ENV])
    return Path(__file__).resolve().parents[2] / "results"


def reference_rows(name: str, profile: Profile) -> list[dict] | None:
    """The reference run's rows of results file ``name`` (index columns included); None when there is none."""
    path = reference_dir() / f"{profile.name}-{name}.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text())["rows"]


def reference_table(name: str, profile: Profile) -> pd.DataFrame | None:
    """The reference run's results file ``name`` as the table it was written from (indexed by its index columns);
    None when the reference run has none for this profile (e.g. on a profile the committed results do not cover)."""
    path = reference_dir() / f"{profile.name}-{name}.json"
    if not path.is_file():
        return None
    payload = json.loads(path.read_text())
    table = pd.DataFrame(payload["rows"])
    return table.set_index(payload["index"]) if payload.get("index") else table


def _key(record: dict, index: list[str]) -> str:
    return " / ".join(str(record[i]) for i in index)


def compare_with_reference(table: pd.DataFrame, name: str, profile: Profile,
                           columns: list[str] | None = None) -> ReferenceCheck:
    """Each figure of ``table`` against the same row and column of the reference run's results file ``name``
    (``results/<profile>-<name>.json``), within ``TOLERANCES[name]``. Rows are matched by the table's index;
    ``columns`` (default: every column with a tolerance) are compared. Call it before ``write_results`` writes
    this run's table over the reference (when ``$LAB_RESULTS`` is not set)."""
    if name not in TOLERANCES:
        raise BadInput(f"no tolerances for results {name!r}; known: {', '.join(sorted(TOLERANCES))}")
    figures = TOLERANCES[name]
    tolerances = figures.columns
    columns = [c for c in tolerances if c in table.columns] if columns is None else columns
    unknown = [c for c in columns if c not in tolerances or c not in table.columns]
    if unknown or not columns:
        raise BadInput(f"cannot compare columns {unknown or columns} of {name!r}: the table has "
                       f"{list(table.columns)}, tolerances exist for {list(tolerances)}")
    reference = reference_rows(name, profile)
    if reference is None:
        return ReferenceCheck(name, [], note=f"no reference run of {name!r} for profile {profile.name}: nothing "
                                             f"compared")
    index = [n if n is not None else "index" for n in table.index.names]
    ref = {_key(r, index): r for r in reference if all(i in r for i in index)}
    checks = []
    for column in columns:
        check = ColumnCheck(column, tolerances[column], figures.text(column), len(table))
        for record in table_records(table):
            key = _key(record, index)
            if not figures.compared(column, key):
                check.left_out.append(key)
            elif key not in ref or column not in ref[key]:
                check.missing.append(key)
            elif not figures.tolerance(column, key).allows(record[column], ref[key][column]):
                check.outside.append(_difference(key, record[column], ref[key][column]))
        checks.append(check)
    return ReferenceCheck(name, checks)


def _float(value) -> float:
    return float("nan") if value is None else float(value)


def _difference(key: str, got, want) -> str:
    if isinstance(got, str) or isinstance(want, str):
        return f"{key}: {str(got)[:60]!r} vs {str(want)[:60]!r}"
    got, want = _float(got), _float(want)
    change = f"{got - want:+.3g}" if want == 0 or math.isnan(got) or math.isnan(want) else \
        f"{(got - want) / abs(want):+.2%}"
    return f"{key}: {got:.6g} vs {want:.6g} ({change})"
