"""Data-parallel calibration on torch.distributed (issue K, item 2): 2 processes on gloo, launched by torchrun, give
the single process's masks (and SparseGPT's updated weights) bit for bit; rank 0 alone writes; a rank that dies
stops the other with a clear message and nothing is published."""
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import dp_worker
import pytest
import torch

import labutils as lu
from labutils.prune.parallel import DataParallel, launched_ranks

HERE = Path(__file__).parent
SMALL = ["--nsamples", "6", "--seqlen", "16", "--eval-tokens", "512", "--eval-seqlen", "32", "--batch-size", "2"]


@contextlib.contextmanager
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def torchrun(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{HERE}{os.pathsep}{HERE.parent}"}  # this checkout
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(HERE / "dp_worker.py"), *args], capture_output=True, text=True, timeout=timeout,
                          env=env)


@pytest.mark.slow
def test_two_ranks_give_one_process_masks(tmp_path, sharded_tiny):
    """Wanda, SparseGPT (50 % and 2:4) and OWL through the API, then the CLI streaming from disk, on 2 ranks."""
    out = tmp_path / "dp"
    run = torchrun("api", str(tmp_path), "--", "prune", "--data-parallel", "--stream-from-disk", "--model",
                   str(sharded_tiny), "--method", "sparsegpt", "--out", str(out), *SMALL)
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    with one_thread():  # as each rank computes (torchrun sets OMP_NUM_THREADS=1): the same kernels, the same bits
        singles = {name: dp_worker.prune_case(name) for name in dp_worker.CASES}
        one = lu.run_prune_job(lu.PruneJob(lu.PruneSpec("sparsegpt", 0.5), model_path=str(sharded_tiny),
                                           out=str(tmp_path / "one"), nsamples=6, seqlen=16, eval_tokens=512,
                                           eval_seqlen=32, batch_size=2), progress=False)
    for name, single in singles.items():
        assert ranks[0][name] == ranks[1][name] == single, name

    assert run.stdout.count("mask sha256") == 1  # rank 0 prints, rank 1 is silent
    report = lu.load_report(out)
    assert report["data_parallel"] == 2 and report["stream_from_disk"]
    assert report["mask_sha256"] == one["mask_sha256"] and report["perplexity"] == one["perplexity"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dp", "one", "rank0.json", "rank1.json"]


@pytest.mark.slow
def test_a_dying_rank_stops_the_other(tmp_path, sharded_tiny):
    out = tmp_path / "out"
    start = time.monotonic()
    run = torchrun("fail", str(tmp_path), "--", "prune", "--data-parallel", "--stream-from-disk", "--model",
                   str(sharded_tiny), "--out", str(out), *SMALL, timeout=120)
    assert run.returncode != 0 and time.monotonic() - start < 90
    assert "rank 0: " in run.stderr and ("another rank failed" in run.stderr or "another one failed" in run.stderr), \
        run.stderr[-3000:]
    assert "nothing was published" in run.stderr and not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no half-written folder left


@pytest.mark.slow
def test_fewer_batches_than_ranks_is_one_line_on_each_rank(tmp_path, tiny_with_tokenizer):
    """--low-memory with 2 processes and one calibration batch: rank 1 would own none (an IndexError once)."""
    out = tmp_path / "out"
    run = torchrun("cli", str(tmp_path), "--", "prune", "--data-parallel", "--low-memory", "--model",
                   str(tiny_with_tokenizer), "--out", str(out), "--nsamples", "2", "--seqlen", "16",
                   "--eval-tokens", "512", "--eval-seqlen", "32", "--batch-size", "2", timeout=120)
    assert run.returncode != 0 and "]: Traceback" not in run.stderr, run.stderr[-3000:]  # no rank's traceback
    lines = [line for line in run.stderr.splitlines() if "error: " in line]
    assert len(lines) == 2 and all("needs at least 2 calibration batches" in line for line in lines), run.stderr
    assert not out.exists()


def test_data_parallel_needs_torchrun(tmp_path, monkeypatch, sharded_tiny):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    job = lu.PruneJob(model_path=str(sharded_tiny), out=str(tmp_path / "x"), data_parallel=True, nsamples=6,
                      seqlen=16, eval_tokens=512, eval_seqlen=32, batch_size=2)
    with pytest.raises(lu.BadInput, match="--data-parallel needs several processes.*launch with torchrun"):
        lu.run_prune_job(job, progress=False)
    assert not (tmp_path / "x").exists()
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(lu.BadInput, match="WORLD_SIZE='two' is not a process count"):
        launched_ranks()


def test_batches_go_round_robin():
    ranks = [DataParallel(r, 3) for r in range(3)]
    assert [[b for b in range(7) if p.owns(b)] for p in ranks] == [[0, 3, 6], [1, 4], [2, 5]]
    assert [p.leader for p in ranks] == [True, False, False] and ranks[1].owner(7) == 1
