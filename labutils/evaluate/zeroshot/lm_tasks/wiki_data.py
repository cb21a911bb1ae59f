"""Loads a task's JSONL file from this folder for lm-eval's ``custom_dataset`` (written by
labutils.evaluate.zeroshot.tasks.write_tasks; edit that, not this file)."""
import json
from pathlib import Path

import datasets


def load(data_file, **metadata):
    """DatasetDict with one "test" split read from ``data_file``, a name relative to this folder."""
    rows = [json.loads(line) for line in (Path(__file__).parent / data_file).read_text("utf-8").splitlines()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
