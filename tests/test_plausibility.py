"""The main job's second line of defence: a dense perplexity far from the profile's recorded one warns (or, with
--strict, stops before pruning), for damage no checksum can see (a weight changed and its manifest rewritten)."""
import shutil

import pytest

import labutils as lu
from labutils.cli import main
from labutils.core import loading, manifests, publish
from labutils.jobs import main_job

PROFILE = lu.get_profile(None)


@pytest.mark.parametrize("dense, strict, outcome", [
    (14.0139, False, None), (14.5, False, None),           # within 5 %: nothing said
    (4.68e6, False, "WARNING"), (float("nan"), False, "WARNING"),
    (4.68e6, True, "stop"),
])
def test_a_far_dense_perplexity_warns_or_stops(dense, strict, outcome, capsys):
    job = lu.PruneJob(lu.PruneSpec("wanda", 0.5), strict=strict)
    if outcome == "stop":
        with pytest.raises(lu.LabError, match=r"the dense perplexity is 4.68e\+06, far from this profile's recorded "
                                              r"14.0139 .*run `python -m labutils prepare`.*--strict"):
            main_job.check_plausible(job, PROFILE, dense, 1024)
        return
    assert main_job.check_plausible(job, PROFILE, dense, 1024) == 14.0139
    err = capsys.readouterr().err
    assert (err.startswith("WARNING: the dense perplexity is") and len(err.splitlines()) == 1) if outcome else err == ""


def test_other_models_and_unrecorded_settings_are_not_judged(capsys):
    assert main_job.check_plausible(lu.PruneJob(lu.PruneSpec("wanda", 0.5), model_path="x"), PROFILE, 1e6, 1024) \
        == 14.0139
    assert main_job.check_plausible(lu.PruneJob(lu.PruneSpec("wanda", 0.5)), PROFILE, 1e6, 777) is None
    assert capsys.readouterr().err == ""


@pytest.mark.slow
def test_a_weight_changed_with_its_manifest_rewritten_is_caught_by_plausibility(tmp_path, monkeypatch, capsys):
    """One weight of a copy of the real cache set to 3e4 and the manifest rewritten to match (every checksum passes):
    --strict stops after the dense perplexity, with one line, and writes nothing."""
    real = loading.embedded_model_dir()
    copy = tmp_path / "cache" / real.name
    shutil.copytree(real, copy)
    from safetensors.torch import load_file, save_file
    weights = load_file(str(copy / "model.safetensors"))
    weights["model.layers.3.mlp.down_proj.weight"][0, 0] = 3e4
    save_file(weights, str(copy / "model.safetensors"), metadata={"format": "pt"})
    manifests.write_manifest(copy, loading.CACHE_KIND)
    monkeypatch.setenv(publish.CACHE_ENV, str(tmp_path / "cache"))
    out = tmp_path / "run"
    assert main(["prune", "--eval-tokens", "1024", "--nsamples", "4", "--strict", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "far from this profile's recorded 14.0139" in err and "--strict" in err and "Traceback" not in err
    assert not out.exists()
