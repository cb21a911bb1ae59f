"""Does the pruned model still work? Generation and drift from the dense model (03-Inference).

Three measurements, all against the dense model on the same input:
- answers to fixed prompts, greedy, side by side;
- on held-out text, next-token **top-1 agreement** with the dense model and mean **KL(dense ‖ sparse)** of the
  next-token distributions (0 when the sparse model predicts exactly like the dense one);
- **repeated n-gram ratio** of greedy continuations: the share of n-grams a continuation has already produced,
  the usual symptom of a model that degenerated into loops.
"""
from __future__ import annotations

import math
import textwrap
from collections import Counter
from dataclasses import dataclass

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm  # plain text everywhere: a saved notebook shows the finished bar, not a widget
from transformers import GenerationConfig

from ..core.anatomy import model_device
from ..core.errors import BadInput
from ..core.validation import check_positive_int
from .perplexity import next_token_logits, window_batches


@dataclass(frozen=True)
class Prompt:
    """One fixed prompt. ``chat``: wrapped in the tokenizer's chat template when it has one; else plain text."""

    name: str
    text: str
    chat: bool = True


PROMPTS = (
    Prompt("factual", "What is the capital of France?"),
    Prompt("science", "Why is the sky blue? Answer in one sentence."),
    Prompt("instruction", "List three fruits, one per line."),
    Prompt("continuation", "The Eiffel Tower is a wrought-iron lattice tower in Paris. It was", chat=False),
)


def prompt_text(tokenizer, prompt: Prompt) -> str:
    """The exact text fed to the model: the chat template for chat prompts (if the tokenizer has one)."""
    if prompt.chat and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt.text}], add_generation_prompt=True,
                                             tokenize=False)
    return prompt.text


@torch.no_grad()
def greedy_generate(model: nn.Module, tokenizer, texts: list[str], max_new_tokens: int,
                    stop_at_eos: bool = True) -> list[list[int]]:
    """Greedy continuations of ``texts``, batched with left padding; the new token ids of each text.

    ``stop_at_eos=False`` always generates ``max_new_tokens`` (for the degeneration check, so every model
    produces the same amount of text); otherwise a continuation ends at the end-of-sequence token.
    """
    check_positive_int("max_new_tokens", max_new_tokens)
    if not texts:
        raise BadInput("need at least one prompt text; got an empty list")
    device = model_device(model)
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        batch = tokenizer(list(texts), return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    finally:
        tokenizer.padding_side = side
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                              eos_token_id=tokenizer.eos_token_id if stop_at_eos else None,
                              min_new_tokens=None if stop_at_eos else max_new_tokens)
    out = model.generate(**batch, generation_config=config)[:, batch["input_ids"].shape[1]:]
    continuations = []
    for row in out.tolist():
        if stop_at_eos and tokenizer.eos_token_id in row:
            row = row[: row.index(tokenizer.eos_token_id)]
        continuations.append(row)
    return continuations


def side_by_side(models: dict[str, nn.Module], tokenizer, prompts: tuple[Prompt, ...] = PROMPTS,
                 max_new_tokens: int = 40, progress: bool = True) -> pd.DataFrame:
    """Greedy answers of every model to every prompt: rows = prompts, columns = "prompt" and model names."""
    texts = [prompt_text(tokenizer, p) for p in prompts]
    table = pd.DataFrame({"prompt": [p.text for p in prompts]}, index=pd.Index([p.name for p in prompts]))
    for name, model in tqdm(models.items(), desc="generating", unit="model", disable=not progress):
        answers = greedy_generate(model, tokenizer, texts, max_new_tokens)
        table[name] = [tokenizer.decode(a, skip_special_tokens=True).strip() for a in answers]
    return table


def format_answers(answers: pd.DataFrame, width: int = 110) -> str:
    """``side_by_side``'s table as text to print (03-Inference): for each prompt, its text, then each model's answer
    left-aligned under it; an answer's own line breaks start indented lines (shown, not escaped as "\\n"), and
    lines longer than ``width`` wrap."""
    models = [c for c in answers.columns if c != "prompt"]
    pad = max(len(m) for m in models) + 2
    blocks = []
    for name, row in answers.iterrows():
        lines = [f"▶ {name}: {row['prompt']}"]
        for model in models:
            text = str(row[model]).strip() or "(nothing)"
            wrapped = [piece for part in text.splitlines() or [""]
                       for piece in textwrap.wrap(part, width - pad - 2) or [""]]
            lines += [f"  {(model if k == 0 else ''):<{pad}}{piece}" for k, piece in enumerate(wrapped)]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def top1_agreement(reference_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """Share of positions where both models' most likely next token is the same. Both (..., vocab)."""
    _check_logits(reference_logits, logits)
    return (reference_logits.argmax(-1) == logits.argmax(-1)).float().mean().item()


def mean_kl(reference_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean over positions of KL(p_ref ‖ p) = Σ_v p_ref(v) (log p_ref(v) − log p(v)), in nats. Both (..., vocab)."""
    _check_logits(reference_logits, logits)
    return _kl_per_position(F.log_softmax(reference_logits.float(), dim=-1), logits).mean().item()


def _kl_per_position(reference_logprobs: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(p_ref ‖ p) at every position, from the reference's log-probabilities (computed once by callers that
    compare several models with it) and the other model's logits."""
    return (reference_logprobs.exp() * (reference_logprobs - F.log_softmax(logits.float(), dim=-1))).sum(-1)


def _check_logits(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape or a.dim() < 1 or a.numel() == 0:
        raise BadInput(f"logits must have the same non-empty shape (..., vocab); got {tuple(a.shape)} and "
                       f"{tuple(b.shape)}")


def repeated_ngram_ratio(sequences: list[list[int]], n: int = 3) -> float:
    """Share of the n-grams in each sequence that already occurred earlier in it, pooled over sequences.

    0 for text that never repeats itself; close to 1 for a model stuck in a loop. Sequences shorter than
    ``n`` contribute nothing; if none is long enough the ratio is undefined and BadInput is raised.
    """
    check_positive_int("n", n)
    repeats = total = 0
    for seq in sequences:
        seen = set()
        for gram in _ngrams(seq, n):
            repeats += gram in seen
            seen.add(gram)
            total += 1
    if total == 0:
        raise BadInput(f"no sequence has at least n={n} tokens, so the repeated n-gram ratio is undefined")
    return repeats / total


@torch.no_grad()
def drift_table(dense: nn.Module, models: dict[str, nn.Module], tokens: torch.Tensor, seqlen: int,
                batch_size: int = 4, progress: bool = True) -> pd.DataFrame:
    """Next-token drift of each model from ``dense`` on held-out ``tokens`` (N,), in the non-overlapping windows of
    ``seqlen`` tokens that ``perplexity`` uses (``window_batches``).

    Columns: top-1 agreement with dense, mean KL(dense ‖ model) in nats, and the perplexity of each model on
    the same windows (dense included as the first row), so drift can be read next to quality.
    """
    check_positive_int("seqlen", seqlen)
    check_positive_int("batch_size", batch_size)
    batches = window_batches(tokens, seqlen, batch_size, model_device(dense), what="held-out tokens",
                             desc="drift" if progress else None)
    names = ["dense", *models]
    sums = {name: {"agree": 0.0, "kl": 0.0, "nll": 0.0} for name in names}
    count = 0
    for batch in batches:
        ref = next_token_logits(dense, batch)
        ref_top, ref_logprobs = ref.argmax(-1), F.log_softmax(ref, dim=-1)  # shared by every model's comparison
        targets = batch[:, 1:]
        for name in names:
            logits = ref if name == "dense" else next_token_logits(models[name], batch)
            sums[name]["agree"] += (ref_top == logits.argmax(-1)).sum().item()
            sums[name]["kl"] += _kl_per_position(ref_logprobs, logits).sum().item()
            sums[name]["nll"] += F.cross_entropy(logits.transpose(1, 2), targets, reduction="sum").item()
        count += targets.numel()
    rows = {name: {"top-1 agreement": s["agree"] / count, "KL(dense ‖ model)": s["kl"] / count,
                   "perplexity": math.exp(s["nll"] / count)} for name, s in sums.items()}
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("model")


def degeneration_table(models: dict[str, nn.Module], tokenizer, prompts: list[str], new_tokens: int = 64,
                       n: int = 3, progress: bool = True) -> pd.DataFrame:
    """Repeated n-gram ratio of ``new_tokens``-token greedy continuations of ``prompts``, per model.

    Every model continues every prompt for exactly ``new_tokens`` tokens (end-of-sequence ignored), so the
    ratios compare the same amount of text. Also the share of continuations that repeat one n-gram 3+ times.
    """
    rows = {}
    for name, model in tqdm(models.items(), desc="continuations", unit="model", disable=not progress):
        continuations = greedy_generate(model, tokenizer, prompts, new_tokens, stop_at_eos=False)
        looping = sum(_max_ngram_count(c, n) >= 3 for c in continuations) / len(continuations)
        rows[name] = {f"repeated {n}-gram ratio": repeated_ngram_ratio(continuations, n),
                      f"continuations with a {n}-gram 3+ times": looping}
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("model")


def _ngrams(seq: list[int], n: int):
    """The n-grams of ``seq`` in order, as tuples."""
    return (tuple(seq[i : i + n]) for i in range(len(seq) - n + 1))


def _max_ngram_count(seq: list[int], n: int) -> int:
    return max(Counter(_ngrams(seq, n)).values(), default=0)


def passage_starts(articles, n_prompts: int, words: int = 24) -> list[str]:
    """The first ``words`` words of the first ``n_prompts`` articles: prompts for the degeneration check."""
    check_positive_int("n_prompts", n_prompts)
    check_positive_int("words", words)
    starts = [" ".join(a.text.split()[:words]) for a in articles[:n_prompts]]
    if len(starts) < n_prompts:
        raise BadInput(f"asked for {n_prompts} passages; only {len(starts)} articles are available")
    return starts
