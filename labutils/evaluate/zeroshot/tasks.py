"""Two small zero-shot tasks built from the test split of the lab's corpus (used in 04-Benchmark).

The paper's seven zero-shot tasks (BoolQ, RTE, HellaSwag, …) download from the Hugging Face Hub. The default
profile runs offline, so it gets two tasks in the same spirit, made from Wikipedia leads the model never saw
during calibration:

- ``wiki_lastword`` (like LAMBADA): a passage of whole sentences; predict its final word. A hit means the
  greedy continuation is exactly that word (lm-eval ``loglikelihood``, metric ``acc``).
- ``wiki_nextsentence`` (like HellaSwag): a sentence, then four candidate next sentences: the true one and
  three of similar length from other articles (lm-eval ``multiple_choice``, metrics ``acc`` and ``acc_norm``).

``write_tasks`` writes the lm-eval task folder: one YAML and one JSONL file per task, and a tiny loader module
that the YAMLs name through lm-eval's ``custom_dataset: !function``. The loader finds each JSONL file next to
itself, so the folder works from any working directory and offline. The copy in ``TASKS_DIR`` is committed;
a test checks it equals a fresh ``write_tasks``.
"""
from __future__ import annotations

import itertools
import json
import random
import re
from pathlib import Path

from ...core.data import Article, corpus_split
from ...core.errors import BadInput
from ...core.validation import check_positive_int

TASKS_DIR = Path(__file__).resolve().parent / "lm_tasks"
N_ITEMS = 300
SEED = 0
LASTWORD_MAX_CONTEXT_WORDS = 40
NEXT_MAX_CONTEXT_WORDS = 30
NEXT_MAX_CHOICE_WORDS = 25
MIN_SENTENCE_WORDS = 5
N_CHOICES = 4
LENGTH_TOLERANCES = (0.15, 0.3, 0.6)  # relative character-length windows tried for distractors, in turn

# Final words a model could guess without reading the passage.
STOPWORDS = frozenset((
    "a", "about", "above", "after", "again", "against", "all", "also", "am", "an", "and", "any", "are", "as",
    "at", "be", "because", "been", "before", "being", "below", "between", "both", "but", "by", "can", "could",
    "did", "do", "does", "doing", "down", "during", "each", "etc", "few", "for", "from", "further", "had", "has",
    "have", "having", "he", "her", "here", "hers", "herself", "him", "himself", "his", "how", "however", "i",
    "if", "in", "into", "is", "it", "its", "itself", "just", "more", "most", "my", "myself", "no", "nor", "not",
    "now", "of", "off", "on", "once", "one", "only", "or", "other", "our", "ours", "ourselves", "out", "over",
    "own", "same", "she", "should", "so", "some", "such", "than", "that", "the", "their", "theirs", "them",
    "themselves", "then", "there", "these", "they", "this", "those", "through", "thus", "to", "too", "two",
    "under", "until", "up", "upon", "us", "very", "was", "we", "were", "what", "when", "where", "which", "while",
    "who", "whom", "why", "will", "with", "within", "without", "would", "you", "your", "yours",
))

# Words that end in a full stop without ending a sentence.
_ABBREVIATIONS = frozenset((
    "mr", "mrs", "ms", "dr", "prof", "st", "mt", "ft", "jr", "sr", "vs", "etc", "c", "ca", "no", "nos", "fig",
    "gen", "col", "lt", "sgt", "capt", "rev", "hon", "inc", "ltd", "co", "corp", "bros", "approx",
))
_SENTENCE_END = re.compile(r"[.!?][\"'”’)\]]*\s+(?=[\"“(]?[A-Z])")
_TRAILING_PUNCT = ".,;:!?\"'”’)]"

_LOADER = '''"""Loads a task's JSONL file from this folder for lm-eval's ``custom_dataset`` (written by
labutils.evaluate.zeroshot.tasks.write_tasks; edit that, not this file)."""
import json
from pathlib import Path

import datasets


def load(data_file, **metadata):
    """DatasetDict with one "test" split read from ``data_file``, a name relative to this folder."""
    rows = [json.loads(line) for line in (Path(__file__).parent / data_file).read_text("utf-8").splitlines()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
'''

_LASTWORD_YAML = """# Written by labutils.evaluate.zeroshot.tasks.write_tasks; regenerate rather than edit.
task: wiki_lastword
custom_dataset: !function wiki_data.load
dataset_kwargs:
  data_file: wiki_lastword.jsonl
output_type: loglikelihood
test_split: test
doc_to_text: "{{context}}"
doc_to_target: "{{' ' + target}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

_NEXTSENTENCE_YAML = """# Written by labutils.evaluate.zeroshot.tasks.write_tasks; regenerate rather than edit.
task: wiki_nextsentence
custom_dataset: !function wiki_data.load
dataset_kwargs:
  data_file: wiki_nextsentence.jsonl
output_type: multiple_choice
test_split: test
doc_to_text: "{{context}}"
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def split_sentences(text: str) -> list[str]:
    """The sentences of ``text``: a break after . ! or ? followed by a capital, unless the word before the stop
    is an initial ("J.") or a common abbreviation ("St.", "U.S.")."""
    text = " ".join(text.split())  # a few leads hold line breaks
    sentences, start = [], 0
    for match in _SENTENCE_END.finditer(text):
        before = text[start : match.start()].split()
        bare = before[-1].lstrip("\"'“(").lower() if before else ""
        if len(bare) <= 1 or bare in _ABBREVIATIONS or "." in bare:
            continue
        sentences.append(text[start : match.end()].strip())
        start = match.end()
    sentences.append(text[start:].strip())
    return [s for s in sentences if s]


def _final_word(sentence: str) -> str | None:
    """The sentence's last word without trailing punctuation, if it is a good target (alphabetic, ≥ 3 letters,
    not a stopword); otherwise None."""
    word = sentence.split()[-1].rstrip(_TRAILING_PUNCT)
    if len(word) >= 3 and word.isalpha() and word.lower() not in STOPWORDS:
        return word
    return None


def _n_words(text: str) -> int:
    return len(text.split())


def _lastword_item(article: Article, rng: random.Random) -> dict | None:
    """One passage of whole sentences ending in a good target word, or None if the article has none."""
    sentences = split_sentences(article.text)
    candidates = []
    for end, sentence in enumerate(sentences):
        if _n_words(sentence) < MIN_SENTENCE_WORDS or _final_word(sentence) is None:
            continue
        start = end
        while start > 0 and sum(map(_n_words, sentences[start - 1 : end + 1])) <= LASTWORD_MAX_CONTEXT_WORDS + 1:
            start -= 1  # as much preceding context as fits: the passage, not the sentence, carries the clue
        passage = " ".join(sentences[start : end + 1])
        if _n_words(passage) <= LASTWORD_MAX_CONTEXT_WORDS + 1:
            candidates.append(passage)
    if not candidates:
        return None
    passage = rng.choice(candidates)
    target = _final_word(passage)
    context = passage[: passage.rstrip().rindex(" ")]
    return {"title": article.title, "context": context, "target": target}


def lastword_items(n_items: int = N_ITEMS, seed: int = SEED) -> list[dict]:
    """``n_items`` LAMBADA-style items, at most one per test article, in the split's fixed order.

    Each item: {"id", "title", "context", "target"}; ``context + " " + target`` is a passage of the article
    (≤ 40 + 1 words) with its final punctuation dropped; the model must continue ``context`` with ``" " + target``.
    """
    check_positive_int("n_items", n_items)
    candidates = (_lastword_item(article, random.Random(f"wiki_lastword:{seed}:{article.title}"))
                  for article in corpus_split("test"))
    return _first_items(candidates, n_items, "wiki_lastword")


def _first_items(candidates, n_items: int, task: str) -> list[dict]:
    """The first ``n_items`` candidates (None = the article gave no item) whose context is new, numbered by
    "id"; BadInput if the test split yields fewer."""
    items, contexts = [], set()
    for item in candidates:
        if item is None or item["context"] in contexts:
            continue
        contexts.add(item["context"])
        items.append({"id": len(items), **item})
        if len(items) == n_items:
            return items
    raise BadInput(f"n_items={n_items} is more than the test split yields; allowed: 1..{len(items)} {task} items")


def _distractor_pool(articles: tuple[Article, ...]) -> list[tuple[str, str]]:
    """(title, sentence) for every usable non-first sentence: first sentences ("X is a …") would stand out,
    because the true next sentence is never a first sentence."""
    pool = []
    for article in articles:
        for sentence in split_sentences(article.text)[1:]:
            if MIN_SENTENCE_WORDS <= _n_words(sentence) <= NEXT_MAX_CHOICE_WORDS:
                pool.append((article.title, sentence))
    return pool


def _distractors(true: str, title: str, pool: list[tuple[str, str]], rng: random.Random) -> list[str] | None:
    """Three sentences from three other articles, each within a tolerance of the true sentence's length."""
    for tolerance in LENGTH_TOLERANCES:
        close = [(t, s) for t, s in pool
                 if t != title and s != true and abs(len(s) - len(true)) <= tolerance * len(true)]
        rng.shuffle(close)
        chosen: dict[str, str] = {}  # title -> sentence, so each distractor has its own article
        for other_title, sentence in close:
            if other_title not in chosen and sentence not in chosen.values():
                chosen[other_title] = sentence
            if len(chosen) == N_CHOICES - 1:
                return list(chosen.values())
    return None


def nextsentence_items(n_items: int = N_ITEMS, seed: int = SEED) -> list[dict]:
    """``n_items`` four-way next-sentence items, at most one per test article, in the split's fixed order.

    Each item: {"id", "title", "context", "choices" (4 sentences), "label" (index of the true next sentence)}.
    The context has ≤ 30 words, every choice 5–25 words; distractors come from other test articles.
    """
    check_positive_int("n_items", n_items)
    articles = corpus_split("test")
    pool = _distractor_pool(articles)
    candidates = (_nextsentence_item(article, pool, random.Random(f"wiki_nextsentence:{seed}:{article.title}"))
                  for article in articles)
    return _first_items(candidates, n_items, "wiki_nextsentence")


def _nextsentence_item(article: Article, pool: list[tuple[str, str]], rng: random.Random) -> dict | None:
    """A sentence of the article, its true next sentence and three distractors in a random order; None if the
    article has no usable pair of sentences or no distractors fit."""
    sentences = split_sentences(article.text)
    pairs = [(a, b) for a, b in itertools.pairwise(sentences)
             if MIN_SENTENCE_WORDS <= _n_words(a) <= NEXT_MAX_CONTEXT_WORDS
             and MIN_SENTENCE_WORDS <= _n_words(b) <= NEXT_MAX_CHOICE_WORDS]
    if not pairs:
        return None
    context, true = rng.choice(pairs)
    distractors = _distractors(true, article.title, pool, rng)
    if distractors is None:
        return None
    label = rng.randrange(N_CHOICES)
    choices = distractors[:label] + [true] + distractors[label:]
    return {"title": article.title, "context": context, "choices": choices, "label": label}


def _jsonl(items: list[dict]) -> str:
    return "".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items)


def task_files(n_items: int = N_ITEMS, seed: int = SEED) -> dict[str, str]:
    """File name → text of every file in the lm-eval task folder."""
    return {
        "wiki_data.py": _LOADER,
        "wiki_lastword.yaml": _LASTWORD_YAML,
        "wiki_lastword.jsonl": _jsonl(lastword_items(n_items, seed)),
        "wiki_nextsentence.yaml": _NEXTSENTENCE_YAML,
        "wiki_nextsentence.jsonl": _jsonl(nextsentence_items(n_items, seed)),
    }


def write_tasks(folder: str | Path = TASKS_DIR, n_items: int = N_ITEMS, seed: int = SEED) -> list[Path]:
    """Write the task folder (YAMLs, JSONL data, loader) into ``folder``; returns the paths written.

    Pass the folder to ``lm_eval.tasks.TaskManager(include_path=folder)``. Regenerate the committed copy with
    ``python -c "import labutils.evaluate.zeroshot.tasks as z; z.write_tasks()"``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in task_files(n_items, seed).items():
        (folder / name).write_text(text, encoding="utf-8")
        written.append(folder / name)
    return written
