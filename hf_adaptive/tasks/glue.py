"""GLUE classification tasks through `datasets`, as `Task`s (network, the Hub cache, or local files).

`load_glue_task("sst2")` reads `nyu-mll/glue` through `datasets.load_dataset`. With `data_dir`, the same
splits are read from local files in the Hub dataset's layout (`<data_dir>/<name>/{train,validation}.{parquet,
jsonl,json,csv,tsv}`), which is how the tests exercise it offline.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .task import Task

GLUE_REPO = "nyu-mll/glue"


@dataclass(frozen=True)
class GlueSpec:
    text_fields: tuple[str, ...]
    verbalizer: tuple[str, ...]
    template: str
    description: str


GLUE_TASKS: dict[str, GlueSpec] = {
    "sst2": GlueSpec(
        ("sentence",),
        ("negative", "positive"),
        "review: {text} sentiment:",
        "binary sentiment of a movie review sentence",
    ),
    "cola": GlueSpec(
        ("sentence",), ("no", "yes"), "sentence: {text} grammatical:", "is the sentence grammatically acceptable"
    ),
    "rte": GlueSpec(
        ("sentence1", "sentence2"), ("yes", "no"), "{text} entailment:", "does the first sentence entail the second"
    ),
    "mrpc": GlueSpec(
        ("sentence1", "sentence2"), ("no", "yes"), "{text} paraphrase:", "are the two sentences paraphrases"
    ),
    "qnli": GlueSpec(
        ("question", "sentence"), ("yes", "no"), "{text} answerable:", "does the sentence answer the question"
    ),
    "qqp": GlueSpec(("question1", "question2"), ("no", "yes"), "{text} duplicate:", "are the two questions duplicates"),
    "wnli": GlueSpec(
        ("sentence1", "sentence2"),
        ("no", "yes"),
        "{text} entailment:",
        "does the first sentence entail the second (Winograd)",
    ),
}
_EXTENSIONS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "csv"}


def _join(spec: GlueSpec):
    def fn(example: dict) -> dict:
        parts = (
            [f"{f}: {example[f]}" for f in spec.text_fields]
            if len(spec.text_fields) > 1
            else [str(example[spec.text_fields[0]])]
        )
        return {"text": " ".join(parts), "label": int(example["label"])}

    return fn


def _local_split(data_dir: Path, name: str, split: str):
    from datasets import load_dataset

    for ext, builder in _EXTENSIONS.items():
        path = data_dir / name / f"{split}{ext}"
        if path.exists():
            kwargs = {"delimiter": "\t"} if ext == ".tsv" else {}
            return load_dataset(builder, data_files={split: str(path)}, split=split, **kwargs)
    raise FileNotFoundError(f"GLUE {name!r}: no {split} file under {data_dir / name} (tried {sorted(_EXTENSIONS)})")


def load_glue_task(
    name: str, data_dir: str | None = None, max_train: int | None = None, max_eval: int | None = None, seed: int = 0
) -> Task:
    """A GLUE task; evaluation uses the labelled `validation` split (GLUE's test labels are hidden)."""
    if name not in GLUE_TASKS:
        raise ValueError(f"load_glue_task: name={name!r} is not allowed; choose one of {sorted(GLUE_TASKS)}")
    spec = GLUE_TASKS[name]
    if data_dir is not None:
        train, validation = (_local_split(Path(data_dir), name, s) for s in ("train", "validation"))
    else:  # pragma: no cover - needs the network or a populated cache
        from datasets import load_dataset

        train = load_dataset(GLUE_REPO, name, split="train")
        validation = load_dataset(GLUE_REPO, name, split="validation")
    missing = set(spec.text_fields + ("label",)) - set(train.column_names)
    if missing:
        raise ValueError(f"GLUE {name!r}: the data lacks columns {sorted(missing)} (has {train.column_names})")
    splits = []
    for data, limit in ((train, max_train), (validation, max_eval)):
        data = data.filter(lambda ex: int(ex["label"]) >= 0)
        if limit is not None and limit < len(data):
            data = data.shuffle(seed=seed).select(range(limit))
        splits.append(data.map(_join(spec), remove_columns=data.column_names))
    return Task(
        name=f"glue_{name}",
        train_dataset=splits[0],
        eval_dataset=splits[1],
        verbalizer=list(spec.verbalizer),
        template=spec.template,
        description=spec.description,
        metadata={"source": GLUE_REPO, "config": name},
    )
