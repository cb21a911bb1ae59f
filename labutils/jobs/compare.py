"""One harness for every method: same model, same calibration, same test tokens, one table (04-Benchmark).

Each variant starts from a fresh copy of the dense model, is pruned through the shared driver and scored on
the same test tokens; pruning times are measured in the same run, so ratios to Wanda are fair.
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Sequence

import pandas as pd
import torch
from torch import nn

from ..core.config import Profile
from ..core.device import kernel_summary
from ..core.errors import BadInput
from ..core.validation import check_model, check_names
from ..evaluate.perplexity import perplexity
from ..prune.driver import prune_model
from ..prune.masks import SparsityTarget
from ..prune.owl import OwlConfig
from ..prune.report import PruneReport
from ..prune.spec import PruneSpec, check_spec


def sweep_variants(methods: tuple[str, ...] = ("magnitude", "wanda"),
                   sparsities: tuple[float, ...] = (0.2, 0.4, 0.5, 0.6, 0.7, 0.8)) -> list[PruneSpec]:
    """Every method at every unstructured sparsity: the perplexity-against-sparsity curves of 04-Benchmark."""
    return [PruneSpec(method, SparsityTarget.of(sparsity=s)) for method in methods for s in sparsities]


def standard_variants(sparsity: float = 0.5, nm: str = "2:4", owl_sparsity: float = 0.7) -> list[PruneSpec]:
    """The lab's comparison: magnitude, Wanda, true-sequential Wanda, SparseGPT and RIA at ``sparsity`` and
    ``nm``; magnitude and Wanda at ``owl_sparsity``, uniform and with OWL."""
    rows = []
    for target in (SparsityTarget.of(sparsity=sparsity), SparsityTarget.of(nm=nm)):
        rows += [PruneSpec("magnitude", target), PruneSpec("wanda", target),
                 PruneSpec("wanda", target, true_sequential=True), PruneSpec("sparsegpt", target),
                 PruneSpec("ria", target)]
    high = SparsityTarget.of(sparsity=owl_sparsity)
    for method in ("magnitude", "wanda"):
        rows += [PruneSpec(method, high), PruneSpec(method, high, owl=OwlConfig())]
    return rows


class Comparison:
    """One harness for every method: the same dense model, calibration and test tokens for every variant, one table.

    ``Comparison(profile, calib, test, dense)`` measures the dense model's perplexity; each ``add(variants)`` prunes
    a fresh copy of the dense model with every variant not measured yet and measures it, so a notebook can grow one
    comparison over several short cells. ``table``: one row per variant plus "dense"; ``reports``: each variant's
    PruneReport by its label; ``models``: the pruned models asked to be kept, by label.
    """

    def __init__(self, profile: Profile, calib: torch.Tensor, test: torch.Tensor, dense: nn.Module,
                 progress: bool = True):
        check_model(dense)
        self.profile, self.calib, self.test, self.dense, self.progress = profile, calib, test, dense, progress
        self.reports: dict[str, PruneReport] = {}
        self.models: dict[str, nn.Module] = {}
        self._rows = [{"variant": "dense", "target": "-", "method": "dense", "sparsity": 0.0, "seconds": 0.0,
                       "method seconds": 0.0, "perplexity": self._perplexity(dense, "dense")}]

    @property
    def table(self) -> pd.DataFrame:
        """Columns: target, method, sparsity (measured), seconds (the whole pruning run), method seconds (score, mask
        and weight update only, without forward passes), perplexity, and both times as a multiple of Wanda's at the
        same target (NaN where Wanda was not run at that target)."""
        return _add_wanda_ratios(pd.DataFrame(self._rows).set_index("variant"))

    def add(self, variants: Sequence[PruneSpec], keep: Sequence[str] = ()) -> pd.DataFrame:
        """Prune and measure every variant (a PruneSpec) not measured yet — a label listed twice, or already in the
        table, is measured once — and return their rows of ``table``. ``keep``: labels among ``variants`` whose
        pruned model is kept in ``models`` (for later measurements in the same run: zero-shot accuracy, latency)."""
        unique: dict[str, PruneSpec] = {}
        for v in variants:
            unique.setdefault(check_spec(v, "each of variants").label, v)
        keep = check_names("keep", keep, list(unique), "the variants' labels") if keep else []
        for spec in unique.values():
            if spec.label in self.reports:
                continue
            model = copy.deepcopy(self.dense)  # a fresh dense copy; faster than reloading it from disk
            report = prune_model(model, spec, self.calib, self.profile.batch_size, self.progress)
            self._rows.append({"variant": spec.label, "target": spec.target.label, "method": spec.variant,
                               "sparsity": report.measured_sparsity, "seconds": report.seconds,
                               "method seconds": report.method_seconds,
                               "perplexity": self._perplexity(model, spec.label)})
            self.reports[spec.label] = report
            if spec.label in keep:
                self.models[spec.label] = model
            del model
        missing = [label for label in keep if label not in self.models]
        if missing:
            raise BadInput(f"keep: {missing} were measured by an earlier add() without keep, and their models are "
                           "gone; list them in keep the first time they are added")
        return self.table.loc[list(unique)]

    def _perplexity(self, model: nn.Module, desc: str) -> float:
        profile = self.profile
        return perplexity(model, self.test, profile.eval_seqlen, profile.batch_size, self.progress, desc)


def compare_methods(profile: Profile, variants: list[PruneSpec], calib: torch.Tensor, test: torch.Tensor,
                    dense: nn.Module, progress: bool = True) -> Comparison:
    """Prune a fresh dense model with every variant and measure it, in one call: ``Comparison`` and one ``add``.
    ``dense`` (``lu.load_model``) is copied for every variant and never modified. To keep pruned models for later
    measurements, grow a ``Comparison`` with ``add(variants, keep)`` instead (as 04-Benchmark and 05-Recover do)."""
    for v in variants:  # bad input fails before the dense model is scored
        check_spec(v, "each of variants")
    comparison = Comparison(profile, calib, test, dense, progress)
    comparison.add(variants)
    return comparison


def _add_wanda_ratios(table: pd.DataFrame) -> pd.DataFrame:
    wanda = table[table["method"] == "wanda"].set_index("target")
    for column in ("seconds", "method seconds"):
        base = table["target"].map(wanda[column]) if len(wanda) else float("nan")
        table[f"{column} / wanda"] = table[column] / base
    return table


RESULTS_ENV = "LAB_RESULTS"  # where write_results writes when no folder is given
RUN_RESULTS = Path("outputs") / "results"  # … by default: ignored by git, like the pruned models


def write_results(table: pd.DataFrame, name: str, profile: Profile, folder: str | Path | None = None) -> Path:
    """Save a results table as ``<folder>/<profile>-<name>.csv`` and ``.json`` so runs can be compared, with the
    machine that computed it (``kernel_summary``).

    ``folder`` defaults to ``$LAB_RESULTS`` or ``outputs/results/``. The committed ``results/`` — the README's
    numbers and the reference run the notebooks compare with (``lu.compare_with_reference``) — change only when
    ``make notebooks`` copies a finished run there, so running a notebook never touches a tracked file."""
    folder = Path(folder if folder is not None else os.environ.get(RESULTS_ENV) or RUN_RESULTS)
    folder.mkdir(parents=True, exist_ok=True)
    stem = folder / f"{profile.name}-{name}"
    table.to_csv(stem.with_suffix(".csv"))
    index = [c for c in table.reset_index().columns if c not in table.columns]  # the columns that name a row
    payload = {"profile": profile.name, "machine": kernel_summary(), "index": index, "rows": table_records(table)}
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    return stem.with_suffix(".csv")


def table_records(table: pd.DataFrame) -> list[dict]:
    """A table's rows, index included, as JSON-safe dicts (NaN → null, NumPy numbers → plain numbers)."""
    return json.loads(table.reset_index().to_json(orient="records"))
