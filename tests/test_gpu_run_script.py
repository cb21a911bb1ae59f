"""``benchmarks/gpu_run.sh`` (G1 item 11, G3): every step under its own timeout within one budget, a failing step
does not stop the next one, logs, JSON saved row by row and a one-line-per-step summary land in the folder given.
The dry run uses a stand-in for Python, so it checks the script, not the GPU work; a step running out of its limit
was seen on the H200 (benchmarks/results/2026-11-30-h200-run1.log). Then the Python steps' own mechanics."""
import copy
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from conftest import make_tiny

import labutils as lu

ROOT = Path(__file__).resolve().parents[1]


STEPS = ["env", "prune-default", "prefill-lab", "prefill-fused", "prune-low-memory", "tests"]
LIMITS = {"env": 30, "prune-default": 170, "prefill-lab": 100, "prefill-fused": 100, "prune-low-memory": 120}
BUDGET = 580  # the script's default GPU_RUN_BUDGET: within the device tool's 600 s per call

STAND_IN = r"""#!/usr/bin/env bash
# python3, as benchmarks/gpu_run.sh calls it: every call is logged with what the process would see.
echo "$* | core $(ulimit -c) | search ${LAB_NO_CUSPARSELT_SEARCH:-unset} | path ${PYTHONPATH%%:*}" >>"$CALLS"
case "$*" in
  "-m pip "*|*gpu_summary.py*) exec "$REAL_PYTHON" "$@" ;;
  *gpu_env.py*) echo "nvidia-smi table"; echo "env: stand-in GPU · transformers $(cd "${PYTHONPATH%%:*}" && ls -d labprobe)" ;;
  *"--modes default"*)  # step (a): saves the floor and one row, then hangs past its limit
    json=${@: -1}
    "$REAL_PYTHON" -c "import json, sys; json.dump({'benchmark': 'bench-prune', 'setup': {'nsamples': 128,
      'seqlen': 4096}, 'floor': {'seconds': 36.0}, 'rows': [{'mode': 'default', 'target': '50%', '× floor': 1.03,
      'mask sha256': 'ab'}], 'complete': False}, open(sys.argv[1], 'w'))" "$json"
    exec sleep 60 ;;
  *gpu_semistructured.py*) echo "2:4 prefill · stand-in · complete" ;;
  *"--modes low-memory"*) echo "bench-prune stand-in low-memory · complete" ;;
  *pytest*) echo "3 passed in 1.00s" ;;
  *) exit 3 ;;
esac
"""


def fake_wheel(folder: Path) -> Path:
    """A real (tiny) wheel standing for the carried transformers: pip installs it with --no-index."""
    import zipfile

    folder.mkdir()
    wheel = folder / "labprobe-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("labprobe/__init__.py", "VERSION = '1.0'\n")
        zf.writestr("labprobe-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: labprobe\nVersion: 1.0\n")
        zf.writestr("labprobe-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                                     "Tag: py3-none-any\n")
        zf.writestr("labprobe-1.0.dist-info/RECORD", "")
    return folder


@pytest.mark.slow  # the whole script end to end
@pytest.mark.skipif(sys.platform != "linux", reason="the script is bash with GNU timeout")
def test_dry_run_of_the_gpu_run(tmp_path):
    """The whole script on the CPU, with a stand-in for python3 (G3): the steps in the issue's order, each under its
    limit within the budget; the environment line first and one summary line per step, the last lines printed;
    no core dumps; the search refused in every process; the carried wheel installed ahead of the machine's
    packages; step (a) hanging past its limit is cut, its summary read from the rows it had saved, and step (b)
    compares with that file."""
    stand_in = tmp_path / "python3"
    stand_in.write_text(STAND_IN)
    stand_in.chmod(0o755)
    out, calls = tmp_path / "results", tmp_path / "calls.log"
    env = {**os.environ, "PYTHON": str(stand_in), "REAL_PYTHON": sys.executable, "CALLS": str(calls),
           "GPU_WHEELS": str(fake_wheel(tmp_path / "wheels")), "GPU_STEP_LIMIT": "6", "TMPDIR": str(tmp_path)}
    env.pop("LAB_NO_CUSPARSELT_SEARCH", None)
    # Core dumps allowed as far as this machine lets a process raise its limit: the script must set 0 itself.
    command = 'ulimit -S -c "$(ulimit -H -c)"; exec bash benchmarks/gpu_run.sh "$0"'
    run = subprocess.run(["bash", "-c", command, str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    printed = run.stdout.splitlines()
    assert printed == (out / "summary.txt").read_text().splitlines()
    assert [line.split()[0] for line in printed] == STEPS
    assert printed[0].split("  ")[-1] == "env: stand-in GPU · transformers labprobe"
    assert "TIMED OUT or aborted (rc 124)" in printed[1]
    assert printed[1].endswith("bench-prune 128×4096: floor 36.00 s · default 50% 1.03× floor (met ≤ 1.05) · "
                               "CUT SHORT after 1 row(s)")
    assert all(" ok " in line for line in printed[2:])
    assert printed[-1].endswith("3 passed in 1.00s")
    logged = calls.read_text().splitlines()
    site = str(tmp_path / "wanda-lab-site")
    work = [line for line in logged if "-m pip" not in line]
    assert all(line.endswith(f"| core 0 | search 1 | path {site}") for line in work), work
    low = next(line for line in work if "--modes low-memory" in line)
    assert f"--baseline {out / 'bench-prune-default.json'}" in low
    for name in STEPS:
        limit = min(LIMITS.get(name, 600), 6)
        assert f"=== {name} (limit {limit} s)" in (out / f"{name}.log").read_text()
    assert sum(LIMITS.values()) + 60 <= BUDGET  # the tests keep a minute even when every step uses all its time


def test_steps_left_without_time_are_skipped_and_said_so(tmp_path):
    out = tmp_path / "results"
    env = {**os.environ, "PYTHON": "true", "GPU_RUN_BUDGET": "3", "GPU_STEPS": "env tests", "GPU_WHEELS": "/none"}
    run = subprocess.run(["bash", "benchmarks/gpu_run.sh", str(out)], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=60)
    assert [line.split()[:3] for line in run.stdout.splitlines()] == [["env", "SKIPPED:", "budget"],
                                                                     ["tests", "SKIPPED:", "budget"]]


def test_the_budgets_written_in_the_script_are_the_ones_tested():
    script = (ROOT / "benchmarks/gpu_run.sh").read_text()
    assert "${GPU_RUN_BUDGET:-580}" in script and "ulimit -c 0" in script
    for name, limit in LIMITS.items():
        assert f"step {name} {limit} " in script or (name.startswith("prefill") and f'}}" {limit} ' in script)


def test_results_folder_is_required():
    run = subprocess.run(["bash", "benchmarks/gpu_run.sh"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode != 0 and "usage: benchmarks/gpu_run.sh RESULTS_DIR" in run.stderr


@pytest.mark.skipif(sys.platform != "linux", reason="the script is bash with GNU timeout")
def test_the_script_parses():
    assert subprocess.run(["bash", "-n", "benchmarks/gpu_run.sh"], cwd=ROOT).returncode == 0


# ---- the Python steps: rows saved as they come, one failing part not costing the others --------------------------

def semistructured():
    return importlib.import_module("benchmarks.gpu_semistructured")


def sticky_cuda_error(monkeypatch):
    """From now on every CUDA call fails, as after the illegal instruction seen on the H200."""
    def fail(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal instruction was encountered")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", fail)
    monkeypatch.setattr(torch.cuda, "empty_cache", fail)


@pytest.mark.parametrize("sticky", [False, True])
def test_a_failed_kernel_costs_only_what_it_must(tmp_path, monkeypatch, capsys, sticky):
    """G3 item 3: after a part fails, the handler frees GPU memory without raising again. A plain failure leaves
    the next kernel its numbers; after a sticky CUDA error the next kernel is not run (it could not be) and says
    why. Either way the record holds what the failed part had saved, and the summary is the last line."""
    gs = semistructured()
    monkeypatch.setattr(gs, "semi_structured_ready", lambda model: (True, "emulated"))

    def run_sparse(dense, args, step, kernel, section, save):
        section["conversion"] = {"kernel": kernel}
        save()
        if kernel == "lab":
            if sticky:
                sticky_cuda_error(monkeypatch)
            raise RuntimeError("CUDA error: an illegal instruction was encountered")
        section["speed"] = [{"phase": "prefill", "tokens": 4096, "graphed × dense": 1.25, "eager × dense": 0.9}]
        save()

    monkeypatch.setattr(gs, "run_sparse", run_sparse)
    out = tmp_path / "prefill.json"
    assert gs.main(["--tiny", "--parts", "model", "--kernels", "lab", "lab-fused", "--out", str(out)]) == 1
    record = json.loads(out.read_text())
    assert record["complete"] is True and record["lab"]["conversion"] == {"kernel": "lab"}
    assert "illegal instruction" in record["lab"]["error"]
    last = capsys.readouterr().out.splitlines()[-1]
    if sticky:
        assert record["lab-fused"]["error"].startswith("not run: the CUDA context broke earlier (RuntimeError: CUDA")
        assert "lab-fused: no prefill timed (not run: the CUDA context broke earlier" in last
    else:
        assert "error" not in record["lab-fused"]
        assert "lab-fused: 4096 tokens graphed 1.25× dense (met ≥ 1.2), eager 0.90×" in last


def test_release_gpu_memory_reports_a_broken_context_instead_of_raising(monkeypatch):
    gs = semistructured()
    assert gs.release_gpu_memory() is None  # no CUDA here: nothing to free
    sticky_cuda_error(monkeypatch)
    assert gs.release_gpu_memory() == "RuntimeError: CUDA error: an illegal instruction was encountered"


def test_prefill_summary_of_a_run_cut_short():
    gs = semistructured()
    record = {"semi_structured_ready": True, "lab": {"conversion": {}, "first calls": [{"first call s": 40.0}]}}
    assert gs.summary_line(record) == "2:4 prefill · lab: no prefill timed · CUT SHORT"
    record["lab"]["speed"] = [{"phase": "prefill", "tokens": 4096, "graphed × dense": 1.1, "eager × dense": 0.7}]
    record["lab"]["verify"] = {"passed": False}
    assert gs.summary_line(record) == ("2:4 prefill · lab: 4096 tokens graphed 1.10× dense (NOT met ≥ 1.2), eager "
                                       "0.70× (LOGITS CHECK FAILED) · CUT SHORT")


def test_prefill_rows_and_first_calls_are_handed_over_as_measured(monkeypatch):
    """``prefill_speedup_table`` and ``first_calls`` give each row to ``on_row`` at once (the benchmark saves it);
    here on the CPU with cuSPARSELt emulated and eager timing only. The table's last step asks CUDA for the GPU's
    name; the rows were handed over before that."""
    from test_sparse24 import prune_2_4, use_emulated_kernels

    from labutils.sparse24 import prefill

    use_emulated_kernels(monkeypatch)
    monkeypatch.setattr(prefill, "kernel_problem", lambda device=None: None)
    dense = prune_2_4(make_tiny()).half()
    sparse = copy.deepcopy(dense)
    lu.to_semi_structured(sparse, fuse=True)
    warmed = []
    rows = prefill.first_calls(sparse, [8, 16], on_row=warmed.append)
    assert rows == warmed and [(r["shape (out, in)"], r["tokens"]) for r in rows] == [
        ("128×64", 8), ("128×64", 16), ("64×64", 8), ("64×64", 16), ("256×64", 8), ("256×64", 16),
        ("64×128", 8), ("64×128", 16)]  # q/k/v stacked (GQA: 64 + 32 + 32), o, gate/up stacked, down: once each
    assert all(r["first call s"] > 0 and r["next call ms"] > 0 for r in rows)
    seen = []
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "emulated")
    timing = prefill.PrefillSettings(warmup=0, repeats=1, graphs=False, decode_tokens=0)
    table = prefill.prefill_speedup_table(dense, sparse, (8, 16), timing, progress=False, on_row=seen.append)
    assert [(r["phase"], r["tokens"]) for r in seen] == [("prefill", 8), ("prefill", 16)] == list(table.index)
    assert all(r["eager × dense"] > 0 for r in seen)


def test_the_environment_line_names_what_the_run_will_use():
    env = importlib.import_module("benchmarks.gpu_env")
    assert env.pinned_version("transformers") == "5.23.0" == transformers.__version__
    line, ok = env.environment_line()
    assert line.startswith("env: ") and "transformers 5.23.0 (this machine's; the lab pins 5.23.0)" in line
    if not torch.cuda.is_available():
        assert not ok and "no CUDA GPU" in line and "2:4 kernels: none" in line
