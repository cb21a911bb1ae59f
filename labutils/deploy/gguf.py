"""Exporting a pruned model to llama.cpp's GGUF format: one ``.gguf`` file that llama.cpp, Ollama or LM Studio
load as a complete model (docs/saving.md "GGUF for llama.cpp").

The default model came as a GGUF file (``loading.embedded_gguf_path``); that file is the template. Every metadata
field of it — architecture, context length, head counts, rope, the tokenizer's tokens, merges and token types,
special token ids, chat template — is copied, ``general.file_type`` says the new tensor type, and ``wanda_lab.*``
fields say how the model was pruned. The tensors are the pruned model's, under llama.cpp's names, in the
template's order. Only models with the template's architecture and shapes can be written this way: any other
model would need metadata (a tokenizer, a chat template) this file cannot supply, and is refused with one line.
"""
from __future__ import annotations

import functools
import os
import struct
from pathlib import Path

import gguf
import numpy as np
import torch

from ..core.errors import BadInput, LabError
from ..core.loading import embedded_gguf_path, embedded_model_dir, quiet_hf_progress
from ..core.locks import output_lock, resolve_target
from ..core.publish import atomic_file, check_apart, check_writable
from ..core.saved import is_lab_output, load_pruned
from ..core.validation import check_choice
from ..prune.sparsity import model_sparsity

QUANTS = ("f16", "q8_0", "q4_0")
DENSE = "default"  # export_gguf's name for the embedded dense model
DENSE_REPORT = {"label": "dense", "target": "none"}
SUFFIX = ".gguf"
MARKER = "wanda_lab"  # prefix of the fields the lab adds; a .gguf holding them is one the lab may replace
MARKER_KEY = f"{MARKER}.method"
HEAD_BYTES = 4096  # where ``is_lab_gguf`` looks for MARKER_KEY
MODEL_TYPES = ("llama",)  # transformers' model_type: LlamaForCausalLM and the models saved as it (SmolLM2)
# transformers' names of one decoder layer's tensors → llama.cpp's (gguf-py's tensor_mapping, MODEL_ARCH.LLAMA)
LAYER_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}
OUTER_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
               "lm_head.weight": "output.weight"}
# the config's shape fields → the template's metadata keys (after "<architecture>.")
SHAPE_KEYS = {"num_hidden_layers": "block_count", "hidden_size": "embedding_length",
              "intermediate_size": "feed_forward_length", "num_attention_heads": "attention.head_count",
              "num_key_value_heads": "attention.head_count_kv", "vocab_size": "vocab_size"}
SKIPPED_FIELDS = ("general.architecture", "general.file_type")  # the writer's own, and the one that changes


def gguf_name(name: str) -> str | None:
    """llama.cpp's name for a transformers tensor name: ``model.layers.3.mlp.up_proj.weight`` →
    ``blk.3.ffn_up.weight``; None for one GGUF does not store (a tied ``lm_head.weight`` is left out by the caller)."""
    if name in OUTER_NAMES:
        return OUTER_NAMES[name]
    parts = name.split(".")
    if parts[:2] != ["model", "layers"] or len(parts) < 4 or not parts[2].isdigit():
        return None
    short = LAYER_NAMES.get(".".join(parts[3:-1]))
    return None if short is None else f"blk.{parts[2]}.{short}.{parts[-1]}"


def to_gguf_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Q or K weight ``(heads·head_dim, in)`` with its rows in llama.cpp's rotary order. transformers rotates the
    two halves of each head (rotate_half), llama.cpp adjacent pairs; convert_hf_to_gguf.py permutes the rows so the
    two agree (checked against the default model's GGUF: its attn_q equals this of the converted q_proj)."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def from_gguf_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """The inverse of ``to_gguf_rows``: llama.cpp's row order back to transformers'."""
    rows = weight.shape[0]
    return weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def is_lab_gguf(path: str | os.PathLike) -> bool:
    """True for a GGUF file this module wrote: ``write_gguf`` puts the ``wanda_lab.*`` fields first, so they are
    in the file's first few hundred bytes (parsing all its metadata, 100 000 tokenizer strings, takes seconds)."""
    key = MARKER_KEY.encode()
    try:
        with open(path, "rb") as f:
            head = f.read(HEAD_BYTES)
    except OSError:
        return False
    return head.startswith(b"GGUF") and struct.pack("<Q", len(key)) + key in head


def check_gguf_output(out: str | os.PathLike, folder: str | os.PathLike) -> Path:
    """``out`` as a Path if a GGUF file can be written there, checked before any work: it ends in ``.gguf``, is
    apart from the folder being exported and the lab's cache, and is new or a GGUF file the lab wrote."""
    given = Path(out).expanduser()
    if given.suffix != SUFFIX:
        raise BadInput(f"OUT {str(out)!r} does not end in {SUFFIX}; the GGUF export writes one file, e.g. "
                       f"{given.name or 'model'}{SUFFIX}")
    target = resolve_target(given)
    check_apart(target, {"the folder being exported": folder})
    if target.is_dir():
        raise BadInput(f"OUT {str(out)!r} is a folder; allowed: a new {SUFFIX} file or one the lab wrote")
    if target.exists() and not is_lab_gguf(target):
        raise BadInput(f"OUT {str(out)!r} exists and is not a GGUF file written by the lab; allowed: a new path "
                       f"or a previous lab {SUFFIX} file, which is then replaced")
    check_writable(target)
    return target


def check_template(config, fields: dict) -> None:
    """BadInput unless ``config`` (a transformers config) is of a supported model type with the template GGUF's
    shapes (``fields``: its metadata as {key: value}); the message names the first difference."""
    model_type = getattr(config, "model_type", None)
    if model_type not in MODEL_TYPES:
        raise BadInput(f"model type {model_type!r} cannot be exported to GGUF; allowed: {', '.join(MODEL_TYPES)} "
                       "(LlamaForCausalLM) with the default model's shapes, whose GGUF file supplies the tokenizer "
                       "and metadata")
    arch = fields["general.architecture"]
    for attr, key in SHAPE_KEYS.items():
        have, want = getattr(config, attr, None), fields.get(f"{arch}.{key}")
        if want is not None and have != want:
            raise BadInput(f"the model's {attr} is {have} but the template GGUF's {arch}.{key} is {want}: only "
                           "models shaped like the default model (SmolLM2-135M) can be exported to GGUF")


@functools.lru_cache(maxsize=1)
def template_reader():
    """A ``gguf.GGUFReader`` of the default model's GGUF file (the template), opened once per process: parsing its
    metadata takes seconds."""
    return gguf.GGUFReader(embedded_gguf_path())


@functools.lru_cache(maxsize=1)
def template() -> tuple[dict, dict]:
    """The template's metadata as {key: (value, value types)} without the header's own fields, and {tensor name:
    (out, in) shape as torch has it} in the file's order."""
    reader = template_reader()
    fields = {key: (field.contents(), field.types) for key, field in reader.fields.items()
              if not key.startswith("GGUF.")}
    return fields, {t.name: tuple(int(n) for n in reversed(t.shape)) for t in reader.tensors}  # GGUF lists (in, out)


def encode(tensor: torch.Tensor, quant: str, name: str):
    """(array, GGML type) of one tensor as the file stores it: 1-D norms float32 (as llama.cpp keeps them); 2-D
    weights float16, or quantized per block of 32 — under q4_0 the token embedding and output in q8_0 (the template's
    embedding is q8_0; llama.cpp's own q4_0 keeps the output above 4 bits too)."""
    types = gguf.GGMLQuantizationType
    if tensor.ndim == 1:
        return tensor.detach().to(torch.float32).numpy(), types.F32
    if quant == "f16":
        return tensor.detach().to(torch.float16).numpy(), types.F16
    qtype = types.Q8_0 if quant == "q8_0" or name in ("token_embd.weight", "output.weight") else types.Q4_0
    return gguf.quants.quantize(tensor.detach().to(torch.float32).numpy(), qtype), qtype


def gguf_tensors(model, fields: dict, quant: str) -> dict:
    """{llama.cpp name: (array, GGML type)} of the model's tensors, Q and K rows in llama.cpp's order."""
    arch = fields["general.architecture"]
    heads = {"attn_q": fields[f"{arch}.attention.head_count"], "attn_k": fields[f"{arch}.attention.head_count_kv"]}
    tied = getattr(model.config, "tie_word_embeddings", False)
    out = {}
    for name, tensor in model.state_dict().items():
        target = gguf_name(name)
        if target is None or (target == "output.weight" and tied):
            continue
        kind = target.split(".")[-2]
        out[target] = encode(to_gguf_rows(tensor, heads[kind]) if kind in heads else tensor, quant, target)
    return out


def pruned_fields(report: dict, model) -> dict:
    """The ``wanda_lab.*`` fields: the method and target from report.json, and the share of zeros measured over
    the prunable linears (``lu.model_sparsity``)."""
    return {f"{MARKER}.method": str(report.get("label") or report.get("method") or "unknown"),
            f"{MARKER}.target": str(report.get("target") or "unknown"),
            f"{MARKER}.linear_sparsity": float(model_sparsity(model)["linear_sparsity"])}


def write_gguf(path: Path, fields: dict, tensors: dict, extra: dict, file_type: int) -> None:
    """Write the GGUF file at ``path``: the template's ``fields`` (file type replaced), ``extra`` and ``tensors``."""
    writer = gguf.GGUFWriter(path, fields["general.architecture"][0])
    for key, value in extra.items():  # first, right after the architecture: what ``is_lab_gguf`` looks for
        writer.add_key_value(key, value, gguf.GGUFValueType.get_type(value))
    for key, (value, types) in fields.items():
        if key not in SKIPPED_FIELDS:
            writer.add_key_value(key, value, types[0], types[1] if len(types) > 1 else None)
    writer.add_file_type(file_type)
    for name, (array, qtype) in tensors.items():
        writer.add_tensor(name, array, raw_dtype=qtype)  # a quantized array's bytes: the writer derives its shape
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def export_gguf(folder: str | os.PathLike, out: str | os.PathLike, quant: str = "f16") -> Path:
    """Write the lab output at ``folder`` (either format) as one GGUF file ``out`` for llama.cpp; returns ``out``.
    ``folder`` may also be ``"default"``: the embedded dense model (the baseline of 08-Deploy's engine table).

    ``quant``: "f16" (every weight as float16: exact for a float16 model, zeros kept), "q8_0" or "q4_0" (llama.cpp's
    block quantizers, 32 weights per scale). Refused with one line, nothing written: a folder that is not a lab
    output, a model other than a LlamaForCausalLM shaped like the default model, an unknown ``quant``, ``out``
    without ``.gguf``, or an existing ``out`` that is not a GGUF file the lab wrote (that one is replaced)."""
    check_choice("quant", quant, QUANTS)
    dense = isinstance(folder, str) and folder == DENSE
    if not dense and (not isinstance(folder, (str, os.PathLike)) or not is_lab_output(folder)):
        raise BadInput(f"{str(folder)!r} is not a lab output folder (no lab-manifest.json listing a report.json); "
                       f"allowed: a folder written by python -m labutils prune or lu.save_pruned, or '{DENSE}' (the "
                       "embedded dense model)")
    if not isinstance(out, (str, os.PathLike)):
        raise BadInput(f"export_gguf(folder, out, quant='f16'): out must be a path; got {type(out).__name__}")
    path = check_gguf_output(out, embedded_model_dir() if dense else folder)
    fields, expected = template()
    values = {key: value for key, (value, _) in fields.items()}
    if dense:
        from transformers import AutoModelForCausalLM

        with quiet_hf_progress():
            model, report = AutoModelForCausalLM.from_pretrained(embedded_model_dir(), dtype=torch.float32), DENSE_REPORT
    else:
        check_template(_folder_config(folder), values)
        model, _, report = load_pruned(folder, "cpu")
    tensors = gguf_tensors(model, values, quant)
    got = {name: model_shape(array, qtype) for name, (array, qtype) in tensors.items()}
    if got != expected:
        differ = sorted(set(got) ^ set(expected)) or [n for n in expected if got[n] != expected[n]]
        raise BadInput(f"the model's tensors differ from the template GGUF's at {differ[0]}: only models shaped like "
                       "the default model (SmolLM2-135M) can be exported to GGUF")
    tensors = {name: tensors[name] for name in expected}  # the template's order
    file_type = {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                 "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[quant]
    with output_lock(path), atomic_file(path) as tmp:
        write_gguf(tmp, fields, tensors, pruned_fields(report, model), int(file_type))
    return Path(out).expanduser()


def model_shape(array: np.ndarray, qtype) -> tuple[int, ...]:
    """The (rows, columns) shape, as torch has it, of an array ``encode`` returned."""
    if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        return tuple(array.shape)
    return tuple(gguf.quant_shape_from_byte_shape(array.shape, qtype))


def _folder_config(folder: str | os.PathLike):
    """The transformers config of a lab output folder, read without loading its weights."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        raise LabError(f"{str(folder)!r}: config.json is unreadable ({str(exc).splitlines()[0]}); prune the model "
                       "again") from None
