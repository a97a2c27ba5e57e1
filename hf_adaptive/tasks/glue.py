"""GLUE classification tasks through `datasets`, as `Task`s (network, the Hub cache, or local files).

`load_glue_task("sst2")` reads `nyu-mll/glue` through `datasets.load_dataset`. With `data_dir`, the same
splits are read from local files in the Hub dataset's layout (`<data_dir>/<name>/{train,validation}.{parquet,
jsonl,json,csv,tsv}`), which is how the tests exercise it offline.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..utils.validation import fail
from .formatting import quiet_datasets
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
            with quiet_datasets():
                data = load_dataset(builder, data_files={split: str(path)}, split=split, **kwargs)
            return data, str(path)
    raise FileNotFoundError(f"GLUE {name!r}: no {split} file under {data_dir / name} (tried {sorted(_EXTENSIONS)})")


def _check_columns(data, name: str, spec: GlueSpec, source: str) -> None:
    """Vectorised checks before any row is touched: the columns exist, texts are strings, labels integers."""
    import pyarrow as pa
    import pyarrow.compute as pc

    missing = sorted(set(spec.text_fields + ("label",)) - set(data.column_names))
    if missing:
        raise ValueError(f"GLUE {name!r}: {source} lacks columns {missing} (has {data.column_names})")
    view = data.with_format("arrow")
    for column in spec.text_fields:
        values = view[column]
        if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)) or values.null_count:
            bad = 0 if not values.null_count else int(pc.index(pc.is_null(values), True).as_py())
            raise ValueError(
                f"GLUE {name!r}: {source} row {bad} field {column!r}={values[bad].as_py()!r} is not allowed: "
                f"a string (column type {values.type})"
            )
    labels = view["label"]
    if not pa.types.is_integer(labels.type) or labels.null_count:
        bad = 0 if not labels.null_count else int(pc.index(pc.is_null(labels), True).as_py())
        raise ValueError(
            f"GLUE {name!r}: {source} row {bad} field 'label'={labels[bad].as_py()!r} is not allowed: an integer "
            f"class index in [0, {len(spec.verbalizer)}) or -1 for unlabelled rows (column type {labels.type})"
        )


def load_glue_task(
    name: str, data_dir: str | None = None, max_train: int | None = None, max_eval: int | None = None, seed: int = 0
) -> Task:
    """A GLUE task; evaluation uses the labelled `validation` split (GLUE's test labels are hidden)."""
    if name not in GLUE_TASKS:
        raise ValueError(f"load_glue_task: name={name!r} is not allowed; choose one of {sorted(GLUE_TASKS)}")
    for field_name, value in (("max_train", max_train), ("max_eval", max_eval)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            fail("load_glue_task", field_name, value, "None or an integer >= 1")
    spec = GLUE_TASKS[name]
    if data_dir is not None:
        loaded = [_local_split(Path(data_dir), name, s) for s in ("train", "validation")]
    else:  # pragma: no cover - needs the network or a populated cache
        from datasets import load_dataset

        with quiet_datasets():
            loaded = [
                (load_dataset(GLUE_REPO, name, split=s), f"{GLUE_REPO}/{name}:{s}") for s in ("train", "validation")
            ]
    splits = []
    for (data, source), limit in zip(loaded, (max_train, max_eval)):
        _check_columns(data, name, spec, source)
        with quiet_datasets():
            data = data.filter(
                lambda labels: [x >= 0 for x in labels], input_columns="label", batched=True, keep_in_memory=True
            )
            if limit is not None and limit < len(data):
                data = data.shuffle(seed=seed, keep_in_memory=True).select(range(limit))
            data = data.map(_join(spec), remove_columns=data.column_names, keep_in_memory=True)
        if len(data) == 0:
            raise ValueError(f"GLUE {name!r}: {source} has no labelled rows (every label is -1)")
        splits.append(data)
    return Task(
        name=f"glue_{name}",
        train_dataset=splits[0],
        eval_dataset=splits[1],
        verbalizer=list(spec.verbalizer),
        template=spec.template,
        description=spec.description,
        metadata={"source": GLUE_REPO, "config": name},
    )
