"""One run per output folder, and what killed runs left behind (introduced in 02-Prune, where the pruned model
is saved; ``publish`` builds on it).

- a lock file beside the folder (``.NAME.lab-lock``, ``flock``, keyed by the folder's real path) stops a second
  run writing the same folder at once, whatever its cache folder or spelling of the path;
- what a killed run leaves behind (``.NAME.tmp-PID-…``, ``.NAME.old-PID``) is cleaned by the next run into
  the same parent once no run holds it: a live run keeps an ``flock`` on its temporary folder, which a run in
  another PID namespace (a container sharing the volume) sees too; a folder found missing with its old copy aside
  is restored.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import sys
import threading
import time
from pathlib import Path

from .errors import BadInput, LabError
from .manifests import remove_lab_folder


def resolve_target(path: str | os.PathLike) -> Path:
    """The folder a path names: ``~`` expanded, a symlink followed to its target (which is written in place,
    the link kept). A dangling link is refused."""
    path = Path(path).expanduser()
    if path.is_symlink():
        target = path.resolve()
        if not target.exists() and not target.parent.is_dir():
            raise BadInput(f"output {str(path)!r} is a symlink to {str(target)!r}, whose folder does not exist")
        return target
    return path


# ------------------------------------------------------------------------------------------------ locking

_HELD: dict[str, list] = {}  # folder → [(fd, lock file), depth]: this process's locks, re-entrant
_HELD_GUARD = threading.Lock()


LOCK_SUFFIX = ".lab-lock"


def _lock_path(path: Path) -> Path:
    """The lock file of an output folder: ``.NAME.lab-lock`` beside it, so that every run writing that real path
    meets the same lock, whatever its cache folder (``LAB_CACHE_DIR``) or the spelling of the path."""
    real = Path(os.path.realpath(path))
    return real.parent / f".{real.name}{LOCK_SUFFIX}"


@contextlib.contextmanager
def output_lock(path: str | os.PathLike):
    """Hold the lock of the folder ``path`` exclusively for the block; another process asking for it is refused
    at once with the holder's PID. Re-entrant within one process."""
    path = Path(os.path.abspath(resolve_target(path)))
    key = str(path)
    with _HELD_GUARD:
        depth = _HELD.setdefault(key, [None, 0])
        depth[1] += 1
        first = depth[1] == 1
    try:
        if first:
            try:
                depth[0] = _acquire(path)
            except BaseException:
                with _HELD_GUARD:
                    del _HELD[key]
                raise
        yield path
    finally:
        with _HELD_GUARD:
            if key in _HELD:
                depth[1] -= 1
                if depth[1] == 0:
                    del _HELD[key]
                    _release(depth[0], path)


def _acquire(path: Path):
    """Open, lock and stamp the lock file; (fd, lock path), or None where ``flock`` does not exist (Windows:
    publishing is still atomic, concurrent runs are not detected)."""
    if importlib.util.find_spec("fcntl") is None:
        return None
    lock = _lock_path(path)
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        _sweep_locks(lock.parent)
        return _lock_file(lock, path)
    except OSError as exc:
        raise LabError(f"cannot create the lock file {lock} for {str(path)!r} ({exc.strerror or exc}); choose an "
                       "output in a folder you can write") from None


def _sweep_locks(folder: Path) -> None:
    """Remove lock files no process holds (left by killed runs), with the same protocol as a release."""
    import fcntl

    for lock in folder.glob(f".*{LOCK_SUFFIX}"):
        with contextlib.suppress(OSError):
            fd = os.open(lock, os.O_RDWR)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                    lock.unlink()
            finally:
                os.close(fd)


def _lock_file(lock: Path, path: Path):
    import fcntl

    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise LabError(f"another run (pid {holder}) is writing {str(path)!r}; wait for it to finish or choose "
                           "another --out") from None
        # The previous holder removes the file when it is done: make sure we locked the file that is there now.
        try:
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd, lock
        os.close(fd)


def _release(held, path: Path) -> None:
    if held is None:
        return
    fd, lock = held
    with contextlib.suppress(OSError):
        lock.unlink()  # while still holding it, so no one can lock this file after we leave
    os.close(fd)


# ---------------------------------------------------------------------------------- leftovers of dead runs

_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<what>tmp|old)-(?P<pid>\d+)(-.*)?$")


LEFTOVER_GRACE = 10.0  # seconds: a temporary folder this young may belong to a run about to lock it


def _alive(pid: int) -> bool:
    """Whether process ``pid`` may still run (unknown counts as alive): the test where ``flock`` is missing."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):  # someone else's process, or no pid we could have made
        return True
    return True


def hold_folder(folder: Path):
    """Lock ``folder`` (shared ``flock`` on the folder itself) for as long as the returned descriptor is open: how
    a run says that its temporary folder is alive. None where ``flock`` does not exist."""
    if importlib.util.find_spec("fcntl") is None:
        return None
    import fcntl

    fd = os.open(folder, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def _in_use(entry: Path, pid: int) -> bool:
    """Whether a run may still own the leftover ``entry``: it holds the folder's lock (``hold_folder``), whatever
    PID namespace it runs in (a container sharing the volume); or process ``pid`` runs here (an older lab that
    held no such lock); or the folder is younger than ``LEFTOVER_GRACE`` (its run is about to lock it)."""
    if _alive(pid):
        return True
    if importlib.util.find_spec("fcntl") is None:
        return False
    import fcntl

    try:
        if time.time() - entry.lstat().st_mtime < LEFTOVER_GRACE:
            return True
        fd = os.open(entry, os.O_RDONLY)
    except OSError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # releases the probe's lock


def sweep_leftovers(parent: Path, log=None) -> list[str]:
    """Clean what killed runs left in ``parent``: a folder whose old copy (``.NAME.old-PID``) is all that is left
    is restored (under that folder's lock; if it cannot be, the copy is left alone); other temporary folders of
    dead PIDs are removed, except files the lab did not write. Returns one line per action (also printed to
    stderr, or passed to ``log``)."""
    lines = []
    for match, entry in _dead_leftovers(parent):
        target = parent / match["name"]
        with contextlib.suppress(OSError):
            if match["what"] == "old" and not target.exists():
                if _restore(entry, target):
                    lines.append(f"restored {target} from {entry.name}, left aside by a run that died while "
                                 f"replacing it (pid {match['pid']})")
                continue  # never delete the only copy
            if entry.exists():
                remove_lab_folder(entry, keep_as=parent / f"{match['name']}.unlisted-{match['pid']}")
                lines.append(f"removed {entry}, left by a run that died (pid {match['pid']})")
    for line in lines:
        (log or (lambda text: print(text, file=sys.stderr)))(line)
    return lines


def _dead_leftovers(parent: Path) -> list:
    """(name match, path) of the leftovers of dead runs in ``parent``, newest first."""
    found = []
    with contextlib.suppress(OSError):
        for entry in parent.iterdir():
            match = _LEFTOVER.match(entry.name)
            with contextlib.suppress(OSError):
                if match and entry.is_dir() and not entry.is_symlink() and not _in_use(entry, int(match["pid"])):
                    found.append((entry.stat().st_mtime, match, entry))
                elif match and match["what"] == "tmp" and entry.is_file() and not entry.is_symlink():
                    entry.unlink()  # a file swapped out of a cache path (see atomic_folder): never a live run's
    return [(match, entry) for _, match, entry in sorted(found, key=lambda t: -t[0])]


def _restore(old: Path, target: Path) -> bool:
    try:
        with output_lock(target):
            if target.exists():
                return False
            old.rename(target)
            return True
    except (OSError, LabError):
        return False
