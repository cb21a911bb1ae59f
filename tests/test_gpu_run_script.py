"""``benchmarks/gpu_run.sh`` (G1 item 11): every step under its own timeout, a failing step does not stop the next
one, logs and a one-line-per-step summary land in the folder given. The steps run with a stand-in for Python, so
this checks the script, not the GPU work; a step running out of its limit was seen on the H200 (the summary said
"TIMED OUT or aborted (rc 124)" after faulthandler's stacks: benchmarks/results/2026-11-30-h200-run1.log)."""
import copy
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_tiny

import labutils as lu

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
    table = prefill.prefill_speedup_table(dense, sparse, (8, 16), warmup=0, repeats=1, graphs=False,
                                          decode_tokens=0, progress=False, on_row=seen.append)
    assert [(r["phase"], r["tokens"]) for r in seen] == [("prefill", 8), ("prefill", 16)] == list(table.index)
    assert all(r["eager × dense"] > 0 for r in seen)
