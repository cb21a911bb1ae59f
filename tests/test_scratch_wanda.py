"""02-Prune's from-scratch Wanda loop gives lu.prune_model's masks on every CPU capability and thread count.

Both do the same float32 operations in the same order, and both break equal scores the same way (the lower column
is pruned first; a ``topk`` breaks them as its kernel happens to, which differed between AVX-512 and AVX2 on the
default model). The model of ``scratch_wanda_worker`` ties at hundreds of thresholds, so a selection that breaks
ties differently from the library fails here.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
# None: the machine's own (the best this CPU and torch build offer)
CAPABILITIES = (None, "avx2", "default")


def run_worker(capability: str | None) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    if capability is not None:
        env["ATEN_CPU_CAPABILITY"] = capability
    done = subprocess.run([sys.executable, str(HERE / "scratch_wanda_worker.py"), "1", "2"], cwd=HERE, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines()]


@pytest.mark.slow  # a notebook cell in subprocesses under three CPU kernel sets
@pytest.mark.parametrize("capability", CAPABILITIES, ids=lambda c: c or "native")
def test_scratch_loop_equals_the_library_on_every_capability_and_thread_count(capability):
    rows = run_worker(capability)
    assert [row["threads"] for row in rows] == [1, 2]
    for row in rows:
        assert row["ties"] > 100, row  # the model really ties at thresholds: the test can tell tie rules apart
        assert row["scratch"] == row["library"], row
    if capability == "default":
        assert rows[0]["capability"] == "DEFAULT", rows[0]  # the variable was read: a different kernel set ran
