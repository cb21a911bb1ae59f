"""Model families beyond Llama (issue F, items 3 and 8): wherever the decoder stack lives, every nn.Linear of every
decoder layer is found and pruned, fused projections (Phi-3) included, and nothing else is touched.

One tiny random model per family (2 layers, in-features multiples of 4, on the CPU). For each: the linears found,
exact sparsity for Wanda per row, magnitude per layer and 2:4, embeddings / norms / lm_head untouched, the
captured layer inputs equal the model's own hidden states, and the driver equal to the slow whole-model reference.
"""
import pytest
import torch
from conftest import random_tokens
from test_driver import slow_sequential_wanda
from test_masks import slow_unstructured_mask
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GemmaConfig,
    GemmaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

import labutils as lu
from labutils.prune.calibration import capture_layer_inputs, layer_output
from labutils.prune.sparsity import nm_violations, prunable_linears

COMMON = dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)
LLAMA_LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                 "mlp.up_proj", "mlp.down_proj"]
FAMILIES = {  # name: (config class, model class, config overrides, the linears of each decoder layer)
    "mistral": (MistralConfig, MistralForCausalLM, {}, LLAMA_LINEARS),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}, LLAMA_LINEARS),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"head_dim": 8}, LLAMA_LINEARS),
    "gemma": (GemmaConfig, GemmaForCausalLM, {"head_dim": 8}, LLAMA_LINEARS),
    "gemma2": (Gemma2Config, Gemma2ForCausalLM, {"head_dim": 8, "sliding_window": 8}, LLAMA_LINEARS),
    "gemma3-text": (Gemma3TextConfig, Gemma3ForCausalLM, {"head_dim": 8, "sliding_window": 8}, LLAMA_LINEARS),
    "phi3": (Phi3Config, Phi3ForCausalLM, {"pad_token_id": 0},
             ["self_attn.o_proj", "self_attn.qkv_proj", "mlp.gate_up_proj", "mlp.down_proj"]),
    "opt": (OPTConfig, OPTForCausalLM, "opt",
            ["self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj", "self_attn.out_proj", "fc1", "fc2"]),
}
OPT = dict(vocab_size=256, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
           max_position_embeddings=64, word_embed_proj_dim=32, pad_token_id=1)


def make(family: str, seed: int = 0):
    config_cls, model_cls, overrides, _ = FAMILIES[family]
    config = config_cls(**OPT) if overrides == "opt" else config_cls(**{**COMMON, **overrides})
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():  # non-trivial norms, so a wrong capture cannot hide behind all-ones scales
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(torch.rand_like(param) * 0.5)
    return model


def untouched(model) -> dict[str, torch.Tensor]:
    """Every parameter that is not a decoder linear's weight: embeddings, norms, lm_head, biases."""
    pruned = {id(lin.weight) for lin in prunable_linears(model).values()}
    return {n: p.detach().clone() for n, p in model.named_parameters() if id(p) not in pruned}


@pytest.fixture
def tokens():
    return random_tokens((4, 16), seed=3)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_linear_of_every_layer_is_found(family):
    model = make(family)
    layers = lu.find_decoder_layers(model)
    assert len(layers) == 2
    for layer in layers:
        assert list(lu.find_linears(layer)) == FAMILIES[family][3]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method, target", [("wanda", 0.5), ("magnitude", 0.5), ("wanda", "2:4"), ("magnitude", "2:4")])
def test_pruned_exactly_and_nothing_else_touched(family, method, target, tokens):
    model = make(family)
    before = untouched(model)
    lu.prune_model(model, lu.PruneSpec(method, target), tokens, batch_size=2, progress=False)
    for name, lin in prunable_linears(model).items():
        zeros = lin.weight == 0
        if target == "2:4":
            assert nm_violations(lin.weight, 2, 4) == 0 and int(zeros.sum()) == lin.weight.numel() // 2, name
        elif method == "wanda":  # per output row
            assert (zeros.sum(dim=1) == lin.in_features // 2).all(), name
        else:  # magnitude: one threshold for the whole matrix
            assert int(zeros.sum()) == lin.weight.numel() // 2, name
    after = untouched(model)
    assert after.keys() == before.keys() and all(torch.equal(after[n], before[n]) for n in before)


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_captured_layer_inputs_are_the_models_hidden_states(family, tokens):
    model = make(family)
    captured = capture_layer_inputs(model, tokens, batch_size=2)
    states = model(input_ids=tokens[:2], output_hidden_states=True, use_cache=False).hidden_states
    torch.testing.assert_close(captured.hidden[0], states[0])
    first = lu.find_decoder_layers(model)[0]
    torch.testing.assert_close(layer_output(first(captured.hidden[0], **captured.kwargs[0][0])), states[1])


@pytest.mark.parametrize("family", FAMILIES)
def test_driver_matches_the_slow_whole_model_reference(family, tokens):
    fast, slow = make(family), make(family)
    lu.prune_model(fast, lu.PruneSpec("wanda", 0.5), tokens, batch_size=2, progress=False)
    slow_sequential_wanda(slow, tokens, lambda score: slow_unstructured_mask(score, 0.5))
    for (name, a), b in zip(prunable_linears(fast).items(), prunable_linears(slow).values()):
        assert torch.equal(a.weight == 0, b.weight == 0), name


@pytest.mark.parametrize("family, later", [("opt", ["self_attn.out_proj", "fc2"]),
                                           ("phi3", ["self_attn.o_proj", "mlp.down_proj"])])
def test_true_sequential_stages_follow_each_familys_names(family, later, tokens):
    from labutils.prune.driver import calibration_stages
    names = list(lu.find_linears(lu.find_decoder_layers(make(family))[0]))
    assert calibration_stages(names, True) == [[n for n in names if n not in later], *[[n] for n in later]]
    model = make(family)
    lu.prune_model(model, lu.PruneSpec("wanda", 0.5, true_sequential=True), tokens, batch_size=2, progress=False)
    assert all((lin.weight == 0).sum(dim=1).eq(lin.in_features // 2).all() for lin in prunable_linears(model).values())
