"""The ``lu.check_…`` cells that score the exercises: each returns a ``CheckResult`` or raises ``CheckFailed``.

A check compares what the student wrote (a function passed in, or a value) with the lab's own answer, on fixed
seeded inputs, so it shows the same line on every run (nbval compares outputs; no timings):

- right: it returns ``CheckResult(name, points, max_points, message)``, shown in a notebook as one line,
  ``PASS: wanda score — matches the package … (3/3 points)``;
- wrong: it raises ``CheckFailed`` (an ``AssertionError``) saying what was wrong and giving the exercise's hint.
  An error inside the student's code counts as wrong, so a stub's ``NotImplementedError`` fails with the hint too.

Checks are all-or-nothing: ``points`` (the keyword in the check cell, the exercise's weight) or 0. Predictions
(``check_prediction``) are compared with a digest of the answer, so the student copy, which keeps its check
cells, does not give the answer away (``answer_digest`` makes one).

Grading (``labutils.lab.grading``) keeps what the instructor's check cells return: a ``CheckResult`` is the only
way to points, and ``CheckFailed``'s message is the feedback.
"""
from __future__ import annotations

import hashlib
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..core.anatomy import find_decoder_layers, find_linears
from ..core.data import random_windows
from ..core.loading import random_model, tiny_llama_config
from ..core.sparse.quant import quantize_dequantize
from ..core.validation import check_count
from ..deploy.engine import nll_of_logits
from ..evaluate.generation import mean_kl, top1_agreement
from ..evaluate.perplexity import perplexity
from ..prune.masks import nm_mask, unstructured_mask
from ..prune.methods import ria_score, wanda_score
from ..prune.recovery import masked_merge


@dataclass(frozen=True)
class CheckResult:
    """One check's outcome: ``points`` of ``max_points`` (all or nothing) and what was compared."""

    name: str
    points: int
    max_points: int
    message: str

    @property
    def passed(self) -> bool:
        return self.points == self.max_points

    def __str__(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        return f"{verdict}: {self.name} — {self.message} ({self.points}/{self.max_points} points)"

    def _repr_pretty_(self, printer, cycle) -> None:  # IPython shows a returned result as its one line
        printer.text(str(self))


class CheckFailed(AssertionError):
    """A wrong answer: ``result`` (0 points) says what was wrong, ``hint`` how to get it right."""

    def __init__(self, result: CheckResult, hint: str):
        super().__init__(f"{result.name} — {result.message}\nHint: {hint}")
        self.result, self.hint = result, hint


def _graded(name: str, points: int, hint: str, compare: Callable[[], tuple[bool, str]]) -> CheckResult:
    """Run ``compare`` → (right?, message) and return the result, or raise CheckFailed with the hint."""
    check_count("points", points)
    try:
        ok, message = compare()
    except NotImplementedError:
        ok, message = False, "not written yet (the cell still raises NotImplementedError)"
    except Exception as exc:  # an error in the student's code is a wrong answer, reported with its message
        ok, message = False, f"the code raised {type(exc).__name__}: {exc}"
    result = CheckResult(name, points if ok else 0, points, message)
    if not ok:
        raise CheckFailed(result, hint)
    return result


def _number(value) -> float | None:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    return None


def _compare_tensor(got, expected: torch.Tensor) -> tuple[bool, str]:
    if not isinstance(got, torch.Tensor) or got.shape != expected.shape:
        shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
        return False, f"expected a tensor of shape {tuple(expected.shape)}, got {shape}"
    diff = (got.float() - expected).abs().max().item()
    tol = 1e-4 * expected.abs().max().item()
    if diff <= tol:
        return True, "matches the package (max |difference| below 1e-4 of the largest score)"
    return False, f"max |difference| = {diff:.3g}, allowed {tol:.3g}"


def _compare_masks(student_fn, cases: dict[str, tuple[tuple, torch.Tensor]]) -> tuple[bool, str]:
    """``cases``: label → (arguments, expected bool mask). Right if every mask is equal."""
    for label, (args, expected) in cases.items():
        got = student_fn(*args)
        if not isinstance(got, torch.Tensor) or got.shape != expected.shape or got.dtype != torch.bool:
            what = (f"{got.dtype} tensor of shape {tuple(got.shape)}" if isinstance(got, torch.Tensor)
                    else type(got).__name__)
            return False, f"{label}: expected a bool tensor (True = pruned) of shape {tuple(expected.shape)}, got {what}"
        wrong = (got != expected).nonzero()
        if len(wrong):
            row, col = wrong[0].tolist()
            return False, (f"{label}: {len(wrong)} of {expected.numel()} entries differ, the first at row {row}, "
                           f"column {col}")
    return True, f"the same masks as the package in {len(cases)} cases ({', '.join(cases)})"


def _exercise_tensors(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A small weight (6, 16) and activations (40, 16) with uneven channel scales."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(6, 16, generator=generator)
    inputs = torch.randn(40, 16, generator=generator) * torch.linspace(0.1, 10, 16)
    return weight, inputs


def _tied_scores(shape: tuple[int, int], seed: int) -> torch.Tensor:
    """Scores with many exact ties: small integers."""
    return torch.randint(0, 3, shape, generator=torch.Generator().manual_seed(seed)).float()


def check_perplexity(student_fn: Callable[[torch.nn.Module, torch.Tensor], float], points: int = 1,
                     hint: str = "logits[0, t] predict token t + 1: compare logits[0, :-1] with window[0, 1:] "
                                 "(torch.nn.functional.cross_entropy averages the negative log-likelihood), then exp") \
        -> CheckResult:
    """``student_fn(model, window)`` (window: (1, seqlen) token ids) against ``lu.perplexity`` (01-Setup), on a tiny
    random Llama and one 32-token window."""
    model = random_model(tiny_llama_config(), torch.float32, torch.device("cpu"), seed=0)
    window = torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(0))

    def compare():
        got, expected = student_fn(model, window), perplexity(model, window[0], 32, progress=False)
        if _number(got) is None:
            return False, f"expected one number, got {type(got).__name__}"
        ok = abs(_number(got) - expected) <= 1e-4 * expected
        return ok, ("matches lu.perplexity on a tiny random model, within 1e-04 relative" if ok else
                    f"{_number(got):.6g} vs {expected:.6g} on a tiny random model, outside 1e-04 relative")
    return _graded("perplexity of one window", points, hint, compare)


def check_wanda_score(student_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], points: int = 1,
                      hint: str = "S = |W| · ‖X_j‖₂: the L2 norm of each input channel is a norm over the tokens "
                                  "(dim=0 of inputs), broadcast over the rows of weight.abs()",
                      seed: int = 0) -> CheckResult:
    """``student_fn(weight, inputs)`` against the package's Wanda score (02-Prune).

    weight: (out, in); inputs: (tokens, in) activations entering the layer. Expected: |W_ij| · ‖X_j‖₂.
    """
    weight, inputs = _exercise_tensors(seed)
    return _graded("wanda score", points, hint, lambda: _compare_tensor(
        student_fn(weight, inputs), wanda_score(weight, inputs.pow(2).sum(dim=0))))


def check_row_mask(student_fn: Callable[[torch.Tensor, float], torch.Tensor], points: int = 1,
                   hint: str = "prune k = int(in_features * sparsity) weights per row: the k lowest scores, and among "
                               "equal scores the lower column first, which is the order of a stable ascending sort "
                               "(torch.sort(score, dim=1, stable=True)); mark those k positions True") -> CheckResult:
    """``student_fn(score, sparsity)`` → bool (out, in), True = pruned, against ``lu.unstructured_mask`` (02-Prune):
    random scores, scores full of ties, all-equal scores, and a sparsity whose ⌊in·s⌋ must round down."""
    random = torch.randn(6, 16, generator=torch.Generator().manual_seed(1))
    cases = {"random scores at 50%": ((random, 0.5), unstructured_mask(random, 0.5)),
             "ties at 30%": ((_tied_scores((6, 16), 2), 0.3), unstructured_mask(_tied_scores((6, 16), 2), 0.3)),
             "all equal at 50%": ((torch.ones(3, 8), 0.5), unstructured_mask(torch.ones(3, 8), 0.5))}
    return _graded("per-row mask", points, hint, lambda: _compare_masks(student_fn, cases))


def check_top1_agreement(student_fn: Callable[[torch.Tensor, torch.Tensor], float], points: int = 1,
                         hint: str = "take argmax over the last (vocabulary) dimension of both logits, compare, and "
                                     "average the matches over every position as a float",
                         seed: int = 0) -> CheckResult:
    """``student_fn(dense_logits, sparse_logits)`` against the package's top-1 agreement (03-Inference).

    Both logits: (batch, positions, vocab). Expected: the share of positions whose argmax tokens are equal.
    """
    generator = torch.Generator().manual_seed(seed)
    dense = torch.randn(3, 50, 40, generator=generator)
    sparse = dense + 0.5 * torch.randn(dense.shape, generator=generator)  # about half the argmaxes survive

    def compare():
        got, expected = _number(student_fn(dense, sparse)), top1_agreement(dense, sparse)
        if got is None:
            return False, "expected one number"
        ok = abs(got - expected) <= 1e-6
        return ok, "matches the package's share of equal argmaxes" if ok else f"{got:.6g} vs {expected:.6g}"
    return _graded("top-1 agreement", points, hint, compare)


def check_mean_kl(student_fn: Callable[[torch.Tensor, torch.Tensor], float], points: int = 1,
                  hint: str = "KL(p_ref ‖ p) = Σ_v p_ref(v) · (log p_ref(v) − log p(v)): log_softmax both logits over "
                              "the last dimension, sum over the vocabulary, then average over every position; the "
                              "first argument is the reference") -> CheckResult:
    """``student_fn(reference_logits, logits)`` against ``lu.mean_kl`` (03-Inference): KL(p_ref ‖ p) in nats,
    averaged over positions. A swapped (reverse) KL fails."""
    generator = torch.Generator().manual_seed(3)
    reference = 2 * torch.randn(2, 30, 50, generator=generator)
    other = reference + torch.randn(reference.shape, generator=generator)

    def compare():
        got, expected = _number(student_fn(reference, other)), mean_kl(reference, other)
        if got is None:
            return False, "expected one number"
        ok = abs(got - expected) <= 1e-4 * expected
        return ok, ("matches lu.mean_kl, within 1e-04 relative" if ok else
                    f"{got:.6g} vs {expected:.6g} nats, outside 1e-04 relative")
    return _graded("mean KL", points, hint, compare)


def check_ria_score(student_fn: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor], points: int = 1,
                    hint: str = "|W| divided by its row sums (dim=1, keepdim=True) plus |W| divided by its column sums "
                                "(dim=0, keepdim=True), times ‖X_j‖₂ ** alpha", alpha: float = 0.5, seed: int = 0) \
        -> CheckResult:
    """``student_fn(weight, inputs, alpha)`` against the package's RIA score (04-Benchmark).

    Expected: (|W_ij| / Σ_k |W_ik| + |W_ij| / Σ_k |W_kj|) · ‖X_j‖₂^alpha.
    """
    weight, inputs = _exercise_tensors(seed)
    return _graded("RIA score", points, hint, lambda: _compare_tensor(
        student_fn(weight, inputs, alpha), ria_score(weight, inputs.pow(2).sum(dim=0), alpha)))


def check_nm_mask(student_fn: Callable[[torch.Tensor, int, int], torch.Tensor], points: int = 1,
                  hint: str = "view the scores as (-1, m), one group of m consecutive inputs per row; prune the m − n "
                              "lowest of each group (stable sort: the lower index first among equal scores); reshape "
                              "back to (out, in)") -> CheckResult:
    """``student_fn(score, n, m)`` → bool (out, in), True = pruned, against the package's N:M mask (04-Benchmark):
    2:4 and 4:8 on random scores and on scores full of ties."""
    random, tied = torch.randn(4, 16, generator=torch.Generator().manual_seed(4)), _tied_scores((4, 16), 5)
    cases = {"2:4 random": ((random, 2, 4), nm_mask(random, 2, 4)), "2:4 ties": ((tied, 2, 4), nm_mask(tied, 2, 4)),
             "4:8 random": ((random, 4, 8), nm_mask(random, 4, 8)), "4:8 ties": ((tied, 4, 8), nm_mask(tied, 4, 8))}
    return _graded("N:M mask", points, hint, lambda: _compare_masks(student_fn, cases))


def check_masked_merge(student_fn: Callable[..., torch.Tensor], points: int = 1,
                       hint: str = "the dense update is lora_b @ lora_a * scale; multiply it by (weight != 0) before "
                                   "adding it, so every zero of the weight stays zero", seed: int = 0) -> CheckResult:
    """``student_fn(weight, lora_a, lora_b, scale)`` → the merged weight (05-Recover), against the package's
    ``masked_merge``: W + (B·A · scale) ⊙ (W ≠ 0), on a half-pruned weight."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(6, 16, generator=generator)
    weight = weight.masked_fill(unstructured_mask(weight.abs(), 0.5), 0)
    lora_a, lora_b = torch.randn(2, 16, generator=generator), torch.randn(6, 2, generator=generator)
    return _graded("masked LoRA merge", points, hint, lambda: _compare_tensor(
        student_fn(weight, lora_a, lora_b, 0.5), masked_merge(weight, lora_a, lora_b, 0.5)))


def check_random_windows(student_fn: Callable[[torch.Tensor, int, int, int], torch.Tensor], points: int = 1,
                         hint: str = "offsets = torch.randint(0, len(tokens) - seqlen, (nsamples,), generator="
                                     "torch.Generator().manual_seed(seed)); stack tokens[s : s + seqlen] for each "
                                     "offset s, in the order drawn") -> CheckResult:
    """``student_fn(tokens, nsamples, seqlen, seed)`` → (nsamples, seqlen) calibration windows, against the package's
    sampler (06-Calibrate), on a 1000-token text, for several sizes and seeds. Token ids: equal on every machine."""
    tokens = torch.arange(1000) * 7 % 1009
    cases = [(1, 32, 0), (16, 128, 0), (8, 64, 1), (4, 999, 2)]

    def compare():
        for nsamples, seqlen, seed in cases:
            got, expected = student_fn(tokens, nsamples, seqlen, seed), random_windows(tokens, nsamples, seqlen, seed)
            if not isinstance(got, torch.Tensor) or got.shape != expected.shape:
                what = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
                return False, f"nsamples {nsamples}, seqlen {seqlen}: expected shape {tuple(expected.shape)}, got {what}"
            if not torch.equal(got.long(), expected):
                return False, f"nsamples {nsamples}, seqlen {seqlen}, seed {seed}: other windows than the package's"
        return True, f"the package's windows in {len(cases)} cases (sizes and seeds)"
    return _graded("calibration windows", points, hint, compare)
def check_q4_0(student_fn: Callable[[torch.Tensor], torch.Tensor], points: int = 1,
               hint: str = "d = (the value of largest magnitude, with its sign) / -8; codes from that float32 d, "
                           "values from d rounded to float16; a block of zeros has d = 0") -> CheckResult:
    """The student's q4_0 of one block (32,) float32 → the 32 values it gives back, against llama.cpp's (the gguf
    package) on seeded blocks: normal, scaled, with an outlier, all zeros (07-Quantize)."""
    def compare():
        generator = torch.Generator().manual_seed(7)
        blocks = {"normal": torch.randn(32, generator=generator), "scaled by 1e-3": torch.randn(32, generator=generator)
                  * 1e-3, "one outlier": torch.randn(32, generator=generator).index_fill_(0, torch.tensor([5]), -9.0),
                  "largest positive": torch.rand(32, generator=generator) * 4, "all zeros": torch.zeros(32)}
        for label, block in blocks.items():
            got, expected = student_fn(block.clone()), quantize_dequantize(block, "q4_0")
            if not isinstance(got, torch.Tensor) or got.shape != expected.shape:
                return False, f"{label}: expected a tensor of shape (32,), got {type(got).__name__}"
            if not torch.allclose(got.float(), expected, rtol=0, atol=1e-7 * float(block.abs().max()) + 1e-12):
                return False, f"{label} block: {int((got.float() - expected).abs().gt(1e-12).sum())} of 32 values differ"
        return True, f"the same values as llama.cpp's q4_0 on {len(blocks)} blocks ({', '.join(blocks)})"
    return _graded("q4_0 of one block", points, hint, compare)


def check_nll(student_fn: Callable, points: int = 1,
              hint: str = "log-softmax of a row is x − log Σ exp(x); subtract the row's largest logit before exp") \
        -> CheckResult:
    """The student's summed negative log-likelihood of targets (T,) under logits (T, vocab), numpy in and a float out,
    against ``lu.nll_of_logits`` on seeded logits: small, large (×400: exp overflows without the shift), one row
    (08-Deploy)."""
    def compare():
        rng = np.random.default_rng(0)
        logits, targets = rng.normal(size=(16, 50)) * 3, rng.integers(0, 50, 16)
        cases = {"small logits": (logits, targets), "logits ×400": (logits * 400, targets),
                 "one row": (logits[:1], targets[:1])}
        for label, (x, t) in cases.items():
            got, expected = student_fn(x.copy(), t.copy()), nll_of_logits(x, t)
            if _number(got) is None or not math.isclose(_number(got), expected, rel_tol=1e-9):
                return False, f"{label}: expected {expected:.6g}, got {got!r}"
        return True, f"the package's value in {len(cases)} cases ({', '.join(cases)})"
    return _graded("summed NLL from logits", points, hint, compare)


def check_layer_sparsity(model: torch.nn.Module, sparsity: float, points: int = 1,
                         hint: str = "prune with a per-row target (lu.PruneSpec(method, sparsity)) and check that "
                                     "nothing restored the weights afterwards") -> CheckResult:
    """Every output row of every prunable linear has ⌊in·sparsity⌋ zeros or more (02-Prune)."""
    def compare():
        short = [f"layer {i} {name}" for i, layer in enumerate(find_decoder_layers(model))
                 for name, lin in find_linears(layer).items()
                 if int((lin.weight == 0).sum(dim=1).min()) < int(lin.in_features * sparsity)]
        return not short, "every row reaches the target" if not short else \
            f"{len(short)} linears fall short, e.g. {short[0]}"
    return _graded("per-row sparsity", points, hint, compare)


def check_close(name: str, got, expected, rtol: float = 1e-4, points: int = 1,
                hint: str = "compare your code with the lab's function named in the exercise") -> CheckResult:
    """``got`` within ``rtol`` (relative) of ``expected``: two numbers, or two dicts of numbers with the same keys."""
    def compare():
        pairs = {"": (got, expected)}
        if isinstance(expected, Mapping):
            if not isinstance(got, Mapping) or set(got) != set(expected):
                keys = sorted(got) if isinstance(got, Mapping) else type(got).__name__
                return False, f"expected a dict with keys {sorted(expected)}, got {keys}"
            pairs = {f"{key}: ": (got[key], value) for key, value in expected.items()}
        wrong = []
        for label, (value, reference) in pairs.items():
            if _number(value) is None:
                return False, f"{label}expected a number, got {type(value).__name__}"
            if abs(_number(value) - reference) > rtol * abs(reference):
                wrong.append(f"{label}{_number(value):.6g} vs {reference:.6g}")
        if wrong:
            return False, f"{', '.join(wrong)}: outside {rtol:.0e} relative"
        # no values when right: the last digits of a float32 figure differ between CPUs, the verdict does not
        what = ", ".join(label.rstrip(": ") for label in pairs) if isinstance(expected, Mapping) else "the value"
        return True, f"{what} within {rtol:.0e} relative of the expected"
    return _graded(name, points, hint, compare)


def answer_digest(name: str, answer) -> str:
    """What ``check_prediction`` compares: a hash of the check's name and the answer (trimmed, lower case)."""
    return hashlib.sha256(f"{name}\n{str(answer).strip().lower()}".encode()).hexdigest()[:16]


def check_prediction(name: str, answer, digest: str, points: int = 1,
                     hint: str = "reread the section the question is about") -> CheckResult:
    """A prediction (e.g. a multiple-choice letter) against ``digest`` = ``answer_digest(name, right answer)``."""
    def compare():
        if answer is None or answer is Ellipsis:
            return False, "no answer given yet"
        ok = answer_digest(name, answer) == digest
        return ok, f"{str(answer).strip().lower()!r} is {'right' if ok else 'not the answer'}"
    return _graded(name, points, hint, compare)
