"""03-Inference: drift metrics against direct computations, generation, degeneration, and finding pruned models."""
import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import make_tiny, random_tokens
from transformers import AutoTokenizer

import labutils as lu
from labutils.core import manifests
from labutils.core.data import split_tokens
from labutils.core.loading import embedded_model_dir
from labutils.evaluate.generation import Prompt, greedy_generate, repeated_ngram_ratio, top1_agreement
from labutils.jobs import main_job


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(embedded_model_dir())


@pytest.fixture(scope="module")
def tiny_lm(tokenizer):
    """A random 2-layer model over the real tokenizer's vocabulary."""
    return make_tiny(vocab_size=len(tokenizer), max_position_embeddings=256)


def test_top1_agreement_counts_equal_argmaxes():
    dense = torch.tensor([[[0.0, 2.0, 1.0], [3.0, 0.0, 0.0], [0.0, 0.0, 1.0], [1.0, 5.0, 0.0]]])  # argmax 1, 0, 2, 1
    sparse = torch.tensor([[[0.0, 9.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 2.0], [4.0, 0.0, 0.0]]])  # argmax 1, 1, 2, 0
    assert top1_agreement(dense, sparse) == pytest.approx(0.5)
    assert top1_agreement(dense, dense) == 1.0


def test_mean_kl_matches_the_definition():
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 5, 7, generator=generator), torch.randn(2, 5, 7, generator=generator)
    p, q = a.softmax(-1), b.softmax(-1)
    expected = (p * (p.log() - q.log())).sum(-1).mean().item()
    assert lu.mean_kl(a, b) == pytest.approx(expected, rel=1e-5)
    assert lu.mean_kl(a, b) > 0 and lu.mean_kl(a, a) == pytest.approx(0.0, abs=1e-6)
    assert lu.mean_kl(a, a + 3.0) == pytest.approx(0.0, abs=1e-5)  # a constant shift is the same distribution
    assert lu.mean_kl(a, b) != pytest.approx(lu.mean_kl(b, a), rel=1e-3)  # not symmetric


@pytest.mark.parametrize("fn", [top1_agreement, lu.mean_kl])
def test_logit_metrics_refuse_mismatched_shapes(fn):
    with pytest.raises(lu.BadInput, match=r"same non-empty shape.*\(2, 3\).*\(2, 4\)"):
        fn(torch.zeros(2, 3), torch.zeros(2, 4))


def test_repeated_ngram_ratio_known_sequences():
    assert repeated_ngram_ratio([[1, 2, 3, 4, 5]], n=3) == 0.0
    assert repeated_ngram_ratio([[1, 2, 3, 1, 2, 3]], n=3) == pytest.approx(1 / 4)  # 123 231 312 [123]
    assert repeated_ngram_ratio([[5] * 6], n=2) == pytest.approx(4 / 5)
    # pooled over sequences; repeats are counted within a sequence, not across sequences
    assert repeated_ngram_ratio([[1, 2, 3], [1, 2, 3], [7, 7, 7, 7]], n=3) == pytest.approx(1 / 4)
    assert repeated_ngram_ratio([[1], [1, 2, 1, 2]], n=2) == pytest.approx(1 / 3)  # short sequence ignored


def test_repeated_ngram_ratio_bad_input():
    with pytest.raises(lu.BadInput, match="at least n=3"):
        repeated_ngram_ratio([[1, 2], []], n=3)
    with pytest.raises(lu.BadInput, match="n must be a positive integer"):
        repeated_ngram_ratio([[1, 2, 3]], n=0)


def test_drift_table_against_direct_computation(tiny_model, calib_tokens):
    pruned = make_tiny()
    lu.prune_model(pruned, lu.PruneSpec("magnitude", lu.SparsityTarget.of(sparsity=0.5)), progress=False)
    tokens = random_tokens((64,), 3)
    table = lu.drift_table(tiny_model, {"pruned": pruned}, tokens, seqlen=16, batch_size=3, progress=False)
    assert list(table.index) == ["dense", "pruned"]
    assert table.loc["dense", "top-1 agreement"] == 1.0
    assert table.loc["dense", "KL(dense ‖ model)"] == pytest.approx(0.0, abs=1e-6)
    windows = tokens.reshape(4, 16)
    with torch.no_grad():
        ref = tiny_model(input_ids=windows).logits[:, :-1]
        got = pruned(input_ids=windows).logits[:, :-1]
    assert table.loc["pruned", "top-1 agreement"] == pytest.approx(top1_agreement(ref, got), abs=1e-6)
    assert table.loc["pruned", "KL(dense ‖ model)"] == pytest.approx(lu.mean_kl(ref, got), rel=1e-4)
    assert table.loc["pruned", "top-1 agreement"] < 1 and table.loc["pruned", "KL(dense ‖ model)"] > 0
    for name, model in (("dense", tiny_model), ("pruned", pruned)):
        assert table.loc[name, "perplexity"] == pytest.approx(
            lu.perplexity(model, tokens, 16, batch_size=4, progress=False), rel=1e-4)


def test_drift_table_needs_one_window(tiny_model):
    with pytest.raises(lu.BadInput, match="at least seqlen=32 held-out tokens; got 20"):
        lu.drift_table(tiny_model, {}, torch.zeros(20, dtype=torch.long), seqlen=32, progress=False)


def test_greedy_generate_batched_equals_one_by_one(tiny_lm, tokenizer):
    texts = ["The capital of France", "Once upon a time, in a small village by the sea,"]
    batched = greedy_generate(tiny_lm, tokenizer, texts, 6, stop_at_eos=False)
    assert [len(c) for c in batched] == [6, 6]
    assert batched == [greedy_generate(tiny_lm, tokenizer, [t], 6, stop_at_eos=False)[0] for t in texts]
    assert tokenizer.padding_side == "right"  # restored


def test_greedy_generate_bad_input(tiny_lm, tokenizer):
    with pytest.raises(lu.BadInput, match="max_new_tokens must be a positive integer"):
        greedy_generate(tiny_lm, tokenizer, ["x"], 0)
    with pytest.raises(lu.BadInput, match="at least one prompt"):
        greedy_generate(tiny_lm, tokenizer, [], 4)


def test_prompt_text_uses_the_chat_template(tokenizer):
    chat, plain = lu.PROMPTS[0], Prompt("plain", "Once upon a time", chat=False)
    text = lu.prompt_text(tokenizer, chat)
    assert "<|im_start|>user\n" + chat.text in text and text.endswith("<|im_start|>assistant\n")
    assert lu.prompt_text(tokenizer, plain) == "Once upon a time"


def test_side_by_side_and_degeneration_tables(tiny_lm, tokenizer):
    models = {"dense": tiny_lm, "copy": tiny_lm}
    answers = lu.side_by_side(models, tokenizer, lu.PROMPTS[:2], max_new_tokens=4, progress=False)
    assert list(answers.index) == [p.name for p in lu.PROMPTS[:2]]
    assert list(answers.columns) == ["prompt", "dense", "copy"]
    assert (answers["dense"] == answers["copy"]).all()
    degeneration = lu.degeneration_table(models, tokenizer, ["The river flows", "In 1990 the"], new_tokens=12,
                                         progress=False)
    assert list(degeneration.index) == ["dense", "copy"]
    assert degeneration.iloc[0].tolist() == degeneration.iloc[1].tolist()
    assert 0 <= degeneration.iloc[0, 0] <= 1


def test_passage_starts():
    articles = lu.corpus_split("validation")
    starts = lu.passage_starts(articles, 3, words=5)
    assert starts == [" ".join(a.text.split()[:5]) for a in articles[:3]]
    with pytest.raises(lu.BadInput, match="only 2 articles"):
        lu.passage_starts(articles[:2], 3)


def test_heldout_tokens_are_the_validation_split(tokenizer):
    profile = lu.get_profile("smollm2-135m")
    held = lu.heldout_tokens(profile, tokenizer, 500)
    assert torch.equal(held, split_tokens(tokenizer, "validation")[:500])
    assert not torch.equal(held, lu.test_tokens(profile, tokenizer, 500))
    random = lu.heldout_tokens(lu.get_profile("llama2-7b-random"), None, 100, vocab_size=32000)
    assert random.shape == (100,) and int(random.max()) < 32000
    with pytest.raises(lu.BadInput, match="validation split has"):
        lu.heldout_tokens(profile, tokenizer, 10**9)


def _fake_lab_output(folder, **fields):
    folder.mkdir(parents=True)
    report = {"lab": "wanda-lab", "profile": "smollm2-135m", "method": "wanda", "target": "50%", "nsamples": 32,
              "seqlen": 128, "seed": 0, "true_sequential": False, "owl": None, "params": {"group": "row"}, **fields}
    (folder / "report.json").write_text(json.dumps(report))
    manifests.write_manifest(folder, "pruned-model")


@pytest.fixture
def recorded_jobs(monkeypatch, tmp_path):
    """Run in an empty folder; record the jobs ensure_pruned would run instead of pruning a real model."""
    monkeypatch.chdir(tmp_path)
    jobs = []

    def fake_run(job, progress=True):
        jobs.append(job)
        return {"output": "made-" + job.spec.method}

    monkeypatch.setattr(main_job, "run_prune_job", fake_run)
    return jobs


def test_ensure_pruned_uses_a_matching_saved_model(recorded_jobs):
    profile = lu.get_profile("smollm2-135m")
    _fake_lab_output(lu.default_output_dir(profile, lu.PruneSpec("wanda", "50%")))
    path, how = lu.ensure_pruned(profile, lu.PruneSpec("wanda", lu.SparsityTarget.of(sparsity=0.5)))
    assert path == lu.default_output_dir(profile, lu.PruneSpec("wanda", "50%")) == Path("outputs/smollm2-135m-wanda-50")
    assert how.startswith("found") and not recorded_jobs


def test_ensure_pruned_makes_a_missing_model(recorded_jobs):
    profile = lu.get_profile("smollm2-135m")
    path, how = lu.ensure_pruned(profile, lu.PruneSpec("wanda", lu.SparsityTarget.of(nm="2:4")), "cpu", seed=3)
    assert "missing" in how and str(path) == "made-wanda"
    (job,) = recorded_jobs
    assert (job.spec, job.seed, job.nsamples, job.seqlen, job.device) == (
        lu.PruneSpec("wanda", "2:4"), 3, 32, 128, "cpu")


def test_ensure_pruned_redoes_a_model_made_differently(recorded_jobs):
    profile = lu.get_profile("smollm2-135m")
    _fake_lab_output(lu.default_output_dir(profile, lu.PruneSpec("wanda", "50%")), seed=1, nsamples=8)
    _, how = lu.ensure_pruned(profile, lu.PruneSpec("wanda", lu.SparsityTarget.of(sparsity=0.5)))
    assert "other settings (nsamples, seed)" in how and len(recorded_jobs) == 1


def test_ensure_pruned_redoes_a_model_calibrated_on_other_text(recorded_jobs):
    """A report without ``calibration`` (written before the field) is a wiki run; one calibrated on code is not."""
    profile = lu.get_profile("smollm2-135m")
    _fake_lab_output(lu.default_output_dir(profile, lu.PruneSpec("wanda", "50%")), calibration="code")
    _, how = lu.ensure_pruned(profile, lu.PruneSpec("wanda", lu.SparsityTarget.of(sparsity=0.5)))
    assert "other settings (calibration)" in how and recorded_jobs[0].calibration == "wiki"


def test_ensure_pruned_magnitude_ignores_calibration_settings(recorded_jobs):
    profile = lu.get_profile("smollm2-135m")
    folder = lu.default_output_dir(profile, lu.PruneSpec("magnitude", "50%"))
    _fake_lab_output(folder, method="magnitude", nsamples=0, seqlen=0, params={"group": "layer"})
    _, how = lu.ensure_pruned(profile, lu.PruneSpec("magnitude", lu.SparsityTarget.of(sparsity=0.5)))
    assert how.startswith("found") and not recorded_jobs


def test_ensure_pruned_redoes_a_damaged_model(recorded_jobs):
    profile = lu.get_profile("smollm2-135m")
    folder = lu.default_output_dir(profile, lu.PruneSpec("wanda", "50%"))
    _fake_lab_output(folder)
    (folder / "report.json").write_text((folder / "report.json").read_text() + " ")
    _, how = lu.ensure_pruned(profile, lu.PruneSpec("wanda", lu.SparsityTarget.of(sparsity=0.5)))
    assert "is damaged (report.json has" in how and len(recorded_jobs) == 1


def test_format_answers_shows_each_prompt_and_keeps_line_breaks():
    answers = pd.DataFrame({"prompt": ["List three fruits."], "dense": ["1. apple\n2. pear"], "wanda 50%": [""]},
                           index=["instruction"])
    assert lu.format_answers(answers).splitlines() == ["▶ instruction: List three fruits.",
                                                       "  dense      1. apple",
                                                       "             2. pear",
                                                       "  wanda 50%  (nothing)"]
