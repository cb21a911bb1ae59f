"""Disk-streamed pruning: the model is never whole in memory (docs/gpu.md "70B"; ``python -m labutils prune
--stream-from-disk``).

Llama-2-70B is 138 GB in float16, more than most machines' memory, yet pruning needs one decoder layer at a time.
So the model is built as a skeleton whose decoder layers hold no weights (parameters on the "meta" device), what
lies outside them (embeddings, final norm, lm_head: 2 % of a 70B model) is loaded, and then, layer by layer:

    read the layer's weights from the safetensors shards (each tensor straight from where the file's header says it
        lies, into memory of its own, in the compute dtype; the next layer is read by a background thread meanwhile)
    prune it with the same driver as ``prune_model`` (same statistics, same masks)
    hash its mask, write it to the output as one shard of the sparse checkpoint, drop its weights

Peak memory: the outer weights, two layers, the calibration activations (offloaded to pinned CPU memory on a GPU,
as the low-memory mode keeps them) and one layer's encoded shard — independent of the model's depth.
"""
from __future__ import annotations

import json
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, initialization

from ..core.anatomy import find_decoder_layers
from ..core.device import give_back_freed_memory, map_large_allocations
from ..core.errors import LabError
from ..core.sparse.bits import KeptMasks
from ..core.sparse.files import SAFETENSORS_DTYPES, write_safetensors
from ..core.sparse.model import ShardWriter
from .calibration import CalibrationData
from .driver import calibration_tokens, check_prunable, prune_all
from .parallel import check_ranks_agree
from .placement import Placement
from .report import PruneReport
from .sparsity import MaskDigest
from .spec import PruneSpec, check_spec

INDEX_FILE = "model.safetensors.index.json"  # transformers' sharded checkpoints
SINGLE_FILE = "model.safetensors"
STORED_DTYPES = {code: dtype for dtype, code in SAFETENSORS_DTYPES.items()}


class CheckpointReader:
    """The tensors of a safetensors checkpoint folder (one ``model.safetensors`` or the shards its index lists),
    read by name straight into memory of their own.

    Each tensor is read with positioned reads (``readinto``) from where the file's header says it lies. A memory map
    would serve as well, but every page read through it counts as this process's memory until the map is closed,
    so the largest tensor would be in memory twice (the 200 MB embeddings of the test model: the peak rose by that
    much). Nothing is ever written to the files."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index, single = self.folder / INDEX_FILE, self.folder / SINGLE_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as exc:
                raise LabError(f"{index} is not a readable shard index ({exc})") from exc
            paths = {name: self.folder / file for name, file in weight_map.items()}
        elif single.is_file():
            paths = None
        else:
            raise LabError(f"streaming from disk reads safetensors weights: {self.folder} holds neither {SINGLE_FILE} "
                           f"nor {INDEX_FILE}; save the model with save_pretrained (safetensors is its default)")
        self.entries: dict[str, tuple[Path, int, str, list[int]]] = {}  # name → (file, offset, dtype, shape)
        for path in sorted(set(paths.values())) if paths else [single]:
            for name, (offset, dtype, shape) in read_header(path).items():
                if paths is None or paths.get(name) == path:
                    self.entries[name] = (path, offset, dtype, shape)

    def read(self, names: list[str], dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
        """name → tensor on ``device``, floating-point ones in ``dtype``."""
        missing = [n for n in names if n not in self.entries]
        if missing:
            raise LabError(f"{self.folder} does not hold {', '.join(missing[:3])}: the weights do not fit config.json")
        tensors = {}
        for name in names:
            path, offset, stored, shape = self.entries[name]
            tensor = torch.empty(shape, dtype=STORED_DTYPES[stored])
            with open(path, "rb") as file:
                file.seek(offset)
                if tensor.numel() and file.readinto(tensor.reshape(-1).view(torch.uint8).numpy()) != tensor.nbytes:
                    raise LabError(f"model weights {path} end before {name}: the file is incomplete; copy it again")
            to = dtype if tensor.is_floating_point() else tensor.dtype
            tensors[name] = tensor.to(device=device, dtype=to)
        return tensors


def read_header(path: Path) -> dict[str, tuple[int, str, list[int]]]:
    """name → (byte offset of its data in the file, safetensors dtype, shape), from a safetensors file's header.
    LabError when the header is damaged or names a type this lab cannot read."""
    try:
        with open(path, "rb") as file:
            length = int.from_bytes(file.read(8), "little")
            header = json.loads(file.read(length))
        size = path.stat().st_size
        entries = {}
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            begin, end = entry["data_offsets"]
            if entry["dtype"] not in STORED_DTYPES or not 0 <= begin <= end <= size - 8 - length:
                raise ValueError(f"{name}: {entry['dtype']} at {begin}..{end}")
            entries[name] = (8 + length + begin, entry["dtype"], list(entry["shape"]))
        return entries
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise LabError(f"model weights {path} are unreadable ({type(exc).__name__}: {exc}); the file is damaged or "
                       "incomplete: copy it again") from exc


def skeleton(folder: str | Path, dtype: torch.dtype) -> nn.Module:
    """The model of ``folder``'s config.json with every parameter on the meta device (no memory, no random
    initialisation) and its buffers real (rotary frequencies are computed, not stored)."""
    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        raise LabError(f"{Path(folder) / 'config.json'} could not be read ({exc})") from exc
    with init_empty_weights(include_buffers=False), initialization.no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def write_random_checkpoint(folder: str | Path, config, dtype: torch.dtype = torch.float32, seed: int = 0,
                            std: float = 0.05) -> int:
    """A random model of ``config`` written to ``folder`` as transformers would save it (config.json, one
    safetensors shard per decoder layer plus one for the rest, and the index), one shard at a time, so a model far
    larger than memory can be made (the tests' 1.6 GB model, docs/gpu.md's 70B-shaped layers). Matrices are normal
    with ``std``, norm weights 1, other vectors 0. Returns the bytes of the weights."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    with init_empty_weights(include_buffers=False), initialization.no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()
    shapes = model.state_dict()
    prefixes = layer_prefixes(model)
    tied = {name for name in shapes if name.startswith("lm_head") and getattr(config, "tie_word_embeddings", False)}
    groups = [[n for n in shapes if not n.startswith(tuple(f"{p}." for p in prefixes)) and n not in tied]]
    groups += [[n for n in shapes if n.startswith(f"{p}.")] for p in prefixes]
    generator, weight_map, total = torch.Generator().manual_seed(seed), {}, 0
    for number, names in enumerate(groups, start=1):
        tensors = {}
        for name in names:
            shape = shapes[name].shape
            if len(shape) > 1:
                tensors[name] = (torch.randn(shape, generator=generator) * std).to(dtype)
            else:
                tensors[name] = (torch.ones if "norm" in name else torch.zeros)(shape, dtype=dtype)
        file = f"model-{number:05d}-of-{len(groups):05d}.safetensors"
        write_safetensors(folder / file, tensors, {"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    (folder / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return total


def layer_prefixes(model: nn.Module) -> list[str]:
    """The state-dict prefix of each decoder layer ("model.layers.0", …)."""
    names = {id(module): name for name, module in model.named_modules()}
    return [names[id(layer)] for layer in find_decoder_layers(model)]


def check_layer_tensors_stored(model: nn.Module, reader: CheckpointReader) -> None:
    """LabError, before any work, unless the checkpoint holds every tensor of every decoder layer under the model's
    own names (the streamed layers are loaded by name; tied weights may be missing)."""
    prefixes = layer_prefixes(model)
    missing = [f"{prefix}.{name}" for prefix, layer in zip(prefixes, find_decoder_layers(model))
               for name in layer.state_dict() if f"{prefix}.{name}" not in reader.entries]
    if not missing:
        return
    if any(".experts." in name for name in missing):
        raise LabError(f"{reader.folder} stores its experts one by one ({missing[0]} is not in the files): transformers "
                       f"stacks them while it loads the whole {model.config.model_type} model, and streaming from disk "
                       f"reads tensors by the model's own names; prune this model in memory (--low-memory keeps it "
                       f"in CPU memory)")
    raise LabError(f"{reader.folder} does not hold {', '.join(missing[:3])}: the weights do not fit config.json")


def load_outer(model: nn.Module, reader: CheckpointReader, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Load every weight outside the decoder layers (embeddings, final norm, lm_head) into the skeleton, on the CPU;
    returns them by state-dict name (tied weights under each name). LabError if the checkpoint lacks one."""
    check_layer_tensors_stored(model, reader)
    prefixes = tuple(f"{p}." for p in layer_prefixes(model))
    outer = [name for name in model.state_dict() if not name.startswith(prefixes)]
    model.load_state_dict(reader.read([n for n in outer if n in reader.entries], dtype, torch.device("cpu")),
                          strict=False, assign=True)
    model.tie_weights()
    state = model.state_dict()
    empty = [name for name in outer if state[name].is_meta]
    if empty:
        raise LabError(f"{reader.folder} does not hold {', '.join(empty[:3])}: the weights do not fit config.json")
    return {name: state[name] for name in outer}


def drop_weights(module: nn.Module) -> None:
    """Every parameter of ``module`` back on the meta device: its memory is freed, its shape kept."""
    for owner in module.modules():
        for name, param in list(owner.named_parameters(recurse=False)):
            setattr(owner, name, nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=False))


@dataclass(frozen=True)
class LayerCallbacks:
    """Callbacks (i, layer) that ``DiskLayers`` runs when layer i has been read (``on_load``) and when it has been
    pruned (``on_pruned``) — what the stream job uses to measure dense and pruned perplexity in the same pass."""

    on_load: tuple = ()
    on_pruned: tuple = ()


class DiskLayers:
    """The decoder layers of a skeleton, read from the checkpoint when their turn comes and dropped after: the
    ``placement.layer_visits`` protocol of ``offload.OffloadedLayers`` (prefetch, attach, release; a context
    manager).

    ``store(i, layer, kept)`` (the pruning pass) hashes the layer's mask and, with a ``writer``, writes it as
    shard i + 2. ``callbacks`` (``LayerCallbacks``): what runs when a layer has been read, and when it is pruned.
    """

    def __init__(self, model: nn.Module, reader: CheckpointReader, device: torch.device, dtype: torch.dtype, *,
                 writer: ShardWriter | None = None, callbacks: LayerCallbacks | None = None):
        callbacks = callbacks or LayerCallbacks()
        self.model, self.reader, self.device, self.dtype = model, reader, torch.device(device), dtype
        self.offloaded = self.device.type == "cuda"  # activations in pinned CPU memory, as the low-memory mode
        self.layers, self.prefixes = find_decoder_layers(model), layer_prefixes(model)
        self.writer, self.on_load, self.on_pruned = writer, list(callbacks.on_load), list(callbacks.on_pruned)
        self.digest = MaskDigest()
        self.parameters = self.zeros = 0  # over the layers stored so far
        self._reads: dict[int, Future] = {}
        self._pool: ThreadPoolExecutor | None = None

    def reading(self) -> DiskLayers:
        """The same layers for a pass that only reads them (OWL's outlier ratios): no writer, no callbacks."""
        return DiskLayers(self.model, self.reader, self.device, self.dtype)

    def _read(self, i: int) -> dict[str, torch.Tensor]:
        names = [f"{self.prefixes[i]}.{n}" for n in self.layers[i].state_dict()]
        tensors = self.reader.read(names, self.dtype, self.device)
        return {name[len(self.prefixes[i]) + 1:]: t for name, t in tensors.items()}

    def prefetch(self, i: int) -> None:
        if 0 <= i < len(self.layers) and i not in self._reads:
            self._reads[i] = self._pool.submit(self._read, i)

    def attach(self, i: int) -> nn.Module:
        """Layer i with its weights, on the device; the ``on_load`` callbacks have seen it."""
        self.prefetch(i)
        layer = self.layers[i]
        layer.load_state_dict(self._reads.pop(i).result(), strict=True, assign=True)
        layer.requires_grad_(False)
        for callback in self.on_load:
            callback(i, layer)
        return layer

    def release(self, i: int) -> None:
        drop_weights(self.layers[i])
        give_back_freed_memory()

    def store(self, i: int, layer: nn.Module, kept: KeptMasks) -> None:
        """After pruning layer i: hash its mask, count its zeros, write its shard, run the ``on_pruned`` callbacks."""
        self.digest.add_layer(i, layer)
        for param in layer.parameters():
            self.parameters += param.numel()
            self.zeros += int(torch.count_nonzero(param == 0))
        if self.writer is not None:
            prefix = self.prefixes[i]
            state = {f"{prefix}.{n}": t.detach().cpu() for n, t in layer.state_dict().items()}
            self.writer.write(i + 2, state, {f"{prefix}.{n}": kept.kept(n) for n in kept.packed})
        for callback in self.on_pruned:
            callback(i, layer)

    def __enter__(self):
        map_large_allocations()  # a dropped layer's memory goes back to the system, not into the heap
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="layer-reads")
        return self

    def __exit__(self, *exc):
        for future in self._reads.values():
            future.cancel()
        self._pool.shutdown(wait=True)
        self._reads.clear()
        for i in range(len(self.layers)):  # a layer left loaded by an error is dropped too
            drop_weights(self.layers[i])


@torch.no_grad()
def prune_streamed(model: nn.Module, disk: DiskLayers, spec: PruneSpec, data: CalibrationData,
                   progress: bool = True) -> PruneReport:
    """Prune the skeleton ``model`` layer by layer from ``disk`` (``DiskLayers``), as ``prune_model`` would prune
    the whole model: the same masks, the same report (its ``mask_sha256`` hashed layer by layer). ``data``: the
    calibration tokens (nsamples, seqlen), batch size and data-parallel share."""
    check_spec(spec)
    data = replace(data, tokens=calibration_tokens(model, spec, data.tokens))
    check_prunable(model, spec.target)
    report = prune_all(model, spec, data, Placement(disk.device, disk.offloaded, disk), progress)
    report.mask_sha256 = disk.digest.hexdigest()
    check_ranks_agree(data.parallel, report.mask_sha256, "the masks")
    return report
