"""Mixture-of-experts models (issue F, item 4): routed experts stored as 3-D parameters are pruned, one (out, in)
matrix per expert and kind; each expert's statistic comes from the calibration tokens its router sends it; an
expert that receives none is pruned by |W| and reported; routers are never pruned and are reported left dense.

Tiny random models on the CPU: Mixtral, Qwen2-MoE (every layer MoE, and layer 0 a plain MLP), Qwen3-MoE, and
GPT-OSS (experts stored transposed, gate and up interleaved, with biases). The slow references below route tokens
from the router weights by hand and compute every expert's inputs with their own formula.
"""
import pytest
import torch
import torch.nn.functional as F
from conftest import random_tokens
from test_driver import whole_model_inputs
from test_families import COMMON
from test_masks import slow_nm_mask, slow_unstructured_mask
from transformers import (
    GptOssConfig,
    GptOssForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

import labutils as lu
from labutils.core.anatomy import ExpertWeight, expert_hidden, find_routers, is_stacked_experts
from labutils.prune.calibration import capture_layer_inputs
from labutils.prune.driver import calibration_stages
from labutils.prune.masks import select_mask
from labutils.prune.sparsity import nm_violations, prunable_linears
from labutils.prune.statistics import INPUT_NORMS, collect_statistics

QWEN2_MOE = dict(moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2, shared_expert_intermediate_size=32)
MOE = {  # name: (config class, model class, config overrides)
    "mixtral": (MixtralConfig, MixtralForCausalLM, dict(num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": (Qwen2MoeConfig, Qwen2MoeForCausalLM, QWEN2_MOE),
    "qwen2_moe-dense0": (Qwen2MoeConfig, Qwen2MoeForCausalLM, {**QWEN2_MOE, "mlp_only_layers": [0]}),
    "qwen3_moe": (Qwen3MoeConfig, Qwen3MoeForCausalLM,
                  dict(moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2, head_dim=8)),
    "gpt_oss": (GptOssConfig, GptOssForCausalLM,
                dict(num_local_experts=4, num_experts_per_tok=2, head_dim=8, sliding_window=8,
                     layer_types=["sliding_attention", "full_attention"],
                     rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
}
SWIGLU = ("mixtral", "qwen2_moe", "qwen2_moe-dense0", "qwen3_moe")  # act(gate) · up, experts stored (out, in)


def make(family: str, seed: int = 0, **overrides):
    config_cls, model_cls, extra = MOE[family]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**{**COMMON, **extra, **overrides})).eval()
    with torch.no_grad():  # non-trivial norms, biases and routers, so nothing hides behind ones, zeros and ties
        for name, param in model.named_parameters():
            if "norm" in name or "bias" in name:
                param.add_(torch.rand_like(param) * 0.5)
            if name.endswith(("mlp.gate.weight", "mlp.router.weight")):
                param.normal_(0, 0.5)
    return model


def untouched(model) -> dict[str, torch.Tensor]:
    """Every parameter value that is not a pruned weight: embeddings, norms, lm_head, routers, biases — and the
    stacked experts' biases (the experts' own weights are compared by their zeros)."""
    pruned = {id(lin.weight) for lin in prunable_linears(model).values() if isinstance(lin, torch.nn.Module)}
    return {n: p.detach().clone() for n, p in model.named_parameters()
            if id(p) not in pruned and not n.endswith(("gate_up_proj", "down_proj", "experts.up_proj"))}


@pytest.fixture
def tokens():
    return random_tokens((4, 16), seed=3)


def moe_blocks(model) -> list[torch.nn.Module | None]:
    """Each decoder layer's MoE block (the parent of its stacked experts), None for a plain MLP layer."""
    return [layer.mlp if is_stacked_experts(getattr(layer.mlp, "experts", layer.mlp)) else None
            for layer in lu.find_decoder_layers(model)]


def test_each_expert_matrix_is_found_and_routers_are_not():
    model = make("qwen2_moe-dense0")
    plain, moe = lu.find_decoder_layers(model)
    assert list(lu.find_linears(plain)) == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                            "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    experts = [f"mlp.experts.{e}.{k}" for e in range(4) for k in ("gate_proj", "up_proj", "down_proj")]
    shared = ["mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj", "mlp.shared_expert.down_proj"]
    assert list(lu.find_linears(moe)) == [*(f"self_attn.{p}_proj" for p in "qkvo"), *experts, *shared]
    assert list(find_routers(moe)) == ["mlp.gate", "mlp.shared_expert_gate"] and not find_routers(plain)
    assert all(isinstance(lu.find_linears(moe)[name], ExpertWeight) for name in experts)


@pytest.mark.parametrize("family", MOE)
@torch.no_grad()
def test_expert_views_are_the_experts_own_matrices(family):
    """Gate and up views put back together are the stored projection; the experts module's own forward for a token
    sent to one expert equals down(hidden) computed from the views; zeroing a view zeroes the model's weight."""
    model = make(family)
    layer = lu.find_decoder_layers(model)[-1]  # a MoE layer in every family
    experts = layer.mlp.experts
    x = torch.randn(5, 32)
    for e in range(4):
        gate, up, down = (ExpertWeight(experts, e, k) for k in ("gate_proj", "up_proj", "down_proj"))
        assert gate.weight.shape == up.weight.shape == (down.in_features, 32) and down.out_features == 32
        stored = experts.gate_up_proj[e].T if experts.is_transposed else experts.gate_up_proj[e]
        both = torch.cat([gate.weight, up.weight]) if experts.is_concatenated else \
            torch.stack([gate.weight, up.weight], dim=1).reshape(-1, 32)  # interleaved rows: g0, u0, g1, u1 …
        assert torch.equal(both, stored)
        hidden = expert_hidden(experts, e, x)
        if family in SWIGLU:  # independent of the experts interface: the SwiGLU formula on the views
            torch.testing.assert_close(hidden, F.silu(x @ gate.weight.T) * (x @ up.weight.T))
        expected = hidden @ down.weight.T + (experts.down_proj_bias[e] if experts.has_bias else 0)
        only = torch.full((5, 1), e)
        torch.testing.assert_close(experts(x, only, torch.ones(5, 1)), expected)
    name = "mlp.experts.2.up_proj"
    lu.find_linears(layer)[name].weight.zero_()
    assert int((lu.find_linears(layer)[name].weight != 0).sum()) == 0
    assert int((experts.gate_up_proj == 0).sum()) == gate.weight.numel()


@pytest.mark.parametrize("family", MOE)
@torch.no_grad()
def test_captured_layer_inputs_are_the_models_hidden_states(family, tokens):
    model = make(family)
    captured = capture_layer_inputs(model, tokens, batch_size=2)
    states = model(input_ids=tokens[:2], output_hidden_states=True, use_cache=False).hidden_states
    torch.testing.assert_close(captured.hidden[0], states[0])
    first = lu.find_decoder_layers(model)[0]
    out = first(captured.hidden[0], **captured.kwargs[0][0])
    torch.testing.assert_close(out[0] if isinstance(out, tuple) else out, states[1])


def reference_expert_statistics(model, tokens, layer_index: int) -> dict[str, torch.Tensor]:
    """Σ x² per expert matrix of one MoE layer of the dense model, by hand: the MoE block's inputs from a hook on the
    block, each token's experts as the top-k router logits, hidden states as SwiGLU of the views."""
    block = lu.find_decoder_layers(model)[layer_index].mlp
    seen = []
    handle = block.register_forward_hook(lambda m, args, out: seen.append(args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        for sample in tokens:
            model(sample[None])
    handle.remove()
    x = torch.cat(seen)
    chosen = torch.topk(x @ block.gate.weight.T, model.config.num_experts_per_tok, dim=1).indices
    stats = {}
    for e in range(4):
        routed = x[(chosen == e).any(dim=1)]
        gate, up = (ExpertWeight(block.experts, e, k).weight for k in ("gate_proj", "up_proj"))
        hidden = F.silu(routed @ gate.T) * (routed @ up.T)
        stats.update({f"mlp.experts.{e}.gate_proj": (routed ** 2).sum(0), f"mlp.experts.{e}.up_proj": (routed ** 2).sum(0),
                      f"mlp.experts.{e}.down_proj": (hidden ** 2).sum(0), f"tokens {e}": routed.shape[0]})
    return stats


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_each_expert_sees_only_the_tokens_its_router_sends(family, tokens):
    model = make(family)
    layers = lu.find_decoder_layers(model)
    inputs = capture_layer_inputs(model, tokens, batch_size=2)
    inputs.run(layers[0], 0, advance=True)
    linears = lu.find_linears(layers[1])
    stats = collect_statistics(layers[1], 1, inputs, linears, INPUT_NORMS)
    reference = reference_expert_statistics(model, tokens, 1)
    counts = [reference[f"tokens {e}"] for e in range(4)]
    assert sum(counts) == tokens.numel() * 2 and min(counts) > 0  # two experts per token, none idle
    for name, expected in reference.items():
        if name.startswith("tokens"):
            assert stats.routed[f"mlp.experts.{name[-1]}.gate_proj"] == expected
        else:
            torch.testing.assert_close(stats[name], expected, rtol=1e-5, atol=1e-6)
    if family == "qwen2_moe":  # the shared expert sees every token
        assert set(stats.routed) == {n for n in linears if ".experts." in n}


def slow_moe_wanda(model, tokens, mask_fn):
    """Reference Wanda for MoE models: layer by layer, the WHOLE partly pruned model run one sample at a time;
    linears' inputs from hooks, experts' from ``reference_expert_statistics``; masks by a Python-loop selection."""
    for i, layer in enumerate(lu.find_decoder_layers(model)):
        linears = lu.find_linears(layer)
        modules = {n: lin for n, lin in linears.items() if isinstance(lin, torch.nn.Module)}
        sq = {name: (x ** 2).sum(0) for name, x in whole_model_inputs(model, tokens, modules).items()}
        if len(linears) > len(modules):
            reference = reference_expert_statistics(model, tokens, i)
            for e in range(4):  # the documented rule: an expert that received no token is scored by |W| alone
                for kind in ("gate_proj", "up_proj", "down_proj"):
                    name = f"mlp.experts.{e}.{kind}"
                    sq[name] = reference[name] if reference[f"tokens {e}"] else torch.ones_like(reference[name])
        with torch.no_grad():
            for name, lin in linears.items():
                score = lin.weight.abs() * torch.sqrt(sq[name])
                lin.weight[mask_fn(score)] = 0


@pytest.mark.slow  # the slow whole-model reference (test_driver keeps the fast loop's reference check)
@pytest.mark.parametrize("family, target, mask_fn", [
    *[(family, 0.5, lambda s: slow_unstructured_mask(s, 0.5)) for family in SWIGLU],
    ("mixtral", "2:4", lambda s: slow_nm_mask(s, 2, 4)), ("qwen2_moe-dense0", "2:4", lambda s: slow_nm_mask(s, 2, 4))])
def test_driver_matches_the_slow_moe_reference(family, target, mask_fn, tokens):
    fast, slow = make(family), make(family)
    lu.prune_model(fast, lu.PruneSpec("wanda", target), tokens, batch_size=2, progress=False)
    slow_moe_wanda(slow, tokens, mask_fn)
    assert lu.mask_sha256(fast) == lu.mask_sha256(slow)
    for (name, a), b in zip(prunable_linears(fast).items(), prunable_linears(slow).values()):
        assert torch.equal(a.weight == 0, b.weight == 0), name


@pytest.mark.parametrize("family", MOE)
@pytest.mark.parametrize("method, target", [("wanda", 0.5), ("magnitude", 0.5), ("wanda", "2:4"), ("magnitude", "2:4"),
                                            ("sparsegpt", 0.5), ("ria", "2:4")])
def test_every_expert_pruned_exactly_and_nothing_else_touched(family, method, target, tokens):
    model = make(family)
    before = untouched(model)
    stacked_before = {n: p.detach().clone() for n, p in model.named_parameters()
                      if n.endswith(("gate_up_proj", "down_proj")) and p.dim() == 3}
    report = lu.prune_model(model, lu.PruneSpec(method, target), tokens, batch_size=2, progress=False)
    linears = prunable_linears(model)
    assert sum(".experts." in n for n in linears) == 2 * 4 * 3 - (12 if family == "qwen2_moe-dense0" else 0)
    for name, lin in linears.items():
        zeros = lin.weight == 0
        if target == "2:4":
            assert nm_violations(lin.weight, 2, 4) == 0 and int(zeros.sum()) == lin.weight.numel() // 2, name
        elif method == "wanda":  # per output row
            assert (zeros.sum(dim=1) == lin.in_features // 2).all(), name
        else:  # magnitude per matrix; SparseGPT per block of columns
            assert int(zeros.sum()) == lin.weight.numel() // 2, name
    after = untouched(model)
    assert after.keys() == before.keys() and all(torch.equal(after[n], before[n]) for n in before)
    if method != "sparsegpt":  # the only method that updates the weights it keeps
        for name, param in model.named_parameters():
            if name in stacked_before:
                kept = param != 0
                assert torch.equal(param[kept], stacked_before[name][kept]), name
    total = sum(lin.weight.numel() for lin in linears.values())
    zeros = sum(int((lin.weight == 0).sum()) for lin in linears.values())
    assert report.measured_sparsity == zeros / total == 0.5
    routers = {d.weight for d in report.left_dense}
    assert routers == {f"mlp.{r}.weight" for r in (["router"] if family == "gpt_oss" else ["gate"])} | (
        {"mlp.shared_expert_gate.weight"} if family.startswith("qwen2_moe") else set())
    table = report.layer_table()
    assert table["left dense"].str.contains("router").tolist() == [b is not None for b in moe_blocks(model)]
    assert (table["sparsity"] == 0.5).all()


def test_an_expert_without_tokens_is_pruned_by_magnitude_and_reported(tokens, tiny_with_tokenizer, tmp_path, capsys):
    """One expert per token; the router sends every token to expert 0 or 1 (logits ±v·x), never to 2 or 3."""
    model = make("mixtral", num_experts_per_tok=1)
    with torch.no_grad():
        for layer in lu.find_decoder_layers(model):
            router = layer.mlp.gate.weight
            router[1] = -router[0]
            router[2:] = 0
    expected = {}
    for i, layer in enumerate(lu.find_decoder_layers(model)):
        for e in (2, 3):
            for kind in ("gate_proj", "up_proj", "down_proj"):
                w = ExpertWeight(layer.mlp.experts, e, kind).weight
                expected[f"layers.{i}.mlp.experts.{e}.{kind}"] = select_mask(w.abs(), lu.SparsityTarget(0.5), "row")
    report = lu.prune_model(model, lu.PruneSpec("wanda", 0.5), tokens, batch_size=2, progress=False)
    assert report.empty_experts == list(expected)
    linears = prunable_linears(model)
    for name, mask in expected.items():
        assert torch.equal(linears[name].weight == 0, mask), name
    frame = report.to_frame().set_index(["layer", "sublayer"])
    assert frame.loc[(0, "mlp.experts.0.gate_proj"), "tokens"] + frame.loc[(0, "mlp.experts.1.gate_proj"), "tokens"] \
        == tokens.numel()
    assert report.layer_table()["experts without tokens"].tolist() == [6, 6]


def test_true_sequential_collects_every_down_projection_in_one_later_stage(tokens):
    model = make("qwen2_moe")
    names = list(lu.find_linears(lu.find_decoder_layers(model)[0]))
    downs = [n for n in names if n.endswith("down_proj")]
    assert calibration_stages(names, True) == [
        [n for n in names if n != "self_attn.o_proj" and n not in downs], ["self_attn.o_proj"], downs]
    report = lu.prune_model(model, lu.PruneSpec("wanda", 0.5, true_sequential=True), tokens, batch_size=2,
                            progress=False)
    frame = report.to_frame()
    experts = frame[frame["sublayer"].str.contains(".experts.", regex=False)]
    assert report.measured_sparsity == 0.5 and experts["tokens"].notna().all()
    assert report.empty_experts == [f"layers.{r.layer}.{r.sublayer}" for r in experts.itertuples() if r.tokens == 0]


@pytest.mark.parametrize("mode", ["owl", "low_memory"])
def test_owl_and_the_low_memory_mode_take_experts(mode, tokens):
    model = make("mixtral")
    if mode == "owl":
        spec = lu.PruneSpec("wanda", 0.5, owl=lu.OwlConfig(m=2, lam=0.05))
        report = lu.prune_model(model, spec, tokens, batch_size=2, progress=False)
        assert len(report.layer_sparsity) == 2 and report.layer_sparsity[0] != report.layer_sparsity[1]
        return
    reference = make("mixtral")
    lu.prune_model(reference, lu.PruneSpec("wanda", 0.5), tokens, batch_size=2, progress=False)
    lu.prune_model(model, lu.PruneSpec("wanda", 0.5), tokens, batch_size=2, progress=False, low_memory="cpu")
    assert lu.mask_sha256(model) == lu.mask_sha256(reference)


def test_weights_the_lab_cannot_prune_stop_the_run_with_their_names():
    """A stacked experts module without the experts interface's flags is not understood: refused, not skipped."""
    model = make("mixtral")
    experts = lu.find_decoder_layers(model)[1].mlp.experts
    del experts.is_concatenated
    with pytest.raises(lu.BadInput, match=r"decoder layer 1 holds weights the lab cannot prune \("
                                          r"mlp.experts.gate_up_proj \(4, 128, 32\), mlp.experts.down_proj \(4, 32, 64\)"):
        lu.find_decoder_layers(model)
