"""Pruned and quantized weights (core/sparse/quant.py, model.py's quantize_model, the format's version 2): the
quantizers' error bounds, the zeros, the packed checkpoint reloaded bit for bit, its bytes, and every bad input."""
import json
import math

import pytest
import torch
from conftest import make_tiny
from safetensors import safe_open

import labutils as lu
from labutils.cli import main
from labutils.core.sparse.files import SPARSE_FILE, write_safetensors
from labutils.core.sparse.format import METADATA_KEY, same_bits
from labutils.core.sparse.quant import dequantize_values, quantize_dequantize, quantize_values, quantized_bytes

SMALL = ["--nsamples", "2", "--seqlen", "16", "--eval-tokens", "64", "--eval-seqlen", "32"]


def blocks_of(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, 32)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("scale", [1e-3, 1.0, 50.0])
def test_q4_0_error_bound_on_random_matrices(seed, scale):
    """q4_0 rounds to 16 levels d·(q − 8), d = (value of largest magnitude) / −8: every value is within |d| / 2 of
    its level, except those of the other sign beyond 6.5·|d|, clipped to 7·|d| (within |d|); fp16's rounding of d
    adds at most 2⁻¹¹ relative."""
    x = torch.randn(64, 96, generator=torch.Generator().manual_seed(seed)) * scale
    error = (quantize_dequantize(x, "q4_0") - x).abs()
    amax = blocks_of(x).abs().amax(1, keepdim=True)
    d = amax / 8
    assert bool((blocks_of(error) <= d * (1 + 2 ** -10)).all())
    inner = blocks_of(x).abs() <= 6.5 * d
    assert bool((blocks_of(error)[inner.expand_as(blocks_of(error))] <=
                 (d / 2 * (1 + 2 ** -9) + 8 * amax * 2 ** -11).expand_as(blocks_of(error))[inner]).all())
    assert error.max() > 0  # it is lossy: the bound above is not vacuous
    assert blocks_of(quantize_dequantize(x, "q4_0")).unique(dim=None).numel() <= 16 * blocks_of(x).shape[0]


@pytest.mark.parametrize("seed", range(3))
def test_q8_0_error_bound_and_rounding_to_nearest(seed):
    x = torch.randn(32, 128, generator=torch.Generator().manual_seed(seed))
    error = (quantize_dequantize(x, "q8_0") - x).abs()
    d = blocks_of(x).abs().amax(1, keepdim=True) / 127
    assert bool((blocks_of(error) <= d / 2 * (1 + 2 ** -8) + d * 127 * 2 ** -11).all())
    assert error.max() < (quantize_dequantize(x, "q4_0") - x).abs().max() / 8  # eight bits: far closer than four


def test_block_bytes_and_padding():
    x = torch.randn(70)  # three blocks, the last padded with zeros
    for quant, size in (("q4_0", 18), ("q8_0", 34), ("q4_1", 20)):
        blocks = quantize_values(x, quant)
        assert tuple(blocks.shape) == (3, size) and quantized_bytes(70, quant) == 3 * size
        assert dequantize_values(blocks, quant, 70, torch.float32).shape == (70,)


def test_quantizing_twice_changes_nothing():
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(3))
    for quant in ("q4_0", "q8_0"):
        once = quantize_dequantize(x, quant)
        assert same_bits(quantize_dequantize(once, quant), once)


def pruned_tiny(target="0.5", calib=None):
    model = make_tiny()
    target = lu.SparsityTarget.of(nm=target) if ":" in target else lu.SparsityTarget.of(float(target))
    lu.prune_model(model, lu.PruneSpec("wanda", target), calib, progress=False)
    return model


@pytest.mark.parametrize("quant, mask_aware, all_zero", [
    ("q4_0", True, True), ("q8_0", True, True), ("q4_1", True, True),  # the kept values alone: zeros untouched
    ("q4_0", False, True), ("q8_0", False, True),  # symmetric: 0.0 is a level, so the zeros stay
    ("q4_1", False, False),  # scale and minimum: 0.0 is generally not a level, pruned weights become non-zero
])
def test_which_quantizations_keep_the_zeros(quant, mask_aware, all_zero, calib_tokens):
    model = pruned_tiny(calib=calib_tokens)
    done = lu.quantize_model(model, quant, mask_aware=mask_aware)
    pruned = sum(int((w == 0).sum()) for w in (lu.find_linears(layer)[n].weight for layer in lu.find_decoder_layers(
        pruned_tiny(calib=calib_tokens)) for n in lu.find_linears(layer)))
    assert done["pruned weights"] == pruned > 0
    assert (done["pruned weights still zero"] == done["pruned weights"]) is all_zero
    assert (lu.quant_record(model) is not None) is (mask_aware and quant != "q4_1")


def test_mask_aware_quantization_quantizes_the_kept_values_alone(calib_tokens):
    model = pruned_tiny(calib=calib_tokens)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lu.quantize_model(model, "q4_0")
    record = lu.kept_masks(model)
    name = "model.layers.0.mlp.down_proj.weight"
    kept = record.kept(name)
    assert same_bits(model.state_dict()[name][kept], quantize_dequantize(before[name][kept], "q4_0"))
    embed = "model.embed_tokens.weight"
    assert same_bits(model.state_dict()[embed], quantize_dequantize(before[embed], "q4_0"))
    norm = "model.norm.weight"
    assert same_bits(model.state_dict()[norm], before[norm])  # norms are left as they are


@pytest.mark.parametrize("target", ["0.5", "2:4", "dense"])
@pytest.mark.parametrize("quant", ["q4_0", "q8_0"])
def test_packed_checkpoint_reloads_bit_for_bit(target, quant, tmp_path, calib_tokens):
    model = make_tiny() if target == "dense" else pruned_tiny(target, calib_tokens)
    lu.quantize_model(model, quant)
    out = lu.save_pruned(model, tmp_path / "q", None, {"dtype": "float32", "nm": target if ":" in target else None})
    loaded, _, report = lu.load_pruned(out, "cpu")
    saved, back = model.state_dict(), loaded.state_dict()
    assert all(same_bits(back[k], saved[k]) for k in saved)
    assert lu.quant_record(loaded).quant == quant
    assert sorted(lu.quant_record(loaded).names) == sorted(lu.quant_record(model).names)
    with safe_open(str(out / SPARSE_FILE), "pt") as file:
        layout = json.loads(file.metadata()[METADATA_KEY])
        stored = sum(file.get_slice(k).get_shape()[0] * math.prod(file.get_slice(k).get_shape()[1:]) *
                     (1 if file.get_slice(k).get_dtype() in ("U8", "BOOL") else 4) for k in file.keys())
    assert layout["version"] == 2
    entries = layout["tensors"]
    assert {e["quant"] for e in entries.values()} == {quant}
    if target == "dense":  # never pruned: stored whole, no masks recorded
        assert {e["layout"] for e in entries.values()} == {"dense"} and lu.kept_masks(loaded) is None
    else:
        assert entries["model.embed_tokens.weight"]["layout"] == "dense"
        assert entries["model.layers.0.mlp.up_proj.weight"]["layout"] == ("nm" if target == "2:4" else "bitmask")
        assert lu.mask_sha256(loaded) == lu.mask_sha256(model)
        assert lu.model_sparsity(loaded) == lu.model_sparsity(model)
    assert report["disk"]["model"]["sparse"] - stored < 64 * 1024  # the header is all the rest
    blocks = {"q4_0": 18, "q8_0": 34}[quant]
    embed = entries["model.embed_tokens.weight"]["shape"]
    assert stored >= math.ceil(embed[0] * embed[1] / 32) * blocks


def test_quantized_bytes_at_half_sparsity(calib_tokens, tmp_path):
    """Wanda 50 % + q4_0 stores a bit per weight and 4.5 bits per kept value: 3.25 bits of the 32 of float32."""
    model = pruned_tiny(calib=calib_tokens)
    lu.quantize_model(model, "q4_0")
    out = lu.save_pruned(model, tmp_path / "q", None, {"dtype": "float32"})
    part = lu.load_report(out)["disk"]["pruned linears"]
    assert part["sparse"] / part["dense"] == pytest.approx(3.25 / 32, rel=0.01)


def test_saving_weights_changed_after_quantizing_is_refused(tmp_path, calib_tokens):
    model = pruned_tiny(calib=calib_tokens)
    lu.quantize_model(model, "q4_0")
    with torch.no_grad():
        model.model.embed_tokens.weight[0, 0] += 0.001
    with pytest.raises(lu.BadInput, match="changed after lu.quantize_model; quantize the model again"):
        lu.save_pruned(model, tmp_path / "q", None, {"dtype": "float32"})
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("call, message", [
    (lambda m: lu.quantize_model(m, "q3"), "quant must be one of q4_0, q8_0, q4_1; got 'q3'"),
    (lambda m: lu.quantize_model(m, "q4_0", mask_aware="yes"), "mask_aware must be True or False; got 'yes'"),
])
def test_quantize_model_bad_input(call, message):
    with pytest.raises(lu.BadInput, match=message.replace("(", r"\(")):
        call(make_tiny())


def test_quantizing_twice_is_refused():
    model = make_tiny()
    lu.quantize_model(model, "q8_0")
    with pytest.raises(lu.BadInput, match=r"already quantized \(q8_0\)"):
        lu.quantize_model(model, "q4_0")


def rewrite(path, change):
    """Rewrite the sparse file at ``path`` with ``change(tensors, layout)`` applied."""
    with safe_open(str(path), "pt") as file:
        metadata, tensors = file.metadata(), {k: file.get_tensor(k).clone() for k in file.keys()}
    layout = json.loads(metadata[METADATA_KEY])
    change(tensors, layout)
    write_safetensors(path, tensors, {**metadata, METADATA_KEY: json.dumps(layout)})


@pytest.mark.parametrize("damage, message", [
    (lambda t, l: t.update({"model.embed_tokens.weight.values": t["model.embed_tokens.weight.values"][:-1]}),
     "sparse tensor model.embed_tokens.weight: its q4_0 values are torch.uint8 (511, 18); 16384 values need uint8 "
     "(512, 18)"),
    (lambda t, l: l["tensors"]["model.embed_tokens.weight"].update(quant="q4_1"),
     "tensors.model.embed_tokens.weight.quant is 'q4_1', not one of q4_0, q8_0 in a version 2 file"),
    (lambda t, l: l["tensors"]["model.embed_tokens.weight"].pop("quant"),
     "tensors.model.embed_tokens.weight has layout dense without a quant"),
    (lambda t, l: l.update(version=1), "quant is 'q4_0', not one of q4_0, q8_0 in a version 2 file"),
    (lambda t, l: l["tensors"]["model.embed_tokens.weight"].update(dtype="int32"),
     "sparse tensor model.embed_tokens.weight: q4_0 values decode into a float dtype, not 'int32'"),
])
def test_damaged_quantized_file_is_one_line(damage, message, tmp_path, calib_tokens):
    model = pruned_tiny(calib=calib_tokens)
    lu.quantize_model(model, "q4_0")
    out = lu.save_pruned(model, tmp_path / "q", None, {"dtype": "float32"})
    rewrite(out / SPARSE_FILE, damage)
    from labutils.core.sparse.files import read_sparse_folder
    with pytest.raises(lu.LabError) as caught:
        read_sparse_folder(out)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_cli_prune_quant_runs_evaluates_and_saves(tiny_dir, tiny_with_tokenizer, tmp_path, capsys):
    out = tmp_path / "pruned"
    assert main(["prune", "--model", str(tiny_dir), "--tokenizer", str(tiny_with_tokenizer), *SMALL, "--quant",
                 "q4_0", "--out", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["quant"] == "q4_0" and set(report["perplexity"]) == {"dense", "pruned", "quantized"}
    assert report["perplexity"]["quantized"] > 0
    loaded, _, _ = lu.load_pruned(out, "cpu")
    assert lu.quant_record(loaded).quant == "q4_0"
    assert "q4_0" in (out / "README.md").read_text()


@pytest.mark.parametrize("argv, message", [
    (["--quant", "q4_1"], "argument --quant: invalid choice: 'q4_1' (choose from q4_0, q8_0)"),
    (["--quant", "q4_0", "--save-format", "dense"],
     "--quant q4_0 stores the quantized blocks in the sparse format of a model held in memory; drop --save-format "
     "dense"),
    (["--quant", "q8_0", "--stream-from-disk"],
     "--quant q8_0 stores the quantized blocks in the sparse format of a model held in memory; drop "
     "--stream-from-disk"),
])
def test_cli_bad_quant_is_one_line_and_writes_nothing(argv, message, tmp_path, capsys):
    out = tmp_path / "out"
    try:
        code = main(["prune", *argv, "--out", str(out)])
    except SystemExit as exc:  # argparse's own choices
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err
    assert message.replace("'", "") in err.replace("'", "") and err.count("\n") == 1
    assert not out.exists()


def test_quant_output_folder():
    from labutils.jobs.main_job import PruneJob
    job = PruneJob(lu.PruneSpec("wanda", lu.SparsityTarget.of(0.5)), quant="q4_0")
    assert job.output_dir(lu.get_profile(lu.DEFAULT_PROFILE)).name == "smollm2-135m-wanda-50-q4_0"
