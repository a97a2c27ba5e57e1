"""Small pieces shared by the replay plugins: tokenizer and device, the rows kept of a task (seeded, stratified
by label), collating stored rows, and the replay loss on the task loss's scale."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..tasks import CausalLMCollator, encode_example

IGNORE_INDEX = -100


def fail(cls: str, name: str, value: Any, allowed: str) -> None:
    raise ValueError(f"{cls}.{name}={value!r} is not allowed: {allowed}")


def check_number(cls: str, name: str, value: Any, low: float, high: float | None = None, integer: bool = False) -> None:
    kind = "an integer" if integer else "a number"
    ok = not isinstance(value, bool) and isinstance(value, int if integer else (int, float))
    if not ok or value != value or value < low or (high is not None and value > high):
        bounds = f">= {low}" + (f" and <= {high}" if high is not None else "")
        fail(cls, name, value, f"must be {kind} {bounds}")


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
    """Which training rows of `task` `task_rows` keeps (ascending), with their class labels read from the data.

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


def task_rows(
    task: Any, tokenizer: Any, limit: int | None = None, seed: int = 0, task_index: int = 0
) -> list[dict[str, Any]]:
    """The rows `task_row_indices` picks, tokenized like the Trainer's rows (`input_ids`, `labels`, class `label`)."""
    data = task.train_dataset
    keep = task_row_indices(task, limit, seed, task_index)
    labels = _class_labels(data)
    rows = []
    for i in keep:
        row = encode_example(task, data[i], tokenizer)
        rows.append({"input_ids": row["input_ids"], "labels": row["labels"], "label": labels[i]})
    return rows


def answer_loss(
    trainer: Any, model: torch.nn.Module, batch: dict[str, torch.Tensor], outputs: Any = None
) -> torch.Tensor:
    """The task loss of the Trainer on a padded replay `batch`: mean answer-token cross-entropy, label-smoothed
    exactly like `Trainer.compute_loss` (`LabelSmoother`, shifted labels) when `args.label_smoothing_factor > 0`.

    Why: a replay term on another scale than the task loss would silently change the replay strength.
    `outputs`: the model's outputs on `batch` without labels, when the caller already has them.
    """
    epsilon = float(getattr(getattr(trainer, "args", None), "label_smoothing_factor", 0.0) or 0.0)
    if outputs is None and epsilon <= 0:
        return model(**batch).loss
    if outputs is None:
        outputs = model(**{k: v for k, v in batch.items() if k != "labels"})
    if epsilon <= 0:
        return _plain_answer_loss(outputs.logits, batch["labels"])
    from transformers.trainer_pt_utils import LabelSmoother

    return LabelSmoother(epsilon=epsilon)(outputs, batch["labels"], shift_labels=True)


def _plain_answer_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled tokens (what a causal LM returns as ``outputs.loss``)."""
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX
    )


def answer_positions(labels: torch.Tensor) -> torch.Tensor:
    """Per row, the position whose next-token prediction is the first answer token (the last prompt token)."""
    labelled = labels != IGNORE_INDEX
    if not bool(labelled.any(dim=1).all()):
        raise ValueError("every row needs at least one answer token (a label other than -100)")
    first = labelled.int().argmax(dim=1)
    return (first - 1).clamp_min(0)
