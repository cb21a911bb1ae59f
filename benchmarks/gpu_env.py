"""The GPU run's first line: what this machine is and what the run will use (``benchmarks/gpu_run.sh``, step env).

Prints nvidia-smi's table, then ONE line: the GPU, torch and its CUDA, transformers against the version the lab
pins (and where it was imported from: the carried wheels or the machine), the 2:4 backend and whether its check
passes, and that cuSPARSELt's search is refused in this run. Exit status 1 when the run cannot measure what it is
for (no CUDA GPU, or a transformers other than the pinned one), 0 otherwise. Runs anywhere: on a CPU it says so.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def pinned_version(package: str, requirements: Path = ROOT / "requirements.txt") -> str | None:
    """The version ``requirements.txt`` pins for ``package`` (``name==version``), or None."""
    for line in requirements.read_text().splitlines():
        match = re.fullmatch(rf"\s*{re.escape(package)}\s*==\s*([^\s;#]+).*", line, flags=re.IGNORECASE)
        if match:
            return match.group(1)
    return None


def environment_line() -> tuple[str, bool]:
    """(the line, whether the run can measure here)."""
    import torch
    import transformers

    from labutils.sparse24.convert import backend_name, kernel_problem
    from labutils.sparse24.kernel import search_problem

    wanted = pinned_version("transformers")
    origin = "carried wheel" if ".gpu-wheels" in transformers.__file__ or "wanda-lab-site" in transformers.__file__ \
        else "this machine's"
    same = transformers.__version__ == wanted
    parts = []
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        parts.append(f"{props.name}, {props.total_memory / 2**30:.1f} GiB, compute capability {props.major}."
                     f"{props.minor}")
    else:
        parts.append("no CUDA GPU")
    parts.append(f"torch {torch.__version__} (CUDA {torch.version.cuda})")
    parts.append(f"transformers {transformers.__version__} ({origin}; the lab pins {wanted}"
                 + ("" if same else ": MISMATCH, carry the pinned wheel: make gpu-wheels") + ")")
    problem = kernel_problem() if torch.cuda.is_available() else "no CUDA GPU"
    parts.append(f"2:4: {backend_name()}, its check passed" if problem is None else f"2:4 kernels: none ({problem})")
    parts.append("search refused" if search_problem() else "search ALLOWED")
    return "env: " + " · ".join(parts), torch.cuda.is_available() and same


def main() -> int:
    try:
        print(subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,clocks.sm,clocks.mem,driver_version",
                              "--format=csv"], capture_output=True, text=True, timeout=20).stdout, flush=True)
    except (OSError, subprocess.SubprocessError) as exc:
        print(f"nvidia-smi: {exc}", flush=True)
    line, ok = environment_line()
    print(line, flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
