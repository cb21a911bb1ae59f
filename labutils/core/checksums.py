"""Checksums of every byte the lab writes, checked before the bytes are used (docs/saving.md "Saving: what is guaranteed").

Every file a lab folder holds (a pruned model, sparse or dense; the converted model cache) is listed in its
manifest with an xxh3-64 digest (``xxhash``: about 20 GB/s on one core, so checking a 540 MB model costs a few
hundredths of a second). A safetensors file gets one digest per stored tensor and one for its header, so damage
is reported with the tensor it hit. The token cache (``core.data``) keeps one digest per cached array beside it.

A digest answers "is this what was written?", not "is this right?": a file rewritten on purpose with a matching
manifest passes, which is what the metadata checks and the main job's plausibility check are for.
"""
from __future__ import annotations

import hashlib
import json
import mmap
from pathlib import Path

import xxhash

HEADER = "__header__"  # the digest of a safetensors file's length prefix and JSON header, among its tensors'


def digest(data) -> str:
    """The xxh3-64 digest of a bytes-like object (bytes, memoryview, mmap), as 16 hex digits."""
    return xxhash.xxh3_64_hexdigest(data)


def name_key(name: str) -> bytes:
    """The SHA-256 of a name (an article title, a module name): a fixed pseudo-random order and split for it."""
    return hashlib.sha256(name.encode("utf-8")).digest()


def name_bucket(name: str) -> int:
    """A fixed bucket in [0, 100) for a name, from its SHA-256: corpus splits by percent."""
    return int.from_bytes(name_key(name)[:8], "big") % 100


def split_by_name(name: str, bounds: dict[str, int]) -> str:
    """The split a name belongs to, a fixed function of the name: the first of ``bounds`` (split → cumulative
    percent) above its bucket."""
    bucket = name_bucket(name)
    return next(split for split, bound in bounds.items() if bucket < bound)


def safetensors_ranges(view: memoryview) -> dict[str, tuple[int, int]]:
    """Byte ranges of a safetensors file's parts: ``HEADER`` → (0, start of data), each tensor → its (start, end)
    in the file. ValueError when the header cannot be read or a range falls outside the file."""
    if len(view) < 8:
        raise ValueError("shorter than a safetensors header")
    length = int.from_bytes(view[:8], "little")
    start = 8 + length
    if length <= 0 or start > len(view):
        raise ValueError(f"header length {length} does not fit a file of {len(view):,} bytes")
    header = json.loads(bytes(view[8:start]))
    if not isinstance(header, dict):
        raise ValueError("its header is not a JSON object")
    ranges = {HEADER: (0, start)}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
                and 0 <= offsets[0] <= offsets[1] and start + offsets[1] <= len(view)):
            raise ValueError(f"tensor {name}: data_offsets {offsets!r} fall outside the file")
        ranges[name] = (start + offsets[0], start + offsets[1])
    return ranges


class _Mapped:
    """A file's bytes, memory-mapped read-only (an empty file gives an empty view)."""

    def __init__(self, path: Path):
        self.file = open(path, "rb")
        self.map = mmap.mmap(self.file.fileno(), 0, access=mmap.ACCESS_READ) if path.stat().st_size else None
        self.view = memoryview(self.map) if self.map is not None else memoryview(b"")

    def __enter__(self) -> memoryview:
        return self.view

    def __exit__(self, *exc) -> None:
        self.view.release()
        if self.map is not None:
            self.map.close()
        self.file.close()


def file_digests(path: Path) -> dict:
    """What a manifest records of ``path`` beyond its size: ``{"xxh3": whole file}``, and for a safetensors file
    whose header reads, ``"tensors"``: part name (``HEADER`` or a tensor) → digest."""
    with _Mapped(path) as view:
        entry = {"xxh3": digest(view)}
        if path.suffix == ".safetensors":
            try:
                ranges = safetensors_ranges(view)
            except ValueError:
                return entry  # not ours to parse (the whole-file digest still covers it)
            entry["tensors"] = {name: digest(view[a:b]) for name, (a, b) in ranges.items()}
    return entry


def check_file(path: Path, entry: dict) -> str | None:
    """None when ``path`` holds the bytes ``entry`` (a manifest entry) recorded, else one phrase naming what
    differs: the tensor (or header) of a safetensors file, or the file. Entries without xxh3 digests (older
    manifests) are checked by ``manifests`` with SHA-256."""
    with _Mapped(path) as view:
        tensors = entry.get("tensors")
        if isinstance(tensors, dict) and tensors:
            try:
                ranges = safetensors_ranges(view)
            except ValueError as exc:
                return f"{path.name}: its header differs from what was written ({exc})"
            if set(ranges) != set(tensors):
                changed = sorted(set(ranges) ^ set(tensors))
                return f"{path.name}: its tensors differ from those written ({', '.join(changed[:3])})"
            for name, (a, b) in ranges.items():
                if digest(view[a:b]) != tensors[name]:
                    part = "its header" if name == HEADER else f"tensor {name}"
                    return f"{path.name}: {part} differs from what was written (xxh3 mismatch)"
            return None
        if digest(view) != entry["xxh3"]:
            return f"{path.name} differs from what was written (xxh3 mismatch)"
    return None


def well_formed(entry: dict) -> bool:
    """Whether a manifest entry's digests, where present, have the shape ``file_digests`` writes."""
    xxh3, tensors = entry.get("xxh3"), entry.get("tensors")
    return (xxh3 is None or isinstance(xxh3, str)) and (tensors is None or (
        isinstance(tensors, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in tensors.items())))
