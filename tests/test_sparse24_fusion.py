"""Fused 2:4 projections: q/k/v and gate/up as one sparse GEMM each, with cuSPARSELt emulated on the CPU (and, on a
GPU with 2:4 kernels, for real)."""
import copy
import gc
import weakref

import pytest
import torch
from conftest import make_tiny, random_tokens
from test_sparse24 import fake_mm_search, needs_2_4_kernels, prune_2_4, use_emulated_kernels

import labutils as lu
from labutils.prune.sparsity import prunable_linears
from labutils.sparse24.convert import to_semi_structured, verify_semi_structured
from labutils.sparse24.graphs import graphed_forward
from labutils.sparse24.kernel import CsltPlan, FusedSlice24, FusedSparse24, SparseLinear24, fusion_groups
from labutils.sparse24.shapes import linear_shapes
from labutils.speed.latency import memory_table

GROUPS = tuple((f"layers.{i}.self_attn.q_proj", f"layers.{i}.self_attn.k_proj", f"layers.{i}.self_attn.v_proj")
               if part == "attn" else (f"layers.{i}.mlp.gate_proj", f"layers.{i}.mlp.up_proj")
               for i in range(2) for part in ("attn", "mlp"))


def converted_pair(monkeypatch, **config):
    """A pruned fp16 tiny Llama converted unfused and fused (emulated kernels), with both reports and the log of
    kernel calls."""
    calls = use_emulated_kernels(monkeypatch)
    dense = prune_2_4(make_tiny(**config)).half()
    plain, fused = copy.deepcopy(dense), copy.deepcopy(dense)
    return dense, (plain, to_semi_structured(plain)), (fused, to_semi_structured(fused, fuse=True)), calls


@pytest.mark.parametrize("bias", [False, True])
def test_fused_model_gives_the_unfused_logits(monkeypatch, bias):
    """Bit for bit: the emulated product sums in float64, so stacking rows changes no rounding."""
    _, (plain, plain_report), (fused, report), calls = converted_pair(monkeypatch, attention_bias=bias)
    assert report.fused == GROUPS and plain_report.fused == ()
    assert report.converted == plain_report.converted and len(report.converted) == 14
    assert isinstance(prunable_linears(fused)["layers.0.self_attn.q_proj"], FusedSlice24)
    assert isinstance(prunable_linears(fused)["layers.0.self_attn.o_proj"], SparseLinear24)
    tokens = random_tokens((2, 11))
    with torch.inference_mode():
        calls.clear()
        expected = plain(input_ids=tokens, use_cache=False).logits
        assert len(calls) == 14  # one GEMM per linear
        calls.clear()
        got = fused(input_ids=tokens, use_cache=False).logits
        assert len(calls) == 8  # per layer: q+k+v, o, gate+up, down
    assert torch.equal(got, expected)


def test_each_fused_member_gives_its_own_linear(monkeypatch):
    dense, (plain, _), (fused, _), _ = converted_pair(monkeypatch, attention_bias=True)
    plain_linears, fused_linears = prunable_linears(plain), prunable_linears(fused)
    for name, lin in prunable_linears(dense).items():
        x = torch.randn(2, 5, lin.in_features, dtype=torch.float16)
        got = fused_linears[name](x)
        assert got.shape == (2, 5, lin.out_features), name
        assert torch.equal(got, plain_linears[name](x)), name
        torch.testing.assert_close(got, lin(x), atol=2e-3, rtol=2e-3)  # fp16 F.linear rounds partial sums
    q_out = fused_linears["layers.0.self_attn.q_proj"](torch.randn(2, 5, 64, dtype=torch.float16))
    assert not q_out.is_contiguous()  # a column slice of the stacked product …
    assert q_out.view(2, 5, 4, 16).shape == (2, 5, 4, 16)  # … that the attention's head reshape still accepts


def test_fused_product_is_computed_once_per_input_and_not_kept(monkeypatch):
    _, _, (fused, _), calls = converted_pair(monkeypatch)
    layer = prunable_linears(fused)
    q, k, v = (layer[f"layers.0.self_attn.{p}"] for p in ("q_proj", "k_proj", "v_proj"))
    x = torch.randn(1, 3, 64, dtype=torch.float16)
    calls.clear()
    q(x), k(x)
    assert len(calls) == 1
    k(x)  # k again before v: a second call, computed again (not a stale slice)
    assert len(calls) == 2
    q(torch.randn(1, 3, 64, dtype=torch.float16))  # a new input is computed anew
    assert len(calls) == 3
    probe = weakref.ref(x)
    q(x), k(x), v(x)
    del x
    gc.collect()
    assert probe() is None  # every member took its slice: the input and product are dropped


def test_fused_model_counts_like_the_unfused_one(monkeypatch):
    dense, (plain, plain_report), (fused, report), _ = converted_pair(monkeypatch)
    assert report.dense_mib == pytest.approx(plain_report.dense_mib)
    assert report.compressed_mib == pytest.approx(plain_report.compressed_mib)  # each stacked weight counted once
    table = memory_table({"dense": dense, "plain": plain, "fused": fused})
    assert table.loc["fused", "parameters"] == table.loc["dense", "parameters"]
    assert (table["non-zero parameters"] == table.loc["dense", "non-zero parameters"]).all()
    assert table.loc["fused", "MiB (params + buffers)"] == table.loc["plain", "MiB (params + buffers)"]
    for name, lin in prunable_linears(dense).items():
        assert prunable_linears(fused)[name].nonzero_weights() == int(lin.weight.count_nonzero()), name
    assert sum(isinstance(m, FusedSparse24) for m in fused.modules()) == 4


def test_fused_search_runs_once_per_stacked_shape(monkeypatch):
    use_emulated_kernels(monkeypatch)
    searched = []
    fake_mm_search(monkeypatch, (4, 2, 1, 9), searched)
    model = prune_2_4(make_tiny()).half()
    report = to_semi_structured(model, fuse=True, alg_search_tokens=20)
    assert sorted(shape for _, shape in searched) == [(64, 24)] * 3 + [(128, 24)]  # 4 shapes, 20 → 24 tokens
    assert sorted(p.numel() for p, _ in searched) == [64 * 64, 64 * 128, 128 * 64, 256 * 64]  # stacked weights
    assert set(report.plans.values()) == {CsltPlan(4, 2, 1)} and report.alg_ids["layers.1.mlp.up_proj"] == 4


def test_only_complete_alike_groups_fuse(monkeypatch):
    use_emulated_kernels(monkeypatch)
    model = prune_2_4(make_tiny()).half()
    names = ["layers.0.self_attn.q_proj", "layers.0.self_attn.k_proj", "layers.1.mlp.gate_proj",
             "layers.1.mlp.up_proj"]
    report = to_semi_structured(model, linears=names, fuse=True)
    assert report.fused == (("layers.1.mlp.gate_proj", "layers.1.mlp.up_proj"),)  # v_proj was not selected
    assert isinstance(prunable_linears(model)["layers.0.self_attn.q_proj"], SparseLinear24)
    linears = prunable_linears(prune_2_4(make_tiny()))
    assert fusion_groups(linears) == list(GROUPS)
    linears["layers.0.self_attn.k_proj"] = torch.nn.Linear(64, 32, bias=True)  # a bias the others lack
    linears["layers.1.mlp.up_proj"] = torch.nn.Linear(64, 128, dtype=torch.float16)  # another dtype
    assert fusion_groups(linears) == [GROUPS[1], GROUPS[2]]


@pytest.mark.parametrize("kwargs,message", [
    ({"fuse": True, "kernel": "stock"}, "fuse=True needs kernel='lab' .*; got 'stock'"),
    ({"fuse": "yes"}, "fuse must be True or False; got 'yes'"),
])
def test_bad_fuse_arguments(tiny_model, kwargs, message):
    with pytest.raises(lu.BadInput, match=message):
        to_semi_structured(tiny_model, **kwargs)


def test_fused_linear_shapes(tiny_model):
    assert linear_shapes(tiny_model, fused=True) == {
        (128, 64): ["self_attn.q_proj+k_proj+v_proj"], (64, 64): ["self_attn.o_proj"],
        (256, 64): ["mlp.gate_proj+up_proj"], (64, 128): ["mlp.down_proj"]}
    with pytest.raises(lu.BadInput, match="fused must be True or False; got 1"):
        linear_shapes(tiny_model, fused=1)


@needs_2_4_kernels
def test_gpu_fused_model_matches_dense_and_replays():
    config = lu.tiny_llama_config(vocab_size=512, hidden_size=128, intermediate_size=256, num_attention_heads=4,
                                  num_key_value_heads=2, max_position_embeddings=256)
    dense = prune_2_4(lu.random_model(config, torch.float16, torch.device("cuda"), seed=0))
    plain, fused = copy.deepcopy(dense), copy.deepcopy(dense)
    to_semi_structured(plain)
    report = to_semi_structured(fused, fuse=True)
    assert len(report.fused) == 4 and set(report.plans.values()) == {CsltPlan()}
    tokens = torch.randint(0, 512, (1, 64), generator=torch.Generator().manual_seed(0)).cuda()
    check = verify_semi_structured(dense, fused, tokens, atol=1e-2, rtol=1e-2)
    assert check.passed and check.top1_agreement > 0.98, check
    graphed = graphed_forward(fused, tokens)
    with torch.inference_mode():
        eager = plain(input_ids=tokens, use_cache=False).logits
    torch.testing.assert_close(graphed(tokens).clone(), eager, atol=1e-2, rtol=1e-2)
    graphed.release()
    for name, lin in prunable_linears(dense).items():
        assert prunable_linears(fused)[name].nonzero_weights() == int(lin.weight.count_nonzero()), name
