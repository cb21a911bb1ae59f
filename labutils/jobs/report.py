"""The report.json of a pruned model: what was done, what it measured, and with which versions (02-Prune).

The main job (``main_job``), the job streamed from disk (``stream_job``) and the notebooks all build it here, then
add what only they know (the model label, the seconds spent loading and evaluating).
"""
from __future__ import annotations

from dataclasses import asdict

from torch import nn

from ..core.config import Profile
from ..core.device import versions
from ..prune.report import PruneReport
from ..prune.sparsity import model_sparsity


def build_report(profile: Profile, model: nn.Module, prune: PruneReport, perplexities: dict[str, float], *,
                 seed: int, eval_tokens: int) -> dict:
    """The report.json of ``model``, pruned as ``prune`` reports, with its ``perplexities`` ({"dense", "pruned"})
    measured on ``eval_tokens`` test tokens: ``lu.build_report(profile, model, prune, perplexities, seed=SEED,
    eval_tokens=test.numel())``."""
    return build_report_from_totals(profile, prune, perplexities, model_sparsity(model), seed=seed,
                                    eval_tokens=eval_tokens)


def build_report_from_totals(profile: Profile, prune: PruneReport, perplexities: dict[str, float],
                    sparsity: dict[str, float | int], *, seed: int, eval_tokens: int) -> dict:
    """``build_report`` for a model that is not whole in memory (streamed from disk): ``sparsity`` holds
    ``model_sparsity``'s totals, counted as the layers were written."""
    return {
        "profile": profile.name, "model": profile.model_id, "base_model": profile.base_model,
        "license": profile.license, "method": prune.method,
        "label": prune.label, "params": prune.params, "true_sequential": prune.true_sequential,
        "owl": prune.owl, "layer_sparsity": prune.layer_sparsity, "low_memory": prune.low_memory,
        "target": prune.target,
        "target_sparsity": prune.target_sparsity,
        "nm": None if prune.nm is None else f"{prune.nm[0]}:{prune.nm[1]}",
        "measured_sparsity": prune.measured_sparsity, **sparsity,
        "perplexity": perplexities, "mask_sha256": prune.mask_sha256,
        "nsamples": prune.nsamples, "seqlen": prune.seqlen, "seed": seed,
        "eval_tokens": eval_tokens, "eval_seqlen": profile.eval_seqlen, "batch_size": profile.batch_size,
        "device": prune.device, "dtype": profile.dtype,
        "seconds": {"prune": round(prune.seconds, 3), "method": round(prune.method_seconds, 3)},
        "layer_seconds": [round(s, 3) for s in prune.layer_seconds],
        "versions": versions(), "quality_warning": profile.quality_warning,
        "sublayers": prune.records(),
        "left_dense": [asdict(d) for d in prune.left_dense], "empty_experts": prune.empty_experts,
    }
