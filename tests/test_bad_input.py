"""Every bad input gives one clear error naming the value given and what is allowed, and writes nothing."""

import pytest
import torch
from conftest import make_tiny

import labutils as lu
from labutils.cli import main
from labutils.core.saved import check_output_dir, load_report
from labutils.core.loading import load_pretrained
from labutils.prune.masks import nm_mask


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5, float("nan"), "0.5", True])
def test_sparsity_outside_range(sparsity):
    with pytest.raises(lu.BadInput, match=r"sparsity must be a number in \[0, 1\); got"):
        lu.SparsityTarget.of(sparsity=sparsity)


@pytest.mark.parametrize("nm,message", [
    ("4:4", "1 ≤ N < M; got N=4, M=4"),
    ("5:4", "1 ≤ N < M; got N=5, M=4"),
    ("0:4", "1 ≤ N < M; got N=0, M=4"),
    ("2-4", "must look like '2:4'; got '2-4'"),
    ((2, "x"), "pair of integers"),
])
def test_bad_nm(nm, message):
    with pytest.raises(lu.BadInput, match=message):
        lu.SparsityTarget.of(nm=nm)


def test_sparsity_and_nm_together():
    with pytest.raises(lu.BadInput, match="exactly one of sparsity or nm"):
        lu.SparsityTarget.of(sparsity=0.5, nm="2:4")


def test_nm_input_size_not_divisible(tiny_model, calib_tokens):
    before = lu.mask_sha256(tiny_model)
    with pytest.raises(lu.BadInput, match="divisible by M=3; layer 0 self_attn.q_proj has 64 inputs"):
        lu.prune_model(tiny_model, lu.PruneSpec("wanda", lu.SparsityTarget.of(nm="2:3")), calib_tokens)
    assert lu.mask_sha256(tiny_model) == before  # nothing was pruned


def test_nm_mask_rejects_indivisible_score():
    with pytest.raises(lu.BadInput, match="divisible by M=4; got 6"):
        nm_mask(torch.rand(2, 6), 2, 4)


@pytest.mark.parametrize("field,value", [("nsamples", 0), ("nsamples", -3), ("seqlen", 0), ("seqlen", -1),
                                         ("eval_tokens", 0), ("batch_size", 0), ("nsamples", 2.5)])
def test_non_positive_sizes(field, value):
    with pytest.raises(lu.BadInput, match=f"{field} must be a positive integer.*got {value!r}"):
        lu.get_profile("smollm2-135m", **{field: value})


def test_seqlen_above_model_maximum(tiny_model):
    with pytest.raises(lu.BadInput, match=r"seqlen 129 exceeds the model's maximum sequence length; allowed: 1..128"):
        lu.perplexity(tiny_model, torch.zeros(300, dtype=torch.long), seqlen=129)


def test_unknown_method_and_profile(tiny_model, calib_tokens):
    with pytest.raises(lu.BadInput, match="unknown method 'obc'; allowed: magnitude, wanda, sparsegpt, ria"):
        lu.prune_model(tiny_model, lu.PruneSpec("obc", lu.SparsityTarget.of(sparsity=0.5)), calib_tokens)
    with pytest.raises(lu.BadInput, match="unknown profile 'gpt5'; allowed: smollm2-135m"):
        lu.get_profile("gpt5")


def test_wanda_without_calibration_tokens(tiny_model):
    with pytest.raises(lu.BadInput, match="needs calibration tokens of shape"):
        lu.prune_model(tiny_model, lu.PruneSpec("wanda", lu.SparsityTarget.of(sparsity=0.5)), None)


def test_model_not_found(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(lu.LabError, match="model '.*no-such-model' not found: there is no local folder"):
        load_pretrained(str(missing), torch.float32, torch.device("cpu"))
    assert not missing.exists()


def test_hub_model_unreachable_says_how_to_get_it():
    # The llama2-7b profile's weights are gated and this machine is offline: the message says what to do.
    with pytest.raises(lu.LabError, match="(?s)meta-llama/Llama-2-7b-hf' not found.*hf auth login.*HF_TOKEN"):
        load_pretrained("meta-llama/Llama-2-7b-hf", torch.float16, torch.device("cpu"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA, so the CUDA-only profile is allowed")
@pytest.mark.parametrize("profile", ["llama2-7b", "llama2-7b-random"])
def test_cuda_profile_without_cuda(profile, tmp_path):
    with pytest.raises(lu.LabError, match=f"profile '{profile}' needs a CUDA GPU, and this machine has none"):
        lu.load_model(lu.get_profile(profile), torch.device("cpu"))
    out = tmp_path / "out"
    assert main(["prune", "--profile", profile, "--out", str(out)]) == 2
    assert not out.exists()


def test_output_folder_that_is_not_a_lab_output(tmp_path, capsys):
    precious = tmp_path / "thesis"
    precious.mkdir()
    (precious / "chapter1.tex").write_text("do not overwrite")
    with pytest.raises(lu.BadInput, match="exists and is a folder that is not a lab output"):
        check_output_dir(precious)
    assert main(["prune", "--out", str(precious)]) == 2
    assert "not a lab output" in capsys.readouterr().err
    assert [p.name for p in precious.iterdir()] == ["chapter1.tex"]


def test_output_path_that_is_a_file(tmp_path):
    target = tmp_path / "model.bin"
    target.write_bytes(b"x")
    with pytest.raises(lu.BadInput, match="exists and is a file"):
        check_output_dir(target)
    assert target.read_bytes() == b"x"


def test_previous_lab_output_may_be_replaced(tmp_path):
    previous = lu.save_pruned(make_tiny(), tmp_path / "run", None, {"run": 1})
    assert check_output_dir(previous) == previous
    lu.save_pruned(make_tiny(seed=1), previous, None, {"run": 2})
    assert load_report(previous)["run"] == 2


@pytest.mark.parametrize("argv,message", [
    (["prune", "--sparsity", "1.2"], "sparsity must be a number in [0, 1); got 1.2"),
    (["prune", "--nm", "4:2"], "1 ≤ N < M; got N=4, M=2"),
    (["prune", "--nsamples", "0"], "nsamples must be a positive integer (≥ 1); got 0"),
    (["prune", "--seqlen", "-5"], "seqlen must be a positive integer (≥ 1); got -5"),
    (["prune", "--method", "obs"], "unknown method 'obs'"),
])
def test_cli_bad_input_writes_nothing(argv, message, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(argv + ["--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_out_of_memory_is_reraised_with_advice(tiny_model, calib_tokens, monkeypatch):
    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr("labutils.prune.calibration.run_layer", oom)
    with pytest.raises(lu.LabError, match="out of GPU memory.*fewer calibration samples.*--seqlen"):
        lu.prune_model(tiny_model, lu.PruneSpec("wanda", lu.SparsityTarget.of(sparsity=0.5)), calib_tokens)


def test_missing_data_package_says_how_to_install():
    from labutils.core.publish import packaged_file

    with pytest.raises(lu.LabError, match="needs the PyPI package 'no-such-lab-package'.*make setup"):
        packaged_file("no-such-lab-package", "x.gguf", "1.0", "the default model")
    with pytest.raises(lu.LabError, match="nothing.bin is missing from it; reinstall it: pip install --force"):
        packaged_file("pytest", "nothing.bin", "9.0.3", "a test")
