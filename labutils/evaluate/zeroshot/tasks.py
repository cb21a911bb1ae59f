"""Two small zero-shot tasks built from the test split of the lab's corpus (used in 04-Benchmark).

The paper's seven zero-shot tasks (BoolQ, RTE, HellaSwag, …) download from the Hugging Face Hub. The default
profile runs offline, so it gets two tasks in the same spirit, made from Wikipedia leads the model never saw
during calibration, cleaned of extraction artefacts and split into sentences by ``zeroshot.sentences``:

- ``wiki_lastword`` (like LAMBADA, built by ``zeroshot.lastword``): a passage of whole sentences (≤ 41 words);
  predict its final word. A hit means the greedy continuation is exactly that word (lm-eval ``loglikelihood``,
  metric ``acc``).
- ``wiki_nextsentence`` (like HellaSwag, built by ``zeroshot.nextsentence``): a context of one sentence, or of
  two where the second opens with a pronoun and needs the first, then four candidate next sentences (lm-eval
  ``multiple_choice``, metrics ``acc`` and ``acc_norm``).

Last-word targets must be predictable from the passage. A candidate is a passage ending at any sentence end of
a test article; the first rule that applies drops it when its final word is a number; not a plain word of ≥ 3
letters ("km²", "well-known"); a function word; inside brackets or quotes (the context would end with a mark
left open, as "… (V." before "planifolia)." did: such items are dropped, never cut); or unsupported: no word of
the passage shares its stem (same word, one a prefix of the other, or ≥ 6 letters in common: gravity /
gravitation) and it is not a common word (in ≥ 1 % of the calibration split's articles, so "river", not
"rainfall"). Unsupported capitalised words are counted as rare proper nouns. Counts (``task_stats()``):

- wiki_lastword candidates: 3,399
- number: 162
- not a word: 140
- function word: 35
- inside brackets or quotes: 49
- rare proper noun: 357
- no earlier support: 1,294
- kept: 1,362

Next-sentence candidates are adjacent sentences whose first has ≥ 5 words and whose second (the answer) has
5–25. Dropped: a pronoun-led context whose previous sentence is missing or pronoun-led too, a context over 30
words, an unclosed bracket or quote in context or answer; then, per article, an item whose distractors ran out.
Distractors: one sentence of the same article that neither opens it nor touches the context or the answer,
where there is one, the others from different articles among the 30 closest in topic (TF-IDF cosine over the
test articles); each within the tightest length window around the answer (± 15, 30 or 60 % of its characters)
that works, so length gives little away. No sentence is a choice twice: a distractor is never any article's
answer nor another item's distractor. Counts (pairs; the last line counts articles, until ``N_ITEMS`` items):

- wiki_nextsentence candidates: 1,808
- pronoun-led without its referent: 56
- context too long: 423
- unclosed bracket or quote: 2
- kept: 1,327
- no distractors left: 21

Each article gives at most one item per task, drawn from its kept candidates with a seed; the first
``N_ITEMS`` articles of the split's fixed order that have one make the task. ``write_tasks`` writes the lm-eval
task folder: one YAML and one JSONL file per task, and a loader module that the YAMLs name through lm-eval's
``custom_dataset: !function``. The loader finds each JSONL file next to itself, so the folder works from any
working directory and offline. The copy in ``TASKS_DIR`` is committed; a test checks it equals a fresh
``write_tasks`` and that the counts above are ``task_stats()``'s.
"""
from __future__ import annotations

import json
from pathlib import Path

from ...core.errors import BadInput
from ...core.validation import check_positive_int
from .lastword import LASTWORD_MAX_CONTEXT_WORDS, lastword_candidates
from .nextsentence import N_CHOICES, NEXT_MAX_CHOICE_WORDS, NEXT_MAX_CONTEXT_WORDS, nextsentence_candidates
from .sentences import MIN_SENTENCE_WORDS, STOPWORDS, split_sentences

__all__ = ["TASKS_DIR", "N_ITEMS", "SEED", "LASTWORD_MAX_CONTEXT_WORDS", "NEXT_MAX_CONTEXT_WORDS",
           "NEXT_MAX_CHOICE_WORDS", "MIN_SENTENCE_WORDS", "N_CHOICES", "STOPWORDS", "split_sentences",
           "lastword_items", "nextsentence_items", "task_stats", "task_files", "write_tasks"]

TASKS_DIR = Path(__file__).resolve().parent / "lm_tasks"
N_ITEMS = 300
SEED = 0

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
  version: 2.0
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
  version: 2.0
"""


def _first_items(candidates, n_items: int, task: str) -> list[dict]:
    """The first ``n_items`` candidates (None = the article gave no item) whose context is new, numbered by
    "id" (copies: the candidates are cached); BadInput if the test split yields fewer."""
    check_positive_int("n_items", n_items)
    items, contexts = [], set()
    for item in candidates:
        if item is None or item["context"] in contexts:
            continue
        contexts.add(item["context"])
        items.append({"id": len(items), **{k: list(v) if isinstance(v, tuple) else v for k, v in item.items()}})
        if len(items) == n_items:
            return items
    raise BadInput(f"n_items={n_items} is more than the test split yields; allowed: 1..{len(items)} {task} items")


def lastword_items(n_items: int = N_ITEMS, seed: int = SEED) -> list[dict]:
    """``n_items`` LAMBADA-style items, at most one per test article, in the split's fixed order.

    Each item: {"id", "title", "context", "target"}; ``context + " " + target`` is a passage of the cleaned
    article (≤ 41 words) without its final punctuation; the model must continue ``context`` with ``" " + target``.
    """
    return _first_items(lastword_candidates(seed)[0], n_items, "wiki_lastword")


def nextsentence_items(n_items: int = N_ITEMS, seed: int = SEED) -> list[dict]:
    """``n_items`` four-way next-sentence items, at most one per test article, in the split's fixed order.

    Each item: {"id", "title", "context", "choices" (4 sentences), "label" (index of the true next sentence)}.
    The context has ≤ 30 words, every choice 5–25 words.
    """
    return _first_items(nextsentence_candidates(n_items, seed)[0], n_items, "wiki_nextsentence")


def task_stats(n_items: int = N_ITEMS, seed: int = SEED) -> dict[str, dict[str, int]]:
    """Per task, how many candidates the test split has, how many each filter drops and how many it keeps; for
    the next-sentence task also the articles whose distractors ran out before ``n_items`` items were made."""
    check_positive_int("n_items", n_items)
    return {"wiki_lastword": lastword_candidates(seed)[1],
            "wiki_nextsentence": nextsentence_candidates(n_items, seed)[1]}


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
    ``python -c "import labutils as lu; lu.write_tasks()"``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in task_files(n_items, seed).items():
        (folder / name).write_text(text, encoding="utf-8")
        written.append(folder / name)
    return written
