"""Exercise checks, environment helpers and the profiles."""
import pytest
import torch
from conftest import make_tiny

import labutils as lu
from labutils.evaluate.generation import top1_agreement
from labutils.lab.checks import answer_digest
from labutils.prune.masks import nm_mask


def test_check_wanda_score_passes_a_right_answer_and_fails_wrong_ones():
    result = lu.check_wanda_score(lambda w, x: w.abs() * x.norm(dim=0), points=3)
    assert (result.points, result.max_points, result.passed) == (3, 3, True)
    assert str(result) == ("PASS: wanda score — matches the package (max |difference| below 1e-4 of the largest "
                           "score) (3/3 points)")
    with pytest.raises(lu.CheckFailed, match=r"wanda score — max \|difference\|.*\nHint: a weight") as failure:
        lu.check_wanda_score(lambda w, x: w.abs() * x.pow(2).sum(0), points=3)  # forgot the square root
    assert failure.value.result == lu.CheckResult("wanda score", 0, 3, failure.value.result.message)
    assert isinstance(failure.value, AssertionError)
    with pytest.raises(lu.CheckFailed):
        lu.check_wanda_score(lambda w, x: w.abs())  # ignored the inputs
    with pytest.raises(lu.CheckFailed, match=r"expected a tensor of shape \(6, 16\), got \(16,\)"):
        lu.check_wanda_score(lambda w, x: x.norm(dim=0))  # wrong shape
    with pytest.raises(lu.CheckFailed, match="the code raised ZeroDivisionError: division by zero"):
        lu.check_wanda_score(lambda w, x: 1 / 0)


def test_a_stub_fails_its_check_with_the_hint():
    def stub(*args):
        raise NotImplementedError("Exercise 02.1: write my_wanda_score")
    for check in (lu.check_wanda_score, lu.check_row_mask, lu.check_top1_agreement, lu.check_mean_kl,
                  lu.check_ria_score, lu.check_nm_mask, lu.check_perplexity):
        with pytest.raises(lu.CheckFailed, match="not written yet .*\nHint: "):
            check(stub)


def test_a_result_shows_as_one_line_in_a_notebook():
    from IPython.lib.pretty import pretty
    result = lu.check_close("ppl", 10.0005, 10.0, points=2)
    assert pretty(result) == "PASS: ppl — the value within 1e-04 relative of the expected (2/2 points)"


def test_a_pass_shows_no_float_digits_a_failure_shows_the_values():
    """A PASS line is what nbval compares on every machine: it must not carry the last digits of a float32 result
    (another CPU's kernels round them differently); a failure shows both values to six digits."""
    passed = lu.check_close("KL", {"forward": 0.74631, "reverse": 0.96}, {"forward": 0.74632, "reverse": 0.96},
                            rtol=1e-3)
    assert str(passed) == "PASS: KL — forward, reverse within 1e-03 relative of the expected (1/1 points)"
    with pytest.raises(lu.CheckFailed, match=r"forward: 0\.8 vs 0\.74632: outside 1e-03 relative"):
        lu.check_close("KL", {"forward": 0.8, "reverse": 0.96}, {"forward": 0.74632, "reverse": 0.96}, rtol=1e-3)
    digits = [str(check(fn)) for check, fn in (
        (lu.check_perplexity, lambda m, w: torch.nn.functional.cross_entropy(m(w).logits[0, :-1], w[0, 1:]).exp()),
        (lu.check_mean_kl, lambda a, b: (a.softmax(-1) * (a.log_softmax(-1) - b.log_softmax(-1))).sum(-1).mean()),
        (lu.check_top1_agreement, lambda a, b: (a.argmax(-1) == b.argmax(-1)).float().mean().item()))]
    assert not any(any(ch.isdigit() for ch in line.split(" — ")[1].split("(")[0].replace("1e-04", ""))
                   for line in digits), digits


def test_check_ria_score():
    def ria(w, x, a):
        w = w.abs()
        return (w / w.sum(1, keepdim=True) + w / w.sum(0, keepdim=True)) * x.norm(dim=0) ** a

    assert lu.check_ria_score(ria).passed
    with pytest.raises(lu.CheckFailed, match="RIA score"):
        lu.check_ria_score(lambda w, x, a: ria(w, x, a) * 1.01)


def _lowest(score, k):
    """The k lowest of each row, equal scores in column order: the reference the masks are checked against."""
    return torch.zeros_like(score, dtype=torch.bool).scatter_(1, torch.sort(score, dim=1, stable=True).indices[:, :k],
                                                              True)


def test_check_row_mask_wants_ties_in_column_order():
    assert lu.check_row_mask(lambda s, sp: _lowest(s, int(s.shape[1] * sp))).passed
    unstable = lambda s, sp: _lowest(s.flip(1), int(s.shape[1] * sp)).flip(1)  # noqa: E731 (ties: last column first)
    with pytest.raises(lu.CheckFailed, match="ties at 30%: .* entries differ"):
        lu.check_row_mask(unstable)
    with pytest.raises(lu.CheckFailed, match="at 30%: .* entries differ"):
        lu.check_row_mask(lambda s, sp: _lowest(s, round(s.shape[1] * sp)))  # rounds instead of ⌊in·s⌋
    with pytest.raises(lu.CheckFailed, match="expected a bool tensor"):
        lu.check_row_mask(lambda s, sp: _lowest(s, int(s.shape[1] * sp)).float())


def test_check_nm_mask():
    def nm(s, n, m):
        return _lowest(s.reshape(-1, m), m - n).reshape(s.shape)
    assert lu.check_nm_mask(nm).passed
    with pytest.raises(lu.CheckFailed, match="2:4 random"):
        lu.check_nm_mask(lambda s, n, m: nm(-s, n, m))  # prunes the highest scores instead


def test_check_mean_kl_and_top1_agreement():
    def kl(ref, logits):
        ref = ref.log_softmax(-1)
        return (ref.exp() * (ref - logits.log_softmax(-1))).sum(-1).mean()
    assert lu.check_mean_kl(kl).passed
    with pytest.raises(lu.CheckFailed, match="mean KL"):
        lu.check_mean_kl(lambda ref, logits: kl(logits, ref))  # the reverse direction
    assert lu.check_top1_agreement(lambda a, b: (a.argmax(-1) == b.argmax(-1)).float().mean().item()).passed
    with pytest.raises(lu.CheckFailed, match="top-1 agreement"):
        lu.check_top1_agreement(lambda a, b: (a.argmax(-1) == b.argmax(-1)).float().sum())
    with pytest.raises(lu.CheckFailed, match="expected one number"):
        lu.check_top1_agreement(lambda a, b: None)


def test_check_perplexity_catches_a_missing_shift():
    def ppl(model, window, shift=1):
        with torch.no_grad():
            logits = model(window).logits[0, :window.shape[1] - shift]
        return torch.nn.functional.cross_entropy(logits, window[0, shift:]).exp().item()
    assert lu.check_perplexity(ppl).passed
    with pytest.raises(lu.CheckFailed, match="outside 1e-04 relative"):
        lu.check_perplexity(lambda model, window: ppl(model, window, shift=0))


def test_check_close_and_prediction():
    assert lu.check_close("ppl", 10.0005, 10.0).passed
    assert lu.check_close("two", {"a": 1.0, "b": torch.tensor(2.0)}, {"a": 1.0, "b": 2.0}).passed
    with pytest.raises(lu.CheckFailed, match=r"ppl — 10.1 vs 10: outside 1e-04 relative\nHint: compare"):
        lu.check_close("ppl", 10.1, 10.0)
    with pytest.raises(lu.CheckFailed, match=r"expected a dict with keys \['a', 'b'\], got \['a'\]"):
        lu.check_close("two", {"a": 1.0}, {"a": 1.0, "b": 2.0})
    with pytest.raises(lu.CheckFailed, match="expected a number, got str"):
        lu.check_close("ppl", "10", 10.0)
    with pytest.raises(lu.BadInput, match="points"):
        lu.check_close("ppl", 10.0, 10.0, points=-1)
    for expected in ("b", answer_digest("q", "b")):  # the answer itself (hidden tests), or an older master's digest
        assert lu.check_prediction("q", " B ", expected).passed
        for wrong in ("a", None, ...):
            with pytest.raises(lu.CheckFailed, match="Hint: think"):
                lu.check_prediction("q", wrong, expected, hint="think")


def test_check_layer_sparsity(calib_tokens):
    model = make_tiny()
    with pytest.raises(lu.CheckFailed, match="per-row sparsity — 14 linears fall short"):
        lu.check_layer_sparsity(model, 0.5)
    lu.prune_model(model, lu.PruneSpec("wanda", lu.SparsityTarget.of(sparsity=0.5)), calib_tokens, progress=False)
    assert lu.check_layer_sparsity(model, 0.5).passed
    with torch.no_grad():  # a degenerate model: every weight zeroed reaches any target, and must not pass
        for parameter in model.parameters():
            parameter.zero_()
    with pytest.raises(lu.CheckFailed, match="far more zeros than the target"):
        lu.check_layer_sparsity(model, 0.5)


def test_a_failure_shows_as_a_short_block_without_a_traceback():
    """IPython shows ``_render_traceback_()`` instead of a traceback: four lines, none from the package's code."""
    with pytest.raises(lu.CheckFailed) as failure:
        lu.check_wanda_score(lambda w, x: w.abs(), points=3)
    lines = failure.value._render_traceback_()
    assert len(lines) == 4 and "wanda score: not right yet (0/3 points)" in lines[0]
    assert lines[1].startswith("  expected: a (6, 16) score") and lines[2].startswith("  got:      max |difference|")
    assert lines[3] == "  hint:     " + failure.value.hint
    assert not any("File " in line or ".py" in line for line in lines)


def test_an_error_in_the_students_code_names_its_line():
    def my_score(weight, inputs):
        scale = 1
        return weight @ inputs * scale  # (6, 16) @ (40, 16): torch raises a RuntimeError in this line

    with pytest.raises(lu.CheckFailed, match=r"the code raised RuntimeError: .*\(line \d+ of my_score\)"):
        lu.check_wanda_score(my_score)


IMPLEMENT = [  # (check, an answer that only calls the lab's own function)
    (lu.check_wanda_score, lambda w, x: lu.wanda_score(w, x.pow(2).sum(0))),
    (lu.check_row_mask, lambda s, sp: lu.unstructured_mask(s, sp)),
    (lu.check_top1_agreement, lambda a, b: top1_agreement(a, b)),
    (lu.check_mean_kl, lambda a, b: lu.mean_kl(a, b)),
    (lu.check_perplexity, lambda m, w: lu.perplexity(m, w[0], 32, progress=False)),
    (lu.check_nm_mask, lambda s, n, m: nm_mask(s, n, m)),
]


@pytest.mark.parametrize("check, delegate", IMPLEMENT)
def test_an_implement_exercise_that_calls_the_lab_scores_zero(check, delegate):
    with pytest.raises(lu.CheckFailed, match="calls the lab's own code .*labutils") as failure:
        check(delegate, points=3)
    assert failure.value.result.points == 0


def test_q4_0_that_calls_gguf_scores_zero():
    import gguf
    def delegate(block):
        packed = gguf.quants.quantize(block.numpy()[None], gguf.GGMLQuantizationType.Q4_0)
        return torch.from_numpy(gguf.quants.dequantize(packed, gguf.GGMLQuantizationType.Q4_0)[0])
    with pytest.raises(lu.CheckFailed, match="calls the lab's own code .*gguf"):
        lu.check_q4_0(delegate)


def test_an_unstable_sort_fails_the_row_mask():
    """torch.sort without stable=True reorders equal scores in rows of 64 and more on a CPU too."""
    def unstable(score, sparsity):
        order = torch.sort(score, dim=1).indices
        return torch.zeros_like(score, dtype=torch.bool).scatter_(1, order[:, :int(score.shape[1] * sparsity)], True)
    with pytest.raises(lu.CheckFailed, match="512-wide rows of ties at 50%: .* entries differ"):
        lu.check_row_mask(unstable)


def test_model_summary_and_sources(tiny_model):
    summary = lu.model_summary(tiny_model)
    assert summary["decoder layers"] == 2 and summary["attention heads / key-value heads"] == "4 / 2"
    assert summary["linears per layer"] == "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"
    assert list(lu.data_sources(lu.get_profile("smollm2-135m")).index) == ["model", "corpus"]
    assert "gated" in lu.data_sources(lu.get_profile("llama2-7b")).loc["model", "source"]


def test_versions_table_lists_the_lab_packages():
    table = lu.versions_table()
    for name in ("python", "torch", "transformers", "datasets", "accelerate", "lm-eval", "nbval"):
        assert name in table.index


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only answers; this machine has CUDA")
def test_cpu_machine_answers():
    assert lu.get_device() in (torch.device("cpu"), torch.device("mps"))
    ok, reason = lu.semi_structured_support()
    assert not ok and reason.startswith("no CUDA GPU")
    assert lu.cuda_capability() is None
    with pytest.raises(lu.LabError, match="device 'cuda' asked for, but this machine has no CUDA GPU"):
        lu.get_device("cuda")


def test_random_model_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = make_tiny(seed=5)
    assert torch.equal(torch.rand(1), expected_next)
    b = make_tiny(seed=5)
    assert lu.mask_sha256(a) == lu.mask_sha256(b)
    assert torch.equal(a.model.layers[0].mlp.up_proj.weight, b.model.layers[0].mlp.up_proj.weight)


def test_profile_env_override(monkeypatch):
    monkeypatch.setenv("LAB_PROFILE", "llama2-7b")
    assert lu.get_profile().name == "llama2-7b"
    monkeypatch.delenv("LAB_PROFILE")
    assert lu.get_profile().name == lu.DEFAULT_PROFILE
    assert lu.get_profile(nsamples=4).nsamples == 4
    with pytest.raises(lu.BadInput, match="unknown profile field"):
        lu.get_profile(colour="blue")
