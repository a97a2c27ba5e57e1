"""Tasks of the standard text-classification continual-learning benchmark (O-LoRA's `CL_Benchmark` layout).

A benchmark folder holds one directory per task with `train.json`, `test.json` (and optionally `dev.json`) as
JSON lists of `{"sentence": ..., "label": <label word>}` rows, and `labels.json`, the label words in order. The
same layout is read from a local folder or, through `datasets`, from a Hub dataset repository that mirrors it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .task import Task

#: an instruction per known task (the prompt is `<instruction>\n<sentence>\nAnswer:`); others get a generic one
CL_BENCHMARK_INSTRUCTIONS: dict[str, str] = {
    "SST-2": "What is the sentiment of the following text? Choose one from the options.",
    "IMDB": "What is the sentiment of the following movie review? Choose one from the options.",
    "Yelp": "What is the sentiment of the following review? Choose one from the options.",
    "Amazon": "What is the sentiment of the following review? Choose one from the options.",
    "MNLI": "What is the logical relationship between the premise and the hypothesis? Choose one from the options.",
    "RTE": "Does the first sentence entail the second? Choose one from the options.",
    "CB": "What is the logical relationship between the premise and the hypothesis? Choose one from the options.",
    "QQP": "Are the two questions asking the same thing? Choose one from the options.",
    "BoolQA": "Answer the question about the passage with true or false.",
    "WiC": "Is the word used with the same meaning in both sentences? Choose one from the options.",
    "COPA": "Choose the more plausible alternative.",
    "MultiRC": "Is the answer to the question about the paragraph correct? Choose one from the options.",
    "DBpedia": "What is the topic of the following text? Choose one from the options.",
    "Yahoo": "What is the topic of the following question? Choose one from the options.",
    "AGNews": "What is the topic of the following news article? Choose one from the options.",
}
_GENERIC_INSTRUCTION = "Classify the following text. Choose one from the options."
_SPLITS = {"train": "train.json", "test": "test.json"}


def _read_local(task_dir: Path, file: str) -> Any:
    path = task_dir / file
    if not path.is_file():
        raise FileNotFoundError(f"CL benchmark task {task_dir.name!r}: {path} is missing")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise ValueError(f"CL benchmark task {task_dir.name!r}: {path} is not valid JSON ({err})") from None


def _rows_to_dataset(rows: Any, labels: list[str], where: str, limit: int | None, seed: int):
    from datasets import Dataset

    if not isinstance(rows, list):
        raise ValueError(f"{where}: expected a JSON list of {{'sentence', 'label'}} rows, got {type(rows).__name__}")
    index = {word: i for i, word in enumerate(labels)}
    texts, ids = [], []
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not isinstance(row.get("sentence"), str):
            raise ValueError(f"{where}: row {i} has no string 'sentence' (got {row!r:.120})")
        if row.get("label") not in index:
            raise ValueError(f"{where}: row {i} has label={row.get('label')!r}, not one of labels.json {labels}")
        texts.append(row["sentence"].strip())
        ids.append(index[row["label"]])
    data = Dataset.from_dict({"text": texts, "label": ids})
    if limit is not None and limit < len(data):
        data = data.shuffle(seed=seed).select(range(limit))
    return data


def load_cl_benchmark_task(
    source: str | Path,
    name: str,
    max_train: int | None = None,
    max_eval: int | None = None,
    seed: int = 0,
    instruction: str | None = None,
    verbalizer: list[str] | None = None,
) -> Task:
    """Task `name` of a benchmark folder (or Hub dataset repo id) `source`, evaluated on its `test` split.

    The label words of `labels.json` are the verbalizer unless `verbalizer` renames them (same order, e.g.
    `["negative", "positive"]` for SST-2's `["Bad", "Good"]`). `max_train` / `max_eval` take a seeded random subset.
    """
    task_dir = Path(source) / name
    if task_dir.is_dir():
        labels = _read_local(task_dir, "labels.json")
        splits = {split: _read_local(task_dir, file) for split, file in _SPLITS.items()}
    else:  # pragma: no cover - needs the network or a populated Hub cache
        from huggingface_hub import hf_hub_download

        def fetch(file: str) -> Any:
            path = hf_hub_download(str(source), f"{name}/{file}", repo_type="dataset")
            return json.loads(Path(path).read_text(encoding="utf-8"))

        labels = fetch("labels.json")
        splits = {split: fetch(file) for split, file in _SPLITS.items()}
    if not isinstance(labels, list) or len(labels) < 2 or not all(isinstance(w, str) for w in labels):
        raise ValueError(f"CL benchmark task {name!r}: labels.json must list at least 2 label words, got {labels!r}")
    words = list(labels) if verbalizer is None else list(verbalizer)
    if len(words) != len(labels):
        raise ValueError(
            f"load_cl_benchmark_task.verbalizer={verbalizer!r} is not allowed: task {name!r} has {len(labels)} "
            f"labels {labels}, give one word per label in that order"
        )
    train = _rows_to_dataset(splits["train"], labels, f"CL benchmark task {name!r} train.json", max_train, seed)
    test = _rows_to_dataset(splits["test"], labels, f"CL benchmark task {name!r} test.json", max_eval, seed)
    text = instruction if instruction is not None else CL_BENCHMARK_INSTRUCTIONS.get(name, _GENERIC_INSTRUCTION)
    options = ", ".join(words)
    return Task(
        name=name,
        train_dataset=train,
        eval_dataset=test,
        verbalizer=words,
        template=f"{text}\nOptions: {options}\n{{text}}\nAnswer:",
        description=text,
        metadata={"source": str(source), "benchmark": "CL_Benchmark", "labels": list(labels)},
    )


def load_cl_benchmark(source: str | Path, names: list[str], **kwargs: Any) -> list[Task]:
    """Several tasks of one benchmark folder, in the order given (a task sequence)."""
    return [load_cl_benchmark_task(source, name, **kwargs) for name in names]
