"""Saving and loading pruned models so that none is ever lost or half-made (introduced in 02-Prune, used by 03
and 04).

A lab output folder holds the model (safetensors), the tokenizer, ``report.json`` and ``lab-manifest.json``
(every file's size and SHA-256). It is written under a temporary name and published in one atomic step
(``storage.atomic_folder``); an existing folder is replaced only if its manifest lists everything in it.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .errors import BadInput, LabError
from .models import load_pretrained
from .storage import (
    LAB_MARKER,
    atomic_folder,
    check_writable,
    quiet_hf_progress,
    read_manifest,
    replace_problem,
    resolve_target,
    strict_json,
    verify_folder,
)

REPORT_FILE = "report.json"
OUTPUT_KIND = "pruned-model"


def is_lab_output(path: str | os.PathLike) -> bool:
    """True for a folder an earlier lab run wrote: its manifest is the lab's and lists a report.json."""
    manifest = read_manifest(path)
    return manifest is not None and manifest.get("kind") == OUTPUT_KIND and REPORT_FILE in manifest["files"]


def check_output_dir(path: str | os.PathLike, need_bytes: int | None = None) -> Path:
    """``path`` if a pruned model can be written there, checked before any work: absent, or a previous lab output
    holding only what the lab wrote (then replaced); its parent a writable folder with room for ``need_bytes``."""
    given = Path(path).expanduser()
    target = resolve_target(given)
    if target.exists():
        problem = replace_problem(target, OUTPUT_KIND)
        if problem:
            raise BadInput(f"output {str(given)!r} exists and is {problem}; allowed: a new path or a previous lab "
                           "output folder, which is then replaced")
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


def save_pruned(model, tokenizer, report: dict, path: str | os.PathLike) -> Path:
    """Write model, tokenizer and report (strict JSON) to ``path`` atomically; returns ``path``."""
    path = check_output_dir(path, need_bytes=model_bytes(model))
    with atomic_folder(path, OUTPUT_KIND) as tmp:
        with quiet_hf_progress():
            model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / REPORT_FILE).write_text(strict_json({"lab": LAB_MARKER, **report}) + "\n")
    return path


def load_report(path: str | os.PathLike) -> dict:
    """The report.json of a lab output folder."""
    path = Path(path)
    if not is_lab_output(path):
        raise BadInput(f"{str(path)!r} is not a lab output folder (no lab-manifest.json listing a report.json)")
    return json.loads((path / REPORT_FILE).read_text())


def check_intact(path: str | os.PathLike) -> None:
    """LabError unless every file of the lab output at ``path`` has the size and sampled hash it was written with."""
    problem = verify_folder(path)
    if problem:
        raise LabError(f"the saved model at {str(path)!r} is damaged ({problem}); prune it again (02-Prune, or "
                       "python -m labutils prune --out …)")


def load_pruned(path: str | os.PathLike, device: torch.device, dtype: torch.dtype | None = None):
    """(model, tokenizer, report) from a lab output folder, after checking it against its manifest."""
    report = load_report(path)
    check_intact(path)
    dtype = dtype or getattr(torch, report.get("dtype", "float32"))
    model, tokenizer = load_pretrained(path, dtype, device)
    return model, tokenizer, report
