"""Exercise checks, environment helpers and the profiles."""
import pytest
import torch
from conftest import make_tiny

import labutils as lu


def test_check_wanda_score_passes_a_right_answer_and_fails_wrong_ones(capsys):
    lu.check_wanda_score(lambda w, x: w.abs() * x.norm(dim=0))
    assert capsys.readouterr().out.startswith("PASS: wanda score")
    lu.check_wanda_score(lambda w, x: w.abs() * x.pow(2).sum(0))  # forgot the square root
    assert capsys.readouterr().out.startswith("FAIL: wanda score — max |difference|")
    lu.check_wanda_score(lambda w, x: w.abs())  # ignored the inputs
    assert capsys.readouterr().out.startswith("FAIL")
    lu.check_wanda_score(lambda w, x: x.norm(dim=0))  # wrong shape
    assert "expected a tensor of shape (6, 16), got (16,)" in capsys.readouterr().out


def test_check_ria_score(capsys):
    def ria(w, x, a):
        w = w.abs()
        return (w / w.sum(1, keepdim=True) + w / w.sum(0, keepdim=True)) * x.norm(dim=0) ** a

    lu.check_ria_score(ria)
    assert capsys.readouterr().out.startswith("PASS: RIA score")
    lu.check_ria_score(lambda w, x, a: ria(w, x, a) * 1.01)
    assert capsys.readouterr().out.startswith("FAIL: RIA score")


def test_check_close(capsys):
    lu.check_close("ppl", 10.0005, 10.0)
    assert capsys.readouterr().out.startswith("PASS: ppl")
    lu.check_close("ppl", 10.1, 10.0)
    assert capsys.readouterr().out.startswith("FAIL: ppl — 10.1 vs 10, outside")


def test_check_layer_sparsity(capsys, calib_tokens):
    model = make_tiny()
    lu.check_layer_sparsity(model, 0.5)
    assert capsys.readouterr().out.startswith("FAIL: per-row sparsity — 14 linears fall short")
    lu.prune_model(model, lu.PruneSpec("wanda", lu.SparsityTarget.of(sparsity=0.5)), calib_tokens, progress=False)
    lu.check_layer_sparsity(model, 0.5)
    assert capsys.readouterr().out.startswith("PASS")


def test_model_summary_and_sources(tiny_model):
    summary = lu.model_summary(tiny_model)
    assert summary["decoder layers"] == 2 and summary["attention heads / key-value heads"] == "4 / 2"
    assert summary["linears per layer"] == "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"
    assert list(lu.data_sources(lu.get_profile("smollm2-135m")).index) == ["model", "corpus"]
    assert "gated" in lu.data_sources(lu.get_profile("llama2-7b")).loc["model", "source"]


def test_versions_table_lists_the_lab_packages():
    table = lu.versions_table()
    for name in ("python", "torch", "transformers", "datasets", "accelerate", "lm-eval", "nbval"):
        assert name in table.index


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only answers; this machine has CUDA")
def test_cpu_machine_answers():
    assert lu.get_device() in (torch.device("cpu"), torch.device("mps"))
    ok, reason = lu.semi_structured_support()
    assert not ok and reason.startswith("no CUDA GPU")
    assert lu.cuda_capability() is None
    with pytest.raises(lu.LabError, match="device 'cuda' asked for, but this machine has no CUDA GPU"):
        lu.get_device("cuda")


def test_random_model_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = make_tiny(seed=5)
    assert torch.equal(torch.rand(1), expected_next)
    b = make_tiny(seed=5)
    assert lu.mask_sha256(a) == lu.mask_sha256(b)
    assert torch.equal(a.model.layers[0].mlp.up_proj.weight, b.model.layers[0].mlp.up_proj.weight)


def test_profile_env_override(monkeypatch):
    monkeypatch.setenv("LAB_PROFILE", "llama2-7b")
    assert lu.get_profile().name == "llama2-7b"
    monkeypatch.delenv("LAB_PROFILE")
    assert lu.get_profile().name == lu.DEFAULT_PROFILE
    assert lu.get_profile(nsamples=4).nsamples == 4
    with pytest.raises(lu.BadInput, match="unknown profile field"):
        lu.get_profile(colour="blue")
