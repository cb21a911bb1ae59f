"""One harness for every method: same model, same calibration, same test tokens, one table (04-Benchmark).

Each variant starts from a fresh copy of the dense model, is pruned through the shared driver and scored on
the same test tokens; pruning times are measured in the same run, so ratios to Wanda are fair.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from ..core.config import Profile
from ..evaluate.perplexity import perplexity
from ..prune.masks import SparsityTarget
from ..core.models import load_model
from ..prune.owl import OwlConfig
from ..prune.driver import PruneReport, prune_model, variant_label


@dataclass(frozen=True)
class Variant:
    """One row of the comparison: a method, its target and options."""

    method: str
    target: SparsityTarget
    params: dict | None = None
    true_sequential: bool = False
    owl: OwlConfig | None = None

    @property
    def label(self) -> str:
        """The row name, the same as the PruneReport's label: e.g. "wanda (true-sequential) 50%"."""
        return variant_label(self.method, self.target.label, self.true_sequential, self.owl is not None)


def sweep_variants(methods: tuple[str, ...] = ("magnitude", "wanda"),
                   sparsities: tuple[float, ...] = (0.2, 0.4, 0.5, 0.6, 0.7, 0.8)) -> list[Variant]:
    """Every method at every unstructured sparsity: the perplexity-against-sparsity curves of 04-Benchmark."""
    return [Variant(method, SparsityTarget.of(sparsity=s)) for method in methods for s in sparsities]


def standard_variants(sparsity: float = 0.5, nm: str = "2:4", owl_sparsity: float = 0.7) -> list[Variant]:
    """The lab's comparison: magnitude, Wanda, true-sequential Wanda, SparseGPT and RIA at ``sparsity`` and
    ``nm``; magnitude and Wanda at ``owl_sparsity``, uniform and with OWL."""
    rows = []
    for target in (SparsityTarget.of(sparsity=sparsity), SparsityTarget.of(nm=nm)):
        rows += [Variant("magnitude", target), Variant("wanda", target), Variant("wanda", target, true_sequential=True),
                 Variant("sparsegpt", target), Variant("ria", target)]
    high = SparsityTarget.of(sparsity=owl_sparsity)
    for method in ("magnitude", "wanda"):
        rows += [Variant(method, high), Variant(method, high, owl=OwlConfig())]
    return rows


@dataclass
class Comparison:
    """``table``: one row per variant plus "dense"; ``reports``: each variant's PruneReport by its label."""

    table: pd.DataFrame
    reports: dict[str, PruneReport]


def compare_methods(profile: Profile, variants: list[Variant], device: torch.device, calib: torch.Tensor,
                    test: torch.Tensor, progress: bool = True, model_path: str | None = None,
                    dense: nn.Module | None = None) -> Comparison:
    """Prune a fresh dense model with every variant and measure it.

    Table columns: target, method, measured sparsity, seconds (the whole pruning run), method seconds (score,
    mask and weight update only, without forward passes), perplexity, and both times as a multiple of
    Wanda's at the same target. ``model_path`` replaces the profile's model (a local folder or hub id).
    A variant listed twice (same label) is measured once, so several comparisons can share one run.
    ``dense``: the dense model already in memory, copied for every variant and never modified (None: load it).
    """
    unique: dict[str, Variant] = {}
    for v in variants:
        unique.setdefault(v.label, v)
    if dense is None:
        dense, _ = load_model(profile, device, model_path)
    rows = [{"variant": "dense", "target": "-", "method": "dense", "sparsity": 0.0, "seconds": 0.0,
             "method seconds": 0.0,
             "perplexity": perplexity(dense, test, profile.eval_seqlen, profile.batch_size, progress, "dense")}]
    reports = {}
    for v in unique.values():
        model = copy.deepcopy(dense)  # a fresh dense copy; faster than reloading it from disk
        report = prune_model(model, v.method, v.target, calib, profile.batch_size, progress, params=v.params,
                             true_sequential=v.true_sequential, owl=v.owl)
        rows.append({"variant": report.label, "target": v.target.label, "method": report.label.rsplit(" ", 1)[0],
                     "sparsity": report.measured_sparsity, "seconds": report.seconds,
                     "method seconds": report.method_seconds,
                     "perplexity": perplexity(model, test, profile.eval_seqlen, profile.batch_size, progress,
                                              report.label)})
        reports[report.label] = report
        del model
    return Comparison(_add_wanda_ratios(pd.DataFrame(rows).set_index("variant")), reports)


def _add_wanda_ratios(table: pd.DataFrame) -> pd.DataFrame:
    wanda = table[table["method"] == "wanda"].set_index("target")
    for column in ("seconds", "method seconds"):
        base = table["target"].map(wanda[column]) if len(wanda) else float("nan")
        table[f"{column} / wanda"] = table[column] / base
    return table


def write_results(table: pd.DataFrame, name: str, profile: Profile, folder: str | Path = "results") -> Path:
    """Save a results table as ``<folder>/<profile>-<name>.csv`` and ``.json`` so runs can be compared."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stem = folder / f"{profile.name}-{name}"
    table.to_csv(stem.with_suffix(".csv"))
    payload = {"profile": profile.name, "rows": table_records(table)}
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    return stem.with_suffix(".csv")


def table_records(table: pd.DataFrame) -> list[dict]:
    """A table's rows, index included, as JSON-safe dicts (NaN → null, NumPy numbers → plain numbers)."""
    return json.loads(table.reset_index().to_json(orient="records"))
