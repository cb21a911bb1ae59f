"""The main job (jobs/main_job.py) end to end on a tiny model with a real tokenizer, and the embedded default model."""
import json

import pytest
import torch
from conftest import make_tiny
from transformers import AutoTokenizer

import labutils as lu
from labutils.cli import main
from labutils.core.loading import embedded_model_dir


@pytest.fixture(scope="module")
def tiny_with_real_tokenizer(tmp_path_factory):
    """A 2-layer random model sharing the default model's tokenizer, saved like a hub folder."""
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir())
    model = make_tiny(vocab_size=len(tokenizer), max_position_embeddings=256)
    path = tmp_path_factory.mktemp("tiny") / "model"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.slow
def test_main_job_end_to_end(tiny_with_real_tokenizer, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["prune", "--model", str(tiny_with_real_tokenizer), "--nm", "2:4", "--nsamples", "4", "--seqlen", "32",
            "--eval-tokens", "256", "--eval-seqlen", "128", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "wanda 2:4" in printed and "mask sha256" in printed
    report = json.loads((out / "report.json").read_text())
    for key in ("method", "target_sparsity", "measured_sparsity", "nm", "perplexity", "mask_sha256", "seconds",
                "profile", "versions"):
        assert key in report, key
    assert report["nm"] == "2:4" and report["measured_sparsity"] == 0.5 and report["eval_tokens"] == 256
    loaded, tokenizer, _ = lu.load_pruned(out, torch.device("cpu"))
    assert lu.mask_sha256(loaded) == report["mask_sha256"] and tokenizer is not None
    assert main(argv) == 0  # a previous lab output is replaced, with the same seed giving the same mask
    assert json.loads((out / "report.json").read_text())["mask_sha256"] == report["mask_sha256"]


def test_main_job_seqlen_above_model_maximum(tiny_with_real_tokenizer, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["prune", "--model", str(tiny_with_real_tokenizer), "--seqlen", "300", "--out", str(out)]) == 2
    assert "seqlen 300 exceeds the model's maximum sequence length; allowed: 1..256" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.slow
def test_embedded_model_is_trained():
    profile = lu.get_profile()
    model, tokenizer = lu.load_model(profile, torch.device("cpu"))
    assert len(lu.find_decoder_layers(model)) == 30 and model.config.num_key_value_heads == 3
    tokens = lu.test_tokens(profile, tokenizer, 1024)
    assert lu.perplexity(model, tokens, seqlen=512, progress=False) < 30


def test_main_job_magnitude_needs_no_calibration(tiny_with_real_tokenizer, tmp_path):
    out = tmp_path / "mag"
    assert main(["prune", "--model", str(tiny_with_real_tokenizer), "--method", "magnitude", "--sparsity", "0.3",
                 "--eval-tokens", "256", "--eval-seqlen", "128", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "magnitude" and report["nsamples"] == 0 and report["nm"] is None
    assert report["params"] == {"group": "layer"}  # one threshold per matrix: ⌊out·in·0.3⌋ zeros in each linear
    assert report["measured_sparsity"] == pytest.approx(0.3, abs=1e-3) and report["measured_sparsity"] <= 0.3
