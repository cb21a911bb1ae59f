"""The lab's output folders (core/saved.py): saving and loading back, an interrupted save, who may read them, and
folders that are not the lab's."""
import json

import pytest
import torch
from conftest import make_tiny

import labutils as lu


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
