"""Zero-shot accuracy with the stock lm-evaluation-harness (introduced in 04-Benchmark).

The Wanda paper reports mean zero-shot accuracy over seven tasks from lm-eval (BoolQ, RTE, HellaSwag,
WinoGrande, ARC-e, ARC-c, OBQA); their data comes from the Hugging Face Hub. The default profile runs offline,
so it uses two local tasks built from the corpus's test split (see ``zeroshot.tasks``). Either way the model
in memory is wrapped in lm-eval's ``HFLM`` and scored by ``lm_eval.simple_evaluate``, zero-shot.
"""
from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import math
import random
import socket
from collections.abc import Sequence
from urllib.parse import urlsplit

import numpy as np
import pandas as pd
import torch
from torch import nn

from ...core.config import Profile
from ...core.errors import BadInput, LabError
from ...core.validation import check_positive_int
from .tasks import TASKS_DIR

LOCAL_TASKS = ("wiki_lastword", "wiki_nextsentence")
PAPER_TASKS = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
COLUMNS = ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n")
HUB_TIMEOUT_S = 3.0


def profile_tasks(profile: Profile) -> tuple[str, ...]:
    """The zero-shot tasks that suit a profile: the local corpus tasks where its test data is the offline
    corpus (the default profile), the paper's seven hub tasks otherwise (the Llama-2-7B profiles)."""
    return LOCAL_TASKS if profile.evaluation == "wiki-offline" else PAPER_TASKS


def check_tasks(tasks: str | Sequence[str]) -> tuple[str, ...]:
    """``tasks`` as a tuple of known task names (a single name is allowed), duplicates dropped."""
    names = (tasks,) if isinstance(tasks, str) else tuple(tasks) if isinstance(tasks, Sequence) else None
    allowed = LOCAL_TASKS + PAPER_TASKS
    if not names:
        raise BadInput(f"tasks must be a non-empty list of task names; got {tasks!r}; allowed: {', '.join(allowed)}")
    unknown = [name for name in names if name not in allowed]
    if unknown:
        raise BadInput(f"unknown zero-shot task(s) {unknown}; allowed: {', '.join(allowed)}")
    return tuple(dict.fromkeys(names))


@functools.lru_cache(maxsize=2)
def _task_manager(include_defaults: bool):
    """lm-eval's task index with the local task folder; lm-eval's own ~5000 tasks only when needed (indexing
    them all is slow; cached per process)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASKS_DIR), include_defaults=include_defaults)


def _hub_reachable(timeout: float = HUB_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the Hugging Face Hub opens within ``timeout`` seconds."""
    from huggingface_hub import constants

    endpoint = urlsplit(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=timeout).close()
    except OSError:
        return False
    return True


@contextlib.contextmanager
def _offline_if_unreachable(needed: bool):
    """Switch ``datasets`` and ``huggingface_hub`` to offline mode while the Hub cannot be reached, so cached
    data still loads and missing data fails at once instead of after rounds of retries."""
    import datasets
    from huggingface_hub import constants

    if not needed or datasets.config.HF_HUB_OFFLINE or _hub_reachable():
        yield
        return
    saved = datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = saved


@contextlib.contextmanager
def _quiet_lm_eval(progress: bool):
    """Hide lm-eval's warnings and, unless ``progress``, its plain-text progress bars (written to stderr)."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.nullcontext() if progress else contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def _keep_random_state():
    """lm-eval seeds Python, NumPy and torch globally (and datasets draws from them); give the caller's random
    state back afterwards."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=list(range(torch.cuda.device_count()))):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


def _load_task(task: str):
    """lm-eval's Task object for one task name, with its data loaded; a LabError naming the task when the data
    cannot be reached."""
    manager = _task_manager(include_defaults=task not in LOCAL_TASKS)
    try:
        return manager.load(task)["tasks"][task]
    except OSError as exc:  # datasets and huggingface_hub report no network, offline mode and 404 as OSError
        if task in LOCAL_TASKS:
            raise LabError(f"task {task!r}: its files in {TASKS_DIR} could not be read ({exc}); regenerate them "
                           "with labutils.evaluate.zeroshot.tasks.write_tasks()") from exc
        raise LabError(
            f"task {task!r}: its data is downloaded from the Hugging Face Hub, which could not be used (offline "
            "mode is on, or huggingface.co did not answer) and it is not in the local cache "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no detail'}). It needs internet "
            "access once (then it is cached); the default profile's local tasks "
            f"({', '.join(LOCAL_TASKS)}) run offline."
        ) from exc


def _row(results: dict, task: str) -> dict[str, float]:
    """acc, acc_norm, their standard errors and the item count from lm-eval's results for one task."""
    metrics = results["results"][task]
    row = {column: _number(metrics.get(f"{column},none")) for column in COLUMNS[:-1]}
    row["n"] = int(results["n-samples"][task]["effective"])
    return row


def _number(value) -> float:
    """A metric as a float; NaN where lm-eval has none (missing, or "N/A": a standard error of one item)."""
    return float(value) if isinstance(value, (int, float)) else math.nan


def zero_shot(model: nn.Module, tokenizer, tasks: str | Sequence[str], *,
              limit: int | dict[str, int | None] | None = None,
              batch_size: int = 8, progress: bool = True) -> pd.DataFrame:
    """Zero-shot accuracy of the model in memory on lm-eval tasks: one row per task.

    Columns: acc, acc_stderr, acc_norm, acc_norm_stderr (NaN where a task has no such metric) and n, the
    items scored. ``limit`` scores only each task's first ``limit`` items (None: all), or per task as a dict
    {task: limit} (tasks not in it: all), since items cost very different amounts. The model is used as it
    is (no reloading); lm-eval may set the tokenizer's pad token if it has none. Hub tasks need internet once.
    ``progress`` shows lm-eval's own progress bars (plain text on stderr); its log messages are hidden.
    """
    tasks = check_tasks(tasks)
    limits = _task_limits(tasks, limit)
    check_positive_int("batch_size", batch_size)
    if not isinstance(model, nn.Module) or tokenizer is None:
        raise BadInput(f"zero_shot needs a causal LM and its tokenizer; got model={type(model).__name__}, "
                       f"tokenizer={type(tokenizer).__name__} (random profiles have no tokenizer)")
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    with _quiet_lm_eval(progress), _keep_random_state():
        with _offline_if_unreachable(needed=any(task not in LOCAL_TASKS for task in tasks)):
            loaded = [_load_task(task) for task in tasks]
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        rows = {}
        for group_limit in dict.fromkeys(limits.values()):  # one lm-eval run per distinct limit
            group = [t for t, task in zip(loaded, tasks) if limits[task] == group_limit]
            results = lm_eval.simple_evaluate(model=lm, tasks=group, num_fewshot=0, limit=group_limit,
                                              log_samples=False, task_manager=_task_manager(include_defaults=False))
            rows.update({task: _row(results, task) for task in tasks if limits[task] == group_limit})
    rows = {task: rows[task] for task in tasks}
    return pd.DataFrame.from_dict(rows, orient="index", columns=list(COLUMNS)).rename_axis("task")


def _task_limits(tasks: tuple[str, ...], limit) -> dict[str, int | None]:
    """Each task's item limit from ``zero_shot``'s ``limit`` argument, validated."""
    if isinstance(limit, dict):
        unknown = [task for task in limit if task not in tasks]
        if unknown:
            raise BadInput(f"limit names task(s) {unknown} that are not evaluated; tasks: {', '.join(tasks)}")
        limits = {task: limit.get(task) for task in tasks}
    else:
        limits = dict.fromkeys(tasks, limit)
    for task, value in limits.items():
        if value is not None:
            check_positive_int("limit" if not isinstance(limit, dict) else f"limit of {task}", value)
    return limits


def zero_shot_table(results: dict[str, pd.DataFrame], metric: str = "acc") -> pd.DataFrame:
    """One row per model, one column per task plus their mean: the layout of the paper's zero-shot table.

    results: model label → ``zero_shot`` table, e.g. {"dense": …, "magnitude 50%": …, "wanda 50%": …}.
    metric: "acc" (what the Wanda paper reports) or "acc_norm" (length-normalised accuracy where a task has
    it, plain accuracy for tasks without it, such as wiki_lastword). Standard errors stay in the per-model tables.
    """
    if metric not in ("acc", "acc_norm"):
        raise BadInput(f"metric must be 'acc' or 'acc_norm'; got {metric!r}")
    if not isinstance(results, dict) or not results:
        raise BadInput(f"results must be a non-empty dict of model label → zero_shot table; got {results!r}")
    for label, table in results.items():
        if not isinstance(table, pd.DataFrame) or not {"acc", metric} <= set(table.columns):
            raise BadInput(f"results[{label!r}] is not a zero_shot table (columns acc, acc_norm, …); "
                           f"got {type(table).__name__}")
    values = {label: table[metric].fillna(table["acc"]) for label, table in results.items()}
    table = pd.DataFrame(values).T
    table["mean"] = table.mean(axis=1, skipna=False)  # a model missing a task gets no mean
    return table.rename_axis(index="model", columns="task")


def task_examples(tasks: str | Sequence[str], n: int = 1) -> pd.DataFrame:
    """The first ``n`` items of each local task as lm-eval scores them: the context, then the answer (with the
    other choices for multiple-choice tasks). Hub tasks are skipped: their data is not in the package."""
    tasks = check_tasks(tasks)
    check_positive_int("n", n)
    rows = []
    for task in tasks:
        if task not in LOCAL_TASKS:
            continue
        lines = (TASKS_DIR / f"{task}.jsonl").read_text("utf-8").splitlines()[:n]
        for item in map(json.loads, lines):
            choices = item.get("choices")
            answer = item["target"] if choices is None else choices[item["label"]]
            others = "" if choices is None else " | ".join(c for i, c in enumerate(choices) if i != item["label"])
            rows.append({"task": task, "context": item["context"], "answer": answer, "other choices": others})
    return pd.DataFrame(rows, columns=["task", "context", "answer", "other choices"]).set_index("task")
