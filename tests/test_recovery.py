"""Mask-preserving LoRA recovery (issue J): training lowers the loss, only the target linears change, every pruned
weight stays exactly zero (mask hash and sparsity unchanged), the result saves and reloads like any pruned model."""
import pytest
import torch
from conftest import make_tiny, random_tokens

import labutils as lu
from labutils.prune.lora import MaskedLoraLinear


def pruned_tiny(target="2:4", seed=0):
    model = make_tiny(seed=seed)
    lu.prune_model(model, lu.PruneSpec("wanda", target), random_tokens((8, 32)), progress=False)
    return model


@pytest.mark.slow  # training runs
@pytest.mark.parametrize("target", ["2:4", "50%"])
def test_recovery_keeps_the_mask_and_lowers_the_loss(target, tmp_path):
    model = pruned_tiny(target)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sha, sparsity = lu.mask_sha256(model), lu.model_sparsity(model)["linear_sparsity"]
    grads = {name: p.requires_grad for name, p in model.named_parameters()}
    tokens = random_tokens((8, 32), seed=3)
    with torch.no_grad():
        start = model(tokens, labels=tokens).loss.item()
    report = lu.recover(model, tokens, lu.RecoverySettings(epochs=4, batch_size=4, lr=5e-3), progress=False)
    with torch.no_grad():
        end = model(tokens, labels=tokens).loss.item()
    assert end < start and report.losses[-1] < report.losses[0]
    assert report.steps == 8 and report.tokens == 4 * tokens.numel()
    assert report.mask_sha256 == lu.mask_sha256(model) == sha
    assert lu.model_sparsity(model)["linear_sparsity"] == sparsity == report.sparsity
    after = model.state_dict()
    assert after.keys() == before.keys()  # no adapter left behind
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {f"model.layers.{i}.self_attn.{p}.weight" for i in range(2) for p in ("q_proj", "v_proj")}
    for name in changed:
        assert bool(((before[name] == 0) == (after[name] == 0)).all()), name
    assert not any(isinstance(m, MaskedLoraLinear) for m in model.modules())
    assert {name: p.requires_grad for name, p in model.named_parameters()} == grads  # peft's freeze undone
    out = lu.save_pruned(model, tmp_path / "recovered", None, {"nm": "2:4" if target == "2:4" else None})
    loaded, _, _ = lu.load_pruned(out, "cpu")
    assert all(torch.equal(a, b) for a, b in zip(after.values(), loaded.state_dict().values()))


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")  # peft asks an old name
def test_masked_update_is_what_training_sees():
    """The LoRA layer computes with W + (B·A · scale) ⊙ M during training, exactly what the merge writes."""
    model = pruned_tiny()
    tokens = random_tokens((4, 16), seed=5)
    lu.recover(model, tokens, lu.RecoverySettings(epochs=1, batch_size=4, targets=("q_proj",)), progress=False)
    from peft import LoraConfig, get_peft_model

    from labutils.prune.lora import KEPT_ATTRIBUTE
    for layer in model.model.layers:
        q = layer.self_attn.q_proj
        object.__setattr__(q, KEPT_ATTRIBUTE, q.weight != 0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False)
    config._register_custom_module({torch.nn.Linear: MaskedLoraLinear})
    layer = get_peft_model(model, config).base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, q.in_features)
    trained = layer(x)
    layer.merge()
    assert torch.allclose(layer(x), trained, atol=1e-5)
    assert torch.equal(layer.get_base_layer().weight == 0, layer.kept == 0)


@pytest.mark.parametrize("kwargs,message", [
    ({"targets": ("qkv",)}, r"targets \['qkv'\] name no linear of this model"),
    ({"targets": "q_proj"}, "targets must be a non-empty tuple of linear names"),
    ({"rank": 0}, "rank must be a positive integer"),
    ({"lr": 0}, r"lr must be a learning rate in \(0, 1\]"),
    ({"epochs": 1.5}, "epochs must be a positive integer"),
])
def test_bad_recovery_arguments(kwargs, message):
    model = pruned_tiny()
    sha = lu.mask_sha256(model)
    with pytest.raises(lu.BadInput, match=message):
        lu.recover(model, random_tokens((4, 16)), lu.RecoverySettings(**kwargs), progress=False)
    assert lu.mask_sha256(model) == sha and not any(isinstance(m, MaskedLoraLinear) for m in model.modules())


def test_recovery_tokens_are_checked():
    with pytest.raises(lu.BadInput, match="recovery tokens"):
        lu.recover(pruned_tiny(), torch.zeros(16, dtype=torch.long), progress=False)
