"""Timing statistics, fair timing loops, prefill / decode on a tiny model, memory counts, the zeros demo."""
import random

import numpy as np
import pytest
import torch
from conftest import make_tiny, random_tokens

import labutils as lu
from labutils.prune.sparsity import prunable_linears
from labutils.speed import timing
from labutils.speed.latency import latency_table, memory_table, random_prompt, zeros_matmul_table
from labutils.speed.timing import TimingStats, time_interleaved, timed_greedy_decode


class FakeClock:
    """Returns the given readings in order and counts how often it was read."""

    def __init__(self, readings):
        self.readings = list(readings)
        self.reads = 0

    def __call__(self):
        self.reads += 1
        return self.readings.pop(0)


CPU = torch.device("cpu")


# ---- TimingStats ------------------------------------------------------------------------------------------------

def test_stats_of_1_to_20_exact():
    values = list(range(1, 21))
    random.Random(0).shuffle(values)  # order must not matter
    stats = TimingStats.of(values)
    assert (stats.n, stats.mean, stats.min, stats.max) == (20, 10.5, 1.0, 20.0)
    assert stats.p50 == pytest.approx(10.5)  # position 19·0.5 = 9.5: halfway between 10 and 11
    assert stats.p95 == pytest.approx(19.05)  # position 19·0.95 = 18.05: 19 + 0.05·(20 − 19)


def test_stats_match_numpy_linear_percentiles():
    values = np.random.default_rng(0).exponential(size=37)
    stats = TimingStats.of(values.tolist())
    assert stats.p50 == pytest.approx(np.percentile(values, 50))
    assert stats.p95 == pytest.approx(np.percentile(values, 95))
    assert stats.mean == pytest.approx(values.mean())


def test_stats_of_one_value_and_rate():
    stats = TimingStats.of([0.25])
    assert stats.p50 == stats.p95 == stats.min == stats.max == 0.25
    assert stats.rate_p50 == pytest.approx(4.0)


@pytest.mark.parametrize("seconds,message", [([], "seconds must hold at least one timing; got an empty list"),
                                             ([0.1, -0.2], r"finite and ≥ 0 seconds; got \[-0.2\]"),
                                             ([float("nan")], "finite and ≥ 0 seconds; got")])
def test_stats_bad_input(seconds, message):
    with pytest.raises(lu.BadInput, match=message):
        TimingStats.of(seconds)


# ---- timing loops -----------------------------------------------------------------------------------------------

def test_time_interleaved_excludes_warmup_with_fake_clock():
    calls = []
    clock = FakeClock([0.0, 1.0, 10.0, 13.0, 20.0, 26.0])  # three timed calls: 1 s, 3 s, 6 s
    stats = time_interleaved({"fn": lambda: calls.append(1)}, warmup=2, repeats=3, device=CPU, clock=clock)["fn"]
    assert len(calls) == 5  # 2 warm-up + 3 timed
    assert clock.reads == 6  # the clock is read only around timed calls
    assert (stats.n, stats.min, stats.p50, stats.max) == (3, 1.0, 3.0, 6.0)
    assert stats.mean == pytest.approx(10 / 3)


def test_time_interleaved_rotates_order():
    log = []
    fns = {name: (lambda n=name: log.append(n)) for name in "abc"}
    stats = time_interleaved(fns, warmup=1, repeats=2, device=CPU, clock=FakeClock(range(100)))
    assert log == list("abc" "bca" "cab")
    assert {name: s.n for name, s in stats.items()} == {"a": 2, "b": 2, "c": 2}


@pytest.mark.parametrize("fns,kwargs,message", [
    ({"fn": lambda: None}, {"warmup": -1, "repeats": 3}, "warmup must be an integer ≥ 0; got -1"),
    ({"fn": lambda: None}, {"warmup": 1, "repeats": 0}, "repeats must be a positive integer"),
    ({"fn": lambda: None}, {"warmup": 1.5, "repeats": 2}, "warmup must be an integer ≥ 0; got 1.5"),
    ({"fn": 3}, {"warmup": 0, "repeats": 1}, r"fns\['fn'\] must be callable; got 3"),
    ({}, {"warmup": 0, "repeats": 1}, "fns must hold at least one callable; got an empty dict"),
])
def test_time_interleaved_bad_input(fns, kwargs, message):
    with pytest.raises(lu.BadInput, match=message):
        time_interleaved(fns, device=CPU, **kwargs)


# ---- prefill and decode on a tiny model -------------------------------------------------------------------------

def test_latency_table_runs_one_prefill_and_one_decode_per_round(tiny_model):
    """Prefill: one cache-free forward over the prompt, last position's logits only. Decode: a cached prefill, then
    exactly new_tokens one-token steps. Each is run once per round: warmup + repeats rounds."""
    calls = []

    def record(module, args, kwargs, out):
        calls.append((kwargs["input_ids"].clone(), kwargs.get("use_cache"), kwargs.get("logits_to_keep")))

    handle = tiny_model.register_forward_hook(record, with_kwargs=True)
    try:
        latency_table({"m": tiny_model}, prompt_len=16, new_tokens=3, warmup=1, repeats=2, progress=False)
    finally:
        handle.remove()
    prompt = random_prompt(tiny_model, 16)
    prefills, decodes = calls[:3], calls[3:]
    assert all(torch.equal(ids, prompt) and (cache, keep) == (False, 1) for ids, cache, keep in prefills)
    assert [(ids.shape[1], cache) for ids, cache, _ in decodes] == [(16, True), (1, True), (1, True), (1, True)] * 3
    assert all(torch.equal(ids, prompt) for ids, _, _ in decodes[::4])


def test_latency_table_decode_columns_pool_the_timed_steps(tiny_model, monkeypatch):
    """decode ms/token P50 and P95 come from every step of the timed rounds only (warm-up dropped)."""
    steps = iter([[9.0, 9.0, 9.0], [0.01, 0.02, 0.03], [0.04, 0.05, 0.06]])  # warm-up round, then 2 timed rounds
    monkeypatch.setattr(timing, "timed_greedy_decode", lambda model, ids, new_tokens: (None, next(steps)))
    table = latency_table({"m": tiny_model}, prompt_len=8, new_tokens=3, warmup=1, repeats=2, progress=False)
    pooled = [0.01, 0.02, 0.03, 0.04, 0.05, 0.06]
    assert table.loc["m", "decode ms/token P50"] == pytest.approx(np.percentile(pooled, 50) * 1e3)
    assert table.loc["m", "decode ms/token P95"] == pytest.approx(np.percentile(pooled, 95) * 1e3)


def test_decode_matches_greedy_without_cache_and_counts_steps(tiny_model):
    prompt = random_tokens((2, 8), 3)
    calls = []
    handle = tiny_model.register_forward_hook(lambda m, args, kwargs, out: calls.append(kwargs["input_ids"].shape[1]),
                                              with_kwargs=True)
    try:
        tokens, seconds = timed_greedy_decode(tiny_model, prompt, 5)
    finally:
        handle.remove()
    assert calls == [8, 1, 1, 1, 1, 1]  # one prefill, then exactly 5 one-token decode steps
    assert tokens.shape == (2, 6) and len(seconds) == 5 and all(s > 0 for s in seconds)
    ids = prompt
    with torch.no_grad():
        for _ in range(6):  # the slow way: recompute the whole sequence for every token
            next_id = tiny_model(input_ids=ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, next_id], dim=1)
    assert torch.equal(tokens, ids[:, 8:])


def test_decode_too_long_for_model(tiny_model):
    with pytest.raises(lu.BadInput, match=r"model 'm': prompt_len \+ new_tokens 130 exceeds .* allowed: 1..128"):
        latency_table({"m": tiny_model}, prompt_len=120, new_tokens=10, progress=False)


def test_latency_table_columns_and_reference(tiny_model):
    table = latency_table({"dense": tiny_model, "again": tiny_model}, prompt_len=8, new_tokens=3, warmup=0,
                          repeats=2, progress=False)
    assert list(table.index) == ["dense", "again"]
    assert list(table.columns) == ["prefill ms P50", "prefill ms P95", "decode ms/token P50", "decode ms/token P95",
                                   "prefill × dense", "decode × dense"]
    assert table.loc["dense", "prefill × dense"] == 1.0 and table.loc["dense", "decode × dense"] == 1.0
    assert (table.to_numpy() > 0).all()


def test_latency_table_bad_input(tiny_model):
    with pytest.raises(lu.BadInput, match="models must hold at least one model; got an empty dict"):
        latency_table({}, prompt_len=8, new_tokens=2)
    with pytest.raises(lu.BadInput, match="prompt_len must be a positive integer"):
        latency_table({"m": tiny_model}, prompt_len=0, new_tokens=2, progress=False)
    with pytest.raises(lu.BadInput, match="new_tokens must be a positive integer"):
        latency_table({"m": tiny_model}, prompt_len=8, new_tokens=0, progress=False)


# ---- memory -----------------------------------------------------------------------------------------------------

def test_memory_table_counts(tiny_model):
    before = memory_table({"m": tiny_model}).loc["m"]
    direct = sum(p.numel() for p in tiny_model.parameters())
    assert before["parameters"] == direct
    assert before["non-zero parameters"] == sum(int((p != 0).sum()) for p in tiny_model.parameters())
    weight = prunable_linears(tiny_model)["layers.0.self_attn.q_proj"].weight
    nonzero_in_first_row = int((weight[0] != 0).sum())
    with torch.no_grad():
        weight[0] = 0
    after = memory_table({"m": tiny_model}).loc["m"]
    assert before["non-zero parameters"] - after["non-zero parameters"] == nonzero_in_first_row
    assert after["zero share"] == pytest.approx(1 - after["non-zero parameters"] / direct, abs=5e-5)  # 4 decimals
    buffer_bytes = sum(b.numel() * b.element_size() for b in tiny_model.buffers())
    assert after["MiB (params + buffers)"] * 2**20 == pytest.approx(direct * 4 + buffer_bytes)
    assert "peak prefill MiB (CUDA)" not in after  # CPU: not tracked, so no column of NaN


def test_memory_table_counts_tied_weights_once():
    untied, tied = make_tiny(tie_word_embeddings=False), make_tiny(tie_word_embeddings=True)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    table = memory_table({"untied": untied, "tied": tied})
    shared = 256 * 64  # vocab × hidden
    assert table.loc["untied", "parameters"] - table.loc["tied", "parameters"] == shared
    difference = table.loc["untied", "MiB (params + buffers)"] - table.loc["tied", "MiB (params + buffers)"]
    assert difference * 2**20 == pytest.approx(shared * 4)


def test_memory_table_empty():
    with pytest.raises(lu.BadInput, match="models must hold at least one model; got an empty dict"):
        memory_table({})


# ---- zeros alone do not speed up a matmul -----------------------------------------------------------------------

def test_zeros_matmul_table_rows(tiny_model):
    weight = prunable_linears(tiny_model)["layers.0.mlp.up_proj"].weight  # (128, 64)
    table = zeros_matmul_table(weight, 16, warmup=1, repeats=3)
    assert list(table.index) == ["dense weight, dense matmul", "50% zeros, dense matmul",
                                 "50% zeros, CSR sparse matmul"]
    assert table["zero share"].tolist() == pytest.approx([0.0, 0.5, 0.5], abs=1e-3)
    assert table["× dense"].iloc[0] == 1.0 and (table["P50 ms"] > 0).all()
    assert table.attrs["shape"] == (128, 64)
    assert int((weight == 0).sum()) == 0  # the caller's weight is not modified


@pytest.mark.parametrize("kwargs,message", [
    ({"weight": torch.zeros(4), "tokens": 2}, r"weight must be a 2-D \(out, in\) tensor; got a tensor of shape \(4,\)"),
    ({"weight": torch.zeros(4, 4), "tokens": 0}, "tokens must be a positive integer"),
    ({"weight": torch.zeros(4, 4), "tokens": 2, "sparsity": 1.0}, r"sparsity must be a number in \(0, 1\); got 1.0"),
])
def test_zeros_matmul_bad_input(kwargs, message):
    with pytest.raises(lu.BadInput, match=message):
        zeros_matmul_table(**kwargs)


@pytest.mark.filterwarnings("ignore:The PyTorch API of SparseSemiStructuredTensor")
def test_nonzero_count_of_a_stock_2_4_weight_skips_its_metadata():
    """torch's cuSPARSELt weight keeps the kept values, then the metadata, in one buffer that some torch versions hold
    2-D: only the values part (out · in / 2 elements) is counted."""
    from labutils.speed.latency import _count_nonzero
    values = torch.ones(16 * 8, dtype=torch.float16)
    values[::3] = 0
    flat = torch.cat([values, torch.full((16,), 7.0, dtype=torch.float16)])  # metadata: never zero here
    weight = torch.sparse.SparseSemiStructuredTensorCUSPARSELT(
        torch.Size([16, 16]), flat.view(16, 9), None, None, None, None, fuse_transpose_cusparselt=False,
        alg_id_cusparselt=0, requires_grad=False)
    assert _count_nonzero(weight) == int(values.count_nonzero()) == 85
