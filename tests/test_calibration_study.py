"""The calibration study of 06-Calibrate (labutils/jobs/calibration_study.py): its runs are the lab's own Wanda prune
from the windows ``calibration_data`` draws, seeds pick other windows, the code runs calibrate on code, and every
bad input is refused in one line. Tiny random Llama models, and two small token streams standing in for the
Wikipedia and code calibration text (ids 0–127 and 128–255), so the two sources cannot be confused."""
import copy

import matplotlib
import pandas as pd
import pytest
import torch
from conftest import make_tiny, random_tokens

import labutils as lu
from labutils.core import data, sources

matplotlib.use("Agg")

WIKI = torch.arange(3000) * 7 % 128  # the profile's calibration text, ids 0..127
CODE = 128 + torch.arange(3000) * 11 % 128  # the standard library's calibration modules, ids 128..255
TOKENIZER = object()  # the windows come from the streams above; only its presence is checked


@pytest.fixture
def texts(monkeypatch):
    monkeypatch.setattr(data, "split_tokens", lambda tokenizer, split: WIKI)
    monkeypatch.setattr(data, "code_tokens", lambda tokenizer, split: CODE)


@pytest.fixture
def profile():
    return lu.get_profile(None, eval_seqlen=32, batch_size=4)


@pytest.fixture
def study(texts, profile):
    tests = {"wiki": random_tokens((96,), seed=5, vocab_size=128), "code": 128 + random_tokens((96,), seed=6,
                                                                                               vocab_size=128)}
    return lu.CalibrationStudy(profile, make_tiny(), TOKENIZER, tests, 0.5, progress=False)


def test_a_run_is_the_labs_wanda_prune_from_calibration_data_windows(study, profile):
    run = lu.CalibrationRun("code", 4, 16, 3)
    row = study.add([run]).loc[run.label]
    windows = lu.calibration_data(profile, TOKENIZER, 4, 16, 3, source="code")
    assert bool((windows >= 128).all())  # from the code text only
    model = make_tiny()
    lu.prune_model(model, lu.PruneSpec("wanda", 0.5), windows, profile.batch_size, progress=False)
    for test, tokens in study.tests.items():
        assert row[f"perplexity ({test})"] == lu.perplexity(model, tokens, 32, 4, progress=False)
    assert row["windows"] == lu.windows_sha256(windows) and row["tokens"] == 64
    assert (row["source"], row["nsamples"], row["seqlen"], row["seed"]) == ("code", 4, 16, 3)
    assert study.dense_perplexity["perplexity (wiki)"] == lu.perplexity(make_tiny(), study.tests["wiki"], 32, 4,
                                                                         progress=False)


def test_the_code_runs_calibrate_on_code_and_prune_other_weights(study):
    table = study.add(lu.domain_runs(("wiki", "code", "mixed"), [0], nsamples=4, seqlen=16))
    assert table["windows"].nunique() == 3
    masks = {}
    for source in ("wiki", "code"):  # the statistics differ, so do the masks
        model = make_tiny()
        windows = lu.calibration_data(study.profile, TOKENIZER, 4, 16, 0, source=source)
        lu.prune_model(model, lu.PruneSpec("wanda", 0.5), windows, 4, progress=False)
        masks[source] = lu.mask_sha256(model)
    assert masks["wiki"] != masks["code"]
    assert table.loc["wiki 4×16 seed 0", "perplexity (code)"] != table.loc["code 4×16 seed 0", "perplexity (code)"]
    mixed = lu.calibration_data(study.profile, TOKENIZER, 4, 16, 0, source="mixed")
    assert bool((mixed[:2] < 128).all()) and bool((mixed[2:] >= 128).all())


def test_seeds_pick_other_windows_and_the_same_seed_the_same(study, profile):
    table = study.add(lu.nsamples_runs([2, 4], [0, 1], seqlen=16))
    assert list(table.index) == ["wiki 2×16 seed 0", "wiki 4×16 seed 0", "wiki 2×16 seed 1", "wiki 4×16 seed 1"]
    assert table.groupby("nsamples")["windows"].nunique().tolist() == [2, 2]
    again = study.add([lu.CalibrationRun("wiki", 2, 16, 0)])  # measured once, the same row
    assert len(study.table) == 4 and again.iloc[0].equals(table.iloc[0])
    two, four = (lu.calibration_data(profile, TOKENIZER, n, 16, 0) for n in (2, 4))
    assert torch.equal(two, four[:2])  # one seed: the windows are nested
    assert not torch.equal(two, lu.calibration_data(profile, TOKENIZER, 2, 16, 1))


def test_the_seqlen_sweep_keeps_the_token_budget():
    runs = lu.seqlen_runs([16, 32, 64], [0, 1], token_budget=128)
    assert [(r.nsamples, r.seqlen) for r in runs[:3]] == [(8, 16), (4, 32), (2, 64)]
    assert {r.nsamples * r.seqlen for r in runs} == {128} and [r.seed for r in runs] == [0, 0, 0, 1, 1, 1]


def test_seed_spread_against_a_direct_computation():
    table = pd.DataFrame({"nsamples": [1, 1, 1, 4, 4, 4], "perplexity (wiki)": [10.0, 14.0, 12.0, 9.0, 9.5, 9.25]})
    spread = lu.seed_spread(table, "nsamples", "perplexity (wiki)")
    assert spread.loc[1].to_dict() == pytest.approx({"runs": 3, "mean": 12.0, "std": 2.0, "min": 10.0, "max": 14.0,
                                                     "max ÷ min": 1.4})
    assert spread.loc[4, "std"] == pytest.approx(0.25)
    with pytest.raises(lu.BadInput, match=r"seed_spread: no column \['seqlen'\]"):
        lu.seed_spread(table, "seqlen", "perplexity (wiki)")


@pytest.mark.parametrize("make, message", [
    (lambda: lu.CalibrationRun("wiki", 0), r"nsamples must be a positive integer \(≥ 1\); got 0"),
    (lambda: lu.CalibrationRun("wiki", 4, -1), r"seqlen must be a positive integer \(≥ 1\); got -1"),
    (lambda: lu.CalibrationRun("wiki", 4, 16, -1), r"seed must be an integer in \[0, 2\*\*63 − 1\]"),
    (lambda: lu.CalibrationRun(3), "source must be wiki, code, mixed or a folder"),
    (lambda: lu.nsamples_runs([], [0]), "nsamples must be a non-empty sequence of integers; got"),
    (lambda: lu.nsamples_runs([1, 2.5], [0]), r"nsamples must be a positive integer \(≥ 1\); got 2.5"),
    (lambda: lu.nsamples_runs([4, 4], [0]), r"nsamples must not repeat a value; got \[4, 4\]"),
    (lambda: lu.nsamples_runs([4], "012"), "seeds must be a non-empty sequence of integers"),
    (lambda: lu.seqlen_runs([48], [0], 2048), r"token_budget 2048 is not a whole number of windows of seqlen \[48\]"),
    (lambda: lu.seqlen_runs([16], [0], 0), r"token_budget must be a positive integer \(≥ 1\); got 0"),
    (lambda: lu.domain_runs("code", [0]), "sources must be a non-empty sequence"),
])
def test_bad_settings_are_refused_in_one_line(make, message):
    with pytest.raises(lu.BadInput, match=message) as info:
        make()
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("runs, message", [
    ([lu.CalibrationRun("wikipedia", 4, 16)], "calibration must be wiki, code, mixed or a folder .*no such folder"),
    ([lu.CalibrationRun("mixed", 1, 16)], "calibration 'mixed' takes half its windows from each text and needs "
                                          "nsamples ≥ 2; got 1"),
    ([lu.CalibrationRun("wiki", 4, 16), lu.CalibrationRun("wiki", 1, 4096)],
     "seqlen 4096 exceeds the model's maximum sequence length"),
    (lu.CalibrationRun("wiki", 4, 16), "runs must be a non-empty list of CalibrationRun"),
    ([], "runs must be a non-empty list of CalibrationRun"),
    ([("wiki", 4, 16, 0)], "each of runs must be a CalibrationRun"),
])
def test_bad_runs_are_refused_before_anything_is_pruned(study, runs, message):
    with pytest.raises(lu.BadInput, match=message):
        study.add(runs)
    assert study.table.empty


@pytest.mark.parametrize("tests, sparsity, message", [
    ({}, 0.5, "tests must be a non-empty dict"),
    ({"wiki": torch.arange(10)}, 0.5, r"tests\['wiki'\] must be a 1-D tensor of at least eval_seqlen = 32"),
    ({"wiki": torch.zeros(2, 64, dtype=torch.long)}, 0.5, "must be a 1-D tensor"),
    ({"wiki": torch.arange(64)}, 1.0, r"sparsity must be a number in \(0, 1\); got 1.0"),
    ({"wiki": torch.arange(64)}, 0, r"sparsity must be a number in \(0, 1\); got 0"),
])
def test_a_bad_study_is_refused(profile, tests, sparsity, message):
    with pytest.raises(lu.BadInput, match=message):
        lu.CalibrationStudy(profile, make_tiny(), TOKENIZER, tests, sparsity, progress=False)


def test_the_random_profile_refuses_code_calibration(texts):
    profile = lu.get_profile("llama2-7b-random", seqlen=16, eval_seqlen=32)
    study = lu.CalibrationStudy(profile, make_tiny(), None, {"random": random_tokens((64,))}, progress=False)
    with pytest.raises(lu.BadInput, match="calibration 'code' needs a profile with real text"):
        study.add([lu.CalibrationRun("code", 2, 16)])


def test_the_code_test_modules_are_not_calibration_modules():
    """The real standard library: the held-out code test set (``lu.test_tokens(…, source="code")``) is read from
    modules that no calibration window comes from."""
    calibration, test = set(sources.code_split("calibration")), set(sources.code_split("test"))
    assert calibration and test and not calibration & test
    modules = sources.code_modules()
    assert not {path for name in test for path in modules[name]} & {path for name in calibration
                                                                   for path in modules[name]}


def test_the_dense_model_is_never_modified(study):
    before = copy.deepcopy(study.dense.state_dict())
    study.add([lu.CalibrationRun("wiki", 2, 16)])
    assert all(torch.equal(before[k], v) for k, v in study.dense.state_dict().items())


def test_the_window_check_passes_a_sampler_like_the_package_and_fails_a_shifted_or_delegating_one():
    def shifted(tokens, nsamples, seqlen, seed, shift=1):
        starts = torch.randint(0, tokens.numel() - seqlen, (nsamples,), generator=torch.Generator().manual_seed(seed))
        return torch.stack([tokens[s + shift: s + shift + seqlen] for s in starts.tolist()])
    assert lu.check_random_windows(lambda t, n, s, seed: shifted(t, n, s, seed, shift=0), points=3).points == 3
    with pytest.raises(lu.CheckFailed, match="other windows than the package's"):
        lu.check_random_windows(shifted)
    with pytest.raises(lu.CheckFailed, match="calls the lab's own code"):  # the package's own sampler scores 0
        lu.check_random_windows(lambda t, n, s, seed: data.random_windows(t, n, s, seed))


def test_the_plots_have_titled_axes(study):
    table = study.add(lu.nsamples_runs([1, 2], [0, 1], seqlen=16))
    spread = lu.seed_spread(table, "nsamples", "perplexity (wiki)")
    fig = lu.plot_calibration_sweep(spread, 10.0, "windows", "sweep")
    assert fig.axes[0].get_title() == "sweep" and fig.axes[0].get_xlabel() == "windows"
    by_source = {t: lu.seed_spread(table, "source", f"perplexity ({t})") for t in ("wiki", "code")}
    fig = lu.plot_calibration_domains(by_source, {"wiki": 1.0, "code": 2.0}, "domains")
    assert [ax.get_title() for ax in fig.axes] == ["test set: wiki", "test set: code"]
    assert all(ax.get_ylabel() for ax in fig.axes)
