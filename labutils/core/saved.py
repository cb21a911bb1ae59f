"""The lab's saved output folders: saving and loading pruned models so that none is ever lost or half-made
(introduced in 02-Prune, used by 03 and 04). The input shards a low-memory run reads are another thing
(``prune.disk.CheckpointReader``).

A lab output folder holds the model — sparse (``sparse-model.safetensors``: kept values and masks, the default) or
dense (``save_pretrained``'s safetensors) —, the tokenizer, ``report.json``, a model card (``README.md``) and
``lab-manifest.json`` (every file's size and SHA-256). It is written under a temporary name and published in one atomic step
(``publish.atomic_folder``); an existing folder is replaced only if its manifest lists everything in it.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import torch

from .card import CARD_FILE, model_card
from .device import get_device
from .errors import BadInput, LabError
from .loading import folder_tokenizer, load_pretrained, quiet_hf_progress, weight_files
from .locks import resolve_target
from .manifests import LAB_MARKER, read_manifest, strict_json, verify_folder
from .publish import atomic_folder, check_apart, check_replaceable, check_writable
from .sparse.model import (
    is_sparse_folder,
    kept_from_nonzeros,
    load_sparse_model,
    save_sparse_model,
    sparse_sizes,
)
from .validation import check_choice

REPORT_FILE = "report.json"
OUTPUT_KIND = "pruned-model"
SAVE_FORMATS = ("sparse", "dense")


def is_lab_output(path: str | os.PathLike) -> bool:
    """True for a folder an earlier lab run wrote: its manifest is the lab's and lists a report.json."""
    manifest = read_manifest(path)
    return manifest is not None and manifest.get("kind") == OUTPUT_KIND and REPORT_FILE in manifest["files"]


def check_output_dir(path: str | os.PathLike, need_bytes: int | None = None,
                     inputs: dict[str, str | os.PathLike | None] | None = None) -> Path:
    """``path`` if a pruned model can be written there, checked before any work: apart from the lab's cache and
    from ``inputs`` (what → folder read by the run), absent or a previous lab output holding only what the lab wrote
    (then replaced); its parent a writable folder with room for ``need_bytes``."""
    given = Path(path).expanduser()
    target = resolve_target(given)
    check_apart(target, inputs or {})
    if target.exists():
        check_replaceable(target, OUTPUT_KIND, shown=given)
    check_writable(target, need_bytes)
    return given


def model_bytes(model) -> int:
    """Bytes of the model's parameters and buffers (shared tensors once): what its safetensors file holds."""
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    return total


def save_pruned(model, folder: str | os.PathLike, tokenizer=None, report: dict | None = None, *,
                format: str = "sparse") -> Path:
    """Write the model, its tokenizer, ``report.json`` (strict JSON, with the bytes on disk added as "disk") and a
    model card (README.md) to ``folder`` atomically; returns ``folder``.

    format "sparse" (default): each pruned weight as its kept values and mask (``sparse.format``), about half
    the bytes at 50 %; "dense": an ordinary transformers folder (``save_pretrained``). Either loads back bit for
    bit with ``load_pruned``; ``python -m labutils export`` turns a sparse folder into a dense one.
    """
    if not isinstance(folder, (str, os.PathLike)):
        raise BadInput(f"save_pruned(model, folder, tokenizer=None, report=None, format='sparse'): folder must be a "
                       f"path; got {type(folder).__name__}")
    check_choice("format", format, SAVE_FORMATS)
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "save_pretrained"):
        raise BadInput(f"save_pruned(model, folder, …): model must be a transformers model; got {type(model).__name__}")
    if report is not None and not isinstance(report, dict):
        raise BadInput(f"save_pruned(…, report=…): report must be a dict (what lu.build_report returns); got "
                       f"{type(report).__name__}")
    report = dict(report or {})
    report.setdefault("dtype", str(model.dtype).removeprefix("torch."))  # what load_pruned gives back
    nm = parse_nm_label(report.get("nm"))
    path = check_output_dir(folder, need_bytes=model_bytes(model))
    with atomic_folder(path, OUTPUT_KIND) as tmp:
        if format == "sparse":
            sizes = save_sparse_model(model, tmp, nm)
        else:
            with quiet_hf_progress():
                model.save_pretrained(tmp)
            state = model.state_dict()
            sizes = sparse_sizes(state, kept_from_nonzeros(model, state), nm)
            sizes["model"]["dense"] = model_file_bytes(tmp)
        write_folder_files(tmp, report, sizes, format, tokenizer, str(folder))
    return path


def write_folder_files(tmp: Path, report: dict, sizes: dict, format: str, tokenizer, folder: str) -> None:
    """What every lab output holds beside the weights: the tokenizer (if any), ``report.json`` with the bytes on
    disk added to ``report`` as "disk", and the model card; ``folder``: where it will be published."""
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    report["disk"] = {"format": format, **sizes}
    (tmp / REPORT_FILE).write_text(strict_json({"lab": LAB_MARKER, **report}) + "\n")
    (tmp / CARD_FILE).write_text(model_card(report, report["disk"], folder))


def model_file_bytes(path: str | os.PathLike) -> int:
    """Bytes on disk of a saved model's weight files (sparse-model.safetensors, or the dense safetensors)."""
    folder = Path(path)
    return sum(f.stat().st_size for f in weight_files(folder))


def parse_nm_label(label) -> tuple[int, int] | None:
    """(2, 4) for a report's "2:4"; None for anything else."""
    if isinstance(label, str) and label.count(":") == 1 and all(part.isdigit() for part in label.split(":")):
        n, m = label.split(":")
        return int(n), int(m)
    return None


def disk_table(report: dict, unit: str = "bytes") -> pd.DataFrame:
    """Bytes on disk of a saved model, dense vs sparse, for the whole model and for the pruned linears alone (the
    saved format measured on disk, the other from its tensors' sizes). ``report``: what ``load_report``,
    ``load_pruned`` or the main job returns; ``unit``: "bytes" or "MB" (10⁶ bytes, one decimal)."""
    check_choice("unit", unit, ("bytes", "MB"))
    if "disk" not in report:
        raise BadInput("this report has no 'disk' sizes: it was saved before the lab wrote them; save it again")
    disk, scale = report["disk"], 1 if unit == "bytes" else 1e6
    rows = {part: {f"dense {unit}": disk[part]["dense"] / scale, f"sparse {unit}": disk[part]["sparse"] / scale,
                   "sparse / dense": disk[part]["sparse"] / disk[part]["dense"] if disk[part]["dense"] else None}
            for part in ("model", "pruned linears")}
    frame = pd.DataFrame.from_dict(rows, orient="index").rename_axis(f"saved {disk['format']}")
    if unit == "bytes":
        return frame.astype({"dense bytes": "int64", "sparse bytes": "int64"})
    return frame.round({"dense MB": 1, "sparse MB": 1, "sparse / dense": 3})


def load_report(path: str | os.PathLike) -> dict:
    """The report.json of a lab output folder, its fields that loading and exporting read checked: LabError naming
    the file and the field when one is damaged."""
    if not isinstance(path, (str, os.PathLike)):
        raise BadInput(f"expected the path of a lab output folder; got {type(path).__name__}")
    path = Path(path)
    if not is_lab_output(path):
        raise BadInput(f"{str(path)!r} is not a lab output folder (no lab-manifest.json listing a report.json)")
    try:
        report = json.loads((path / REPORT_FILE).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise LabError(f"{path / REPORT_FILE} is not readable JSON ({exc}); prune the model again") from None
    problem = report_problem(report)
    if problem:
        raise LabError(f"{path / REPORT_FILE}: {problem}; prune the model again")
    return report


FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")


def _number(value) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def report_problem(report) -> str | None:
    """What is wrong with a parsed report.json (one phrase naming the field), or None."""
    if not isinstance(report, dict):
        return f"it holds {type(report).__name__}, not an object"
    if "dtype" in report and report["dtype"] not in FLOAT_DTYPES:
        return f"field 'dtype' is {report['dtype']!r}; allowed: {', '.join(FLOAT_DTYPES)}"
    if report.get("nm") is not None and parse_nm_label(report["nm"]) is None:
        return f"field 'nm' is {report['nm']!r}, not an N:M label such as '2:4'"
    for field in ("perplexity", "seconds"):
        if field in report and not (isinstance(report[field], dict) and all(map(_number, report[field].values()))):
            return f"field {field!r} is not an object of numbers"
    disk = report.get("disk")
    if disk is not None and not (isinstance(disk, dict) and all(
            isinstance(disk.get(part), dict) and all(_number(disk[part].get(k)) for k in ("dense", "sparse"))
            for part in ("model", "pruned linears"))):
        return "field 'disk' does not hold the dense and sparse bytes of 'model' and 'pruned linears'"
    return None


def check_intact(path: str | os.PathLike) -> None:
    """LabError unless every file of the lab output at ``path`` has the size and sampled hash it was written with."""
    problem = verify_folder(path)
    if problem:
        raise LabError(f"the saved model at {str(path)!r} is damaged ({problem}); prune it again (02-Prune, or "
                       "python -m labutils prune --out …)")


def load_pruned(path: str | os.PathLike, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
    """(model, tokenizer, report) from a lab output folder in either format, after checking it against its
    manifest. The model is an ordinary transformers model, its weights bit for bit those saved (in ``dtype`` if
    given), on ``device`` (default: the best one here); a sparse folder's masks are recorded on it (``KeptMasks``).
    """
    report = load_report(path)
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise BadInput(f"dtype must be a torch dtype such as torch.float16; got {dtype!r}")
    check_intact(path)
    device = get_device(device)
    folder = Path(path)
    if is_sparse_folder(folder):
        model = load_sparse_model(folder, dtype).to(device)
        return model, folder_tokenizer(folder), report
    dtype = dtype or getattr(torch, report.get("dtype", "float32"))
    model, tokenizer = load_pretrained(path, dtype, device)
    return model, tokenizer, report


def export_dense(folder: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write the lab output at ``folder`` (either format) to ``out`` as an ordinary dense transformers folder, for
    tools that know nothing of the lab; ``out`` is itself a lab output (dense), with report and model card."""
    if not is_lab_output(folder):
        raise BadInput(f"{str(folder)!r} is not a lab output folder (no lab-manifest.json listing a report.json); "
                       "allowed: a folder written by python -m labutils prune or lu.save_pruned")
    check_output_dir(out, inputs={"the folder being exported": folder})
    model, tokenizer, report = load_pruned(folder, "cpu")
    return save_pruned(model, out, tokenizer, {**report, "exported_from": str(folder)}, format="dense")
