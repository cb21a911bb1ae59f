"""Device, seeding and hardware facts (introduced in 01-Setup)."""
from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib.metadata
import os
import platform
import random
import sys
import time

import numpy as np
import pandas as pd
import torch

from .errors import BadInput, LabError
from .validation import check_seed

DEVICE_TYPES = ("cuda", "mps", "cpu")  # not meta (holds no data) nor the backends the lab never runs on


def get_device(prefer: str | torch.device | None = None) -> torch.device:
    """The best device here: cuda, then mps, then cpu. ``prefer`` forces one (and checks it exists)."""
    if prefer is not None:
        device = _parse_device(prefer)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise LabError(f"device {str(prefer)!r} asked for, but this machine has no CUDA GPU that torch can use "
                           f"(torch {torch.__version__}, CUDA build: {torch.version.cuda})")
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            count = torch.cuda.device_count()
            raise LabError(f"device {str(prefer)!r} asked for, but this machine has {count} CUDA GPU(s); "
                           f"allowed: cuda, cuda:0..cuda:{count - 1}")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise LabError(f"device {str(prefer)!r} asked for, but MPS is not available here")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _parse_device(prefer: str | torch.device) -> torch.device:
    """``prefer`` as a torch.device of a type the lab runs on, else BadInput naming what is allowed."""
    try:
        device = torch.device(prefer)
    except (RuntimeError, TypeError, ValueError):  # torch's own message lists a dozen backends the lab never uses
        device = None
    if device is None or device.type not in DEVICE_TYPES:
        raise BadInput(f"device {str(prefer)!r} is not one the lab can run on; allowed: cuda, cuda:N, mps, cpu")
    return device


def require_cuda(what: str) -> None:
    """Raise a clear error if ``what`` (e.g. a profile) needs CUDA and there is none."""
    if not torch.cuda.is_available():
        raise LabError(f"{what} needs a CUDA GPU, and this machine has none "
                       f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'none, a CPU build'}). "
                       "Run the default profile 'smollm2-135m' here, or move to a machine with an NVIDIA GPU.")


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) so sampling and random init repeat; ``seed`` in [0, 2**63 − 1]."""
    seed = check_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so a wall-clock time covers it (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class SectionTimer:
    """Times ``with timer.section():`` blocks without making the host wait for the GPU inside a loop.

    On CUDA each section records two events on ``device``'s current stream (named explicitly, so a ``cuda:N`` that
    is not the current device is timed on its own stream) and the times are read once, at the end
    (``seconds()``); a host sync per section would leave the GPU idle while Python queues the next kernels. On
    other devices work is synchronous and the wall clock is used.
    """

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self._sections: list = []

    @contextlib.contextmanager
    def section(self):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(torch.cuda.current_stream(self.device))
            yield
            end.record(torch.cuda.current_stream(self.device))
            self._sections.append((start, end))
        else:
            start = time.perf_counter()
            yield
            self._sections.append(time.perf_counter() - start)

    def seconds(self) -> list[float]:
        """Each section's duration in seconds, in order (waits for the GPU once)."""
        if self.cuda and self._sections:
            self._sections[-1][1].synchronize()
            return [start.elapsed_time(end) / 1e3 for start, end in self._sections]
        return list(self._sections)


def cuda_capability(device: torch.device | None = None) -> tuple[int, int] | None:
    """(major, minor) compute capability of the CUDA device, or None without CUDA."""
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability(device)


def device_summary(device: torch.device) -> dict[str, str]:
    """Facts about the machine and device, for 01-Setup's table."""
    info = {
        "device": str(device),
        "platform": platform.platform(terse=True),
        "cpu": cpu_name(),
        "cpu capability (kernels)": torch.backends.cpu.get_cpu_capability(),
        "cpu cores (torch threads)": f"{os.cpu_count()} ({torch.get_num_threads()})",
        "ram total": _fmt_bytes(_ram_total()),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = props.name
        info["gpu memory"] = _fmt_bytes(props.total_memory)
        info["compute capability"] = f"{props.major}.{props.minor}"
    return info


# Environment variables that change which float kernels torch and MKL run (docs/testing.md "Portability")
KERNEL_SETTINGS = ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "OMP_NUM_THREADS")


def cpu_name() -> str:
    """The CPU's model name ("AMD EPYC", "Intel(R) Xeon(R) …"), from /proc/cpuinfo where there is one."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.split(":")[0].strip() in ("model name", "Model", "Hardware"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def kernel_summary() -> dict[str, str | int]:
    """What decides the last bits of the lab's CPU arithmetic on this machine: the CPU, the kernel set torch
    chose for it (``ATEN_CPU_CAPABILITY`` overrides), torch's threads, and any setting of ``KERNEL_SETTINGS``.
    Recorded with every results file, so a reference run says where it came from."""
    summary = {"cpu": cpu_name(), "cpu capability": torch.backends.cpu.get_cpu_capability(),
               "torch threads": torch.get_num_threads(), "torch": torch.__version__}
    summary.update({name: os.environ[name] for name in KERNEL_SETTINGS if name in os.environ})
    return summary


def _ram_total() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not available on every OS
        return None


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "unknown"
    return f"{n / 2**30:.1f} GiB"


LAB_PACKAGES = ("torch", "transformers", "datasets", "accelerate", "lm-eval", "nbval", "gguf", "pandas")


def versions(packages: tuple[str, ...] = ("torch", "transformers")) -> dict[str, str]:
    """Python and package versions (``"not installed"`` where missing); stored in every report."""
    found = {"python": platform.python_version()}
    for name in packages:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def versions_table() -> pd.DataFrame:
    """01-Setup's table of the versions that decide the lab's numbers."""
    return pd.DataFrame({"version": versions(LAB_PACKAGES)}).rename_axis("package")


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far: anonymous memory and the file pages it mapped.

    On Linux, ``VmHWM`` of /proc/self/status. Not ``getrusage``'s ``ru_maxrss``: Linux carries that over ``exec``
    from the process that forked it, so a command started by a large process (the test suite, a notebook kernel)
    would report its parent's peak."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource  # POSIX only; imported here so that the lab still imports on Windows

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS counts bytes, Linux KiB


@functools.cache
def _libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # glibc only
        return libc
    except (OSError, AttributeError):
        return None


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def map_large_allocations(threshold: int = 1 << 20) -> None:
    """From now on, let glibc serve every allocation of ``threshold`` bytes or more with its own memory map, given
    back to the operating system when freed (elsewhere than glibc: nothing).

    By default glibc raises that threshold (up to 32 MB) each time a large block is freed, and later blocks of a
    few MB then come from its heap, where freed memory stays. A loop that reads, prunes and drops one layer after
    another then grows by about a layer each time: measured on the 1.6 GB test model streamed from disk, 2.9 GiB
    peak instead of 0.7. Mapping costs a page fault per page on first use (the streamed pruning took about 20 %
    longer on the CPU), so only disk streaming asks for it."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, threshold)


def give_back_freed_memory() -> None:
    """Return the C heap's free pages to the operating system (glibc's ``malloc_trim``; elsewhere nothing): what
    smaller freed blocks left in the heap after a layer is dropped."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
