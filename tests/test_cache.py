"""The converted-model cache is verified: a damaged cache is never used, `prepare` rebuilds it, NaN stops a run."""
import shutil

import pytest
from conftest import make_tiny

import labutils as lu
from labutils.cli import main
from labutils.core import models, storage


@pytest.fixture
def fake_cache(tmp_path, monkeypatch):
    """An empty cache folder whose "conversion" writes a tiny model (instead of the 30 s GGUF conversion).
    Returns the list of conversions made."""
    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache"))
    conversions = []

    def convert(target):
        conversions.append(target)
        with storage.atomic_folder(target, models.CACHE_KIND, replace_any=True) as tmp:
            make_tiny().save_pretrained(tmp)

    monkeypatch.setattr(models, "_convert_embedded", convert)
    return conversions


def overwrite(path, offset, data=b"\xff" * 4096):
    with path.open("r+b") as f:
        f.seek(offset)
        f.write(data)


def between_samples(size: int) -> int:
    """An offset where 256 bytes touch no sampled block (the quick check cannot see them; the full one can)."""
    offsets = storage._sample_offsets(size)
    gap_start, gap_end = offsets[31] + storage.SAMPLE_BYTES, offsets[32]
    assert gap_end - gap_start > 256
    return (gap_start + gap_end - 256) // 2 // 4 * 4


def test_converted_once_then_checked_quickly(fake_cache):
    path = models.embedded_model_dir()
    assert models.embedded_model_dir() == path and len(fake_cache) == 1
    manifest = storage.read_manifest(path)
    assert manifest["kind"] == models.CACHE_KIND and {"config.json", "model.safetensors"} <= set(manifest["files"])
    assert all(len(entry["sha256"]) == 64 and entry["bytes"] > 0 for entry in manifest["files"].values())


@pytest.mark.parametrize("damage,problem", [
    (lambda p: (p / "model.safetensors").open("r+b").truncate(5000), "model.safetensors has 5,000 bytes"),
    (lambda p: overwrite(p / "model.safetensors", 0), "model.safetensors differs .*sampled hash"),
    (lambda p: (p / "config.json").unlink(), "config.json is missing"),
])
def test_damaged_cache_stops_the_load_and_prepare_rebuilds_it(fake_cache, damage, problem, capsys):
    path = models.embedded_model_dir()
    damage(path)
    with pytest.raises(lu.LabError, match=f"the cached model at .* is damaged \\({problem}.*\\); run `python -m "
                                          "labutils prepare`"):
        models.embedded_model_dir()
    out = path.parent / "run"
    assert main(["prune", "--out", str(out)]) == 2  # the main job stops before any work
    assert "is damaged" in capsys.readouterr().err and not out.exists()
    assert main(["prepare"]) == 0
    assert "converting it again" in capsys.readouterr().err and len(fake_cache) == 2
    assert storage.verify_folder(path, full=True) is None


def test_change_the_quick_check_misses_is_found_by_prepare(fake_cache):
    path = models.embedded_model_dir()
    weights = path / "model.safetensors"
    overwrite(weights, between_samples(weights.stat().st_size), b"\xff" * 256)
    assert models.embedded_model_dir() == path and len(fake_cache) == 1  # sizes and samples still match
    assert "SHA-256 mismatch" in storage.verify_folder(path, full=True)
    models.embedded_model_dir(verify="full")
    assert len(fake_cache) == 2 and storage.verify_folder(path, full=True) is None


def test_cache_without_manifest_is_rebuilt(fake_cache, capsys):
    path = models.embedded_model_dir()
    (path / storage.MANIFEST_FILE).unlink()
    assert models.embedded_model_dir() == path and len(fake_cache) == 2
    assert "has no lab-manifest.json" in capsys.readouterr().err


@pytest.mark.slow
def test_nan_weights_in_a_copy_of_the_real_cache_stop_the_run(tmp_path, monkeypatch, capsys):
    """Bytes the quick check cannot see (between its samples) make the weights NaN: the run stops at the dense
    perplexity with one line and writes nothing."""
    real = models.embedded_model_dir()
    copy = tmp_path / "cache" / real.name
    shutil.copytree(real, copy)
    weights = copy / "model.safetensors"
    overwrite(weights, between_samples(weights.stat().st_size), b"\xff" * 256)  # inside a decoder layer's weights
    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache"))
    out = tmp_path / "run"
    assert main(["prune", "--method", "magnitude", "--eval-tokens", "1024", "--eval-seqlen", "256", "--batch-size", "4",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "perplexity is not finite" in err and "Traceback" not in err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["cache"]
