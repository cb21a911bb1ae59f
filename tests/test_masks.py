"""Scores and masks against direct computations and slow straightforward references."""
import itertools

import pytest
import torch

import labutils as lu
from labutils.prune.masks import nm_mask
from labutils.prune.sparsity import nm_violations


def slow_unstructured_mask(score, sparsity):
    """Reference: for each row, sort (score, column) pairs and prune the first ⌊in·s⌋."""
    out_features, in_features = score.shape
    k = int(in_features * sparsity)
    mask = torch.zeros_like(score, dtype=torch.bool)
    for r in range(out_features):
        order = sorted(range(in_features), key=lambda j: (score[r, j].item(), j))
        for j in order[:k]:
            mask[r, j] = True
    return mask


def slow_nm_mask(score, n, m):
    """Reference: for each row and each group of m columns, prune the m-n lowest."""
    mask = torch.zeros_like(score, dtype=torch.bool)
    for r, g in itertools.product(range(score.shape[0]), range(score.shape[1] // m)):
        cols = range(g * m, (g + 1) * m)
        for j in sorted(cols, key=lambda j: (score[r, j].item(), j))[: m - n]:
            mask[r, j] = True
    return mask


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.5, 0.75, 0.99])
@pytest.mark.parametrize("shape", [(7, 24), (3, 97)])
def test_unstructured_mask_exact_per_row_and_matches_reference(sparsity, shape):
    score = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    mask = lu.unstructured_mask(score, sparsity)
    assert (mask.sum(dim=1) == int(shape[1] * sparsity)).all()
    assert torch.equal(mask, slow_unstructured_mask(score, sparsity))


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4), (3, 4), (1, 2)])
def test_nm_mask_pattern_and_matches_reference(n, m):
    score = torch.rand(5, 32, generator=torch.Generator().manual_seed(n * 10 + m))
    mask = nm_mask(score, n, m)
    kept_per_group = (~mask).reshape(5, 32 // m, m).sum(dim=2)
    assert (kept_per_group == n).all()
    assert torch.equal(mask, slow_nm_mask(score, n, m))


def test_wanda_score_matches_direct_formula():
    gen = torch.Generator().manual_seed(0)
    weight, x = torch.randn(5, 8, generator=gen), torch.randn(30, 8, generator=gen)
    expected = torch.empty(5, 8)
    for i in range(5):
        for j in range(8):
            expected[i, j] = abs(weight[i, j]) * torch.sqrt(sum(x[t, j] ** 2 for t in range(30)))
    torch.testing.assert_close(lu.wanda_score(weight, x.pow(2).sum(0)), expected)


def test_wanda_keeps_small_weight_on_outlier_channel():
    # Magnitude would drop column 0 (small weights); its input channel is 100x larger, so Wanda keeps it.
    weight = torch.tensor([[0.1, 1.0, -0.9, 0.5], [-0.2, 0.8, 1.1, -0.6]])
    sq_norm = torch.tensor([100.0, 1.0, 1.0, 1.0]) ** 2
    mag = lu.unstructured_mask(lu.magnitude_score(weight), 0.5)
    wanda = lu.unstructured_mask(lu.wanda_score(weight, sq_norm), 0.5)
    assert mag[:, 0].all() and not wanda[:, 0].any()


def test_magnitude_score_is_abs_weight():
    weight = torch.tensor([[-3.0, 2.0], [0.5, -0.25]])
    assert torch.equal(lu.magnitude_score(weight), weight.abs())


def test_wanda_score_rejects_wrong_norm_shape():
    with pytest.raises(lu.BadInput, match=r"shape \(8,\)"):
        lu.wanda_score(torch.ones(4, 8), torch.ones(7))


def test_nm_violations_counts_broken_groups():
    weight = torch.tensor([[1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0]])
    assert nm_violations(weight, 2, 4) == 1
    assert nm_violations(weight, 3, 4) == 0
