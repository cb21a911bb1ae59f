"""One line for a GPU run's JSON record, complete or cut short: ``python benchmarks/gpu_summary.py FILE``.

``benchmarks/gpu_run.sh`` calls it when a step ended early (its time limit, a crash), so that the step's summary
still says what was measured; it reads only the file (no GPU). bench-prune records and 2:4 prefill records
(``gpu_semistructured.py``) are understood.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def summary(path: Path) -> str:
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return f"nothing saved ({path.name} was not written)"
    except (OSError, ValueError) as exc:
        return f"{path.name} unreadable: {exc}"
    if record.get("benchmark") == "bench-prune":
        from labutils.jobs.bench_prune import summary_line
    else:
        sys.path.insert(0, str(ROOT))
        from benchmarks.gpu_semistructured import summary_line
    return summary_line(record)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python benchmarks/gpu_summary.py RECORD.json")
    print(summary(Path(sys.argv[1])))
