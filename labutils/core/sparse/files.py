"""The files of the lab's sparse checkpoint (``format`` gives each tensor's layout): ``sparse-model.safetensors``, or
the shards of a model written layer by layer with their index; written tensor by tensor from the tensors' own memory,
and read back with every tensor decoded and the layout metadata checked field by field (02-Prune saves, 03 and 04
load).
"""
from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..errors import LabError
from .format import METADATA_KEY, QUANT_VERSION, VERSION, decode, encode
from .quant import STORED_QUANTS, QuantRecord

SPARSE_FILE = "sparse-model.safetensors"
SPARSE_INDEX = "sparse-model.safetensors.index.json"  # the shards of a model written layer by layer
DECODE_THREADS = max(1, min(8, os.cpu_count() or 1))


def write_sparse(path: Path, state: dict[str, torch.Tensor], kept: dict[str, torch.Tensor],
                 nm: tuple[int, int] | None, quant: QuantRecord | None = None) -> list[str]:
    """Write ``state`` (name → tensor) to the safetensors file ``path``, each name in ``kept`` (name → kept bool
    mask, same shape) encoded, and the names ``quant`` lists as its blocks (whole, if not in ``kept``). Tensors that
    share memory are stored once, the others as aliases. Returns the names of the tensors stored."""
    tensors, layout, aliases, stored = {}, {}, {}, {}
    quantized = set(quant.names) if quant else set()
    for name, tensor in state.items():
        identity = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.stride())
        if identity in stored:
            aliases[name] = stored[identity]
            continue
        stored[identity] = name
        tensor = tensor.detach().cpu()
        if name not in kept and name not in quantized:
            tensors[name] = tensor
            continue
        parts, layout[name] = encode(tensor.contiguous(), kept.get(name), nm,
                                     quant.quant if name in quantized else None,
                                     quant.blocks.get(name) if name in quantized else None)
        for suffix, part in parts.items():
            if f"{name}.{suffix}" in state:
                raise LabError(f"cannot store {name} sparse: the model has a tensor called {name}.{suffix}")
            tensors[f"{name}.{suffix}"] = part.contiguous()
    version = QUANT_VERSION if quantized else VERSION
    metadata = {"format": "pt", METADATA_KEY: json.dumps({"version": version, "tensors": layout,
                                                          "aliases": aliases})}
    write_safetensors(path, tensors, metadata)
    return list(tensors)


SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3",
                      torch.float8_e5m2: "F8_E5M2"}


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """A safetensors file written tensor by tensor from the tensors' own memory: unlike ``save_file``, which
    first copies every tensor into one bytes object, this needs no second copy of the model (what keeps a
    disk-streamed run of a large model within its memory). Tensors are laid out largest element first, so each
    starts aligned to its element size, as ``save_file`` lays them out."""
    order = sorted(tensors, key=lambda n: (-tensors[n].element_size(), n))
    header, offset = {"__metadata__": metadata}, 0
    for name in order:
        tensor = tensors[name]
        if tensor.dtype not in SAFETENSORS_DTYPES:
            raise LabError(f"cannot store {name}: safetensors has no type for {tensor.dtype}")
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as file:
        file.write(len(encoded).to_bytes(8, "little"))
        file.write(encoded)
        for name in order:
            tensor = tensors[name].detach().cpu().contiguous()
            if tensor.numel():
                file.write(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))  # no copy; a full disk: ENOSPC


def shard_name(number: int, count: int) -> str:
    """The file name of shard ``number`` (from 1) of ``count``."""
    return f"sparse-model-{number:05d}-of-{count:05d}.safetensors"


def write_sparse_index(folder: Path, weight_map: dict[str, str], total_size: int) -> None:
    """The index of a sharded sparse checkpoint: every stored tensor name → its shard's file name."""
    index = {"metadata": {"total_size": total_size, METADATA_KEY: {"version": VERSION}}, "weight_map": weight_map}
    (folder / SPARSE_INDEX).write_text(json.dumps(index, indent=1) + "\n")


def sparse_files(folder: Path) -> list[Path]:
    """The sparse weight files of a folder: ``sparse-model.safetensors``, or the shards its index lists; [] if
    neither is there. LabError when the index is unreadable or names a missing shard."""
    if (folder / SPARSE_FILE).is_file():
        return [folder / SPARSE_FILE]
    if not (folder / SPARSE_INDEX).is_file():
        return []
    try:
        weight_map = json.loads((folder / SPARSE_INDEX).read_text())["weight_map"]
    except (ValueError, KeyError, TypeError) as exc:
        raise LabError(f"{folder / SPARSE_INDEX} is not a readable shard index ({exc}); save the model again") from exc
    files = [folder / name for name in sorted(set(weight_map.values()))]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise LabError(f"{folder / SPARSE_INDEX} lists shards that are missing: {', '.join(missing[:3])}")
    return files


def read_sparse_folder(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor],
                                              tuple[int, int] | None, QuantRecord | None]:
    """(state dict, packed kept bits of each pruned weight, the N:M pattern all of them are stored in or None, the
    quantization of a quantized model or None) decoded from every sparse file of ``folder`` (one, or the shards of
    a model written layer by layer), merged; LabError naming the tensor or the file when one is damaged. Everything
    is decoded before anything is returned. Tensors decode in parallel threads (numpy and torch release the GIL),
    a few at a time, so memory holds the decoded model and a few encoded tensors, not two copies of the model."""
    state, kept, patterns, quantized = {}, {}, set(), {}
    for path in sparse_files(folder):
        part = _read_file(path)
        state.update(part[0])
        kept.update(part[1])
        patterns |= part[2]
        quantized.update(part[3])
    kinds = set(quantized.values())
    if len(kinds) > 1:
        raise LabError(f"{folder} mixes quantizations ({', '.join(sorted(kinds))}); save the model again")
    quant = QuantRecord(kinds.pop(), list(quantized)) if kinds else None
    return state, kept, patterns.pop() if len(patterns) == 1 else None, quant


def _read_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], set, dict[str, str]]:
    state, kept = {}, {}
    try:
        with safe_open(str(path), framework="pt") as file, ThreadPoolExecutor(DECODE_THREADS) as pool:
            layout = _layout(path, file.metadata())
            names, entries = set(file.keys()), list(layout["tensors"].items())
            for start in range(0, len(entries), 2 * DECODE_THREADS):
                jobs = []
                for key, entry in entries[start:start + 2 * DECODE_THREADS]:
                    suffixes = {"nm": ("values", "positions"), "dense": ("values",)}.get(entry.get("layout"),
                                                                                         ("values", "mask"))
                    missing = [f"{key}.{s}" for s in suffixes if f"{key}.{s}" not in names]
                    if missing:
                        raise LabError(f"sparse tensor {key}: {', '.join(missing)} missing from {path.name}")
                    jobs.append((key, entry, {s: file.get_tensor(f"{key}.{s}") for s in suffixes}))
                    names -= {f"{key}.{s}" for s in suffixes}
                for (key, _, _), (weight, bits) in zip(jobs, pool.map(lambda job: decode(*job), jobs)):
                    state[key] = weight
                    if bits is not None:
                        kept[key] = bits
            state.update({name: file.get_tensor(name) for name in names})
    except SafetensorError as exc:
        raise LabError(f"{path} is not a readable safetensors file ({exc}); save the model again") from exc
    for alias, name in layout["aliases"].items():
        if name not in state:
            raise LabError(f"sparse file {path.name}: alias {alias} points to {name}, which it does not hold")
        state[alias] = state[name]
    pruned = [e for e in layout["tensors"].values() if e.get("layout") != "dense"]
    patterns = {(e.get("n"), e.get("m")) if e.get("layout") == "nm" else None for e in pruned}
    quantized = {key: e["quant"] for key, e in layout["tensors"].items() if "quant" in e}
    return state, kept, patterns, quantized


def _layout(path: Path, metadata: dict | None) -> dict:
    """The file's sparse layout (its ``METADATA_KEY`` metadata), checked field by field: LabError naming the file
    and the field for anything this lab would not decode (a tool that "repairs" the metadata included)."""
    raw = (metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise LabError(f"{path} has no {METADATA_KEY} metadata: it is not a lab sparse checkpoint")
    try:
        layout = json.loads(raw)
    except ValueError as exc:
        raise LabError(f"{path}: its {METADATA_KEY} metadata is not JSON ({exc}); save the model again") from None
    if not isinstance(layout, dict):
        raise LabError(f"{path}: its {METADATA_KEY} metadata is {type(layout).__name__}, not an object")
    if layout.get("version") not in (VERSION, QUANT_VERSION):
        raise LabError(f"{path} uses sparse layout version {layout.get('version')!r}; this lab reads versions "
                       f"{VERSION} and {QUANT_VERSION} (update labutils)")
    problem = _layout_problem(layout)
    if problem:
        raise LabError(f"{path}: {METADATA_KEY} {problem}; save the model again")
    return layout


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _layout_problem(layout: dict) -> str | None:
    """What is wrong with a parsed layout (one phrase naming the field), or None."""
    tensors, aliases = layout.get("tensors"), layout.get("aliases")
    if not isinstance(tensors, dict):
        return f"field 'tensors' is {type(tensors).__name__}, not an object"
    if not isinstance(aliases, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in aliases.items()):
        return f"field 'aliases' is {'missing' if aliases is None else 'not an object of names'}"
    for key, entry in tensors.items():
        if not isinstance(entry, dict):
            return f"tensors.{key} is {type(entry).__name__}, not an object"
        shape = entry.get("shape")
        if not (isinstance(shape, list) and all(_is_count(d) for d in shape)):
            return f"tensors.{key}.shape is {shape!r}, not a list of sizes"
        if entry.get("layout") == "nm" and not all(_is_count(entry.get(f)) for f in ("n", "m", "bits")):
            return f"tensors.{key} has layout nm without integer n, m and bits"
        if not isinstance(entry.get("dtype"), str):
            return f"tensors.{key}.dtype is {entry.get('dtype')!r}, not a dtype name"
        quant = entry.get("quant")
        if quant is not None and (quant not in STORED_QUANTS or layout.get("version") != QUANT_VERSION):
            return f"tensors.{key}.quant is {quant!r}, not one of {', '.join(STORED_QUANTS)} in a version 2 file"
        if entry.get("layout") == "dense" and quant is None:
            return f"tensors.{key} has layout dense without a quant"
    return None
