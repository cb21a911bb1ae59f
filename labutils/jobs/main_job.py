"""The main job: load → evaluate dense → calibrate and prune → evaluate pruned → save with a report.

``python -m labutils prune`` runs it; 02-Prune builds the same report for the model it saves.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from ..core import data
from ..core.checkpoint import check_output_dir, is_lab_output, load_report, save_pruned
from ..core.config import Profile, get_profile
from ..core.device import get_device, require_cuda, set_seed, versions
from ..core.errors import BadInput
from ..evaluate.perplexity import perplexity
from ..core.models import CACHE_FOLDER, WEIGHT_PATTERNS, check_seqlen, load_model
from ..prune.masks import SparsityTarget
from ..prune.methods import get_method
from ..prune.owl import OwlConfig
from ..prune.driver import PruneReport, check_options, check_prunable, prune_model
from ..prune.sparsity import model_sparsity
from ..core.storage import cache_dir, output_lock, verify_folder

LLAMA2_7B_PARAMS = 6_738_415_616  # Llama-2-7B's parameter count (13.5 GB in float16)
EMBEDDED_MODEL_BYTES = 538_000_000  # SmolLM2-135M in float32, before the cache exists to measure it


@dataclass(frozen=True)
class PruneJob:
    """Everything one pruning run needs; ``None`` fields take the profile's defaults."""

    profile: str | None = None
    method: str = "wanda"
    sparsity: float | None = None
    nm: str | None = None
    nsamples: int | None = None
    seqlen: int | None = None
    eval_tokens: int | None = None
    eval_seqlen: int | None = None
    batch_size: int | None = None
    seed: int = 0
    out: str | None = None
    model_path: str | None = None
    device: str | None = None
    params: dict | None = None  # the method's own parameters, e.g. {"alpha": 0.5} for RIA
    true_sequential: bool = False
    owl: bool = False
    owl_m: float | None = None
    owl_lambda: float | None = None
    low_memory: bool = False  # keep the model in CPU memory while pruning; layers visit the device one at a time

    def target(self) -> SparsityTarget:
        if self.sparsity is None and self.nm is None:
            return SparsityTarget.of(sparsity=0.5)
        return SparsityTarget.of(sparsity=self.sparsity, nm=self.nm)

    def resolved_profile(self) -> Profile:
        return get_profile(self.profile, nsamples=self.nsamples, seqlen=self.seqlen, eval_tokens=self.eval_tokens,
                           eval_seqlen=self.eval_seqlen, batch_size=self.batch_size)

    def owl_config(self) -> OwlConfig | None:
        if not self.owl:
            if self.owl_m is not None or self.owl_lambda is not None:
                raise BadInput("--owl-m and --owl-lambda set OWL's parameters; add --owl to use OWL")
            return None
        defaults = OwlConfig()
        return OwlConfig(m=defaults.m if self.owl_m is None else self.owl_m,
                         lam=defaults.lam if self.owl_lambda is None else self.owl_lambda)

    def output_dir(self, profile: Profile) -> Path:
        if self.out is not None:
            return Path(self.out)
        variant = self.method + ("-ts" if self.true_sequential else "") + ("-owl" if self.owl else "")
        return default_output_dir(profile, variant, self.target())


def default_output_dir(profile: Profile, method: str, target: SparsityTarget | str) -> Path:
    """outputs/<profile>-<method>-<target>, e.g. outputs/smollm2-135m-wanda-50 or …-wanda-2-4.

    ``target``: a SparsityTarget or its label ("50%", "2:4"), as a PruneReport records it.
    """
    label = target if isinstance(target, str) else target.label
    return Path("outputs") / f"{profile.name}-{method}-{label.replace(':', '-').rstrip('%')}"


def validate_job(job: PruneJob) -> tuple[Profile, SparsityTarget, Path]:
    """Every check that needs no model, so bad input fails at once and writes nothing."""
    profile = job.resolved_profile()
    target = job.target()
    check_options(job.method, target, job.params, job.true_sequential, job.owl_config())
    if profile.needs_cuda:
        require_cuda(f"profile {profile.name!r}")
    out = check_output_dir(job.output_dir(profile), need_bytes=expected_model_bytes(profile, job.model_path))
    return profile, target, out


def expected_model_bytes(profile: Profile, model_path: str | None) -> int | None:
    """About how many bytes the saved model will take, known before loading it (for the free-space check):
    the weight files of a local folder, the converted default model, or Llama-2-7B's parameters in float16.
    None where it cannot be known (a hub id other than the profile's)."""
    if model_path is not None:
        folder = Path(model_path).expanduser()
        files = [f for pattern in WEIGHT_PATTERNS for f in folder.glob(pattern)] if folder.is_dir() else []
        return sum(f.stat().st_size for f in files) or None
    if profile.model_source == "embedded":
        cached = cache_dir() / CACHE_FOLDER / "model.safetensors"
        return cached.stat().st_size if cached.is_file() else EMBEDDED_MODEL_BYTES
    return LLAMA2_7B_PARAMS * torch.finfo(getattr(torch, profile.dtype)).bits // 8


def build_report(profile: Profile, model, prune: PruneReport, perplexities: dict[str, float], *, seed: int,
                 device: torch.device, eval_tokens: int, model_label: str | None = None,
                 seconds: dict[str, float] | None = None) -> dict:
    """The report.json of a pruned model: what was done, what it measured, and with which versions."""
    return {
        "profile": profile.name, "model": model_label or profile.model_id, "method": prune.method,
        "label": prune.label, "params": prune.params, "true_sequential": prune.true_sequential,
        "owl": prune.owl, "layer_sparsity": prune.layer_sparsity, "low_memory": prune.low_memory,
        "target": prune.target,
        "target_sparsity": prune.target_sparsity,
        "nm": None if prune.nm is None else f"{prune.nm[0]}:{prune.nm[1]}",
        "measured_sparsity": prune.measured_sparsity, **model_sparsity(model),
        "perplexity": perplexities, "mask_sha256": prune.mask_sha256,
        "nsamples": prune.nsamples, "seqlen": prune.seqlen, "seed": seed,
        "eval_tokens": eval_tokens, "eval_seqlen": profile.eval_seqlen, "batch_size": profile.batch_size,
        "device": str(device), "dtype": profile.dtype,
        "seconds": {**(seconds or {}), "prune": round(prune.seconds, 3), "method": round(prune.method_seconds, 3)},
        "versions": versions(), "quality_warning": profile.quality_warning,
        "sublayers": prune.to_frame().to_dict(orient="records"),
    }


def run_prune_job(job: PruneJob, progress: bool = True) -> dict:
    """Run the main job and return its report (also written to ``<out>/report.json``)."""
    profile, target, out = validate_job(job)
    with output_lock(out):  # a second run to the same folder stops at once
        return _run_locked(job, profile, target, out, progress)


def _run_locked(job: PruneJob, profile: Profile, target: SparsityTarget, out: Path, progress: bool) -> dict:
    seconds = {}
    clock = time.perf_counter()
    device = get_device(job.device)
    set_seed(job.seed)
    home = torch.device("cpu") if job.low_memory else device  # where the model lives between steps
    model, tokenizer = load_model(profile, home, job.model_path)
    check_seqlen(model, "seqlen", profile.seqlen)
    check_seqlen(model, "eval seqlen", profile.eval_seqlen)
    check_prunable(model, target)
    vocab = model.config.vocab_size
    test = data.test_tokens(profile, tokenizer, profile.eval_tokens, vocab_size=vocab, seed=job.seed)
    calib = None
    if get_method(job.method).needs_calibration or job.owl:
        calib = data.calibration_data(profile, tokenizer, profile.nsamples, profile.seqlen, job.seed, vocab_size=vocab)
    seconds["load"] = _lap(clock)

    clock = time.perf_counter()
    with _visiting(model, device, home):
        dense_ppl = perplexity(model, test, profile.eval_seqlen, profile.batch_size, progress, desc="dense perplexity")
    seconds["dense_eval"] = _lap(clock)
    prune = prune_model(model, job.method, target, calib, profile.batch_size, progress, params=job.params,
                        true_sequential=job.true_sequential, owl=job.owl_config(), device=device,
                        low_memory=job.low_memory)
    clock = time.perf_counter()
    with _visiting(model, device, home):
        pruned_ppl = perplexity(model, test, profile.eval_seqlen, profile.batch_size, progress,
                                desc="pruned perplexity")
    seconds["pruned_eval"] = _lap(clock)

    report = build_report(profile, model, prune, {"dense": dense_ppl, "pruned": pruned_ppl}, seed=job.seed,
                          device=device, eval_tokens=int(test.numel()), model_label=job.model_path, seconds=seconds)
    report["output"] = str(save_pruned(model, tokenizer, report, out))
    return report


def ensure_pruned(profile: Profile, method: str, target: SparsityTarget, device: torch.device | str | None = None,
                  *, seed: int = 0, progress: bool = True) -> tuple[Path, str]:
    """The folder of a pruned lab model (03, 04): the one 02-Prune saved if it matches, else made now.

    A saved model matches when its report has the same profile, method, target, calibration sizes and seed
    (plain method: no true-sequential, no OWL). Otherwise the main job (``run_prune_job``) prunes and saves
    it, which also measures its perplexity. Returns the folder and one sentence saying which happened.
    """
    out = default_output_dir(profile, method, target)
    wanted = {"profile": profile.name, "method": method, "target": target.label, "true_sequential": False,
              "owl": None}
    if get_method(method).needs_calibration:
        wanted.update(nsamples=profile.nsamples, seqlen=profile.seqlen, seed=seed)
    if is_lab_output(out):
        saved = load_report(out)
        differs = [key for key, value in wanted.items() if saved.get(key) != value]
        damage = verify_folder(out)
        if not differs and damage is None:
            return out, f"found {out} (saved by an earlier run)"
        reason = (f"{out} is damaged ({damage}); pruning again" if damage else
                  f"{out} was made with other settings ({', '.join(differs)}); pruning again")
    else:
        reason = f"{out} is missing; pruning it now with the package (as 02-Prune would)"
    job = PruneJob(profile=profile.name, method=method, sparsity=target.sparsity,
                   nm=f"{target.n}:{target.m}" if target.is_nm else None, nsamples=profile.nsamples,
                   seqlen=profile.seqlen, eval_tokens=profile.eval_tokens, eval_seqlen=profile.eval_seqlen,
                   batch_size=profile.batch_size, seed=seed, device=None if device is None else str(device))
    report = run_prune_job(job, progress)
    return Path(report["output"]), reason


@contextlib.contextmanager
def _visiting(model, device: torch.device, home: torch.device):
    """The whole model on ``device`` for evaluation, back ``home`` afterwards (low-memory mode: home is the CPU;
    evaluating needs the fp16 weights on the GPU once, 12.6 GiB for Llama-2-7B, but no activations of pruning)."""
    model.to(device)
    try:
        yield
    finally:
        model.to(home)


def _lap(start: float) -> float:
    return round(time.perf_counter() - start, 3)


def summary_table(report: dict) -> pd.DataFrame:
    """The table the CLI prints: dense and pruned perplexity with their sparsity."""
    rows = [
        {"model": "dense", "sparsity": 0.0, "perplexity": report["perplexity"]["dense"]},
        {"model": report["label"], "sparsity": report["measured_sparsity"],
         "perplexity": report["perplexity"]["pruned"]},
    ]
    return pd.DataFrame(rows).set_index("model")
