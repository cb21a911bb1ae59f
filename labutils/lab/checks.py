"""The ``lu.check_…`` calls that score the exercises: each returns a ``CheckResult`` or raises ``CheckFailed``
(``verdict.py``: what a result and a failure show).

A check compares what the student wrote (a function passed in, or a value) with the lab's own answer, on fixed
seeded inputs, so it shows the same line on every run (nbval compares outputs; no timings):

- right: it returns ``CheckResult(name, points, max_points, message)``, shown in a notebook as one line,
  ``PASS: wanda score — matches the package … (3/3 points)``;
- wrong: it raises ``CheckFailed`` (an ``AssertionError``), shown as one short block: what was expected in words,
  what was got, and the exercise's hint. An error inside the student's code counts as wrong, so a stub's
  ``NotImplementedError`` fails with the hint too.

The checks run in the master's check cells inside nbgrader's hidden-test region (``### BEGIN HIDDEN TESTS``): a
student copy keeps only the visible ``lu.sanity(…)`` line (``sanity.py``), so no cell a student receives computes
the expected answer or holds a prediction's answer. An implement check runs the student's function under
``own_work``: a function that calls the lab's own code (``lu.wanda_score`` …) scores 0.

Checks are all-or-nothing: ``points`` (the keyword in the check cell, the exercise's weight) or 0.
Grading (``labutils.lab.grading``) keeps what the instructor's check cells return: a ``CheckResult`` is the only
way to points, and ``CheckFailed``'s message is the feedback.
"""
from __future__ import annotations

import hashlib
import math
import numbers
import os
from collections.abc import Mapping
from typing import Callable

import gguf
import numpy as np
import torch

from ..core.anatomy import find_decoder_layers, find_linears
from ..core.data import random_windows
from ..core.loading import random_model, tiny_llama_config
from ..core.sparse.quant import quantize_dequantize
from ..deploy.engine import nll_of_logits
from ..evaluate.generation import mean_kl, top1_agreement
from ..evaluate.perplexity import perplexity
from ..prune.masks import nm_mask, unstructured_mask
from ..prune.methods import ria_score, wanda_score
from ..prune.recovery import masked_merge
from .verdict import CheckResult, graded, number, own_work

GGUF_ROOT = os.path.dirname(gguf.__file__)  # llama.cpp's own quantizer: 07.1 must not call it either


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
                     hint: str = "which position's logits predict which token? Line the predictions up with the tokens "
                                 "they predict (no prediction for the first token), average the negative "
                                 "log-likelihood, then undo the log") -> CheckResult:
    """``student_fn(model, window)`` (window: (1, seqlen) token ids) against ``lu.perplexity`` (01-Setup), on a tiny
    random Llama and one 32-token window."""
    model = random_model(tiny_llama_config(), torch.float32, torch.device("cpu"), seed=0)
    window = torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(0))
    student_fn = own_work(student_fn)

    def compare():
        got, expected = student_fn(model, window), perplexity(model, window[0], 32, progress=False)
        if number(got) is None:
            return False, f"expected one number, got {type(got).__name__}"
        ok = abs(number(got) - expected) <= 1e-4 * expected
        return ok, ("matches lu.perplexity on a tiny random model, within 1e-04 relative" if ok else
                    f"{number(got):.6g} vs {expected:.6g} on a tiny random model, outside 1e-04 relative")
    return graded("perplexity of one window", points, hint, compare,
                  "one number: the perplexity of a 32-token window under a tiny random model, within 1e-4 relative")


def check_wanda_score(student_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], points: int = 1,
                      hint: str = "a weight matters more when the input channel it multiplies carries more signal: "
                                  "which dimension of inputs runs over tokens, and which over channels?",
                      seed: int = 0) -> CheckResult:
    """``student_fn(weight, inputs)`` against the package's Wanda score (02-Prune).

    weight: (out, in); inputs: (tokens, in) activations entering the layer. Expected: |W_ij| · ‖X_j‖₂.
    """
    weight, inputs, student_fn = *_exercise_tensors(seed), own_work(student_fn)
    return graded("wanda score", points, hint, lambda: _compare_tensor(
        student_fn(weight, inputs), wanda_score(weight, inputs.pow(2).sum(dim=0))),
        "a (6, 16) score for a seeded (6, 16) weight and (40, 16) inputs, equal to Wanda's score within 1e-4")


def check_row_mask(student_fn: Callable[[torch.Tensor, float], torch.Tensor], points: int = 1,
                   hint: str = "how many weights per row does the sparsity allow (round down)? Among equal scores, "
                               "does your ordering keep the lower column first in a long row too? torch.sort's "
                               "documentation says when it keeps the order of equal elements") -> CheckResult:
    """``student_fn(score, sparsity)`` → bool (out, in), True = pruned, against ``lu.unstructured_mask`` (02-Prune):
    random scores, scores full of ties (short rows, and 512-wide rows, where an unstable sort reorders equal scores on
    a CPU too), all-equal scores, and a sparsity whose ⌊in·s⌋ must round down."""
    random, wide = torch.randn(6, 16, generator=torch.Generator().manual_seed(1)), _tied_scores((4, 512), 6)
    cases = {"random scores at 50%": ((random, 0.5), unstructured_mask(random, 0.5)),
             "ties at 30%": ((_tied_scores((6, 16), 2), 0.3), unstructured_mask(_tied_scores((6, 16), 2), 0.3)),
             "all equal at 50%": ((torch.ones(3, 8), 0.5), unstructured_mask(torch.ones(3, 8), 0.5)),
             "512-wide rows of ties at 50%": ((wide, 0.5), unstructured_mask(wide, 0.5))}
    student_fn = own_work(student_fn)
    return graded("per-row mask", points, hint, lambda: _compare_masks(student_fn, cases),
                  "in every case, a bool mask equal to the lab's: the lowest ⌊in·sparsity⌋ scores of each row, "
                  "equal scores in column order")


def check_top1_agreement(student_fn: Callable[[torch.Tensor, torch.Tensor], float], points: int = 1,
                         hint: str = "for every position, which token does each model like best? Count the positions "
                                     "where they agree, as a share of all positions of every sequence",
                         seed: int = 0) -> CheckResult:
    """``student_fn(dense_logits, sparse_logits)`` against the package's top-1 agreement (03-Inference).

    Both logits: (batch, positions, vocab). Expected: the share of positions whose argmax tokens are equal.
    """
    generator = torch.Generator().manual_seed(seed)
    dense = torch.randn(3, 50, 40, generator=generator)
    sparse = dense + 0.5 * torch.randn(dense.shape, generator=generator)  # about half the argmaxes survive
    student_fn = own_work(student_fn)

    def compare():
        got, expected = number(student_fn(dense, sparse)), top1_agreement(dense, sparse)
        if got is None:
            return False, "expected one number"
        ok = abs(got - expected) <= 1e-6
        return ok, "matches the package's share of equal argmaxes" if ok else f"{got:.6g} vs {expected:.6g}"
    return graded("top-1 agreement", points, hint, compare,
                  "one number in [0, 1]: the top-1 agreement of two seeded (3, 50, 40) logits, within 1e-6")


def check_mean_kl(student_fn: Callable[[torch.Tensor, torch.Tensor], float], points: int = 1,
                  hint: str = "turn both logits into log-probabilities over the vocabulary first (softmax can "
                              "overflow); which of the two weighs the log-ratio, and what is summed and what averaged?") \
        -> CheckResult:
    """``student_fn(reference_logits, logits)`` against ``lu.mean_kl`` (03-Inference): KL(p_ref ‖ p) in nats,
    averaged over positions. A swapped (reverse) KL fails."""
    generator = torch.Generator().manual_seed(3)
    reference = 2 * torch.randn(2, 30, 50, generator=generator)
    other = reference + torch.randn(reference.shape, generator=generator)
    student_fn = own_work(student_fn)

    def compare():
        got, expected = number(student_fn(reference, other)), mean_kl(reference, other)
        if got is None:
            return False, "expected one number"
        ok = abs(got - expected) <= 1e-4 * expected
        return ok, ("matches lu.mean_kl, within 1e-04 relative" if ok else
                    f"{got:.6g} vs {expected:.6g} nats, outside 1e-04 relative")
    return graded("mean KL", points, hint, compare,
                  "one number: KL(p_ref ‖ p) in nats averaged over the positions of seeded logits, within 1e-4 relative")


def check_ria_score(student_fn: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor], points: int = 1,
                    hint: str = "two relative importances, one within the weight's row and one within its column "
                                "(keep the dimension you sum over, so it broadcasts), then the activation norm to the "
                                "power alpha", alpha: float = 0.5, seed: int = 0) \
        -> CheckResult:
    """``student_fn(weight, inputs, alpha)`` against the package's RIA score (04-Benchmark).

    Expected: (|W_ij| / Σ_k |W_ik| + |W_ij| / Σ_k |W_kj|) · ‖X_j‖₂^alpha.
    """
    weight, inputs, student_fn = *_exercise_tensors(seed), own_work(student_fn)
    return graded("RIA score", points, hint, lambda: _compare_tensor(
        student_fn(weight, inputs, alpha), ria_score(weight, inputs.pow(2).sum(dim=0), alpha)),
        "a (6, 16) score for a seeded weight and inputs, equal to RIA's score within 1e-4")


def check_nm_mask(student_fn: Callable[[torch.Tensor, int, int], torch.Tensor], points: int = 1,
                  hint: str = "can you reshape the scores so that each group of m neighbours is a row of its own? "
                              "How many of each group go, and in which order do equal scores go?") -> CheckResult:
    """``student_fn(score, n, m)`` → bool (out, in), True = pruned, against the package's N:M mask (04-Benchmark):
    2:4 and 4:8 on random scores and on scores full of ties."""
    random, tied = torch.randn(4, 16, generator=torch.Generator().manual_seed(4)), _tied_scores((4, 16), 5)
    cases = {"2:4 random": ((random, 2, 4), nm_mask(random, 2, 4)), "2:4 ties": ((tied, 2, 4), nm_mask(tied, 2, 4)),
             "4:8 random": ((random, 4, 8), nm_mask(random, 4, 8)), "4:8 ties": ((tied, 4, 8), nm_mask(tied, 4, 8))}
    student_fn = own_work(student_fn)
    return graded("N:M mask", points, hint, lambda: _compare_masks(student_fn, cases),
                  "in every case, a bool mask equal to the lab's: the m − n lowest scores of each group of m, "
                  "equal scores in index order")


def check_masked_merge(student_fn: Callable[..., torch.Tensor], points: int = 1,
                       hint: str = "which product of the two adapters has the weight's shape? Where must the update "
                                   "be switched off so that no pruned weight comes back?", seed: int = 0) -> CheckResult:
    """``student_fn(weight, lora_a, lora_b, scale)`` → the merged weight (05-Recover), against the package's
    ``masked_merge``: W + (B·A · scale) ⊙ (W ≠ 0), on a half-pruned weight."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(6, 16, generator=generator)
    weight = weight.masked_fill(unstructured_mask(weight.abs(), 0.5), 0)
    lora_a, lora_b = torch.randn(2, 16, generator=generator), torch.randn(6, 2, generator=generator)
    student_fn = own_work(student_fn)
    return graded("masked LoRA merge", points, hint, lambda: _compare_tensor(
        student_fn(weight, lora_a, lora_b, 0.5), masked_merge(weight, lora_a, lora_b, 0.5)),
        "the merged (6, 16) weight of a seeded half-pruned weight and rank-2 adapters, equal to the lab's within 1e-4")


def check_random_windows(student_fn: Callable[[torch.Tensor, int, int, int], torch.Tensor], points: int = 1,
                         hint: str = "one generator seeded with seed draws every offset at once; what is the last "
                                     "offset at which a whole window still fits? Keep the windows in the order drawn") \
        -> CheckResult:
    """``student_fn(tokens, nsamples, seqlen, seed)`` → (nsamples, seqlen) calibration windows, against the package's
    sampler (06-Calibrate), on a 1000-token text, for several sizes and seeds. Token ids: equal on every machine."""
    tokens = torch.arange(1000) * 7 % 1009
    cases = [(1, 32, 0), (16, 128, 0), (8, 64, 1), (4, 999, 2)]
    student_fn = own_work(student_fn)

    def compare():
        for nsamples, seqlen, seed in cases:
            got, expected = student_fn(tokens, nsamples, seqlen, seed), random_windows(tokens, nsamples, seqlen, seed)
            if not isinstance(got, torch.Tensor) or got.shape != expected.shape:
                what = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
                return False, f"nsamples {nsamples}, seqlen {seqlen}: expected shape {tuple(expected.shape)}, got {what}"
            if not torch.equal(got.long(), expected):
                return False, f"nsamples {nsamples}, seqlen {seqlen}, seed {seed}: other windows than the package's"
        return True, f"the package's windows in {len(cases)} cases (sizes and seeds)"
    return graded("calibration windows", points, hint, compare,
                  "for each size and seed, the same (nsamples, seqlen) windows of a 1000-token text as the lab's sampler")


def check_q4_0(student_fn: Callable[[torch.Tensor], torch.Tensor], points: int = 1,
               hint: str = "which value of the block sets the scale, and with which sign? Codes from the float32 "
                           "scale, values from the scale rounded to float16; what does a block of zeros give?") \
        -> CheckResult:
    """The student's q4_0 of one block (32,) float32 → the 32 values it gives back, against llama.cpp's (the gguf
    package) on seeded blocks: normal, scaled, with an outlier, all zeros (07-Quantize)."""
    student_fn = own_work(student_fn, (GGUF_ROOT,))

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
    return graded("q4_0 of one block", points, hint, compare,
                  "for every seeded block, the 32 values llama.cpp's q4_0 gives back")


def check_nll(student_fn: Callable, points: int = 1,
              hint: str = "log-softmax of a row is x − log Σ exp(x); what can you subtract from every entry of a row "
                          "first without changing that, so that exp never overflows?") -> CheckResult:
    """The student's summed negative log-likelihood of targets (T,) under logits (T, vocab), numpy in and a float out,
    against ``lu.nll_of_logits`` on seeded logits: small, large (×400: exp overflows without the shift), one row
    (08-Deploy)."""
    student_fn = own_work(student_fn)

    def compare():
        rng = np.random.default_rng(0)
        logits, targets = rng.normal(size=(16, 50)) * 3, rng.integers(0, 50, 16)
        cases = {"small logits": (logits, targets), "logits ×400": (logits * 400, targets),
                 "one row": (logits[:1], targets[:1])}
        for label, (x, t) in cases.items():
            got, expected = student_fn(x.copy(), t.copy()), nll_of_logits(x, t)
            if number(got) is None or not math.isclose(number(got), expected, rel_tol=1e-9):
                return False, f"{label}: {got!r}"
        return True, f"the package's value in {len(cases)} cases ({', '.join(cases)})"
    return graded("summed NLL from logits", points, hint, compare,
                  "for every seeded case, the summed negative log-likelihood within 1e-9 relative")


def check_layer_sparsity(model: torch.nn.Module, sparsity: float, points: int = 1,
                         hint: str = "prune with a per-row target (lu.PruneSpec(method, sparsity)) and check that "
                                     "nothing restored the weights afterwards") -> CheckResult:
    """Every output row of every prunable linear has ⌊in·sparsity⌋ zeros, and not many more: at most 1 % of the
    row (weights that were zero before pruning) beyond it, so a model with every weight zeroed fails (02-Prune)."""
    def compare():
        short, over = [], []
        for i, layer in enumerate(find_decoder_layers(model)):
            for name, lin in find_linears(layer).items():
                zeros, k = (lin.weight == 0).sum(dim=1), int(lin.in_features * sparsity)
                short += [f"layer {i} {name}"] if int(zeros.min()) < k else []
                over += [f"layer {i} {name}"] if int(zeros.max()) > k + max(1, lin.in_features // 100) else []
        if short:
            return False, f"{len(short)} linears fall short, e.g. {short[0]}"
        if over:
            return False, f"{len(over)} linears have rows with far more zeros than the target, e.g. {over[0]}"
        return True, "every row reaches the target, and no row goes far beyond it"
    return graded("per-row sparsity", points, hint, compare,
                  f"⌊in·{sparsity:g}⌋ zeros in every row of every pruned linear (and at most 1 % of the row more)")


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
            if number(value) is None:
                return False, f"{label}expected a number, got {type(value).__name__}"
            if abs(number(value) - reference) > rtol * abs(reference):
                wrong.append(f"{label}{number(value):.6g} vs {reference:.6g}")
        if wrong:
            return False, f"{', '.join(wrong)}: outside {rtol:.0e} relative"
        # no values when right: the last digits of a float32 figure differ between CPUs, the verdict does not
        what = ", ".join(label.rstrip(": ") for label in pairs) if isinstance(expected, Mapping) else "the value"
        return True, f"{what} within {rtol:.0e} relative of the expected"
    return graded(name, points, hint, compare)


def answer_digest(name: str, answer) -> str:
    """A hash of a check's name and an answer (trimmed, lower case): what masters written before the hidden tests
    passed to ``check_prediction`` instead of the answer. A one-letter answer is found again by hashing each letter,
    so new masters give the answer itself, inside a hidden-test region."""
    return hashlib.sha256(f"{name}\n{str(answer).strip().lower()}".encode()).hexdigest()[:16]


def check_prediction(name: str, answer, expected: str, points: int = 1,
                     hint: str = "reread the section the question is about") -> CheckResult:
    """A prediction (e.g. a multiple-choice letter) against ``expected``, the right answer (trimmed, any case).

    The call sits in the check cell's hidden-test region, so student copies never hold the answer; an ``expected``
    of 16 hex digits is an ``answer_digest`` (older masters)."""
    def compare():
        if answer is None or answer is Ellipsis:
            return False, "no answer given yet"
        given = str(answer).strip().lower()
        digest = len(expected) == 16 and all(c in "0123456789abcdef" for c in expected)
        ok = answer_digest(name, answer) == expected if digest else given == str(expected).strip().lower()
        return ok, f"{given!r} is {'right' if ok else 'not the answer'}"
    return graded(name, points, hint, compare, "the answer the question asks for")
