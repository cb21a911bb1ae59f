"""Group-wise 4- and 8-bit weights with llama.cpp's quantizers, and the model's record of them (07-Quantize).

The arithmetic is the ``gguf`` package's (maintained with llama.cpp, pure numpy: the same bits on every CPU), in
llama.cpp's own block formats, so a lab checkpoint's quantized values are exactly what llama.cpp would compute:

- ``q4_0``: blocks of 32 values; a float16 scale ``d`` = (the value of largest magnitude) / −8 and 32 four-bit codes
  ``q``; a value is ``d · (q − 8)``. 18 bytes per 32 values, 4.5 bits each. Symmetric: 0.0 is code 8, exactly 0.
- ``q8_0``: blocks of 32; ``d`` = max |x| / 127 (float16) and 32 eight-bit codes; ``d · q``. 34 bytes, 8.5 bits.
- ``q4_1``: blocks of 32; a float16 scale and a float16 minimum ``m``; ``d · q + m``. 20 bytes, 5 bits. 0.0 is
  generally not one of its 16 levels, so a quantizer that does not know the mask turns pruned zeros into small
  non-zeros; the lab shows that (``quantize_model(…, mask_aware=False)``) and stores only q4_0 and q8_0.

``quantize_model`` quantizes in place what the lab prunes (every linear of the decoder layers) and the input
embedding (the output one too when it is a separate matrix); norms and biases stay as they are. A pruned weight's
kept values are quantized alone, in row-major order, 32 to a block (the zeros are not stored, so they cannot move
and take no codes); every other weight as a whole. The record on the model (``QuantRecord``) tells the sparse format
to store those tensors as the quantizer's blocks (``format``), and what is decoded is bit for bit what the model
held.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

QUANTS = ("q4_0", "q8_0", "q4_1")  # what quantize_model computes
STORED_QUANTS = ("q4_0", "q8_0")  # what the sparse format stores: the types that keep 0.0 exactly
ATTRIBUTE = "lab_quant"
BITS = {"q4_0": 4, "q8_0": 8, "q4_1": 4}


def quant_type(quant: str) -> GGMLQuantizationType:
    return GGMLQuantizationType[quant.upper()]


def block_size(quant: str) -> tuple[int, int]:
    """(values per block, bytes per block) of ``quant``: (32, 18) for q4_0."""
    return GGML_QUANT_SIZES[quant_type(quant)]


def quantized_bytes(count: int, quant: str) -> int:
    """Bytes of ``count`` values quantized to ``quant`` (the last block padded with zeros)."""
    values, size = block_size(quant)
    return math.ceil(count / values) * size


ROW_BLOCKS = 256  # blocks handed to gguf per row: it loops over rows in Python, so long rows are much faster


def quantize_values(values: torch.Tensor, quant: str) -> torch.Tensor:
    """The blocks of ``values`` (any shape, read row-major; padded with zeros to whole blocks) in ``quant``:
    (⌈numel / 32⌉, bytes per block) uint8 on the CPU. Each block depends on its own 32 values only."""
    per_block, size = block_size(quant)
    flat = values.detach().reshape(-1).to("cpu", torch.float32).numpy()
    count = math.ceil(flat.size / per_block)
    padded = np.zeros(math.ceil(count / ROW_BLOCKS) * ROW_BLOCKS * per_block, np.float32)
    padded[:flat.size] = flat
    blocks = quants.quantize(padded.reshape(-1, ROW_BLOCKS * per_block), quant_type(quant)).reshape(-1, size)
    return torch.from_numpy(np.ascontiguousarray(blocks[:count]))


def dequantize_values(blocks: torch.Tensor, quant: str, count: int, dtype: torch.dtype) -> torch.Tensor:
    """The first ``count`` values the ``quant`` blocks (blocks, bytes per block) uint8 hold, as (count,) ``dtype``."""
    decoded = quants.dequantize(blocks.numpy().reshape(1, -1), quant_type(quant)).reshape(-1)[:count]
    return torch.from_numpy(np.ascontiguousarray(decoded)).to(dtype)


def quantize_dequantize(values: torch.Tensor, quant: str) -> torch.Tensor:
    """``values`` (any shape) as ``quant`` gives them back: quantized, then decoded into their own dtype."""
    return quantized_pair(values, quant)[0]


def quantized_pair(values: torch.Tensor, quant: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(``values`` as ``quant`` gives them back, same shape, dtype and device; the blocks that hold them)."""
    blocks = quantize_values(values, quant)
    decoded = dequantize_values(blocks, quant, values.numel(), values.dtype).reshape(values.shape)
    return decoded.to(values.device), blocks


@dataclass
class QuantRecord:
    """Which parameters (state-dict names) ``quantize_model`` quantized, and to what; on the model as one
    attribute, so that saving stores them as blocks and loading records them again."""

    quant: str
    names: list[str] = field(default_factory=list)
    # name → the blocks quantize_model computed (not saved with the model): saving reuses them after checking that
    # they still decode to the weights, instead of quantizing the whole model again
    blocks: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)


def quant_record(model: torch.nn.Module) -> QuantRecord | None:
    """The quantization recorded on ``model``, or None for a model never quantized by the lab."""
    return getattr(model, ATTRIBUTE, None)


def record_quant(model: torch.nn.Module, record: QuantRecord | None) -> None:
    object.__setattr__(model, ATTRIBUTE, record)  # a plain attribute: not a parameter, buffer or module
