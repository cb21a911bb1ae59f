"""``benchmarks/gpu_run.sh`` (G1 item 11): every step under its own timeout, a failing step does not stop the next
one, logs and a one-line-per-step summary land in the folder given. The steps run with a stand-in for Python, so
this checks the script, not the GPU work; a step running out of its limit was seen on the H200 (the summary said
"TIMED OUT or aborted (rc 124)" after faulthandler's stacks: benchmarks/results/2026-11-30-h200-run1.log)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("python, verdict", [("false", "FAILED (rc 1)"), ("true", "ok")])
def test_each_step_is_run_and_summarised_whatever_the_last_did(tmp_path, python, verdict):
    """The script's own mechanics, with a stand-in for Python that fails (or succeeds) at once: every step asked
    for runs, in order, under its limit, and the summary printed last says how each ended."""
    out = tmp_path / "results"
    env = {**os.environ, "GPU_STEPS": "env linears prefill", "PYTHON": python}
    run = subprocess.run(["bash", "benchmarks/gpu_run.sh", str(out)], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    summary = (out / "summary.txt").read_text().splitlines()
    assert [line.split()[0] for line in summary] == ["env", "linears", "prefill"]
    assert all(verdict in line for line in summary)
    assert run.stdout.splitlines()[-3:] == summary  # the summary is what the run prints last
    log = (out / "run.log").read_text()
    assert all(f"=== {step} (limit {limit} s)" in log for step, limit in (("env", 30), ("linears", 50),
                                                                           ("prefill", 150)))
    assert "=== prune" not in log and not (out / "tests.log").exists()  # steps not asked for do not run


def test_results_folder_is_required():
    run = subprocess.run(["bash", "benchmarks/gpu_run.sh"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode != 0 and "usage: benchmarks/gpu_run.sh RESULTS_DIR" in run.stderr


@pytest.mark.skipif(sys.platform != "linux", reason="the script is bash with GNU timeout")
def test_the_script_parses():
    assert subprocess.run(["bash", "-n", "benchmarks/gpu_run.sh"], cwd=ROOT).returncode == 0
