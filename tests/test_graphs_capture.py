"""Captured forwards take the eager path's attention (G1 item 4), checked on the CPU by simulating stream capture.

transformers treats CUDA stream capture as tracing: under capture it builds a full causal mask and SDPA runs with
``is_causal=False`` (no flash kernel). ``sparse24.graphs.causal_attention`` is what ``graphed_forward`` wraps its
warm-up and capture in; here ``torch.cuda.is_current_stream_capturing`` is patched to say "capturing" and SDPA is
spied on, so what a real capture would hand to SDPA is visible without a GPU.
"""
import pytest
import torch
from conftest import make_tiny, random_tokens
from torch.nn import functional as F
from transformers import MistralConfig, MistralForCausalLM

from labutils.sparse24.graphs import CAUSAL_SDPA, causal_attention


@pytest.fixture
def sdpa_calls(monkeypatch):
    """(attn_mask is None, is_causal) of every SDPA call, in order."""
    calls = []
    real = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append((kwargs.get("attn_mask") is None, kwargs.get("is_causal")))
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    return calls


@pytest.fixture
def capturing(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)


@torch.no_grad()
def _logits(model, ids):
    return model(input_ids=ids, use_cache=False).logits


def test_capture_without_the_switch_gets_a_full_mask(sdpa_calls, capturing):
    """The defect this guards against: under capture transformers hands SDPA a mask and is_causal=False."""
    model = make_tiny()
    _logits(model, random_tokens((1, 16)))
    assert sdpa_calls and all(call == (False, False) for call in sdpa_calls)


def test_capture_with_the_switch_runs_causal_sdpa_and_same_logits(sdpa_calls, monkeypatch):
    model = make_tiny()
    ids = random_tokens((2, 16))
    eager = _logits(model, ids)
    assert sdpa_calls == [(True, True)] * model.config.num_hidden_layers  # what an eager forward hands SDPA
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    sdpa_calls.clear()
    with causal_attention(model, ids.shape[1]) as switched:
        captured = _logits(model, ids)
    assert switched
    assert sdpa_calls == [(True, True)] * model.config.num_hidden_layers
    assert torch.equal(captured, eager)
    assert model.config._attn_implementation == "sdpa"


def test_the_switch_is_undone_when_the_forward_raises():
    model = make_tiny()
    with pytest.raises(RuntimeError, match="boom"), causal_attention(model, 16):
        assert model.config._attn_implementation == CAUSAL_SDPA
        raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"


def test_eager_attention_is_left_alone(sdpa_calls, capturing):
    model = make_tiny()
    model.config._attn_implementation = "eager"
    with causal_attention(model, 16) as switched:
        _logits(model, random_tokens((1, 16)))
    assert not switched and not sdpa_calls and model.config._attn_implementation == "eager"


def _tiny_mistral(window: int | None) -> MistralForCausalLM:
    config = MistralConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                           sliding_window=window)
    torch.manual_seed(0)
    return MistralForCausalLM(config).eval()


@pytest.mark.parametrize("window, length, expected", [(8, 16, False), (32, 16, True), (None, 16, True)])
def test_sliding_window_shorter_than_the_prompt_keeps_its_mask(sdpa_calls, capturing, window, length, expected):
    """A window that cuts into the prompt is not plain causal attention: no switch, and the logits stay right."""
    model = _tiny_mistral(window)
    ids = random_tokens((1, length))
    reference = _logits(model, ids)
    with causal_attention(model, length) as switched:
        got = _logits(model, ids)
    assert switched is expected
    torch.testing.assert_close(got, reference)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: a real stream capture")
def test_real_capture_runs_causal_sdpa_and_matches_eager(sdpa_calls):
    from labutils.sparse24.graphs import graphed_forward
    model = make_tiny().half().cuda()
    ids = random_tokens((1, 64)).cuda()
    eager = _logits(model, ids)[:, -1:]
    sdpa_calls.clear()
    graphed = graphed_forward(model, ids, warmup=1, logits_to_keep=1)
    try:
        assert sdpa_calls and all(call == (True, True) for call in sdpa_calls)  # warm-up and capture alike
        torch.testing.assert_close(graphed(ids).float(), eager.float(), atol=1e-2, rtol=1e-2)
    finally:
        graphed.release()
