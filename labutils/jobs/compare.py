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
from ..core.validation import check_model
from ..evaluate.perplexity import perplexity
from ..prune.driver import PruneReport, prune_model
from ..prune.masks import SparsityTarget
from ..prune.owl import OwlConfig
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


@dataclass
class Comparison:
    """``table``: one row per variant plus "dense"; ``reports``: each variant's PruneReport by its label."""

    table: pd.DataFrame
    reports: dict[str, PruneReport]


def compare_methods(profile: Profile, variants: list[PruneSpec], calib: torch.Tensor, test: torch.Tensor,
                    dense: nn.Module, progress: bool = True) -> Comparison:
    """Prune a fresh dense model with every variant (a PruneSpec) and measure it.

    Table columns: target, method, sparsity (measured), seconds (the whole pruning run), method seconds (score,
    mask and weight update only, without forward passes), perplexity, and both times as a multiple of
    Wanda's at the same target. A variant listed twice (same label) is measured once, so several comparisons can
    share one run. ``dense``: the dense model (``lu.load_model``), copied for every variant and never modified.
    """
    check_model(dense)
    unique: dict[str, PruneSpec] = {}
    for v in variants:
        unique.setdefault(check_spec(v, "each of variants").label, v)
    rows = [{"variant": "dense", "target": "-", "method": "dense", "sparsity": 0.0, "seconds": 0.0,
             "method seconds": 0.0, "perplexity": _perplexity(dense, test, profile, "dense", progress)}]
    reports = {}
    for spec in unique.values():
        model = copy.deepcopy(dense)  # a fresh dense copy; faster than reloading it from disk
        report = prune_model(model, spec, calib, profile.batch_size, progress)
        rows.append({"variant": spec.label, "target": spec.target.label, "method": spec.variant,
                     "sparsity": report.measured_sparsity, "seconds": report.seconds,
                     "method seconds": report.method_seconds, "perplexity": _perplexity(model, test, profile,
                                                                                        spec.label, progress)})
        reports[spec.label] = report
        del model
    return Comparison(_add_wanda_ratios(pd.DataFrame(rows).set_index("variant")), reports)


def _perplexity(model: nn.Module, test: torch.Tensor, profile: Profile, desc: str, progress: bool) -> float:
    return perplexity(model, test, profile.eval_seqlen, profile.batch_size, progress, desc)


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
