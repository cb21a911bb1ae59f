"""The layer-by-layer driver on tiny random Llama-family models."""
import pytest
import torch
from conftest import make_tiny, random_tokens
from test_masks import slow_nm_mask, slow_unstructured_mask
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

import labutils as lu
from labutils.prune.calibration import run_layer
from labutils.prune.sparsity import nm_violations, prunable_linears
from labutils.prune.statistics import InputNormAccumulator


def test_captured_inputs_reproduce_the_model(tiny_model, calib_tokens):
    """Running the layers one by one on the captured inputs gives the model's own final hidden state."""
    inputs = lu.capture_layer_inputs(tiny_model, calib_tokens, batch_size=4)
    assert "position_embeddings" in inputs.kwargs[0][0]
    layers = lu.find_decoder_layers(tiny_model)
    for i, layer in enumerate(layers):
        inputs.hidden = run_layer(layer, i, inputs)
    with torch.no_grad():
        expected = tiny_model.model(calib_tokens, output_hidden_states=True).hidden_states[-1]
        got = tiny_model.model.norm(torch.cat(inputs.hidden))
    torch.testing.assert_close(got, expected)


def test_norm_hooks_match_direct_sum_of_squares(tiny_model, calib_tokens):
    layer = lu.find_decoder_layers(tiny_model)[0]
    linears = lu.find_linears(layer)
    seen = {}
    handles = [lin.register_forward_hook(lambda m, a, o, n=name: seen.setdefault(n, []).append(a[0]))
               for name, lin in linears.items()]
    inputs = lu.capture_layer_inputs(tiny_model, calib_tokens, batch_size=4)
    with InputNormAccumulator(linears) as acc:
        run_layer(layer, 0, inputs)
    for h in handles:
        h.remove()
    for name in linears:
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in seen[name]])
        assert x.shape[0] == calib_tokens.numel()
        torch.testing.assert_close(acc.stats[name], x.pow(2).sum(0))


def whole_model_inputs(model, tokens, modules: dict) -> dict:
    """name → (tokens, in): every input each of ``modules`` receives while the WHOLE model runs one sample at a time."""
    xs = {name: [] for name in modules}
    handles = [m.register_forward_hook(lambda mod, a, o, n=name: xs[n].append(a[0].reshape(-1, a[0].shape[-1])))
               for name, m in modules.items()]
    with torch.no_grad():
        for sample in tokens:
            model(sample[None])
    for h in handles:
        h.remove()
    return {name: torch.cat(x) for name, x in xs.items()}


def slow_sequential_wanda(model, tokens, mask_fn):
    """Reference Wanda: for each layer in order, run the WHOLE (partly pruned) model one sample at a time with
    hooks on that layer's linears, compute |W|·‖X‖ by hand and prune with a Python-loop mask."""
    for layer in lu.find_decoder_layers(model):
        linears = lu.find_linears(layer)
        xs = whole_model_inputs(model, tokens, linears)
        with torch.no_grad():
            for name, lin in linears.items():
                x = xs[name]
                score = lin.weight.abs() * torch.sqrt((x * x).sum(0))
                lin.weight[mask_fn(score)] = 0


@pytest.mark.parametrize("target,mask_fn", [
    (lu.SparsityTarget.of(sparsity=0.5), lambda s: slow_unstructured_mask(s, 0.5)),
    (lu.SparsityTarget.of(nm="2:4"), lambda s: slow_nm_mask(s, 2, 4)),
])
def test_driver_matches_slow_reference(calib_tokens, target, mask_fn):
    fast, slow = make_tiny(), make_tiny()
    lu.prune_model(fast, lu.PruneSpec("wanda", target), calib_tokens, batch_size=3, progress=False)
    slow_sequential_wanda(slow, calib_tokens, mask_fn)
    assert lu.mask_sha256(fast) == lu.mask_sha256(slow)
    for (name, a), b in zip(prunable_linears(fast).items(), prunable_linears(slow).values()):
        assert torch.equal(a.weight, b.weight), name


@pytest.mark.parametrize("method", ["magnitude", "wanda", "ria"])  # the per-row methods; SparseGPT is per block
@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.8])
def test_exact_per_row_sparsity_and_untouched_embeddings(method, sparsity, calib_tokens):
    model = make_tiny()
    embed, lm_head = model.model.embed_tokens.weight.clone(), model.lm_head.weight.clone()
    norms = [p.clone() for n, p in model.named_parameters() if "norm" in n]
    spec = lu.PruneSpec(method, sparsity, params={"group": "row"})  # each output row: exact per row
    report = lu.prune_model(model, spec, calib_tokens, progress=False)
    for name, lin in prunable_linears(model).items():
        zeros_per_row = (lin.weight == 0).sum(dim=1)
        assert (zeros_per_row == int(lin.in_features * sparsity)).all(), name
    assert torch.equal(model.model.embed_tokens.weight, embed) and torch.equal(model.lm_head.weight, lm_head)
    assert all(torch.equal(a, p) for a, p in zip(norms, (p for n, p in model.named_parameters() if "norm" in n)))
    assert len(report.sublayers) == 2 * 7
    linears = prunable_linears(model).values()
    expected = sum(int(lin.in_features * sparsity) * lin.out_features for lin in linears)
    assert report.measured_sparsity == pytest.approx(expected / sum(lin.weight.numel() for lin in linears))


@pytest.mark.parametrize("nm", ["2:4", "4:8", "1:4"])
def test_nm_pattern_holds_everywhere(nm, calib_tokens):
    model = make_tiny()
    n, m = lu.parse_nm(nm)
    lu.prune_model(model, lu.PruneSpec("wanda", nm), calib_tokens, progress=False)
    table = lu.sparsity_table(model, nm=(n, m))
    assert (table[f"{nm} violations"] == 0).all()
    assert table["sparsity"].tolist() == pytest.approx([1 - n / m] * len(table))


def test_batched_and_one_sample_calibration_agree(calib_tokens):
    a, b = make_tiny(), make_tiny()
    lu.prune_model(a, lu.PruneSpec("wanda", 0.5), calib_tokens, batch_size=6, progress=False)
    lu.prune_model(b, lu.PruneSpec("wanda", 0.5), calib_tokens, batch_size=1, progress=False)
    assert lu.mask_sha256(a) == lu.mask_sha256(b)


def test_same_seed_same_mask_other_seed_other_mask():
    def tokens(seed):
        return random_tokens((8, 16), seed)

    hashes = []
    for seed in (0, 0, 1):
        model = make_tiny()
        hashes.append(lu.prune_model(model, lu.PruneSpec("wanda", 0.5), tokens(seed), progress=False).mask_sha256)
    assert hashes[0] == hashes[1] != hashes[2]


def test_wanda_and_magnitude_differ(calib_tokens):
    a, b = make_tiny(), make_tiny()
    lu.prune_model(a, lu.PruneSpec("wanda", 0.5), calib_tokens, progress=False)
    lu.prune_model(b, lu.PruneSpec("magnitude", 0.5), None, progress=False)
    assert lu.mask_sha256(a) != lu.mask_sha256(b)


@pytest.mark.parametrize("config_cls,model_cls", [(MistralConfig, MistralForCausalLM), (Qwen2Config, Qwen2ForCausalLM)])
def test_other_llama_family_models(config_cls, model_cls, calib_tokens):
    config = config_cls(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    model = model_cls(config).eval()
    lu.prune_model(model, lu.PruneSpec("wanda", "2:4"), calib_tokens, progress=False)
    assert all(nm_violations(lin.weight, 2, 4) == 0 for lin in prunable_linears(model).values())


def test_gpt2_conv1d_projections_are_refused_by_name():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    found = (r"unsupported architecture GPT2LMHeadModel \(model_type='gpt2'\): decoder layer 0 projects with "
             r"GPT-2-style Conv1D modules \(attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj\)")
    with pytest.raises(lu.BadInput, match=found):
        lu.find_decoder_layers(model)


def test_a_model_without_a_decoder_stack_names_what_was_found():
    model = nn.Sequential(nn.Embedding(8, 4), nn.Linear(4, 8))
    with pytest.raises(lu.BadInput, match=r"unsupported architecture Sequential .*no decoder layers at model.layers, "
                                          r"model.decoder.layers.*top-level modules: 0, 1"):
        lu.find_decoder_layers(model)


def test_every_layer_is_checked_not_only_the_first():
    model = make_tiny()
    model.model.layers[1].mlp = nn.Identity()  # a layer may lack some linears (MoE models differ per layer) …
    assert "mlp.up_proj" not in lu.find_linears(lu.find_decoder_layers(model)[1])
    model.model.layers[1].self_attn = nn.Identity()  # … but one with none at all is refused, by its index
    with pytest.raises(lu.BadInput, match=r"decoder layer 1 \(LlamaDecoderLayer\) holds no nn.Linear to prune"):
        lu.find_decoder_layers(model)


def test_collect_input_norms_matches_driver_statistics(tiny_model, calib_tokens):
    norms = lu.collect_input_norms(tiny_model, calib_tokens, layer_index=1, batch_size=2)
    assert set(norms) == set(lu.find_linears(lu.find_decoder_layers(tiny_model)[1]))
    assert norms["mlp.down_proj"].shape == (128,) and (norms["self_attn.q_proj"] > 0).all()
    with pytest.raises(lu.BadInput, match="layer_index 2 out of range; the model has 2 decoder layers"):
        lu.collect_input_norms(tiny_model, calib_tokens, layer_index=2)
