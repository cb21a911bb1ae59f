"""What a lab folder holds: its manifest (``lab-manifest.json``: each file's size, SHA-256 and xxh3 digests),
checked before the folder is trusted, loaded or replaced (introduced in 02-Prune, where the pruned model is saved).

A folder the lab may replace is one whose manifest lists every file in it: replacing it removes only those.
Also the lab's strict JSON (reports and benchmark rows), written through a temporary file and a rename.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import sys
from pathlib import Path

from .checksums import check_file, file_digests
from .checksums import well_formed as checksums_well_formed

MANIFEST_FILE = "lab-manifest.json"
LAB_MARKER = "wanda-lab"
MANIFEST_VERSION = 1


# ---------------------------------------------------------------------------------------------- manifests

def _sha256(path: Path) -> str:
    whole = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(2**22), b""):
            whole.update(chunk)
    return whole.hexdigest()


def _listed_files(folder: Path) -> list[str]:
    """Every file under ``folder`` except the manifest, as sorted POSIX paths relative to it."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() and p.name != MANIFEST_FILE)


def write_manifest(folder: Path, kind: str) -> dict:
    """List every file in ``folder`` with its size, SHA-256 and xxh3 digests (per tensor for safetensors files), in
    ``folder/lab-manifest.json``, written through a temporary file and renamed into place."""
    files = {name: {"bytes": (folder / name).stat().st_size, "sha256": _sha256(folder / name),
                    **file_digests(folder / name)} for name in _listed_files(folder)}
    manifest = {"lab": LAB_MARKER, "kind": kind, "version": MANIFEST_VERSION, "files": files}
    tmp = folder / f".{MANIFEST_FILE}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, folder / MANIFEST_FILE)
    return manifest


def read_manifest(folder: str | os.PathLike) -> dict | None:
    """The lab manifest of ``folder``, or None where there is none (or it is not the lab's)."""
    try:
        manifest = json.loads((Path(folder) / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("lab") != LAB_MARKER or not isinstance(
            manifest.get("files"), dict):
        return None
    if not all(_safe_name(name) and _well_formed(entry) for name, entry in manifest["files"].items()):
        return None  # names outside the folder, or entries without sizes and hashes: not a manifest we trust
    return manifest


def _safe_name(name) -> bool:
    """A relative POSIX path that stays inside the folder (no absolute path, no '..', not the manifest)."""
    if not isinstance(name, str) or not name or name.startswith("/") or "\\" in name:
        return False
    parts = name.split("/")
    return all(part not in ("", ".", "..") for part in parts) and name != MANIFEST_FILE


def _well_formed(entry) -> bool:
    return (isinstance(entry, dict) and isinstance(entry.get("bytes"), int) and not isinstance(entry["bytes"], bool)
            and isinstance(entry.get("sha256"), str) and checksums_well_formed(entry))


def verify_folder(folder: str | os.PathLike, full: bool = False) -> str | None:
    """None if every file the manifest lists is there with its recorded size and every byte as written, else what
    is wrong (one phrase, naming the file, and the tensor of a safetensors file). Bytes are compared by their xxh3
    digests (``checksums``; a manifest from before them: by SHA-256); ``full`` compares the SHA-256 too."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest is None:
        return f"no readable {MANIFEST_FILE}"
    if manifest.get("version") != MANIFEST_VERSION:
        return f"{MANIFEST_FILE} has layout version {manifest.get('version')!r}, this lab reads {MANIFEST_VERSION}"
    for name, want in manifest["files"].items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != want.get("bytes"):
            return f"{name} has {size:,} bytes, {want.get('bytes'):,} were written"
        problem = check_file(path, want) if "xxh3" in want else None
        if problem is None and (full or "xxh3" not in want) and _sha256(path) != want["sha256"]:
            problem = f"{name} differs from what was written (SHA-256 mismatch)"
        if problem:
            return problem if problem.startswith(name) else f"{name}: {problem}"
    return None


def has_digests(folder: str | os.PathLike) -> bool:
    """Whether the manifest of ``folder`` records xxh3 digests for every file (a lab from before them wrote none,
    and then every load pays a SHA-256 of every byte)."""
    manifest = read_manifest(folder)
    return manifest is not None and all("xxh3" in entry for entry in manifest["files"].values())


def unlisted_files(folder: Path) -> list[str]:
    """Entries of ``folder`` its manifest does not account for: files and symlinks it does not list, and folders
    that hold none of its files (everything, where there is no manifest)."""
    listed = set((read_manifest(folder) or {"files": {}})["files"])
    parents = {"/".join(name.split("/")[:i]) for name in listed for i in range(1, name.count("/") + 1)}
    unlisted = []
    for root, dirs, files in os.walk(folder):
        rel = Path(root).relative_to(folder)
        for name in dirs + files:
            entry = (rel / name).as_posix()
            if entry == MANIFEST_FILE:
                continue
            is_dir = name in dirs and not (Path(root) / name).is_symlink()
            if (entry not in parents) if is_dir else (entry not in listed or (Path(root) / name).is_symlink()):
                unlisted.append(entry)
    return sorted(unlisted)


# --------------------------------------------------------------------------- replacing only what is listed

def replace_problem(path: Path, kind: str) -> str | None:
    """Why the lab may not replace the existing ``path`` (None if it may): it must be a folder of ``kind`` whose
    manifest lists every file in it."""
    if not path.is_dir():
        return "a file"
    manifest = read_manifest(path)
    if manifest is None or manifest.get("kind") != kind:
        hint = (" (its report.json is an older lab version's; delete the folder yourself to reuse the name)"
                if (path / "report.json").is_file() and manifest is None else "")
        return f"a folder that is not a lab output (no {MANIFEST_FILE} of kind {kind!r}){hint}"
    extra = unlisted_files(path)
    if extra:
        shown = ", ".join(extra[:3]) + (f" and {len(extra) - 3} more" if len(extra) > 3 else "")
        return f"a lab output holding files the lab did not write ({shown})"
    return None


def remove_lab_folder(folder: Path, keep_as: Path | None = None) -> None:
    """Delete the files ``folder``'s manifest lists, the manifest, then the folder if nothing else is in it; if
    something else is (files the lab did not write), the folder is renamed to ``keep_as`` and said so. A folder
    without a manifest (a half-written temporary one) is removed whole."""
    manifest = read_manifest(folder)
    if manifest is None:
        shutil.rmtree(folder, ignore_errors=True)
        return
    for name in manifest["files"]:
        with contextlib.suppress(OSError):
            if not (folder / name).is_symlink():
                (folder / name).unlink()
    with contextlib.suppress(FileNotFoundError):
        (folder / MANIFEST_FILE).unlink()
    for sub in sorted((p for p in folder.rglob("*") if p.is_dir() and not p.is_symlink()),
                      key=lambda p: -len(p.parts)):
        with contextlib.suppress(OSError):
            sub.rmdir()
    try:
        folder.rmdir()
    except OSError:
        kept = keep_as or folder.parent / f"{folder.name.lstrip('.')}.unlisted"
        with contextlib.suppress(OSError):
            folder.rename(kept)
            folder = kept
        print(f"kept {folder}: it holds files the lab did not write", file=sys.stderr)


# ------------------------------------------------------------------------------------------------- JSON

def strict_json(value) -> str:
    """``value`` as strict JSON (RFC 8259): NaN and ±inf become null, other non-JSON values their str()."""
    return json.dumps(_finite(value), indent=2, allow_nan=False, default=str)


def write_json_atomic(path: str | os.PathLike, value) -> Path:
    """Write ``value`` as strict JSON to ``path`` through a temporary file and a rename: a reader (or a run killed
    while writing) sees the old file or the new one, never half of one. Benchmarks call it after every row."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(strict_json(value) + "\n")
    os.replace(tmp, path)
    return path


def _finite(value):
    if hasattr(value, "item") and getattr(value, "shape", None) == ():  # numpy / torch scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
