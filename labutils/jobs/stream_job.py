"""The main job with the model streamed from disk (``python -m labutils prune --stream-from-disk``, docs/gpu.md "70B").

One pass over the checkpoint does everything the in-memory job does: each decoder layer is read, runs the dense
perplexity windows, is pruned (``prune.disk``), runs the pruned perplexity windows, and is written to the output
as one shard of the sparse checkpoint. The model is never whole in memory, so its size is bounded by the disk,
not by RAM. Perplexity is measured layer by layer on the same windows and batches as ``perplexity`` measures it.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch
from torch import nn

from ..core.anatomy import decoder_stack, find_decoder_layers
from ..core.config import Profile
from ..core.device import give_back_freed_memory, peak_rss_bytes
from ..core.loading import folder_tokenizer, load_tokenizer, model_folder
from ..core.publish import atomic_folder
from ..core.saved import OUTPUT_KIND, write_folder_files
from ..core.sparse.model import GENERATION_FILE, ShardWriter
from ..evaluate.perplexity import perplexity_of, total_nll, window_batches
from ..prune.calibration import CalibrationData, layers_replaced, outer_modules_on
from ..prune.disk import CheckpointReader, DiskLayers, LayerCallbacks, load_outer, prune_streamed, skeleton
from ..prune.parallel import DataParallel
from ..prune.placement import calibration_inputs
from .report import build_report_from_totals
from .tokens import job_tokens


class _Replay(nn.Module):
    """Stands in for the first decoder layer: returns the stored final hidden states of the next batch."""

    def __init__(self, hidden: list[torch.Tensor], layer: nn.Module, device: torch.device | None = None):
        super().__init__()
        self.hidden, self.device = iter(hidden), device
        if hasattr(layer, "attention_type"):  # some models read this to choose the mask
            self.attention_type = layer.attention_type

    def forward(self, hidden_states, *args, **kwargs):
        return next(self.hidden).to(self.device)  # from pinned CPU memory on a GPU


class _Pass(_Replay):
    """Stands in for every later decoder layer: passes the hidden states on."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


class LayerwisePerplexity:
    """The perplexity of a model that is never whole in memory: the embeddings of the test windows are captured
    once, ``advance(i, layer)`` runs them through decoder layer i when it is loaded, and ``result()`` applies the
    model's own head (final norm, lm_head, its loss) to the last layer's outputs. Same windows and batches as
    ``perplexity(model, tokens, seqlen, batch_size)``. On a GPU the windows' hidden states wait in pinned CPU memory
    between layers, as the calibration activations do (``offload.OffloadedInputs``)."""

    def __init__(self, model: nn.Module, tokens: torch.Tensor, seqlen: int, batch_size: int, device: torch.device):
        self.model, self.device, self.seqlen, self.batch_size = model, device, seqlen, batch_size
        self.tokens = tokens
        windows = tokens[: tokens.numel() // seqlen * seqlen].reshape(-1, seqlen)
        self.inputs = calibration_inputs(model, windows, batch_size, device, low_memory=device.type == "cuda")

    def advance(self, index: int, layer: nn.Module) -> None:
        self.inputs.run(layer, index, advance=True)

    @torch.no_grad()
    def result(self) -> float:
        base, attribute = decoder_stack(self.model)
        layers = find_decoder_layers(self.model)
        self.inputs.finish()  # every copy back to CPU memory has landed
        replay = nn.ModuleList([_Replay(self.inputs.hidden, layers[0], self.device),
                                *(_Pass([], layer) for layer in layers[1:])])
        batches = window_batches(self.tokens, self.seqlen, self.batch_size, self.device, what="test tokens")
        with layers_replaced(base, attribute, replay), outer_modules_on(self.model, "", self.device):
            total, count = total_nll(self.model, batches)
        return perplexity_of(total, count)


def run_streamed(job, profile: Profile, out: Path, device: torch.device, progress: bool,
                 parallel: DataParallel | None) -> dict:
    """The main job streamed from disk (``PruneJob(stream_from_disk=True)``), with the main job's report
    (``report.build_report_from_totals``). With ``parallel`` every rank reads and prunes every layer on its share of
    the calibration batches; rank 0 measures perplexity and writes the output, the others return only their mask
    hash."""
    folder = model_folder(profile, job.model_path)
    dtype = getattr(torch, profile.dtype)
    model = skeleton(folder, dtype)
    reader = CheckpointReader(folder)
    tokenizer = folder_tokenizer(folder) if job.tokenizer_path is None else load_tokenizer(job.tokenizer_path, model)
    # Tokenizing a corpus split takes a few hundred MB for a while (``data.split_tokens``): done before any weight
    # is in memory, and given back before they come.
    test, calib = job_tokens(profile, job.spec, model, tokenizer, job.seed, job.calibration)
    give_back_freed_memory()
    outer = load_outer(model, reader, dtype)
    data = CalibrationData(calib, profile.batch_size, parallel)
    if parallel is not None and not parallel.leader:
        disk = DiskLayers(model, reader, device, dtype)
        prune = prune_streamed(model, disk, job.spec, data, False)
        return {"rank": parallel.rank, "mask_sha256": prune.mask_sha256}
    dense = LayerwisePerplexity(model, test, profile.eval_seqlen, profile.batch_size, device)
    pruned = LayerwisePerplexity(model, test, profile.eval_seqlen, profile.batch_size, device)
    with atomic_folder(out, OUTPUT_KIND) as tmp:
        writer = ShardWriter(tmp, len(find_decoder_layers(model)) + 1, job.spec.target.nm)
        writer.write(1, outer, {})
        disk = DiskLayers(model, reader, device, dtype, writer=writer,
                          callbacks=LayerCallbacks(on_load=(dense.advance,), on_pruned=(pruned.advance,)))
        prune = prune_streamed(model, disk, job.spec, data, progress)
        perplexities = {"dense": dense.result(), "pruned": pruned.result()}
        report = build_report_from_totals(profile, prune, perplexities, streamed_sparsity(outer, disk), seed=job.seed,
                                          eval_tokens=int(test.numel()))
        report.update(model=job.model_path or report["model"], device=str(device), stream_from_disk=True,
                      calibration=job.calibration_label(),
                      data_parallel=None if parallel is None else parallel.world, peak_rss_bytes=peak_rss_bytes())
        model.config.save_pretrained(tmp)
        if (folder / GENERATION_FILE).is_file():
            shutil.copyfile(folder / GENERATION_FILE, tmp / GENERATION_FILE)
        write_folder_files(tmp, report, writer.finish(), "sparse", tokenizer, str(out))
    report["output"] = str(out)
    return report


def streamed_sparsity(outer: dict[str, torch.Tensor], disk: DiskLayers) -> dict[str, float | int]:
    """``model_sparsity``'s totals for a model pruned from disk: the outer weights (tied ones once) and every
    layer as it was stored."""
    unique = {t.data_ptr(): t for t in outer.values()}.values()
    total = disk.parameters + sum(t.numel() for t in unique)
    zeros = disk.zeros + sum(int(torch.count_nonzero(t == 0)) for t in unique)
    return {"parameters": total, "nonzero_parameters": total - zeros,
            "linear_sparsity": disk.digest.zeros / disk.digest.weights, "model_sparsity": zeros / total}
