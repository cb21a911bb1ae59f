"""Low-memory mode (weights and activations offloaded to CPU memory) and the bench-prune benchmark, on the CPU."""
import copy
import json

import pytest
import torch
from conftest import make_tiny, random_tokens

import labutils as lu
from labutils.cli import main
from labutils.core.saved import is_lab_output
from labutils.core.device import SectionTimer
from labutils.jobs.bench_prune import bench_prune, bench_setup, forward_floor
from labutils.jobs.bench_prune import summary_line as bench_summary
from labutils.prune.calibration import run_layer
from labutils.prune.offload import OffloadedInputs, OffloadedLayers, tree_to
from labutils.prune.placement import calibration_inputs

TARGETS = {"50%": lu.SparsityTarget.of(sparsity=0.5), "2:4": lu.SparsityTarget.of(nm="2:4"),
           "60%": lu.SparsityTarget.of(sparsity=0.6)}


@pytest.mark.parametrize("method, target, options", [
    ("wanda", "50%", {}), ("wanda", "2:4", {}), ("magnitude", "50%", {}), ("sparsegpt", "2:4", {}),
    ("ria", "50%", {}), ("wanda", "50%", {"true_sequential": True}), ("wanda", "60%", {"owl": lu.OwlConfig()}),
])
def test_low_memory_mode_gives_the_default_modes_weights(method, target, options, calib_tokens):
    model = make_tiny(num_hidden_layers=3)
    default, low = copy.deepcopy(model), copy.deepcopy(model)
    spec = lu.PruneSpec(method, TARGETS[target], **options)
    a = lu.prune_model(default, spec, calib_tokens, batch_size=4, progress=False)
    b = lu.prune_model(low, spec, calib_tokens, batch_size=4, progress=False, low_memory="cpu")
    assert b.low_memory and not a.low_memory
    assert a.mask_sha256 == b.mask_sha256
    for (name, x), y in zip(default.state_dict().items(), low.state_dict().values()):
        assert torch.equal(x, y), name  # not only the masks: SparseGPT's updated weights too
    assert [s.pruned for s in a.sublayers] == [s.pruned for s in b.sublayers]
    assert a.layer_sparsity == b.layer_sparsity


def test_offloaded_inputs_copy_every_batch_and_match_resident_inputs(tiny_model, calib_tokens):
    resident = calibration_inputs(tiny_model, calib_tokens, 4, torch.device("cpu"), low_memory=False)
    offloaded = calibration_inputs(tiny_model, calib_tokens, 4, torch.device("cpu"), low_memory=True)
    assert isinstance(offloaded, OffloadedInputs) and len(offloaded.hidden) == 2
    layers = lu.find_decoder_layers(tiny_model)
    for i, layer in enumerate(layers):
        produced = []
        handle = layer.register_forward_hook(lambda m, a, out: produced.append(out))
        resident.run(layer, i, advance=True)
        offloaded.run(layer, i, advance=True)
        handle.remove()
        for r, s in zip(resident.hidden, offloaded.hidden):
            torch.testing.assert_close(s, r, rtol=0, atol=0)
        # the offloaded store holds its own copies, never the tensors the layer returned
        own = {t.data_ptr() for t in offloaded.hidden}
        assert not own & {(o[0] if isinstance(o, tuple) else o).data_ptr() for o in produced}
    offloaded.finish()


def test_statistics_pass_keeps_no_outputs(tiny_model, calib_tokens):
    inputs = calibration_inputs(tiny_model, calib_tokens, 4, torch.device("cpu"), low_memory=False)
    before = [t.clone() for t in inputs.hidden]
    layer = lu.find_decoder_layers(tiny_model)[0]
    assert run_layer(layer, 0, inputs, keep=False) == []
    inputs.run(layer, 0, advance=False)
    assert all(torch.equal(a, b) for a, b in zip(before, inputs.hidden))


def test_tree_to_copies_shared_tensors_once():
    t = torch.arange(4.0)
    copied = tree_to({"a": t, "b": (t, 3, None), "c": [t * 2]}, torch.device("cpu"))
    assert copied["a"] is copied["b"][0] and copied["a"].data_ptr() != t.data_ptr()
    assert copied["b"][1:] == (3, None) and torch.equal(copied["c"][0], t * 2)


def test_offloaded_layers_visit_and_return(tiny_model):
    layers = lu.find_decoder_layers(tiny_model)
    with OffloadedLayers(layers, torch.device("cpu")) as placement:
        for i in range(len(layers)):
            assert placement.attach(i) is layers[i]
            placement.prefetch(i + 1)
            placement.release(i)
    assert all(p.device.type == "cpu" for p in tiny_model.parameters())


def test_low_memory_needs_the_model_in_cpu_memory(tiny_model, calib_tokens):
    target = TARGETS["50%"]
    with pytest.raises(lu.BadInput, match="low_memory keeps the model in CPU memory.*the model is on meta"):
        lu.prune_model(tiny_model.to("meta"), lu.PruneSpec("wanda", target), calib_tokens, low_memory=True)


@pytest.mark.parametrize("value,message", [
    (1, "low_memory must be False, True or a device such as 'cuda'; got 1"),
    (None, "low_memory must be False, True or a device such as 'cuda'; got None"),
    ("nowhere", "device 'nowhere' is not one the lab can run on; allowed: cuda, cuda:N, mps, cpu"),
])
def test_low_memory_takes_a_flag_or_a_device(value, message, tiny_model, calib_tokens):
    before = lu.mask_sha256(tiny_model)
    with pytest.raises(lu.BadInput, match=message):
        lu.prune_model(tiny_model, lu.PruneSpec("wanda", TARGETS["50%"]), calib_tokens, low_memory=value)
    assert lu.mask_sha256(tiny_model) == before


def test_section_timer_on_cpu_times_each_section():
    timer = SectionTimer(torch.device("cpu"))
    for _ in range(3):
        with timer.section():
            sum(range(1000))
    seconds = timer.seconds()
    assert len(seconds) == 3 and all(0 <= s < 1 for s in seconds)


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


@pytest.mark.slow
def test_main_job_low_memory_gives_the_same_model(tmp_path):
    """`python -m labutils prune --low-memory` on the default profile: same masks and perplexities as the default."""
    sizes = dict(nsamples=4, seqlen=64, eval_tokens=512, batch_size=2, device="cpu")
    default = lu.run_prune_job(lu.PruneJob(out=str(tmp_path / "default"), **sizes), progress=False)
    low = lu.run_prune_job(lu.PruneJob(out=str(tmp_path / "low"), low_memory=True, **sizes), progress=False)
    assert low["mask_sha256"] == default["mask_sha256"]
    assert low["perplexity"] == default["perplexity"]
    assert is_lab_output(tmp_path / "low")


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: streams, pinned memory")


@needs_cuda
@pytest.mark.parametrize("target", ["50%", "2:4"])
def test_gpu_low_memory_same_weights_less_memory(target):
    """On a GPU: offloaded to pinned CPU memory, copied on copy streams, the weights still match the default mode's."""
    config = lu.tiny_llama_config(num_hidden_layers=4, hidden_size=256, intermediate_size=512,
                                  max_position_embeddings=256)
    tokens = random_tokens((8, 128), 0)
    on_gpu = lu.random_model(config, torch.float16, torch.device("cuda"), seed=0)
    on_cpu = copy.deepcopy(on_gpu).to("cpu")
    torch.cuda.reset_peak_memory_stats()
    a = lu.prune_model(on_gpu, lu.PruneSpec("wanda", TARGETS[target]), tokens, batch_size=2, progress=False)
    default_peak = torch.cuda.max_memory_allocated()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    b = lu.prune_model(on_cpu, lu.PruneSpec("wanda", TARGETS[target]), tokens, batch_size=2, progress=False,
                       low_memory="cuda")
    assert torch.cuda.max_memory_allocated() - base < default_peak
    assert a.mask_sha256 == b.mask_sha256 and all(p.device.type == "cpu" for p in on_cpu.parameters())
    for x, y in zip(on_gpu.state_dict().values(), on_cpu.state_dict().values()):
        assert torch.equal(x.cpu(), y)


@needs_cuda
def test_gpu_bench_prune_tiny_reports_peak_memory():
    result = bench_prune(bench_setup(tiny=True, device="cuda"), progress=False)
    assert result.floor.peak_gib > 0 and all(row["peak GPU GiB"] > 0 for row in result.rows)
    assert all(v for k, v in result.goals().items() if "same masks" in k)
