"""The ``wiki_lastword`` task's candidates (LAMBADA-style; see ``zeroshot.tasks``, used in 04-Benchmark).

A candidate is a passage of whole sentences of a test article that ends at a sentence end; the model must
continue the passage without its final word with exactly that word. ``lastword_drop_reason`` keeps only
targets the passage makes predictable (the rules are listed in ``zeroshot.tasks``' docstring, with counts).
"""
from __future__ import annotations

import collections
import functools
import os
import random

from ...core.data import corpus_split
from .sentences import MIN_SENTENCE_WORDS, STOPWORDS, article_sentences, brackets_balanced, n_words, words

LASTWORD_MAX_CONTEXT_WORDS = 40
COMMON_WORD_SHARE = 0.01  # a word in at least this share of the calibration articles needs no earlier support
MIN_STEM = 4              # letters of a word that another word must start with to count as the same stem …
MIN_SHARED_PREFIX = 6     # … or letters two words must share at the start
TRAILING_PUNCT = ".,;:!?\"'”’)]"
DROP_REASONS = ("number", "not a word", "function word", "inside brackets or quotes", "rare proper noun",
                "no earlier support")


@functools.lru_cache(maxsize=1)
def common_words() -> frozenset[str]:
    """Lower-case words that occur in at least ``COMMON_WORD_SHARE`` of the calibration split's articles (697
    words: "people", "river", "species", "english"; not "gravitation", "rainfall" or "bce")."""
    articles = corpus_split("calibration")
    counts = collections.Counter(word for article in articles for word in set(words(article.text)))
    return frozenset(word for word, n in counts.items() if n >= COMMON_WORD_SHARE * len(articles))


def same_stem(a: str, b: str) -> bool:
    """Whether two lower-case words share a stem: equal, one a prefix of the other (≥ ``MIN_STEM`` letters:
    state / states), or ≥ ``MIN_SHARED_PREFIX`` letters in common at the start (gravity / gravitation)."""
    short, long = sorted((a, b), key=len)
    return (a == b or (len(short) >= MIN_STEM and long.startswith(short))
            or len(os.path.commonprefix((a, b))) >= MIN_SHARED_PREFIX)


def is_supported(word: str, context: str) -> bool:
    """Whether the context predicts ``word``: a word of the context shares its stem, or it is a common word."""
    word = word.lower()
    return word in common_words() or any(same_stem(word, earlier) for earlier in words(context))


def lastword_drop_reason(context: str, final: str) -> str | None:
    """Why a passage ``context + " " + final`` (``final``: its last token, punctuation included) makes no
    item, as one of ``DROP_REASONS`` (the first rule that applies), or None if it makes one."""
    word = final.rstrip(TRAILING_PUNCT)
    if any(char.isdigit() for char in word):
        return "number"
    if not (word.isalpha() and len(word) >= 3):
        return "not a word"
    if word.lower() in STOPWORDS:
        return "function word"
    if not brackets_balanced(context):  # the word sits inside (…) or "…": the context ends with a mark open
        return "inside brackets or quotes"
    if is_supported(word, context):
        return None
    return "rare proper noun" if word[0].isupper() else "no earlier support"


def passages(sentences: tuple[str, ...]) -> list[tuple[str, str]]:
    """(context, final token) of each passage that ends with a sentence of ≥ ``MIN_SENTENCE_WORDS`` words and
    starts as early as ≤ ``LASTWORD_MAX_CONTEXT_WORDS`` + 1 words allow."""
    found = []
    for end, sentence in enumerate(sentences):
        start = end
        while start > 0 and sum(map(n_words, sentences[start - 1 : end + 1])) <= LASTWORD_MAX_CONTEXT_WORDS + 1:
            start -= 1  # as much preceding context as fits: the passage, not the sentence, carries the clue
        passage = " ".join(sentences[start : end + 1])
        if n_words(sentence) >= MIN_SENTENCE_WORDS and n_words(passage) <= LASTWORD_MAX_CONTEXT_WORDS + 1:
            context, final = passage.rsplit(" ", 1)
            found.append((context, final))
    return found


@functools.lru_cache(maxsize=4)
def lastword_candidates(seed: int) -> tuple[tuple[dict | None, ...], dict[str, int]]:
    """One item {"title", "context", "target"} per test article in the split's order (None where none is
    kept), drawn with ``seed`` from its kept passages; and the number of candidates each rule dropped."""
    counts = collections.Counter(dict.fromkeys(("candidates", *DROP_REASONS, "kept"), 0))
    chosen = []
    for article in corpus_split("test"):
        kept = []
        for context, final in passages(article_sentences(article.text)):
            reason = lastword_drop_reason(context, final)
            counts.update(("candidates", reason or "kept"))
            if reason is None:
                kept.append({"title": article.title, "context": context, "target": final.rstrip(TRAILING_PUNCT)})
        rng = random.Random(f"wiki_lastword:{seed}:{article.title}")
        chosen.append(rng.choice(kept) if kept else None)
    return tuple(chosen), dict(counts)
