"""The data (core/data.py): the corpus splits, seeded calibration windows, unreachable hub datasets and the random
profile's tokens."""
import pytest
import torch

import labutils as lu


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
