"""Zero-shot evaluation: the local tasks built from the corpus, and running them through stock lm-eval."""
import collections
import json
import random
import re
import time

import numpy as np
import pandas as pd
import pytest
import torch

import labutils as lu
from labutils.core.data import corpus_split
from labutils.core.errors import BadInput, LabError
from labutils.evaluate.zeroshot import lastword as lastword_module
from labutils.evaluate.zeroshot import nextsentence as nextsentence_module
from labutils.evaluate.zeroshot import run as zeroshot
from labutils.evaluate.zeroshot import tasks as zeroshot_tasks
from labutils.evaluate.zeroshot.sentences import (
    article_sentences,
    brackets_balanced,
    clean_text,
    is_invisible,
    is_pronoun_led,
    split_sentences,
)


def _clean_texts() -> dict[str, str]:
    return {a.title: clean_text(a.text) for a in corpus_split("test")}


def test_split_sentences_keeps_initials_and_abbreviations():
    text = "J. R. R. Tolkien lived in St. Louis. The U.S. Army is large!  \"Yes,\" he said. It was c. 1900."
    assert zeroshot_tasks.split_sentences(text) == [
        "J. R. R. Tolkien lived in St. Louis.", "The U.S. Army is large!", "\"Yes,\" he said.", "It was c. 1900."]


@pytest.mark.parametrize("sentences", [
    ["She finished 6.", "The race was won by Dr. Smith with 3.5 points."],
    ["It sells apples, pears, etc.", "The shop is No. 5 on the street."],
    ["He moved to the U.S.", "In 1990 he joined the U.S. Army."],
    ["Vitamin C.", "It is found in fruit, e.g. oranges."],
    ["Works by E. A. Poe (b. 1809) are read.", "Prunus sect. Armeniaca are apricots, plums, etc.",
     "Since 1900 they grow in the U.S. and Canada."],
])
def test_split_sentences_handles_numbers_and_abbreviations(sentences):
    assert split_sentences(" ".join(sentences)) == sentences


def test_clean_text_removes_extraction_artefacts():
    raw = ("the symbol , representing \u20603/4\u2060 ( CHEL-oh) , bonds\u2060\u200d—\u200dthat \"Urvogel\u200a\" "
           "is\xa0a  co\u00adop ; days .The form () ends .")
    assert clean_text(raw) == 'the symbol, representing 3/4 (CHEL-oh), bonds—that "Urvogel" is a coop; days. ' \
                              'The form ends.'
    assert all(is_invisible(c) for c in "\u200b\u200c\u200d\u2060\ufeff\u00ad\xa0\u2009\n\t")
    assert not any(is_invisible(c) for c in " aé—’")


def test_generators_are_deterministic_and_match_committed_files():
    files = zeroshot_tasks.task_files()
    assert files == zeroshot_tasks.task_files()
    on_disk = {p.name: p.read_text(encoding="utf-8") for p in zeroshot_tasks.TASKS_DIR.iterdir() if p.is_file()}
    assert on_disk == files, "labutils/evaluate/zeroshot/lm_tasks is stale: run lu.write_tasks()"
    assert sum(len(text.encode()) for text in files.values()) < 400_000
    text = "".join(files[name] for name in ("wiki_lastword.jsonl", "wiki_nextsentence.jsonl"))
    items = [json.loads(line) for line in text.splitlines()]
    strings = [s for item in items for s in (item["context"], item.get("target", ""), *item.get("choices", ()))]
    bad = [s for s in strings if any(map(is_invisible, s)) or re.search(r" [,.;:)]|\( |  ", s)]
    assert not bad, bad[:3]


def test_task_stats_are_the_docstrings_counts():
    stats = zeroshot_tasks.task_stats()
    doc = zeroshot_tasks.__doc__
    for task, counts in stats.items():
        section = doc[doc.index(f"- {task} candidates:"):].split("\n\n")[0]  # the task's list of counts
        listed = dict(line[2:].rsplit(": ", 1) for line in section.splitlines())
        assert listed == {f"{task} candidates" if k == "candidates" else k: f"{n:,}" for k, n in counts.items()}
    lastword = stats["wiki_lastword"]
    assert lastword["candidates"] == sum(v for k, v in lastword.items() if k != "candidates")
    nextsentence = stats["wiki_nextsentence"]
    assert nextsentence["candidates"] == sum(nextsentence[k] for k in (*nextsentence_module.DROP_REASONS, "kept"))


@pytest.mark.parametrize("context, final, reason", [
    ("The battle was fought in", "1066.", "number"),
    ("The city lies at an altitude of 400", "m.", "not a word"),
    ("The house was built in the style it is known", "for.", "function word"),
    ("The vanilla orchid (V.", "planifolia).", "inside brackets or quotes"),
    ('A judo practitioner is called a "judoka', 'uniform".', "inside brackets or quotes"),
    ("The subgenus of the raspberry is called", "Idaeobatus.", "rare proper noun"),
    ("Newton described the force of", "gravitation.", "no earlier support"),
    ("Gravity is a force. Newton described the law of", "gravitation.", None),
    ("The Idaeobatus are raspberries. Many species belong to", "Idaeobatus.", None),
    ("The river flows into the", "sea.", None),  # a common word needs no support
    ("The Lakers are a team in the United", "States.", None),
])
def test_lastword_drop_reasons(context, final, reason):
    assert lastword_module.lastword_drop_reason(context, final) == reason


def test_lastword_items_are_predictable_passages_ending_in_their_target():
    items = zeroshot_tasks.lastword_items()
    texts = _clean_texts()
    assert [item["id"] for item in items] == list(range(300))
    assert len({item["title"] for item in items}) == 300 and len({item["context"] for item in items}) == 300
    for item in items:
        assert set(item) == {"id", "title", "context", "target"}
        context, target = item["context"], item["target"]
        words = len(context.split())
        assert zeroshot_tasks.MIN_SENTENCE_WORDS - 1 <= words <= zeroshot_tasks.LASTWORD_MAX_CONTEXT_WORDS
        assert target.isalpha() and len(target) >= 3 and target.lower() not in zeroshot_tasks.STOPWORDS
        assert brackets_balanced(context) and lastword_module.is_supported(target, context), item
        # The passage is whole sentences of its cleaned article, and the target is its final word.
        text = texts[item["title"]]
        start = text.index(context + " " + target)
        after = text[start + len(context) + 1 + len(target):]
        assert after[:1] in {".", "!", "?"} and after[1:2] in {"", " "}, (item, after[:20])
        assert start == 0 or text[:start].rstrip()[-1] in ".!?\"”)", item


def test_next_sentence_context_keeps_the_referent_of_a_leading_pronoun():
    sentences = ("Ada Lovelace was a mathematician.", "She wrote the first program.", "It ran on no machine.",
                 "Babbage designed the machine.", "His engine was never built.")
    assert [nextsentence_module.context_start(sentences, answer) for answer in range(1, 5)] == [0, 0, -1, 3]
    assert nextsentence_module.next_drop_reason(sentences, 3) == "pronoun-led without its referent"
    assert nextsentence_module.next_drop_reason(sentences, 2) is None
    assert nextsentence_module.next_drop_reason(("A b c d " * 12 + ".", "The end is near now."), 1) == \
        "context too long"


def _sentence_sources() -> dict[str, list[int]]:
    """Sentence → indices (in the test split's order) of the articles it is a sentence of."""
    sources = collections.defaultdict(list)
    for index, article in enumerate(corpus_split("test")):
        for sentence in article_sentences(article.text):
            sources[sentence].append(index)
    return sources


def test_nextsentence_items_have_one_true_next_sentence_and_unused_distractors():
    items = zeroshot_tasks.nextsentence_items()
    articles = corpus_split("test")
    position = {article.title: i for i, article in enumerate(articles)}
    sources, near = _sentence_sources(), nextsentence_module.neighbours()
    assert [item["id"] for item in items] == list(range(300))
    assert len({item["context"] for item in items}) == 300
    answers = {item["choices"][item["label"]] for item in items}
    choices = [c for item in items for c in item["choices"]]
    assert len(answers) == 300 and len(set(choices)) == len(choices) == 1200  # no choice serves two items
    same_article = 0
    for item in items:
        assert set(item) == {"id", "title", "context", "choices", "label"}
        context, choices, label = item["context"], item["choices"], item["label"]
        assert len(choices) == 4 and len(set(choices)) == 4 and label in range(4)
        assert len(context.split()) <= zeroshot_tasks.NEXT_MAX_CONTEXT_WORDS and brackets_balanced(context)
        assert all(5 <= len(c.split()) <= zeroshot_tasks.NEXT_MAX_CHOICE_WORDS and brackets_balanced(c)
                   for c in choices)
        own_index = position[item["title"]]
        own = article_sentences(articles[own_index].text)
        first = own.index(split_sentences(context)[0])
        answer = first + len(split_sentences(context))
        assert " ".join(own[first:answer]) == context and own[answer] == choices[label], item
        assert not is_pronoun_led(own[first]), context  # a leading pronoun comes with its referent
        assert len(split_sentences(context)) == 1 or is_pronoun_led(own[first + 1])
        origins = set()
        for i, choice in enumerate(choices):
            if i == label:
                continue
            assert choice not in answers, choice
            found = sources[choice]
            if own_index in found:  # from the same article: not its first sentence, not next to the context
                assert own.index(choice) not in {0, *range(first - 1, answer + 2)}, (item, choice)
                origins.add(own_index)
            else:
                origins.add(next(j for j in found if j in near[own_index]))
        same_article += own_index in origins
        assert len(origins) == 3, item  # three different articles
    assert same_article >= 20, same_article  # leads are short: most articles have no sentence to spare
    # Neither the answer's position nor its length gives it away.
    positions = collections.Counter(item["label"] for item in items)
    assert min(positions.values()) >= 50, positions
    shortest = sum(min(range(4), key=lambda i: len(item["choices"][i])) == item["label"] for item in items)
    longest = sum(max(range(4), key=lambda i: len(item["choices"][i])) == item["label"] for item in items)
    assert shortest <= 105 and longest <= 105, (shortest, longest)


def test_too_many_items_is_bad_input():
    with pytest.raises(BadInput, match="allowed: 1.."):
        zeroshot_tasks.lastword_items(100_000)
    with pytest.raises(BadInput, match="n_items"):
        zeroshot_tasks.nextsentence_items(0)


def test_written_tasks_load_from_any_working_directory(tmp_path, monkeypatch):
    from lm_eval.tasks import TaskManager

    folder = tmp_path / "tasks"
    zeroshot_tasks.write_tasks(folder, n_items=5)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    manager = TaskManager(include_path=str(folder), include_defaults=False)
    tasks = manager.load(list(zeroshot.LOCAL_TASKS))["tasks"]
    lastword, nextsentence = (tasks[name] for name in zeroshot.LOCAL_TASKS)
    assert len(lastword.test_docs()) == len(nextsentence.test_docs()) == 5
    doc = nextsentence.test_docs()[0]
    assert nextsentence.doc_to_choice(doc) == doc["choices"] and nextsentence.doc_to_target(doc) == doc["label"]
    doc = lastword.test_docs()[0]
    assert lastword.doc_to_target(doc) == " " + doc["target"]


def test_profile_tasks():
    assert zeroshot.profile_tasks(lu.get_profile(lu.DEFAULT_PROFILE)) == zeroshot.LOCAL_TASKS
    assert zeroshot.profile_tasks(lu.get_profile("llama2-7b")) == zeroshot.PAPER_TASKS
    assert len(zeroshot.PAPER_TASKS) == 7


@pytest.mark.parametrize("tasks", [["nope"], [], "", ["boolq", "lambada"], 3])
def test_unknown_tasks_are_bad_input(tiny_model, tasks):
    with pytest.raises(BadInput, match="allowed: wiki_lastword, wiki_nextsentence, boolq"):
        zeroshot.zero_shot(tiny_model, object(), tasks)


@pytest.mark.parametrize("limit", [0, -3, 2.5, True, "10"])
def test_bad_limit_is_bad_input(tiny_model, limit):
    with pytest.raises(BadInput, match=f"limit must be a positive integer.*got {limit!r}"):
        zeroshot.zero_shot(tiny_model, object(), zeroshot.LOCAL_TASKS, limit=limit)


def test_missing_tokenizer_is_bad_input(tiny_model):
    with pytest.raises(BadInput, match="tokenizer"):
        zeroshot.zero_shot(tiny_model, None, zeroshot.LOCAL_TASKS)


def _assert_hub_error(excinfo, task: str) -> None:
    assert not isinstance(excinfo.value, BadInput)
    message = str(excinfo.value)
    for part in (repr(task), "Hugging Face Hub", "internet", "wiki_lastword", "offline"):
        assert part in message, message


@pytest.mark.slow
def test_offline_hub_task_fails_fast_with_a_clear_error(tiny_model):
    zeroshot._task_manager(include_defaults=True)  # indexing lm-eval's own tasks takes seconds; not timed
    start = time.perf_counter()
    with pytest.raises(LabError) as excinfo:
        zeroshot.zero_shot(tiny_model, object(), ["boolq"], progress=False)
    assert time.perf_counter() - start < 5
    _assert_hub_error(excinfo, "boolq")


@pytest.mark.slow  # indexes lm-eval's ~5000 tasks first
def test_unreachable_hub_switches_to_offline_mode(tiny_model, monkeypatch):
    """Without HF_*_OFFLINE, an unreachable Hub would cost rounds of retries per dataset; it must fail at once."""
    import datasets
    from huggingface_hub import constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: refused at once
    assert not zeroshot._hub_reachable()
    zeroshot._task_manager(include_defaults=True)
    start = time.perf_counter()
    with pytest.raises(LabError) as excinfo:
        zeroshot.zero_shot(tiny_model, object(), ["wiki_lastword", "arc_easy"], progress=False)
    assert time.perf_counter() - start < 10
    _assert_hub_error(excinfo, "arc_easy")
    assert datasets.config.HF_HUB_OFFLINE is False and constants.HF_HUB_OFFLINE is False


@torch.no_grad()
def _direct_scores(model, tokenizer, context: str, continuations: list[str]) -> list[tuple[float, bool]]:
    """(log-likelihood, greedy?) of each continuation after ``context``, computed without lm-eval."""
    scores = []
    for continuation in continuations:
        context_ids = tokenizer(context)["input_ids"]
        whole = tokenizer(context + continuation)["input_ids"]
        target = torch.tensor(whole[len(context_ids):])
        logits = model(torch.tensor([whole[:-1]])).logits[0, len(context_ids) - 1:].log_softmax(-1)
        scores.append((logits.gather(1, target[:, None]).sum().item(), bool((logits.argmax(-1) == target).all())))
    return scores


@pytest.mark.slow
def test_zero_shot_end_to_end_matches_a_direct_computation():
    model, tokenizer = lu.load_model(lu.get_profile(lu.DEFAULT_PROFILE), torch.device("cpu"))
    limits = {"wiki_lastword": 4, "wiki_nextsentence": 3}  # per-task limits: two lm-eval runs
    torch.manual_seed(5), random.seed(5), np.random.seed(5)
    table = zeroshot.zero_shot(model, tokenizer, zeroshot.LOCAL_TASKS, limit=limits, progress=False)
    draws = torch.rand(1).item(), random.random(), np.random.rand()
    torch.manual_seed(5), random.seed(5), np.random.seed(5)
    assert draws == (torch.rand(1).item(), random.random(), np.random.rand()), "lm-eval's seeding leaked out"
    assert list(table.index) == list(zeroshot.LOCAL_TASKS) and list(table.columns) == list(zeroshot.COLUMNS)
    assert table["n"].to_dict() == limits
    assert table.loc["wiki_lastword", ["acc_norm", "acc_norm_stderr"]].isna().all()
    numbers = [*table["acc"], *table["acc_stderr"], table.loc["wiki_nextsentence", "acc_norm"]]
    assert all(0 <= x <= 1 for x in numbers), table

    lastword = zeroshot_tasks.lastword_items(limits["wiki_lastword"])
    hits = [_direct_scores(model, tokenizer, i["context"], [" " + i["target"]])[0][1] for i in lastword]
    assert table.loc["wiki_lastword", "acc"] == pytest.approx(sum(hits) / len(lastword))
    right = 0
    for item in zeroshot_tasks.nextsentence_items(limits["wiki_nextsentence"]):
        scores = _direct_scores(model, tokenizer, item["context"], [" " + c for c in item["choices"]])
        right += max(range(4), key=lambda i: scores[i][0]) == item["label"]
    assert table.loc["wiki_nextsentence", "acc"] == pytest.approx(right / limits["wiki_nextsentence"])


def test_per_task_limits_must_name_evaluated_tasks(tiny_model):
    with pytest.raises(BadInput, match=r"limit names task\(s\) \['boolq'\] that are not evaluated"):
        zeroshot.zero_shot(tiny_model, object(), zeroshot.LOCAL_TASKS, limit={"boolq": 3})
    with pytest.raises(BadInput, match="limit of wiki_lastword must be a positive integer"):
        zeroshot.zero_shot(tiny_model, object(), zeroshot.LOCAL_TASKS, limit={"wiki_lastword": 0})


def test_task_examples_show_the_committed_items():
    table = zeroshot.task_examples(zeroshot.LOCAL_TASKS + ("boolq",), n=2)
    assert list(table.index) == ["wiki_lastword"] * 2 + ["wiki_nextsentence"] * 2  # hub tasks skipped
    first = zeroshot_tasks.nextsentence_items(1)[0]
    row = table.loc["wiki_nextsentence"].iloc[0]
    assert row["answer"] == first["choices"][first["label"]] and row["answer"] not in row["other choices"]
    assert table.loc["wiki_lastword"].iloc[0]["answer"] == zeroshot_tasks.lastword_items(1)[0]["target"]


def test_results_of_one_item_have_no_standard_error():
    results = {"results": {"wiki_lastword": {"alias": "wiki_lastword", "acc,none": 1.0, "acc_stderr,none": "N/A"}},
               "n-samples": {"wiki_lastword": {"original": 300, "effective": 1}}}
    row = zeroshot._row(results, "wiki_lastword")
    assert row["acc"] == 1.0 and row["n"] == 1
    assert all(row[k] != row[k] for k in ("acc_stderr", "acc_norm", "acc_norm_stderr"))  # NaN


def test_zero_shot_table_lays_out_models_by_task():
    def result(acc_lastword, acc_next):
        return pd.DataFrame({"acc": [acc_lastword, acc_next], "acc_norm": [float("nan"), 0.5]},
                            index=pd.Index(zeroshot.LOCAL_TASKS, name="task"))

    table = zeroshot.zero_shot_table({"dense": result(0.4, 0.8), "wanda 50%": result(0.2, 0.6)})
    assert list(table.index) == ["dense", "wanda 50%"]
    assert list(table.columns) == [*zeroshot.LOCAL_TASKS, "mean"]
    assert table.loc["dense", "mean"] == pytest.approx(0.6) and table.loc["wanda 50%", "mean"] == pytest.approx(0.4)
    normalised = zeroshot.zero_shot_table({"dense": result(0.4, 0.8)}, metric="acc_norm")
    assert normalised.loc["dense"].tolist() == pytest.approx([0.4, 0.5, 0.45])  # acc where acc_norm is missing
    with pytest.raises(BadInput, match="metric"):
        zeroshot.zero_shot_table({"dense": result(0.4, 0.8)}, metric="f1")
    with pytest.raises(BadInput, match="non-empty dict"):
        zeroshot.zero_shot_table({})
