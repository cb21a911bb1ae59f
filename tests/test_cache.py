"""The converted-model cache is verified, every byte on every load: a damaged cache is never used, `prepare`
rebuilds it."""
import json
import shutil

import pytest
from conftest import make_tiny

import labutils as lu
from labutils.cli import main
from labutils.core import checksums, loading, manifests, publish


@pytest.fixture
def fake_cache(tmp_path, monkeypatch):
    """An empty cache folder whose "conversion" writes a tiny model (instead of the 30 s GGUF conversion).
    Returns the list of conversions made."""
    monkeypatch.setenv(publish.CACHE_ENV, str(tmp_path / "cache"))
    conversions = []

    def convert(target):
        conversions.append(target)
        with publish.atomic_folder(target, loading.CACHE_KIND, replace_any=True) as tmp:
            make_tiny().save_pretrained(tmp)

    monkeypatch.setattr(loading, "_convert_embedded", convert)
    return conversions


def overwrite(path, offset, data=b"\xff" * 4096):
    with path.open("r+b") as f:
        f.seek(offset)
        f.write(data)


def inside_a_tensor(path, name: str = "") -> tuple[int, str]:
    """An offset in the middle of the data of a tensor of the safetensors file ``path`` whose name contains
    ``name`` (the largest such tensor), and that tensor's name."""
    with checksums._Mapped(path) as view:
        ranges = {k: r for k, r in checksums.safetensors_ranges(view).items() if k != checksums.HEADER and name in k}
    tensor = max(ranges, key=lambda k: ranges[k][1] - ranges[k][0])
    start, end = ranges[tensor]
    return (start + end) // 2 // 4 * 4, tensor


def test_converted_once_then_checked_quickly(fake_cache):
    path = loading.embedded_model_dir()
    assert loading.embedded_model_dir() == path and len(fake_cache) == 1
    manifest = manifests.read_manifest(path)
    assert manifest["kind"] == loading.CACHE_KIND and {"config.json", "model.safetensors"} <= set(manifest["files"])
    assert all(len(entry["sha256"]) == 64 and entry["bytes"] > 0 for entry in manifest["files"].values())


@pytest.mark.parametrize("damage,problem", [
    (lambda p: (p / "model.safetensors").open("r+b").truncate(5000), "model.safetensors has 5,000 bytes"),
    (lambda p: overwrite(p / "model.safetensors", 0), "model.safetensors: its header differs from what was written"),
    (lambda p: (p / "config.json").unlink(), "config.json is missing"),
])
def test_damaged_cache_stops_the_load_and_prepare_rebuilds_it(fake_cache, damage, problem, capsys):
    path = loading.embedded_model_dir()
    damage(path)
    with pytest.raises(lu.LabError, match=f"the cached model at .* is damaged \\({problem}.*\\); run `python -m "
                                          "labutils prepare`"):
        loading.embedded_model_dir()
    out = path.parent.parent / "run"  # beside the cache (an output inside it is refused before anything else)
    assert main(["prune", "--out", str(out)]) == 2  # the main job stops before any work
    assert "is damaged" in capsys.readouterr().err and not out.exists()
    assert main(["prepare"]) == 0
    assert "converting it again" in capsys.readouterr().err and len(fake_cache) == 2
    assert manifests.verify_folder(path, full=True) is None


def test_one_flipped_bit_anywhere_stops_the_load_naming_the_tensor(fake_cache):
    """Every load checks every byte against the per-tensor xxh3 digests of the manifest: one flipped low bit of a
    weight in the middle of the file is found, with the tensor it hit; prepare rebuilds the folder."""
    path = loading.embedded_model_dir()
    weights = path / "model.safetensors"
    offset, tensor = inside_a_tensor(weights)
    with weights.open("r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(lu.LabError, match=f"model.safetensors: tensor {tensor} differs from what was written "
                                          r"\(xxh3 mismatch\)\); run `python -m labutils prepare`"):
        loading.embedded_model_dir()
    loading.embedded_model_dir(verify="full")
    assert len(fake_cache) == 2 and manifests.verify_folder(path, full=True) is None


def test_an_older_manifest_is_checked_by_sha256_then_given_digests(fake_cache):
    path = loading.embedded_model_dir()
    manifest = json.loads((path / manifests.MANIFEST_FILE).read_text())
    for entry in manifest["files"].values():
        entry.pop("xxh3"), entry.pop("tensors", None)
    (path / manifests.MANIFEST_FILE).write_text(json.dumps(manifest))
    assert not manifests.has_digests(path)
    overwrite(path / "config.json", 2, b"X")
    assert "config.json differs from what was written (SHA-256 mismatch)" in manifests.verify_folder(path)
    loading.embedded_model_dir(verify="full")  # rebuilt, with digests
    assert manifests.has_digests(path) and len(fake_cache) == 2
    manifest = json.loads((path / manifests.MANIFEST_FILE).read_text())
    for entry in manifest["files"].values():
        entry.pop("xxh3"), entry.pop("tensors", None)
    (path / manifests.MANIFEST_FILE).write_text(json.dumps(manifest))
    assert loading.embedded_model_dir() == path and manifests.has_digests(path)  # intact: digests added once


def test_cache_without_manifest_is_rebuilt(fake_cache, capsys):
    path = loading.embedded_model_dir()
    (path / manifests.MANIFEST_FILE).unlink()
    assert loading.embedded_model_dir() == path and len(fake_cache) == 2
    assert "has no lab-manifest.json" in capsys.readouterr().err


@pytest.mark.slow
def test_damage_between_any_samples_of_the_real_cache_stops_the_run_before_work(tmp_path, monkeypatch, capsys):
    """256 bytes inside a decoder layer's weights (NaN, or one weight 3e4: the dense perplexity then reads millions)
    stop the main job at the load with one line naming the tensor, and it writes nothing."""
    real = loading.embedded_model_dir()
    copy = tmp_path / "cache" / real.name
    shutil.copytree(real, copy)
    weights = copy / "model.safetensors"
    offset, tensor = inside_a_tensor(weights, "layers.")
    overwrite(weights, offset, b"\xff" * 256)
    monkeypatch.setenv(publish.CACHE_ENV, str(tmp_path / "cache"))
    out = tmp_path / "run"
    assert main(["prune", "--method", "magnitude", "--eval-tokens", "1024", "--eval-seqlen", "256", "--batch-size", "4",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"tensor {tensor} differs from what was written" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["cache"]


def test_a_file_where_the_cache_folder_goes_is_replaced_without_leftovers(fake_cache, capsys):
    target = publish.cache_dir() / loading.CACHE_FOLDER
    target.parent.mkdir(parents=True)
    target.write_text("not a folder")
    assert main(["prepare"]) == 0
    assert target.is_dir() and manifests.verify_folder(target, full=True) is None
    assert not [p.name for p in target.parent.iterdir() if p.name.startswith(".")]  # no dot-file left behind
