"""Perplexity, saving and loading back, the data splits, and the main job end to end on a tiny model."""
import json
import math

import pytest
import torch
from conftest import make_tiny, random_tokens
from transformers import AutoTokenizer

import labutils as lu
from labutils.cli import main
from labutils.core.loading import embedded_model_dir
from labutils.evaluate.perplexity import window_batches


def test_perplexity_matches_manual_computation(tiny_model):
    tokens = random_tokens((100,), 0)
    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, 96, 32):  # 3 windows of 32; the last 4 tokens are dropped
            window = tokens[start : start + 32][None]
            nll += tiny_model(window, labels=window).loss.item() * 31
            count += 31
    assert lu.perplexity(tiny_model, tokens, seqlen=32, batch_size=2, progress=False) == pytest.approx(
        math.exp(nll / count), rel=1e-5)


def test_perplexity_needs_one_window(tiny_model):
    with pytest.raises(lu.BadInput, match="need at least seqlen=64 test tokens .*got 10"):
        lu.perplexity(tiny_model, torch.zeros(10, dtype=torch.long), seqlen=64)
    with pytest.raises(lu.BadInput, match="seqlen must be an integer ≥ 2; got 1"):  # one token predicts nothing
        lu.perplexity(tiny_model, torch.zeros(10, dtype=torch.long), seqlen=1)


def test_window_batches_are_the_non_overlapping_windows_in_order():
    batches = list(window_batches(torch.arange(70), 16, 3, torch.device("cpu"), what="test tokens"))
    assert [tuple(b.shape) for b in batches] == [(3, 16), (1, 16)]  # 4 windows; the last 70 − 64 tokens dropped
    assert torch.equal(torch.cat(batches), torch.arange(64).reshape(4, 16))


def test_save_load_round_trip(tmp_path, calib_tokens):
    model = make_tiny()
    report = lu.prune_model(model, lu.PruneSpec("wanda", lu.SparsityTarget.of(nm="2:4")), calib_tokens, progress=False)
    out = lu.save_pruned(model, tmp_path / "run", None, {"mask_sha256": report.mask_sha256, "dtype": "float32"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no temporary folder left behind
    loaded, tokenizer, saved = lu.load_pruned(out, torch.device("cpu"))
    assert tokenizer is None and saved["lab"] == "wanda-lab"
    assert lu.mask_sha256(loaded) == report.mask_sha256 == saved["mask_sha256"]
    assert lu.model_sparsity(loaded) == lu.model_sparsity(model)
    with torch.no_grad():
        torch.testing.assert_close(loaded(calib_tokens).logits, model(calib_tokens).logits)


def test_interrupted_save_keeps_previous_output(tmp_path):
    good = lu.save_pruned(make_tiny(), tmp_path / "run", None, {"dtype": "float32", "run": 1}, format="dense")
    before = (good / "model.safetensors").read_bytes()

    class DiesWhileSaving:  # the weights are already written when the tokenizer is saved
        def save_pretrained(self, path):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        lu.save_pruned(make_tiny(seed=1), tmp_path / "run", DiesWhileSaving(), {"run": 2}, format="dense")
    assert (good / "model.safetensors").read_bytes() == before
    assert json.loads((good / "report.json").read_text())["run"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_saved_folder_is_readable_by_others(tmp_path):
    out = lu.save_pruned(make_tiny(), tmp_path / "run", None, {"dtype": "float32"})
    assert out.stat().st_mode & 0o055 and (out / "sparse-model.safetensors").stat().st_mode & 0o044


def test_load_pruned_refuses_non_lab_folder(tmp_path):
    with pytest.raises(lu.BadInput, match="is not a lab output folder"):
        lu.load_pruned(tmp_path, torch.device("cpu"))


def test_splits_are_disjoint_deterministic_and_sized():
    splits = {name: lu.corpus_split(name) for name in ("calibration", "validation", "test")}
    titles = [set(a.title for a in arts) for arts in splits.values()]
    assert not (titles[0] & titles[1]) and not (titles[0] & titles[2]) and not (titles[1] & titles[2])
    total = sum(len(t) for t in titles)
    assert total > 9000
    assert 0.75 < len(titles[0]) / total < 0.85 and 0.07 < len(titles[2]) / total < 0.13
    from labutils.core import data
    assert all(data.split_of(a.title) == "test" for a in splits["test"][:50])


def test_calibration_windows_are_seeded():
    tokens = torch.arange(1000)
    a = lu.core.data.random_windows(tokens, 4, 16, seed=0)
    assert a.shape == (4, 16) and torch.equal(a, lu.core.data.random_windows(tokens, 4, 16, seed=0))
    assert not torch.equal(a, lu.core.data.random_windows(tokens, 4, 16, seed=1))
    assert all(torch.equal(w, torch.arange(int(w[0]), int(w[0]) + 16)) for w in a)  # consecutive tokens
    with pytest.raises(lu.BadInput, match="seqlen 1000 is too long for a text of 1000 tokens"):
        lu.core.data.random_windows(tokens, 4, 1000, seed=0)


def test_hub_datasets_unreachable_give_clear_errors():
    with pytest.raises(lu.LabError, match="C4 .* could not be loaded from the Hugging Face Hub"):
        lu.core.data.c4_calibration(None, 4, 16, 0)
    with pytest.raises(lu.LabError, match="WikiText-2 .* could not be loaded"):
        lu.core.data.wikitext2_test(None)


def test_random_profile_data_and_warning():
    profile = lu.get_profile("llama2-7b-random")
    calib = lu.calibration_data(profile, None, 3, 8, seed=0, vocab_size=50)
    assert calib.shape == (3, 8) and int(calib.max()) < 50
    assert "meaningless" in profile.quality_warning
    assert lu.get_profile("smollm2-135m").quality_warning is None


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
