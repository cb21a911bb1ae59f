"""Every supported decoder family through the CLI (issue F, item 8): ``python -m labutils prune --model FOLDER
--tokenizer TOK`` on a tiny random model saved like a hub folder, at 50 % and 2:4, with Wanda and magnitude.

For each run: every linear and every routed expert's matrix in report.json is exactly at its target (Wanda per
output row, magnitude per matrix, 2:4 in every group), the saved model's zeros are what the report says, and
the embeddings, norms, lm_head and routers of the saved model equal the original's. The in-process tests of the
same models (test_families.py, test_moe.py) check the captured layer inputs and the driver against slow
references; this file checks the path a user takes.
"""
import json

import pytest
import test_families
import test_moe
import torch

import labutils as lu
from labutils.cli import main

FAMILIES = [*test_families.FAMILIES, *test_moe.MOE]
SMALL = ["--nsamples", "4", "--seqlen", "16", "--eval-tokens", "64", "--eval-seqlen", "32", "--batch-size", "2"]


def make(family: str):
    return test_moe.make(family) if family in test_moe.MOE else test_families.make(family)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """family → (its tiny model's folder, the original weights by name), saved once per module."""
    cache = {}

    def get(family: str):
        if family not in cache:
            folder = tmp_path_factory.mktemp(family) / "model"
            model = make(family)
            model.save_pretrained(folder)
            cache[family] = folder, {n: p.detach().clone() for n, p in model.state_dict().items()}
        return cache[family]
    return get


@pytest.mark.slow  # a whole CLI job per family (test_families: in process)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method, target", [("wanda", "50%"), ("magnitude", "50%"), ("wanda", "2:4"),
                                            ("magnitude", "2:4")])
def test_prune_through_the_cli(family, method, target, saved, tiny_with_tokenizer, tmp_path, capsys):
    folder, original = saved(family)
    out = tmp_path / "pruned"
    target_flags = ["--nm", target] if ":" in target else ["--sparsity", "0.5"]
    assert main(["prune", "--model", str(folder), "--tokenizer", str(tiny_with_tokenizer), "--method", method,
                 *target_flags, *SMALL, "--out", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["measured_sparsity"] == 0.5 and report["target"] == target
    rows = report["sublayers"]
    assert rows and all(r["pruned"] * 2 == r["out_features"] * r["in_features"] for r in rows)
    experts = [r for r in rows if ".experts." in r["sublayer"]]
    assert bool(experts) == (family in test_moe.MOE)
    if method == "wanda":  # an expert's tokens are counted; the rest have none
        assert all(isinstance(r["tokens"], int) for r in experts) and all("tokens" not in r for r in rows
                                                                          if r not in experts)
    assert {d["reason"] for d in report["left_dense"]} <= {"router: weighs the experts for each token; never pruned"}
    assert bool(report["left_dense"]) == (family in test_moe.MOE)

    pruned = lu.load_pruned(out, "cpu")[0].state_dict()  # sparse: bit for bit, in the model's own names
    assert pruned.keys() == original.keys()
    changed = {name for name in pruned if not torch.equal(pruned[name], original[name])}
    for name in changed:  # only decoder weight matrices: linears' and stacked experts' weights
        assert name.startswith(("model.layers.", "model.decoder.layers.")) and pruned[name].dim() >= 2, name
        assert not any(part in name for part in ("norm", "embed", "lm_head", "bias", "mlp.gate.", "router",
                                                 "shared_expert_gate")), name
    zeros = sum(int((pruned[n] == 0).sum()) - int((original[n] == 0).sum()) for n in changed)
    assert zeros == sum(r["pruned"] for r in rows)  # the saved zeros are exactly the pruned weights
    for name in changed:
        weight = pruned[name]
        if target == "2:4":  # in every group of 4 inputs of every matrix (the stacked ones per expert)
            matrices = weight.reshape(-1, weight.shape[-1]) if "experts" not in name or "gpt_oss" not in family \
                else weight.transpose(-1, -2).reshape(-1, weight.shape[-2])
            assert int(((matrices != 0).reshape(-1, 4).sum(1) > 2).sum()) == 0, name
        elif method == "wanda" and weight.dim() == 2:  # per output row
            assert ((weight == 0).sum(1) == weight.shape[1] // 2).all(), name
