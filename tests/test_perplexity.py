"""Perplexity (evaluate/perplexity.py) against a manual computation, and its windows."""
import math

import pytest
import torch
from conftest import random_tokens

import labutils as lu
from labutils.evaluate.perplexity import window_batches


def test_perplexity_matches_manual_computation(tiny_model):
    tokens = random_tokens((100,), 0)
    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, 96, 32):  # 3 windows of 32; the last 4 tokens are dropped
            window = tokens[start : start + 32][None]
            nll += tiny_model(window, labels=window).loss.item() * 31
            count += 31
    assert lu.perplexity(tiny_model, tokens, seqlen=32, batch_size=2, progress=False) == pytest.approx(
        math.exp(nll / count), rel=1e-5)


def test_perplexity_needs_one_window(tiny_model):
    with pytest.raises(lu.BadInput, match="need at least seqlen=64 test tokens .*got 10"):
        lu.perplexity(tiny_model, torch.zeros(10, dtype=torch.long), seqlen=64)
    with pytest.raises(lu.BadInput, match="seqlen must be an integer ≥ 2; got 1"):  # one token predicts nothing
        lu.perplexity(tiny_model, torch.zeros(10, dtype=torch.long), seqlen=1)


def test_window_batches_are_the_non_overlapping_windows_in_order():
    batches = list(window_batches(torch.arange(70), 16, 3, torch.device("cpu"), what="test tokens"))
    assert [tuple(b.shape) for b in batches] == [(3, 16), (1, 16)]  # 4 windows; the last 70 − 64 tokens dropped
    assert torch.equal(torch.cat(batches), torch.arange(64).reshape(4, 16))
