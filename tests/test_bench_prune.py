"""The bench-prune benchmark (jobs/bench_prune.py): the forward floor, the modes it times, its saved rows and its bad
input, on the CPU."""
import json

import pytest
import torch

import labutils as lu
from labutils.cli import main
from labutils.jobs import bench_prune as bench
from labutils.jobs.bench_prune import bench_prune, bench_setup, forward_floor
from labutils.jobs.bench_prune import summary_line as bench_summary
from labutils.prune import driver, sparsity
from labutils.prune.offload import PinnedPool

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: streams, pinned memory")


def test_forward_floor_runs_each_layer_twice_but_the_last(tiny_model, calib_tokens):
    calls = []
    for i, layer in enumerate(lu.find_decoder_layers(tiny_model)):
        layer.register_forward_hook(lambda m, a, o, i=i: calls.append(i))
    forward_floor(tiny_model, calib_tokens, 3)
    assert calls == [0] * 4 + [1] * 2  # 2 batches: layer 0 twice, the last layer once


@pytest.mark.slow  # a whole CLI run
def test_bench_prune_tiny_measures_floor_modes_and_masks(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench-prune", "--tiny", "--device", "cpu", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "floor: 2 passes / layer" in printed and f"wrote {out} (after every row)" in printed
    record = json.loads(out.read_text())
    assert record["complete"] is True and printed.splitlines()[-1] == bench_summary(record)
    assert printed.splitlines()[-1].startswith("bench-prune 8×64: floor ") and "low-memory 2:4 " in printed
    assert record["setup"]["layers"] == 4 and record["setup"]["nsamples"] == 8
    rows = record["rows"]
    assert [(r["mode"], r["target"]) for r in rows] == [("default", "50%"), ("default", "2:4"),
                                                       ("low-memory", "50%"), ("low-memory", "2:4")]
    floor = record["floor"]["seconds"]
    assert floor > 0 and record["floor"]["peak_gib"] is None  # no GPU memory to measure on a CPU
    for row in rows:
        assert row["× floor"] == pytest.approx(row["seconds"] / floor)
    assert rows[0]["mask sha256"] == rows[2]["mask sha256"] != rows[1]["mask sha256"] == rows[3]["mask sha256"]
    assert record["goals"]["low-memory 2:4 same masks as default"] is True
    assert record["environment"]["device"] == "cpu" and record["environment"]["torch"]


def test_bench_prune_result_table_and_goals():
    setup = bench_setup(tiny=True, device="cpu", specs=[lu.PruneSpec("wanda", "2:4")], modes=["low-memory"],
                        sizes={"nsamples": 4, "seqlen": 32})
    result = bench_prune(setup, progress=False)
    table = result.table()
    assert list(table.index) == [("floor: 2 passes / layer", ""), ("low-memory", "2:4")]
    assert set(result.goals()) == {"low-memory 2:4 ≤ 1.15× floor"}  # nothing to compare masks with


def test_bench_prune_saves_every_row_as_it_goes(tmp_path, monkeypatch, capsys):
    """G3: a GPU step cut short by its timeout keeps what it measured. The record is on disk after the floor and
    after each row; here the second run fails, and the file holds the floor and the first row, marked incomplete."""
    from labutils.jobs import bench_prune as bench

    real, runs = bench.prune_model, []

    def second_run_fails(*args, **kwargs):
        runs.append(1)
        if len(runs) == 2:
            raise RuntimeError("CUDA error: an illegal instruction was encountered")
        return real(*args, **kwargs)

    monkeypatch.setattr(bench, "prune_model", second_run_fails)
    out = tmp_path / "bench.json"
    with pytest.raises(RuntimeError, match="illegal instruction"):
        main(["bench-prune", "--tiny", "--device", "cpu", "--nsamples", "4", "--seqlen", "32", "--modes", "default",
              "--json", str(out)])
    record = json.loads(out.read_text())
    assert record["floor"]["seconds"] > 0 and [r["target"] for r in record["rows"]] == ["50%"]
    assert record["complete"] is False
    assert bench_summary(record).endswith("CUT SHORT after 1 row(s)")
    assert [p.name for p in tmp_path.iterdir()] == ["bench.json"]  # written through a temporary file, renamed


@pytest.mark.slow  # two CLI runs
def test_bench_prune_low_memory_against_a_baseline_run(tmp_path, capsys):
    """The GPU run's step (b): low-memory alone, its floor and default-mode masks taken from step (a)'s JSON."""
    sizes = ["--tiny", "--device", "cpu", "--nsamples", "4", "--seqlen", "32"]
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    assert main(["bench-prune", *sizes, "--modes", "default", "--json", str(first)]) == 0
    assert main(["bench-prune", *sizes, "--modes", "low-memory", "--baseline", str(first), "--json", str(second)]) == 0
    a, b = json.loads(first.read_text()), json.loads(second.read_text())
    assert b["floor"] == {**a["floor"], "from": str(first)}
    assert [r["mode"] for r in b["rows"]] == ["low-memory", "low-memory"]
    assert all(r["same masks as default"] is True for r in b["rows"])
    assert b["goals"]["low-memory 2:4 same masks as default"] is True
    assert "same masks" in capsys.readouterr().out.splitlines()[-1]


def test_bench_prune_refuses_a_baseline_of_another_setup(tmp_path, capsys):
    base = tmp_path / "a.json"
    base.write_text(json.dumps({"benchmark": "bench-prune", "floor": {"seconds": 1.0}, "rows": [],
                                "setup": {**bench_setup(tiny=True, device="cpu").describe(), "seqlen": 4096}}))
    argv = ["bench-prune", "--tiny", "--device", "cpu", "--json", str(tmp_path / "b.json"), "--baseline"]
    assert main([*argv, str(base)]) == 2
    assert capsys.readouterr().err.strip().endswith("another setup (seqlen 4096 there, 64 here); its floor and masks "
                                                    "do not apply")
    (tmp_path / "x.json").write_text("{}")
    assert main([*argv, str(tmp_path / "x.json")]) == 2
    assert "not the JSON of a bench-prune run" in capsys.readouterr().err
    assert main([*argv, str(tmp_path / "none.json")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert not (tmp_path / "b.json").exists()


@pytest.mark.parametrize("argv, message", [
    (["--modes", "fast"], "unknown mode 'fast'; allowed: default, low-memory"),
    (["--targets", "5:4"], "N:M pattern needs 1 ≤ N < M; got N=5, M=4"),
    (["--targets", "half"], "target must look like '50%', '0.5' or '2:4'; got 'half'"),
    (["--nsamples", "0"], "nsamples must be a positive integer"),
    (["--seqlen", "4096"], "seqlen 4096 exceeds the model's maximum sequence length; allowed: 1..256"),
    (["--method", "obs"], "unknown method 'obs'"),
])
def test_bench_prune_bad_input(argv, message, capsys):
    assert main(["bench-prune", "--tiny", "--device", "cpu", *argv]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_bench_prune_at_7b_scale_needs_cuda(capsys):
    assert main(["bench-prune"]) == 2
    err = capsys.readouterr().err
    assert "bench-prune at Llama-2-7B scale" in err and "needs a CUDA GPU" in err and "--tiny runs anywhere" in err


@needs_cuda
def test_gpu_bench_prune_tiny_reports_peak_memory():
    result = bench_prune(bench_setup(tiny=True, device="cuda"), progress=False)
    assert result.floor.peak_gib > 0 and all(row["peak GPU GiB"] > 0 for row in result.rows)
    assert all(v for k, v in result.goals().items() if "same masks" in k)


def test_bench_prune_times_pruning_alone(monkeypatch):
    """No fingerprint and no pinned allocation inside ``measure``; every row still has its hash."""
    timing, hashed, pools = [], [], []
    real_measure, real_hash = bench.measure, sparsity.mask_sha256

    def measure(device, fn):
        before = [p.allocations for p in pools]
        timing.append(True)
        try:
            return real_measure(device, fn)
        finally:
            timing.pop()
            assert [p.allocations for p in pools] == before, "pinned buffers allocated inside a timed run"

    def mask_hash(model):
        hashed.append(bool(timing))
        return real_hash(model)

    class CountedPool(PinnedPool):
        def __init__(self):
            super().__init__()
            pools.append(self)

    monkeypatch.setattr(bench, "measure", measure)
    monkeypatch.setattr(bench, "mask_sha256", mask_hash)
    monkeypatch.setattr(driver, "mask_sha256", mask_hash)
    monkeypatch.setattr(bench, "PinnedPool", CountedPool)
    setup = bench.bench_setup(tiny=True, device="cpu", sizes={"nsamples": 4, "seqlen": 32})
    result = bench.bench_prune(setup, progress=False)
    assert hashed == [False] * 4 and len(pools) == 1 and pools[0].allocations > 0
    rows = result.rows
    assert rows[0]["mask sha256"] == rows[2]["mask sha256"] != rows[1]["mask sha256"] == rows[3]["mask sha256"]
    assert [r["same masks as default"] for r in rows] == ["", "", True, True]


def test_saved_bench_results_reads_back_a_written_run(tmp_path):
    """A run written by bench-prune (its setup and environment both name a device) reads back as 04 shows it: the
    newest file of the folder, floor first, with date, GPU and calibration size in attrs."""
    result = bench.bench_prune(bench.bench_setup(tiny=True, device="cpu", sizes={"nsamples": 4}), progress=False)
    bench.write_json(result, tmp_path / "2026-01-01-bench-prune.json")
    newer = result.to_json()
    newer["environment"]["gpu"] = "a newer GPU"
    (tmp_path / "2026-02-01-bench-prune.json").write_text(json.dumps(newer))
    table = lu.saved_bench_results(tmp_path)
    assert list(table.index)[0] == ("floor: 2 passes / layer", "") and len(table) == 1 + len(result.rows)
    assert table.attrs["gpu"] == "a newer GPU" and table.attrs["nsamples"] == 4
    assert table.attrs["device"] == "cpu" and table.attrs["file"].endswith("2026-02-01-bench-prune.json")
    assert lu.saved_bench_results(tmp_path / "empty") is None
