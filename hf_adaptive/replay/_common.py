"""Small pieces shared by the replay plugins: the plugin's config and its options, tokenizer and device, the rows
kept of a task (seeded, stratified by label, read from the task's tokenized rows), collating stored rows, and the
replay loss on the task loss's scale."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..tasks import CausalLMCollator
from ..tasks.losses import IGNORE_INDEX, answer_cross_entropy


class ConfigValue:
    """A read-only attribute of a plugin that shows `plugin.config.<name>` (`plugin.alpha` is `config.alpha`)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, objtype: type | None = None) -> Any:
        return self if obj is None else getattr(obj.config, self.name)


def configure(config_class: type, config: Any, overrides: Mapping[str, Any], owner: str) -> Any:
    """`config` (or the defaults of `config_class`) with `overrides` applied, validated again.

    Why not `dataclasses.replace` alone: an unknown name would read "__init__() got an unexpected keyword".
    """
    if config is not None and not isinstance(config, config_class):
        raise TypeError(f"{owner}: config must be a {config_class.__name__} (or None), got {type(config).__name__}")
    names = [f.name for f in dataclasses.fields(config_class) if f.init]
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        raise TypeError(f"{owner} got unknown option(s) {unknown}; the options of {config_class.__name__}: {names}")
    return dataclasses.replace(config if config is not None else config_class(), **overrides)


def run_seed(options: Any) -> dict[str, Any]:
    """`{"seed": options.seed}` when the options carry the run's seed (a `TrainingArguments`), else nothing."""
    return {"seed": options.seed} if hasattr(options, "seed") else {}


def config_sharing_replay_options(options: Any, source: Any, **from_replay: str) -> Any:
    """`source`'s config built from `options`, with the run's seed and the fields that exact replay's options set
    for every replay plugin (`from_replay`: field -> `ReplayConfig` field, e.g. `batch_size="batch_size"`),
    each validated under its own option name."""
    from ..utils.options import build_config
    from .config import REPLAY_SOURCE

    owner = type(options).__name__
    shared = build_config(REPLAY_SOURCE, options, owner=owner)
    values = {field: getattr(shared, name) for field, name in from_replay.items()}
    return build_config(source, options, owner=owner, **values, **run_seed(options))


def trainer_tokenizer(trainer: Any, owner: str) -> Any:
    """The trainer's tokenizer (`processing_class`, or the older `tokenizer` attribute)."""
    tok = getattr(trainer, "processing_class", None) or getattr(trainer, "tokenizer", None)
    if tok is None:
        raise ValueError(f"{owner} needs the trainer's processing_class (a tokenizer) to tokenize and pad examples")
    return tok


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def collate(rows: Sequence[dict[str, Any]], tokenizer: Any, device: torch.device) -> dict[str, torch.Tensor]:
    """Right-pad rows with the tokenizer's pad id (labels with -100) and move them to `device`."""
    batch = CausalLMCollator(tokenizer)([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows])
    return {k: v.to(device) for k, v in batch.items()}


def apportion(counts: Mapping[int, int], n: int) -> dict[int, int]:
    """Split `n` slots over strata in proportion to `counts` (largest remainder; ties: larger stratum, then key).

    Why largest remainder: every stratum gets the floor or the ceiling of its exact share ``n · c / total``, and
    the shares sum to exactly `n` (for ``0 <= n <= total``).
    """
    total = sum(counts.values())
    if total == 0:
        return dict.fromkeys(counts, 0)
    out = {k: n * c // total for k, c in counts.items()}
    left = n - sum(out.values())
    order = sorted(counts, key=lambda k: (-(n * counts[k] % total), -counts[k], k))
    for k in order[:left]:
        out[k] += 1
    return out


def stratified_indices(labels: Sequence[int], n: int, generator: torch.Generator) -> list[int]:
    """`min(n, len(labels))` indices, a uniform draw inside each label, each label's count by `apportion`.

    Returned in ascending order. With one label (or unlabelled rows, all ``-1``) this is a uniform subset.
    """
    n = min(n, len(labels))
    by_label: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        by_label.setdefault(int(label), []).append(i)
    if len(by_label) <= 1:
        return sorted(torch.randperm(len(labels), generator=generator)[:n].tolist())
    quota = apportion({k: len(v) for k, v in by_label.items()}, n)
    picked: list[int] = []
    for label in sorted(by_label):
        members = by_label[label]
        order = torch.randperm(len(members), generator=generator)[: quota[label]].tolist()
        picked += [members[j] for j in order]
    return sorted(picked)


def selection_generator(seed: int, task_index: int) -> torch.Generator:
    """The generator of the rows kept of task `task_index`: a function of (seed, task index) only, so the same
    rows are kept in a resumed run and in an uninterrupted one, whatever the other generators did before."""
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + int(task_index)) % (2**63))


def task_row_indices(task: Any, limit: int | None = None, seed: int = 0, task_index: int = 0) -> list[int]:
    """Which training rows of `task` `select_rows` keeps (ascending), with their class labels read from the data.

    Why not the first `limit` rows: datasets are often sorted (by label, by source), so a prefix can miss a
    class. The rows are a seeded random sample (`selection_generator(seed, task_index)`), stratified by class
    label (each label's share of the sample is its share of the task, `apportion`); all rows when `limit` is
    None or not smaller than the task.
    """
    data = task.train_dataset
    if data is None:
        raise ValueError(f"task {task.name!r} has no train split")
    labels = _class_labels(data)
    if limit is None or limit >= len(labels):
        return list(range(len(labels)))
    return stratified_indices(labels, limit, selection_generator(seed, task_index))


def _class_labels(data: Any) -> list[int]:
    return [int(x) for x in (data["label"] if hasattr(data, "column_names") else [r["label"] for r in data])]


def select_rows(
    task: Any, tokenized: Any, limit: int | None = None, seed: int = 0, task_index: int = 0
) -> list[dict[str, Any]]:
    """The rows `task_row_indices` picks of `tokenized` (the task's training rows as `tokenize_task` made them,
    same order), each ``{"input_ids", "labels", "label"}`` with its class `label` read from the task's data."""
    keep = task_row_indices(task, limit, seed, task_index)
    labels = _class_labels(task.train_dataset)
    if len(tokenized) != len(labels):
        raise ValueError(
            f"task {task.name!r}: {len(tokenized)} tokenized training rows for {len(labels)} rows of its train split"
        )
    picked = tokenized.select(keep) if hasattr(tokenized, "select") else [tokenized[i] for i in keep]
    return [
        {"input_ids": list(row["input_ids"]), "labels": list(row["labels"]), "label": labels[i]}
        for i, row in zip(keep, picked, strict=True)
    ]


def context_rows(context: Any, limit: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """The rows kept of the task of a `TaskContext`: taken from its tokenized rows (never tokenized again)."""
    return select_rows(context.task, context.train_dataset, limit, seed, context.index)


def task_rows(
    task: Any, tokenizer: Any, limit: int | None = None, seed: int = 0, task_index: int = 0
) -> list[dict[str, Any]]:
    """`context_rows` for a caller without a task context (scripts, tests): tokenizes the task's train split."""
    from ..tasks import tokenize_task

    return select_rows(task, tokenize_task(task, tokenizer, "train"), limit, seed, task_index)


def answer_loss(
    trainer: Any, model: torch.nn.Module, batch: dict[str, torch.Tensor], outputs: Any = None
) -> torch.Tensor:
    """The task loss of the Trainer on a padded replay `batch`: mean answer-token cross-entropy
    (`answer_cross_entropy`), label-smoothed exactly like `Trainer.compute_loss` (`LabelSmoother`, shifted labels)
    when `args.label_smoothing_factor > 0`.

    Why: a replay term on another scale than the task loss would silently change the replay strength.
    `outputs`: the model's outputs on `batch` without labels, when the caller already has them.
    """
    epsilon = float(getattr(getattr(trainer, "args", None), "label_smoothing_factor", 0.0) or 0.0)
    if outputs is None:
        outputs = model(**{k: v for k, v in batch.items() if k != "labels"})
    return answer_cross_entropy(outputs.logits, batch["labels"], label_smoothing=epsilon)


def answer_positions(labels: torch.Tensor) -> torch.Tensor:
    """Per row, the position whose next-token prediction is the first answer token (the last prompt token)."""
    labelled = labels != IGNORE_INDEX
    if not bool(labelled.any(dim=1).all()):
        raise ValueError("every row needs at least one answer token (a label other than -100)")
    first = labelled.int().argmax(dim=1)
    return (first - 1).clamp_min(0)
