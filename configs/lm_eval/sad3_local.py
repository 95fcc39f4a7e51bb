"""The offline tasks' data loader: a task's JSONL file beside this module, read into memory (no hub, no
dataset cache, any working directory). lm-eval calls `custom_dataset(**metadata, **dataset_kwargs)`, and
its metadata holds the model's arguments too: the extra keys are ignored."""

from __future__ import annotations

import json
from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent


def load_jsonl(data_files: dict[str, str] | None = None, **_ignored) -> datasets.DatasetDict:
    splits = {}
    for split, name in (data_files or {}).items():
        lines = (HERE / name).read_text(encoding="utf-8").splitlines()
        splits[split] = datasets.Dataset.from_list([json.loads(line) for line in lines if line.strip()])
    return datasets.DatasetDict(splits)
