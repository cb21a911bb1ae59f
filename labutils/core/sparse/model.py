"""A whole model to and from the sparse checkpoint (``format``): which weights are pruned, with which masks,
and an ordinary transformers model built back from the file (02-Prune saves, 03 and 04 load); a model's weights
quantized to llama.cpp's 4- and 8-bit blocks, zeros kept (``quantize_model``, 07-Quantize).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm import tqdm  # plain text everywhere: a saved notebook shows the finished bar, not a widget
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, initialization

from ..anatomy import find_decoder_layers, find_linears
from ..errors import BadInput, LabError
from ..validation import check_choice
from .bits import KeptMasks, kept_masks, record_kept, storage_names, unpack_mask
from .files import SPARSE_FILE, read_sparse_folder, shard_name, sparse_files, write_sparse, write_sparse_index
from .format import encoded_bytes, nonzero_bits
from .quant import BITS, QUANTS, STORED_QUANTS, QuantRecord, quant_record, quantized_pair, record_quant

GENERATION_FILE = "generation_config.json"


def prunable_parameter_names(model: nn.Module) -> list[str]:
    """State-dict names of the parameters that hold the linears (and routed experts' matrices) the lab prunes."""
    params, names = storage_names(model), []
    for layer in find_decoder_layers(model):
        for linear in find_linears(layer).values():
            name = params[linear.weight.untyped_storage().data_ptr()][0]
            if name not in names:
                names.append(name)
    return names


def kept_to_save(model: nn.Module, state: dict[str, torch.Tensor], nm: tuple[int, int] | None = None
                 ) -> tuple[dict[str, torch.Tensor], tuple[int, int] | None]:
    """(kept mask per pruned parameter name, N:M pattern or None): the masks ``prune_model`` or ``load_pruned``
    recorded, else (a model loaded from a dense folder, or pruned some other way) every non-zero of the prunable
    parameters, with ``nm`` the pattern it was pruned to if known (a kept weight that was exactly +0.0 is then
    indistinguishable from a pruned one: only the sparse format keeps the difference). BadInput if a weight is
    non-zero where its recorded mask says pruned: the sparse format would lose it."""
    record = kept_masks(model)
    if record is None:
        return kept_from_nonzeros(model, state), nm
    kept = {name: record.kept(name) for name in record.packed if name in state}
    for name, kept_mask in kept.items():
        stray = int((nonzero_bits(state[name].detach().cpu()) & ~kept_mask).sum())
        if stray:
            raise BadInput(f"{name} holds {stray} non-zero weights where pruning removed them, so the sparse format "
                           "would lose them; save with format='dense' (--save-format dense), or prune again")
    return kept, record.nm


def kept_from_nonzeros(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per prunable parameter name, its kept mask as the weights alone show it: True where the weight is not +0.0
    (a kept weight that is exactly +0.0 counts as pruned)."""
    return {name: nonzero_bits(state[name].detach().cpu()) for name in prunable_parameter_names(model)}


def sparse_sizes(state: dict[str, torch.Tensor], kept: dict[str, torch.Tensor], nm: tuple[int, int] | None,
                 quant: QuantRecord | None = None) -> dict:
    """Bytes of the model's tensors (each shared tensor once) and of the pruned ones alone, dense and sparse
    (``quant``: the names it lists stored as its blocks)."""
    seen, dense, sparse = set(), 0, 0
    pruned_dense = pruned_sparse = 0
    quantized = set(quant.names) if quant else set()
    for name, tensor in state.items():
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        size = tensor.numel() * tensor.element_size()
        dense += size
        coded = size
        if name in kept or name in quantized:
            coded = encoded_bytes(kept.get(name), tensor.element_size(), nm,
                                  quant.quant if name in quantized else None, tensor.numel())
        sparse += coded
        if name in kept:
            pruned_dense, pruned_sparse = pruned_dense + size, pruned_sparse + coded
    return {"model": {"dense": dense, "sparse": sparse}, "pruned linears": {"dense": pruned_dense,
                                                                             "sparse": pruned_sparse}}


def save_sparse_model(model: nn.Module, folder: Path, nm: tuple[int, int] | None = None) -> dict:
    """Write the model's weights as ``sparse-model.safetensors`` with its config (and generation config) into
    ``folder``; returns the sizes (``sparse_sizes``), the model's sparse bytes measured on disk. ``nm``: the
    pattern of a model without recorded masks (``kept_to_save``)."""
    state = model.state_dict()
    kept, nm = kept_to_save(model, state, nm)
    quant = quant_record(model)
    if quant is not None and kept_masks(model) is None:  # a model the lab did not prune: quantized weights whole
        kept = {name: mask for name, mask in kept.items() if name not in quant.names}
    sizes = sparse_sizes(state, kept, nm, quant)
    write_sparse(folder / SPARSE_FILE, state, kept, nm, quant)
    model.config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None and model.can_generate():
        model.generation_config.save_pretrained(folder)
    sizes["model"]["sparse"] = (folder / SPARSE_FILE).stat().st_size
    return sizes


def is_sparse_folder(folder: Path) -> bool:
    """True for a folder holding the lab's sparse checkpoint (one file, or a shard index)."""
    return bool(sparse_files(folder))


class ShardWriter:
    """Writes a sparse checkpoint shard by shard (``prune.disk``): ``write(number, state, kept)`` stores one shard
    (shard 1: everything outside the decoder layers; then one per layer) and adds up the sizes; ``finish()``
    writes the index and returns the sizes as ``save_sparse_model`` does."""

    def __init__(self, folder: Path, count: int, nm: tuple[int, int] | None):
        self.folder, self.count, self.nm = folder, count, nm
        self.weight_map: dict[str, str] = {}
        self.sizes = {"model": {"dense": 0, "sparse": 0}, "pruned linears": {"dense": 0, "sparse": 0}}

    def write(self, number: int, state: dict[str, torch.Tensor], kept: dict[str, torch.Tensor]) -> None:
        """Shard ``number`` (from 1): ``state`` (name → tensor), the names in ``kept`` (→ kept bool mask) encoded."""
        name = shard_name(number, self.count)
        stored = write_sparse(self.folder / name, state, kept, self.nm)
        for part, sizes in sparse_sizes(state, kept, self.nm).items():
            for kind, size in sizes.items():
                self.sizes[part][kind] += size
        self.weight_map.update(dict.fromkeys(stored, name))

    def finish(self) -> dict:
        """Write the index; the sizes, the sparse model's measured on disk."""
        files = {self.folder / name for name in self.weight_map.values()}
        self.sizes["model"]["sparse"] = sum(f.stat().st_size for f in files)
        write_sparse_index(self.folder, self.weight_map, self.sizes["model"]["sparse"])
        return {**self.sizes, "shards": len(files)}


def load_sparse_model(folder: Path, dtype: torch.dtype | None = None) -> nn.Module:
    """An ordinary transformers model from a sparse folder, its weights bit for bit those saved (then converted to
    ``dtype`` if given and different) and its kept masks recorded on it. Everything is decoded and checked before
    the model is built."""
    state, kept, nm, quant = read_sparse_folder(folder)  # kept: packed bits per pruned weight
    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        raise LabError(f"{folder / 'config.json'} could not be read ({exc}); save the model again") from exc
    stored = next((t.dtype for t in state.values() if t.is_floating_point()), torch.float32)
    with initialization.no_init_weights():  # every weight comes from the file: skip the random initialisation
        model = AutoModelForCausalLM.from_config(config, dtype=stored)
    expected = set(model.state_dict())
    if expected != set(state):
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise LabError(f"{folder / SPARSE_FILE} does not fit its config.json (missing {missing[:3]}, unexpected "
                       f"{extra[:3]}); save the model again")
    wanted = model.state_dict()
    for name, tensor in state.items():
        if tensor.shape != wanted[name].shape:
            raise LabError(f"{folder / SPARSE_FILE}: tensor {name} has shape {tuple(tensor.shape)}, its config.json "
                           f"needs {tuple(wanted[name].shape)}; save the model again")
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()
    if (folder / GENERATION_FILE).is_file():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    if kept:
        record_kept(model, KeptMasks(kept, {name: tuple(state[name].shape) for name in kept}, nm))
    record_quant(model, quant)
    if dtype is not None and dtype != stored:
        model.to(dtype)
    return model.eval()


def quantizable_parameter_names(model: nn.Module) -> list[str]:
    """What ``quantize_model`` quantizes: the prunable parameters, then the input embedding and the output one
    when it is not the same matrix (state-dict names, each storage once)."""
    names, params = prunable_parameter_names(model), storage_names(model)
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        weight = getattr(module, "weight", None)
        if weight is not None:
            name = params[weight.untyped_storage().data_ptr()][0]
            if name not in names:
                names.append(name)
    return names


def quantize_model(model: nn.Module, quant: str = "q4_0", mask_aware: bool = True, progress: bool = True) -> pd.Series:
    """Quantize ``model``'s linears and embeddings in place to ``quant`` (q4_0, q8_0 or q4_1; ``quant``'s
    module docstring gives the formats) and return what it did: values quantized, bits per value, and how many of
    the pruned weights are still exactly zero.

    ``mask_aware`` (default): a pruned weight's kept values are quantized alone and its pruned ones stay +0.0 (what
    the sparse checkpoint stores; the model is marked so that ``save_pruned`` writes the blocks). False: every
    weight is quantized whole, as a tool that knows nothing of the mask does; the model is then not marked (q4_1
    would not keep the zeros the sparse format relies on)."""
    check_choice("quant", quant, QUANTS)
    if not isinstance(mask_aware, bool):
        raise BadInput(f"mask_aware must be True or False; got {mask_aware!r}")
    if quant_record(model) is not None:
        raise BadInput(f"the model is already quantized ({quant_record(model).quant}); load or prune it again to "
                       "quantize it another way")
    record, state = kept_masks(model), model.state_dict()
    names = quantizable_parameter_names(model)
    pruned_total = still_zero = values = 0
    blocks = {}
    with torch.no_grad():
        for name in tqdm(names, desc=f"quantize {quant}", unit="tensor", disable=not progress):
            flat = state[name].view(-1)  # the parameter's own memory
            kept = None
            if record is not None and name in record.packed:  # the kept positions, ascending
                kept = torch.from_numpy(np.flatnonzero(unpack_mask(record.packed[name].numpy(), flat.numel())))
                kept = kept.to(flat.device)
            if mask_aware and kept is not None:
                decoded, blocks[name] = quantized_pair(flat.index_select(0, kept), quant)
                flat.index_copy_(0, kept, decoded)
                values += kept.numel()
            else:
                whole, blocks[name] = quantized_pair(flat, quant)
                flat.copy_(whole)
                values += flat.numel()
                decoded = flat.index_select(0, kept) if kept is not None else None
            if kept is not None:  # non-zeros among the pruned positions: all non-zeros less those among the kept
                pruned_total += flat.numel() - kept.numel()
                moved = int(torch.count_nonzero(flat)) - int(torch.count_nonzero(decoded))
                still_zero += flat.numel() - kept.numel() - moved
    if mask_aware and quant in STORED_QUANTS:
        record_quant(model, QuantRecord(quant, names, blocks))
    return pd.Series({"quant": quant, "mask aware": mask_aware, "tensors": len(names), "values quantized": values,
                      "bits per value": BITS[quant], "pruned weights": pruned_total,
                      "pruned weights still zero": still_zero}, name="quantize_model")
