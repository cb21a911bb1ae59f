"""The lab's sparse checkpoint: pruned weights stored as the kept values and where they were (02-Prune).

One safetensors file, ``sparse-model.safetensors``, of plain dense tensors, so that any safetensors reader can
decode it (docs/saving.md's "Sparse checkpoint format" gives the few lines of numpy). Every pruned weight ``K`` of
the model's state dict becomes two tensors, in one of two layouts:

- ``bitmask`` (unstructured, OWL, any group): ``K.values`` (kept,) — the kept weights in row-major order, in the
  weight's own dtype; ``K.mask`` (⌈numel / 8⌉,) uint8 — one bit per weight, 1 = kept, packed as ``np.packbits``
  packs the row-major flattened weight (first weight in the highest bit, last byte padded with zeros).
- ``nm`` (N:M with M ≤ 16, 2-D weights whose every group of M consecutive inputs keeps exactly N):
  ``K.values`` (out, in · N / M) — the kept weights of each row in order; ``K.positions`` uint8 — for each group,
  row by row, which N positions it keeps, as the rank of that set among all C(M, N) sets in the order
  ``itertools.combinations(range(M), N)`` lists them, written in ``bits`` = ⌈log2 C(M, N)⌉ bits (3 for 2:4, 7 for
  4:8), most significant first, all groups' numbers concatenated and packed as ``np.packbits`` packs bits. That
  is 0.75 bit per weight at 2:4 and 0.875 at 4:8, less than a bitmask's one.

Every other tensor is stored under its own name as it is. The file's metadata key ``wanda_lab.sparse`` holds JSON:
``{"version": 1, "tensors": {K: {"layout", "shape", "dtype", and for nm "n", "m", "bits"}}, "aliases":
{name: stored name}}`` (aliases: tied weights, stored once). A pruned position is +0.0; a kept weight keeps its
exact bits, even when it is 0.0 or -0.0, so decoding gives back the saved weights bit for bit, and the masks.

Version 2 (written only for a model quantized by ``quant.quantize_model``, 07-Quantize) adds ``"quant": "q4_0"``
or ``"q8_0"`` to the entries of quantized tensors. Their ``K.values`` are then llama.cpp's blocks of those values
(``quant``: (⌈count / 32⌉, 18) uint8 for q4_0, 34 bytes a block for q8_0; ``dtype`` is the dtype they decode
into): for a pruned weight the kept values in the order above, for a weight stored whole (layout ``dense``: the
input embedding, and the linears of a model the lab did not prune) all of its values. Decoding gives back the
quantized model's weights bit for bit.

A model pruned while streamed from disk (``prune.disk``) is written shard by shard: ``sparse-model-00001-of-000NN
.safetensors`` … (the first holds everything outside the decoder layers, then one per decoder layer), each a file
of the layout above with its own metadata, and ``sparse-model.safetensors.index.json`` mapping every stored tensor
to its shard (``{"metadata": {...}, "weight_map": {name: file}}``, as transformers' sharded checkpoints do).
"""
from __future__ import annotations

import functools
import itertools
import math

import numpy as np
import torch

from ..errors import BadInput, LabError
from .bits import pack_fields, pack_mask, unpack_fields, unpack_mask
from .quant import block_size, dequantize_values, quantize_values, quantized_bytes

METADATA_KEY = "wanda_lab.sparse"
VERSION = 1
QUANT_VERSION = 2  # a file with quantized tensors
LAYOUTS = ("bitmask", "nm", "dense")  # dense: a quantized tensor stored whole
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}  # element size → same-size integer


def nonzero_bits(weight: torch.Tensor) -> torch.Tensor:
    """True where the weight is not +0.0 (bit for bit: -0.0 counts as a value to keep). Same shape, bool."""
    return weight.view(_INT_VIEW[weight.element_size()]) != 0


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True if ``a`` and ``b`` hold the same bits (unlike ``torch.equal``, -0.0 differs from 0.0 and NaN matches)."""
    view = _INT_VIEW[a.element_size()]
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(view), b.view(view))


MAX_NM_M = 16  # the N:M layout's lookup tables hold 2^M and C(M, N) entries; larger M use the bitmask


@functools.cache
def combinations_table(n: int, m: int) -> torch.Tensor:
    """(C(m, n), n) int64: every set of n positions out of m, in ``itertools.combinations`` order."""
    return torch.tensor(list(itertools.combinations(range(m), n)), dtype=torch.int64).reshape(-1, n)


def position_bits(n: int, m: int) -> int:
    """Bits that number every set of n positions out of m: ⌈log2 C(m, n)⌉ (3 for 2:4, 7 for 4:8)."""
    return max(1, math.ceil(math.log2(math.comb(m, n))))


def follows_nm(kept: torch.Tensor, n: int, m: int) -> bool:
    """True if ``kept`` (out, in) keeps exactly ``n`` of every ``m`` consecutive inputs of each row, and m is small
    enough for the N:M layout."""
    return (m <= MAX_NM_M and kept.dim() == 2 and kept.shape[1] % m == 0
            and bool((kept.reshape(-1, m).sum(1) == n).all()))


def encode(weight: torch.Tensor, kept: torch.Tensor | None, nm: tuple[int, int] | None,
           quant: str | None = None, blocks: torch.Tensor | None = None) -> tuple[dict, dict]:
    """(tensors under their suffix: "values" and "mask" or "positions", layout entry) for one pruned weight on
    the CPU. ``nm``: use the N:M layout if the mask follows it, else the bitmask. ``quant``: store the values as
    that quantizer's blocks (``kept`` None: the whole weight, layout dense); ``blocks``: those ``quantize_model``
    computed, if it did (used once checked)."""
    entry = {"layout": "bitmask", "shape": list(weight.shape), "dtype": str(weight.dtype).removeprefix("torch.")}
    if quant is not None:
        entry["quant"] = quant
    if kept is None:
        entry["layout"] = "dense"
        return {"values": _quantized(weight, quant, blocks)}, entry
    flat, keep = weight.reshape(-1), kept.reshape(-1)
    if nm is not None and follows_nm(kept, *nm):
        n, m = nm
        table = combinations_table(n, m)
        codes = (table.new_zeros(len(table), m).scatter_(1, table, 1) << torch.arange(m - 1, -1, -1)).sum(1)
        rank_of = torch.full((1 << m,), -1, dtype=torch.int64)
        rank_of[codes] = torch.arange(len(table))
        groups = (keep.reshape(-1, m).to(torch.int64) << torch.arange(m - 1, -1, -1)).sum(1)
        bits = position_bits(n, m)
        entry.update(layout="nm", n=n, m=m, bits=bits)
        values = flat[keep].reshape(weight.shape[0], -1)
        return {"values": _quantized(values, quant, blocks), "positions": pack_fields(rank_of[groups], bits)}, entry
    return {"values": _quantized(flat[keep], quant, blocks), "mask": pack_mask(keep)}, entry


def _quantized(values: torch.Tensor, quant: str | None, blocks: torch.Tensor | None) -> torch.Tensor:
    """``values`` as stored: as they are, or their ``quant`` blocks (``blocks``, or computed now), which must decode
    to them bit for bit (the model holds what ``quantize_model`` left; BadInput if the weights changed since)."""
    if quant is None:
        return values
    if blocks is None:
        blocks = quantize_values(values, quant)
    decoded = dequantize_values(blocks, quant, values.numel(), values.dtype)
    if not same_bits(decoded, values.reshape(-1)):
        raise BadInput(f"the weights are not what {quant} gives: they changed after lu.quantize_model; quantize "
                       "the model again before saving it")
    return blocks


def zeros(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A zero tensor from calloc: the kernel hands out zeroed pages as they are first written, so the memory is not
    written twice (about twice as fast as ``torch.zeros`` for a large decoded weight)."""
    size = torch.empty((), dtype=dtype).element_size()
    return torch.from_numpy(np.zeros(numel * size, np.uint8)).view(dtype)


def encoded_bytes(kept: torch.Tensor | None, element_size: int, nm: tuple[int, int] | None,
                  quant: str | None = None, numel: int | None = None) -> int:
    """Bytes ``encode`` stores for a weight with this mask (None: a quantized weight stored whole, of ``numel``
    values), computed without encoding it."""
    if kept is None:
        return quantized_bytes(numel, quant)
    count = int(kept.sum())
    values = quantized_bytes(count, quant) if quant else count * element_size
    if nm is not None and follows_nm(kept, *nm):
        return values + math.ceil(kept.numel() // nm[1] * position_bits(*nm) / 8)
    return values + math.ceil(kept.numel() / 8)


def decode(key: str, entry: dict, tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, its kept bits packed as ``np.packbits`` packs them; None for a quantized weight stored whole) of
    weight ``key`` from its stored tensors; LabError naming the tensor when they do not fit together."""
    layout, shape = entry.get("layout"), tuple(entry.get("shape", ()))
    if layout not in LAYOUTS:
        raise LabError(f"sparse tensor {key}: unknown layout {layout!r} (this lab reads {', '.join(LAYOUTS)})")
    values = tensors["values"]
    numel = math.prod(shape)
    if layout == "dense":
        return stored_values(key, entry, values, numel).reshape(shape), None
    if layout == "bitmask":
        packed = tensors["mask"].numpy()
        if packed.shape != (math.ceil(numel / 8),):
            raise LabError(f"sparse tensor {key}: mask has {packed.size} bytes; {numel} weights need "
                           f"{math.ceil(numel / 8)}")
        count = int(unpack_mask(packed, numel).sum()) if "quant" in entry else values.numel()
        weight = _scatter_kept(key, packed, numel, stored_values(key, entry, values, count).reshape(-1))
        return weight.reshape(shape), tensors["mask"].clone()
    return _decode_nm(key, entry, shape, values, tensors["positions"].numpy())


def stored_values(key: str, entry: dict, values: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count`` values of weight ``key`` as its stored ``values`` give them: as they are, or decoded from the
    blocks of the entry's ``quant``; LabError naming the tensor when they do not fit the entry."""
    quant, dtype = entry.get("quant"), entry.get("dtype")
    if quant is None:
        if str(values.dtype).removeprefix("torch.") != dtype:
            raise LabError(f"sparse tensor {key}: values are {values.dtype}, the layout says {dtype}")
        return values
    per_block, size = block_size(quant)
    want = (math.ceil(count / per_block), size)
    if values.dtype != torch.uint8 or tuple(values.shape) != want:
        raise LabError(f"sparse tensor {key}: its {quant} values are {values.dtype} {tuple(values.shape)}; "
                       f"{count} values need uint8 {want}")
    target = getattr(torch, dtype, None)
    if not isinstance(target, torch.dtype) or not target.is_floating_point:
        raise LabError(f"sparse tensor {key}: {quant} values decode into a float dtype, not {dtype!r}")
    return dequantize_values(values, quant, count, target)


def _scatter_kept(key: str, packed: np.ndarray, numel: int, values: torch.Tensor) -> torch.Tensor:
    """The dense weight (numel,) with ``values`` at the kept positions of the bitmask ``packed``. The positions
    ascend, so the copy writes memory in order (about 4× faster than ``masked_scatter_`` on a CPU)."""
    where = torch.from_numpy(np.flatnonzero(unpack_mask(packed, numel)))
    if where.numel() != values.numel():
        raise LabError(f"sparse tensor {key}: {values.numel()} values but the mask keeps {where.numel()}")
    return zeros(numel, values.dtype).index_copy_(0, where, values)


def _decode_nm(key: str, entry: dict, shape: tuple, values: torch.Tensor, packed: np.ndarray):
    n, m, bits = entry.get("n"), entry.get("m"), entry.get("bits")
    if len(shape) != 2 or not all(isinstance(v, int) for v in (n, m, bits)) or not 0 < n < m <= MAX_NM_M or \
            bits != position_bits(n, m) or shape[1] % m:
        raise LabError(f"sparse tensor {key}: N:M layout {n}:{m} with {bits}-bit positions does not fit shape {shape}")
    groups = shape[0] * shape[1] // m
    if "quant" in entry:
        values = stored_values(key, entry, values, groups * n).reshape(shape[0], -1)
    elif str(values.dtype).removeprefix("torch.") != entry.get("dtype"):
        raise LabError(f"sparse tensor {key}: values are {values.dtype}, the layout says {entry.get('dtype')}")
    if values.shape != (shape[0], shape[1] // m * n):
        raise LabError(f"sparse tensor {key}: values have shape {tuple(values.shape)}; {n}:{m} of {shape} needs "
                       f"{(shape[0], shape[1] // m * n)}")
    if packed.shape != (math.ceil(groups * bits / 8),):
        raise LabError(f"sparse tensor {key}: positions have {packed.size} bytes; {groups} groups of {bits} bits "
                       f"need {math.ceil(groups * bits / 8)}")
    ranks = unpack_fields(packed, groups, bits)
    table = combinations_table(n, m)
    if bool((ranks >= len(table)).any()):
        raise LabError(f"sparse tensor {key}: a group's positions number exceeds the {len(table)} sets of {n} in {m}")
    where = table[ranks]  # (groups, n)
    weight = zeros(groups * m, values.dtype).view(groups, m).scatter_(1, where, values.reshape(-1, n))
    keep = torch.zeros(groups, m, dtype=torch.bool).scatter_(1, where, True)
    return weight.reshape(shape), pack_mask(keep)
