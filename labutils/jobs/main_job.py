"""The main job: load → evaluate dense → calibrate and prune → evaluate pruned → save with a report.

``python -m labutils prune`` runs it; 02-Prune builds the same report for the model it saves.
"""
from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import pandas as pd
import torch

from ..core.card import folder_card_fields
from ..core.config import Profile, get_profile
from ..core.device import get_device, peak_rss_bytes, require_cuda, set_seed
from ..core.errors import BadInput, LabError
from ..core.loading import CACHE_FOLDER, load_model
from ..core.locks import output_lock
from ..core.manifests import verify_folder
from ..core.publish import cache_dir
from ..core.saved import (
    SAVE_FORMATS,
    check_output_dir,
    is_lab_output,
    load_report,
    model_file_bytes,
    save_pruned,
)
from ..core.sources import CalibrationSourceSpec, calibration_source, check_calibration_source
from ..core.sparse.model import quantize_model
from ..core.sparse.quant import STORED_QUANTS
from ..core.validation import check_choice
from ..evaluate.perplexity import perplexity
from ..prune.driver import prune_model
from ..prune.parallel import DataParallel, start_data_parallel, stop_data_parallel
from ..prune.spec import PruneSpec, check_spec
from .report import build_report
from .stream_job import run_streamed
from .tokens import job_tokens

LLAMA2_7B_PARAMS = 6_738_415_616  # Llama-2-7B's parameter count (13.5 GB in float16)
EMBEDDED_MODEL_BYTES = 538_000_000  # SmolLM2-135M in float32, before the cache exists to measure it


@dataclass(frozen=True)
class PruneJob:
    """One run of the main job: the pruning ``spec`` plus where and on what it runs. ``None`` fields take the
    profile's defaults."""

    spec: PruneSpec = field(default_factory=PruneSpec)
    profile: str | None = None
    nsamples: int | None = None
    seqlen: int | None = None
    eval_tokens: int | None = None
    eval_seqlen: int | None = None
    batch_size: int | None = None
    seed: int = 0
    out: str | None = None
    model_path: str | None = None
    tokenizer_path: str | None = None  # for a model folder saved without a tokenizer (``--tokenizer``)
    device: str | None = None
    low_memory: bool = False  # keep the model in CPU memory while pruning; layers visit the device one at a time
    save_format: str = "sparse"  # "sparse": kept values and masks (about half the bytes at 50 %); "dense"
    stream_from_disk: bool = False  # never load the model whole: layers are read, pruned and written one by one
    data_parallel: bool = False  # one of torchrun's processes, each calibrating on its share of the samples
    strict: bool = False  # stop (instead of warning) when the dense perplexity is far from the profile's recorded one
    # "wiki" (the profile's own text), "code", "mixed" or a folder of text files; ``validate_job`` resolves it once
    calibration: str | CalibrationSourceSpec = "wiki"
    quant: str | None = None  # "q4_0" or "q8_0": quantize the pruned model's weights (07-Quantize) and save the blocks

    def resolved_profile(self) -> Profile:
        return get_profile(self.profile, nsamples=self.nsamples, seqlen=self.seqlen, eval_tokens=self.eval_tokens,
                           eval_seqlen=self.eval_seqlen, batch_size=self.batch_size)

    def output_dir(self, profile: Profile) -> Path:
        if self.out is not None:
            return Path(self.out)
        folder = default_output_dir(profile, self.spec, calibration_source(self.calibration))
        return folder.with_name(f"{folder.name}-{self.quant}") if self.quant else folder

    def calibration_label(self) -> str | None:
        """What report.json records as ``calibration``: the source's label, or None when the method calibrates on
        nothing."""
        return calibration_source(self.calibration).label if self.spec.needs_calibration else None


def default_output_dir(profile: Profile, spec: PruneSpec,
                       calibration: CalibrationSourceSpec | None = None) -> Path:
    """outputs/<profile>-<spec.slug>, e.g. outputs/smollm2-135m-wanda-50 or …-wanda-2-4; another calibration source
    than the profile's own adds its slug: …-wanda-50-code, …-wanda-50-mixed, …-wanda-50-text-<folder name>."""
    return Path("outputs") / f"{profile.name}-{spec.slug}{calibration.slug if calibration else ''}"


def validate_job(job: PruneJob) -> tuple[PruneJob, Profile, Path]:
    """Every check that needs no model, so bad input fails at once and writes nothing (the spec checked itself
    when it was built). Returns the job with its calibration source resolved (a folder's text is read once here,
    not again by each later use), its profile and its checked output folder."""
    check_spec(job.spec, "PruneJob.spec")
    check_choice("save format", job.save_format, SAVE_FORMATS)
    if job.tokenizer_path is not None and job.model_path is None:
        raise BadInput("--tokenizer goes with --model (a model folder without tokenizer files); the profile's own "
                       "model brings its tokenizer")
    if job.stream_from_disk and job.low_memory:
        raise BadInput("--stream-from-disk already keeps the model out of memory (one layer at a time, from disk); "
                       "drop --low-memory")
    if job.quant is not None:
        check_choice("quant", job.quant, STORED_QUANTS)
        if job.save_format != "sparse" or job.stream_from_disk:
            raise BadInput(f"--quant {job.quant} stores the quantized blocks in the sparse format of a model held in "
                           "memory; drop " + ("--stream-from-disk" if job.stream_from_disk else "--save-format dense"))
    if job.stream_from_disk and job.save_format != "sparse":
        raise BadInput("--stream-from-disk writes the sparse format, shard by shard; drop --save-format dense (a "
                       "dense copy: python -m labutils export OUT DENSE_OUT)")
    profile = job.resolved_profile()
    source = check_calibration_source(job.calibration, profile, profile.nsamples)
    job = replace(job, calibration=source)
    if source.kind != "wiki" and not job.spec.needs_calibration:
        raise BadInput(f"--calibration {source.label} chooses calibration text; method {job.spec.method!r} uses none "
                       "(allowed: wiki, the default)")
    if profile.needs_cuda:
        require_cuda(f"profile {profile.name!r}")
    out = check_output_dir(job.output_dir(profile), need_bytes=expected_model_bytes(profile, job.model_path),
                           inputs={"the --model folder": job.model_path, "the --tokenizer folder": job.tokenizer_path})
    return job, profile, out


def expected_model_bytes(profile: Profile, model_path: str | None) -> int | None:
    """About how many bytes the saved model will take, known before loading it (for the free-space check):
    the weight files of a local folder, the converted default model, or Llama-2-7B's parameters in float16.
    None where it cannot be known (a hub id other than the profile's)."""
    if model_path is not None:
        folder = Path(model_path).expanduser()
        return (model_file_bytes(folder) or None) if folder.is_dir() else None
    if profile.model_source == "embedded":
        cached = cache_dir() / CACHE_FOLDER / "model.safetensors"
        return cached.stat().st_size if cached.is_file() else EMBEDDED_MODEL_BYTES
    return LLAMA2_7B_PARAMS * torch.finfo(getattr(torch, profile.dtype)).bits // 8


# The dense perplexity of each profile's own model, by (profile, eval_tokens, eval_seqlen): the main job checks its
# dense figure against it (``check_plausible``). smollm2-135m: measured, the same to 1e-5 on every CPU kernel set
# (docs/testing.md "Portability"); llama2-7b: Sun et al. 2023, Table 3 (dense LLaMA-2-7B on WikiText-2, 4096-token windows).
DENSE_PERPLEXITY = {("smollm2-135m", 8192, 512): 13.8201, ("smollm2-135m", 1024, 512): 14.0139,
                    ("smollm2-135m", 2048, 512): 12.6429, ("llama2-7b", None, 4096): 5.12}
PLAUSIBLE = 0.05  # relative distance from the recorded figure beyond which the model or the text is suspect


def check_plausible(job: PruneJob, profile: Profile, dense_ppl: float, eval_tokens: int | None) -> float | None:
    """The recorded dense perplexity for this profile and evaluation, if there is one and the job uses the
    profile's own model; a line on stderr (LabError with ``job.strict``) when ``dense_ppl`` is further than
    ``PLAUSIBLE`` from it: a damaged model or test text that no checksum caught, or another model."""
    expected = DENSE_PERPLEXITY.get((profile.name, eval_tokens, profile.eval_seqlen))
    if expected is None or job.model_path is not None:
        return expected
    if not abs(dense_ppl - expected) <= PLAUSIBLE * expected:  # NaN is never plausible
        message = (f"the dense perplexity is {dense_ppl:,.4g}, far from this profile's recorded {expected:g} "
                   f"(more than {PLAUSIBLE:.0%} off): the model or the test text may be damaged; run "
                   "`python -m labutils prepare`, which checks and rebuilds both")
        if job.strict:
            raise LabError(message + " (stopped by --strict before pruning)")
        print(f"WARNING: {message}", file=sys.stderr)
    return expected


def run_prune_job(job: PruneJob, progress: bool = True) -> dict:
    """Run the main job and return its report (also written to ``<out>/report.json``).

    ``job.data_parallel`` (launched by torchrun): every rank prunes on its share of the calibration samples; rank 0
    evaluates, writes and returns the report, every other rank returns {"rank", "mask_sha256"}."""
    job, profile, out = validate_job(job)
    device, parallel = get_device(job.device), None
    if job.data_parallel:
        parallel, device = start_data_parallel(device)
        batches = -(-profile.nsamples // profile.batch_size)
        if batches < parallel.world:
            stop_data_parallel()
            raise BadInput(f"--data-parallel with {parallel.world} processes needs at least {parallel.world} "
                           f"calibration batches; --nsamples {profile.nsamples} in batches of {profile.batch_size} "
                           f"gives {batches}: use more samples or a smaller --batch-size")
    try:
        leader = parallel is None or parallel.leader
        with output_lock(out) if leader else contextlib.nullcontext():  # a second run to the same folder stops
            if job.stream_from_disk:
                set_seed(job.seed)
                return run_streamed(job, profile, out, device, progress and leader, parallel)
            return _run_locked(job, profile, out, device, progress and leader, parallel)
    finally:
        if parallel is not None:
            stop_data_parallel()


def _run_locked(job: PruneJob, profile: Profile, out: Path, device: torch.device, progress: bool,
                parallel: DataParallel | None) -> dict:
    seconds = {}
    clock = time.perf_counter()
    set_seed(job.seed)
    home = torch.device("cpu") if job.low_memory else device  # where the model lives between steps
    model, tokenizer = load_model(profile, home, job.model_path, job.tokenizer_path)
    test, calib = job_tokens(profile, job.spec, model, tokenizer, job.seed, job.calibration)
    seconds["load"] = _lap(clock)

    if parallel is not None and not parallel.leader:  # evaluating and writing are rank 0's
        prune = prune_model(model, job.spec, calib, profile.batch_size, False,
                            low_memory=device if job.low_memory else False, parallel=parallel)
        return {"rank": parallel.rank, "mask_sha256": prune.mask_sha256}
    clock = time.perf_counter()
    with _visiting(model, device, home):
        dense_ppl = perplexity(model, test, profile.eval_seqlen, profile.batch_size, progress, desc="dense perplexity")
    seconds["dense_eval"] = _lap(clock)
    expected = check_plausible(job, profile, dense_ppl, profile.eval_tokens)
    prune = prune_model(model, job.spec, calib, profile.batch_size, progress,
                        low_memory=device if job.low_memory else False, parallel=parallel)
    clock = time.perf_counter()
    with _visiting(model, device, home):
        pruned_ppl = perplexity(model, test, profile.eval_seqlen, profile.batch_size, progress,
                                desc="pruned perplexity")
    seconds["pruned_eval"] = _lap(clock)
    perplexities = {"dense": dense_ppl, "pruned": pruned_ppl}
    if job.quant is not None:
        clock = time.perf_counter()
        quantize_model(model, job.quant, progress=progress)
        with _visiting(model, device, home):
            perplexities["quantized"] = perplexity(model, test, profile.eval_seqlen, profile.batch_size, progress,
                                                   desc=f"pruned + {job.quant} perplexity")
        seconds["quantize_and_eval"] = _lap(clock)

    report = build_report(profile, model, prune, perplexities, seed=job.seed, eval_tokens=int(test.numel()))
    report.update(model=job.model_path or report["model"], device=str(device), dense_perplexity_expected=expected,
                  calibration=job.calibration_label(), quant=job.quant,
                  seconds={**seconds, **report["seconds"]}, data_parallel=None if parallel is None else parallel.world,
                  peak_rss_bytes=peak_rss_bytes())
    if job.model_path is not None:  # the card's base model and licence: what the folder's own card says
        card = folder_card_fields(job.model_path)
        report.update(base_model=card.get("base_model", job.model_path), license=card.get("license"))
    report["output"] = str(save_pruned(model, out, tokenizer, report, format=job.save_format))
    report["disk"] = load_report(out)["disk"]
    return report


def ensure_pruned(profile: Profile, spec: PruneSpec, device: torch.device | str | None = None, *, seed: int = 0,
                  progress: bool = True) -> tuple[Path, str]:
    """The folder of a pruned lab model (03, 04): the one 02-Prune saved if it matches, else made now.

    A saved model matches when its report has the same profile and spec (method, target, parameters,
    true-sequential, OWL) and, if the spec calibrates, the same calibration sizes and seed. Otherwise the main
    job (``run_prune_job``) prunes and saves it, which also measures its perplexity. Returns the folder and one
    sentence saying which happened.
    """
    out = default_output_dir(profile, spec)
    wanted = {"profile": profile.name, **spec.to_dict(), "quant": None}  # not a quantized model (07 makes those)
    if spec.needs_calibration:
        wanted.update(nsamples=profile.nsamples, seqlen=profile.seqlen, seed=seed, calibration="wiki")
    if is_lab_output(out):
        saved = load_report(out)
        saved_owl = saved.get("owl") or None
        saved = {**saved, "owl": saved_owl and {k: saved_owl.get(k) for k in ("M", "lambda")},
                 "calibration": saved.get("calibration", "wiki")}  # earlier reports, and lu.build_report's: wiki
        differs = [key for key, value in wanted.items() if saved.get(key) != value]
        damage = verify_folder(out)
        if not differs and damage is None:
            return out, f"found {out} (saved by an earlier run)"
        reason = (f"{out} is damaged ({damage}); pruning again" if damage else
                  f"{out} was made with other settings ({', '.join(differs)}); pruning again")
    else:
        reason = f"{out} is missing; pruning it now with the package (as 02-Prune would)"
    job = PruneJob(spec, profile=profile.name, nsamples=profile.nsamples, seqlen=profile.seqlen,
                   eval_tokens=profile.eval_tokens, eval_seqlen=profile.eval_seqlen, batch_size=profile.batch_size,
                   seed=seed, device=None if device is None else str(device))
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
    if report.get("quant"):
        rows.append({"model": f"{report['label']} + {report['quant']}", "sparsity": report["measured_sparsity"],
                     "perplexity": report["perplexity"]["quantized"]})
    return pd.DataFrame(rows).set_index("model")
