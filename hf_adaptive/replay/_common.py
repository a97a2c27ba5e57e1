"""Small pieces shared by the replay plugins: finding the tokenizer and device, collating stored rows."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..tasks import CausalLMCollator, tokenize_task

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


def task_rows(task: Any, tokenizer: Any, limit: int | None = None) -> list[dict[str, Any]]:
    """The task's training split as tokenized rows (`input_ids`, `labels`), at most `limit` of them."""
    data = tokenize_task(task, tokenizer, "train")
    n = len(data) if limit is None else min(limit, len(data))
    return [{"input_ids": data[i]["input_ids"], "labels": data[i]["labels"]} for i in range(n)]


def answer_positions(labels: torch.Tensor) -> torch.Tensor:
    """Per row, the position whose next-token prediction is the first answer token (the last prompt token)."""
    labelled = labels != IGNORE_INDEX
    if not bool(labelled.any(dim=1).all()):
        raise ValueError("every row needs at least one answer token (a label other than -100)")
    first = labelled.int().argmax(dim=1)
    return (first - 1).clamp_min(0)
