"""Saving and loading pruned models atomically (introduced in 02-Prune, used by 03 and 04).

A lab output folder holds the model (safetensors), the tokenizer and ``report.json``. It is written to a
temporary sibling folder first and renamed into place, so an interrupted save never leaves half a model
where a good one was.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .errors import BadInput
from .models import load_pretrained
from .storage import atomic_folder, quiet_hf_progress

REPORT_FILE = "report.json"
LAB_MARKER = "wanda-lab"


def is_lab_output(path: str | os.PathLike) -> bool:
    """True for a folder that an earlier lab run wrote (it holds a report.json with the lab's marker)."""
    report = Path(path) / REPORT_FILE
    try:
        return json.loads(report.read_text()).get("lab") == LAB_MARKER
    except (OSError, ValueError, AttributeError):
        return False


def check_output_dir(path: str | os.PathLike) -> Path:
    """``path`` if it can be written: absent, or a previous lab output (which will be replaced)."""
    path = Path(path).expanduser()
    if path.exists() and not (path.is_dir() and is_lab_output(path)):
        kind = "a file" if not path.is_dir() else "a folder that is not a lab output (no report.json from this lab)"
        raise BadInput(f"output {str(path)!r} exists and is {kind}; allowed: a new path or a previous lab "
                       "output folder, which is then replaced")
    return path


def save_pruned(model, tokenizer, report: dict, path: str | os.PathLike) -> Path:
    """Write model, tokenizer and report to ``path`` atomically; returns the final path."""
    path = check_output_dir(path)
    with atomic_folder(path) as tmp:
        with quiet_hf_progress():
            model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / REPORT_FILE).write_text(json.dumps({"lab": LAB_MARKER, **report}, indent=2, default=str) + "\n")
    return path


def load_report(path: str | os.PathLike) -> dict:
    """The report.json of a lab output folder."""
    path = Path(path)
    if not is_lab_output(path):
        raise BadInput(f"{str(path)!r} is not a lab output folder (no report.json written by this lab)")
    return json.loads((path / REPORT_FILE).read_text())


def load_pruned(path: str | os.PathLike, device: torch.device, dtype: torch.dtype | None = None):
    """(model, tokenizer, report) from a lab output folder."""
    report = load_report(path)
    dtype = dtype or getattr(torch, report.get("dtype", "float32"))
    model, tokenizer = load_pretrained(path, dtype, device)
    return model, tokenizer, report
