"""The ``wiki_nextsentence`` task's candidates (HellaSwag-style; see ``zeroshot.tasks``, used in 04-Benchmark).

A context of one or two sentences of a test article, its true next sentence and three distractors: one from
the same article where it has a sentence away from the context, the rest from the articles closest in topic.
No sentence is a choice twice: a distractor is never any article's answer, nor another item's distractor.
"""
from __future__ import annotations

import collections
import functools
import math
import random

import numpy as np

from ...core.data import corpus_split
from .sentences import (
    MIN_SENTENCE_WORDS,
    STOPWORDS,
    article_sentences,
    brackets_balanced,
    clean_text,
    is_pronoun_led,
    n_words,
    words,
)

NEXT_MAX_CONTEXT_WORDS = 30  # as many as before: 04-Benchmark is short of time
NEXT_MAX_CHOICE_WORDS = 25
N_CHOICES = 4
NEIGHBOURS = 30  # topically closest articles searched for distractors
LENGTH_TOLERANCES = (0.15, 0.3, 0.6)  # relative character-length windows tried for distractors, in turn
DROP_REASONS = ("pronoun-led without its referent", "context too long", "unclosed bracket or quote")


@functools.lru_cache(maxsize=1)
def neighbours() -> tuple[tuple[int, ...], ...]:
    """For each test article (in the split's order), the indices of the ``NEIGHBOURS`` others closest to it in
    topic: cosine similarity of TF-IDF vectors of their content words, ties broken by index."""
    bags = [collections.Counter(w for w in words(clean_text(a.text)) if len(w) > 2 and w not in STOPWORDS)
            for a in corpus_split("test")]
    frequency = collections.Counter(word for bag in bags for word in bag)
    vocabulary = {word: i for i, word in enumerate(sorted(w for w, n in frequency.items() if n > 1))}
    vectors = np.zeros((len(bags), len(vocabulary)))  # (articles, words)
    for row, bag in enumerate(bags):
        for word, n in bag.items():
            if word in vocabulary:
                vectors[row, vocabulary[word]] = (1 + math.log(n)) * math.log(len(bags) / frequency[word])
    vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    similarity = np.round(vectors @ vectors.T, 6)  # rounded: summation order must not reorder neighbours
    np.fill_diagonal(similarity, -np.inf)
    order = np.argsort(-similarity, axis=1, kind="stable")[:, :NEIGHBOURS]
    return tuple(tuple(int(i) for i in row) for row in order)


def context_start(sentences: tuple[str, ...], answer: int) -> int:
    """Index of the context's first sentence for the answer ``sentences[answer]``: the sentence before it, or
    the one before that too when the first opens with a pronoun; -1 if that one is missing or pronoun-led."""
    start = answer - 1
    if is_pronoun_led(sentences[start]):
        start -= 1
        if start < 0 or is_pronoun_led(sentences[start]):
            return -1
    return start


def next_drop_reason(sentences: tuple[str, ...], answer: int) -> str | None:
    """Why the pair ending at ``sentences[answer]`` makes no item, as one of ``DROP_REASONS``, or None."""
    start = context_start(sentences, answer)
    if start < 0:
        return "pronoun-led without its referent"
    context = " ".join(sentences[start:answer])
    if n_words(context) > NEXT_MAX_CONTEXT_WORDS:
        return "context too long"
    if not (brackets_balanced(context) and brackets_balanced(sentences[answer])):
        return "unclosed bracket or quote"
    return None


def choice_fits(sentence: str) -> bool:
    return MIN_SENTENCE_WORDS <= n_words(sentence) <= NEXT_MAX_CHOICE_WORDS and brackets_balanced(sentence)


def _distractors(index: int, start: int, answer: int, sentences: list[tuple[str, ...]], taken: set[str],
                 rng: random.Random) -> list[str] | None:
    """Three sentences for the item of article ``index`` none of which is in ``taken`` (then added to it):
    one of the same article that neither opens it nor touches the context or the answer, if it has one, then
    one from each closest article; each within the tightest length window around the answer that works."""
    own, true = sentences[index], sentences[index][answer]
    near = {0, *range(start - 1, answer + 2)}
    for tolerance in LENGTH_TOLERANCES:
        def fits(sentence: str) -> bool:
            return (sentence not in taken and choice_fits(sentence)
                    and abs(len(sentence) - len(true)) <= tolerance * len(true))
        same = [s for j, s in enumerate(own) if j not in near and fits(s)]
        chosen = [rng.choice(same)] if same else []
        for other in neighbours()[index]:
            options = [s for s in sentences[other][1:] if fits(s) and s not in chosen]
            if options:
                chosen.append(rng.choice(options))
            if len(chosen) == N_CHOICES - 1:
                taken.update(chosen)
                return chosen
    return None


def _pick_pairs(seed: int, articles, sentences) -> tuple[list[tuple | None], collections.Counter]:
    """Per article, (context start, answer index, its random generator) drawn from its kept pairs, or None;
    and the counts of candidate pairs per rule."""
    counts = collections.Counter(dict.fromkeys(("candidates", *DROP_REASONS, "kept", "no distractors left"), 0))
    picks = []
    for article, own in zip(articles, sentences):
        kept = []
        for answer in range(1, len(own)):
            if (n_words(own[answer - 1]) < MIN_SENTENCE_WORDS
                    or not MIN_SENTENCE_WORDS <= n_words(own[answer]) <= NEXT_MAX_CHOICE_WORDS):
                continue  # not a candidate: a fragment, or an answer too long to be a choice
            reason = next_drop_reason(own, answer)
            counts.update(("candidates", reason or "kept"))
            if reason is None:
                kept.append((context_start(own, answer), answer))
        rng = random.Random(f"wiki_nextsentence:{seed}:{article.title}")
        picks.append((*rng.choice(kept), rng) if kept else None)
    return picks, counts


@functools.lru_cache(maxsize=4)
def nextsentence_candidates(n_items: int, seed: int) -> tuple[tuple[dict, ...], dict[str, int]]:
    """Up to ``n_items`` items {"title", "context", "choices" (a tuple), "label"}, at most one per test article
    in the split's order, each pair drawn with ``seed`` from the article's kept ones; and the counts of the
    module's rules (candidate pairs over the whole split; articles whose distractors ran out until then)."""
    articles = corpus_split("test")
    sentences = [article_sentences(article.text) for article in articles]
    picks, counts = _pick_pairs(seed, articles, sentences)
    taken = {own[pick[1]] for pick, own in zip(picks, sentences) if pick}  # every article's answer, to begin
    items = []
    for index, pick in enumerate(picks):
        if pick is None or len(items) == n_items:
            continue
        start, answer, rng = pick
        distractors = _distractors(index, start, answer, sentences, taken, rng)
        if distractors is None:
            counts["no distractors left"] += 1
            continue
        label = rng.randrange(N_CHOICES)
        own = sentences[index]
        items.append({"title": articles[index].title, "context": " ".join(own[start:answer]),
                      "choices": (*distractors[:label], own[answer], *distractors[label:]), "label": label})
    return tuple(items), dict(counts)
