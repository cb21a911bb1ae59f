"""Comparison groups (per output row or per layer) and the tie rule: equal scores are pruned in index order."""

import pytest
import torch
from conftest import make_tiny

import labutils as lu
from labutils.prune.masks import SMALL_GROUP, group_rank, layer_mask, lowest_mask, nm_mask
from labutils.prune.methods import sparsegpt
from labutils.prune.sparsity import prunable_linears


def stable_lowest(score: torch.Tensor, k: int) -> torch.Tensor:
    """Reference: a stable ascending sort of each row, the first k pruned."""
    order = torch.sort(score, dim=1, stable=True).indices[:, :k]
    return torch.zeros_like(score, dtype=torch.bool).scatter_(1, order, True)


def tied_scores(shape, seed=0, levels=3):
    """Scores with many exact ties: a few distinct values only."""
    return torch.randint(0, levels, shape, generator=torch.Generator().manual_seed(seed)).float()


@pytest.mark.parametrize("k", [0, 1, 5, 11, 12])
def test_lowest_mask_breaks_ties_by_lower_column_first(k):
    score = tied_scores((9, 12))
    assert torch.equal(lowest_mask(score, k), stable_lowest(score, k))


def test_all_equal_scores_prune_the_first_columns():
    mask = lu.unstructured_mask(torch.zeros(3, 8), 0.5)
    assert mask[:, :4].all() and not mask[:, 4:].any()


@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.7])
def test_layer_mask_is_one_threshold_for_the_matrix_with_stable_ties(sparsity):
    score = tied_scores((6, 10), seed=1, levels=4)
    mask = layer_mask(score, sparsity)
    assert int(mask.sum()) == int(score.numel() * sparsity)
    assert torch.equal(mask, stable_lowest(score.reshape(1, -1), int(score.numel() * sparsity)).reshape(6, 10))
    assert score[mask].max() <= score[~mask].min()  # one threshold: nothing kept scores below anything pruned


def test_nm_mask_ties_prune_the_lower_index_in_each_group():
    score = torch.tensor([[1.0, 1.0, 1.0, 1.0, 2.0, 0.0, 2.0, 0.0]])
    assert nm_mask(score, 2, 4).tolist() == [[True, True, False, False, False, True, False, True]]
    score = tied_scores((5, 16), seed=2)
    assert torch.equal(nm_mask(score, 2, 4), stable_lowest(score.reshape(-1, 4), 2).reshape(5, 16))


@pytest.mark.parametrize("m", [2, 4, 8, 16])
@pytest.mark.parametrize("ties", [False, True])
def test_nm_mask_by_comparison_equals_the_selection_per_group(m, ties):
    """N:M groups up to SMALL_GROUP are ranked by comparing each score with the others (G1: no topk / kthvalue per
    4-element slice); the result is the per-group selection's, with and without ties, for every N."""
    generator = torch.Generator().manual_seed(m)
    shape = (33, 6 * m)
    score = (torch.randint(0, 3, shape, generator=generator).float() if ties
             else torch.randn(shape, generator=generator))
    for n in range(m + 1):
        expected = lowest_mask(score.reshape(-1, m), m - n).reshape(shape)
        assert torch.equal(nm_mask(score, n, m), expected), (n, m)
    if m <= SMALL_GROUP:  # each row of ranks is a permutation of 0..m-1
        ranks = group_rank(score.reshape(-1, m)).long()
        assert torch.equal(ranks.sort(dim=1).values, torch.arange(m).expand_as(ranks))


def test_sparsegpt_block_selection_ties_follow_the_same_rule():
    weight, hessian = torch.ones(4, 8), torch.eye(8) * 2  # every w²/[H⁻¹]²_jj equal: all tied
    _, mask = sparsegpt.sparsegpt_weights(weight, hessian, lu.SparsityTarget(0.5), blocksize=8)
    assert mask.reshape(-1)[:16].all() and not mask.reshape(-1)[16:].any()


def test_masks_do_not_depend_on_the_kernels_tie_order():
    """The same tied scores on a permuted layout give the permuted mask only where no tie decides."""
    score = tied_scores((4, 12), seed=3)
    first = lu.unstructured_mask(score, 0.5)
    assert torch.equal(first, lu.unstructured_mask(score.clone().contiguous(), 0.5))
    assert torch.equal(first, lu.unstructured_mask(score.t().contiguous().t(), 0.5))  # non-contiguous input


# --- the comparison group of the methods ------------------------------------------------------------------------

@pytest.mark.parametrize("method,default", [("magnitude", "layer"), ("wanda", "row"), ("ria", "layer")])
def test_default_groups_are_the_papers(method, default):
    assert lu.PruneSpec(method, 0.5).params["group"] == default
    assert "group" not in lu.PruneSpec("sparsegpt", 0.5).params


@pytest.mark.parametrize("method", ["magnitude", "wanda", "ria"])
def test_per_layer_group_prunes_the_matrix_and_per_row_each_row(method, calib_tokens):
    per_layer, per_row = make_tiny(), make_tiny()
    lu.prune_model(per_layer, lu.PruneSpec(method, 0.5, params={"group": "layer"}), calib_tokens, progress=False)
    lu.prune_model(per_row, lu.PruneSpec(method, 0.5, params={"group": "row"}), calib_tokens, progress=False)
    uneven = 0
    for (name, a), b in zip(prunable_linears(per_layer).items(), prunable_linears(per_row).values()):
        zeros_a, zeros_b = (a.weight == 0).sum(dim=1), (b.weight == 0).sum(dim=1)
        assert int(zeros_a.sum()) == int(a.weight.numel() * 0.5), name  # exact per matrix
        assert (zeros_b == a.in_features // 2).all(), name  # exact per row
        uneven += int(zeros_a.min() < zeros_a.max())
    assert uneven > 0  # one threshold per matrix leaves rows unevenly sparse


def test_group_is_ignored_by_nm_targets_and_refused_elsewhere(tiny_model, calib_tokens):
    a, b = make_tiny(), make_tiny()
    lu.prune_model(a, lu.PruneSpec("magnitude", "2:4", params={"group": "layer"}), progress=False)
    lu.prune_model(b, lu.PruneSpec("magnitude", "2:4", params={"group": "row"}), progress=False)
    assert lu.mask_sha256(a) == lu.mask_sha256(b)
    with pytest.raises(lu.BadInput, match="group must be one of row, layer; got 'column'"):
        lu.PruneSpec("wanda", 0.5, params={"group": "column"})
    with pytest.raises(lu.BadInput, match="method 'sparsegpt' does not take group"):
        lu.PruneSpec("sparsegpt", 0.5, params={"group": "row"})


def test_group_names_the_variant():
    assert lu.PruneSpec("magnitude", 0.5).label == "magnitude 50%"
    spec = lu.PruneSpec("magnitude", 0.5, params={"group": "row"})
    assert (spec.label, spec.slug) == ("magnitude (group=row) 50%", "magnitude-grouprow-50")
