"""Turning task examples into causal-LM training rows, and scoring by rank classification.

Training rows are `prompt + " " + answer + eos`; the loss covers only the answer tokens (prompt tokens get
label -100). Classification scores every verbalized label by the summed log-likelihood of its tokens after
the prompt and predicts the best one, all labels of a batch of examples in one forward pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from .task import Task

IGNORE_INDEX = -100


def _encode_pair(tokenizer, prompt: str, answer: str, max_length: int | None) -> tuple[list[int], int]:
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(" " + answer, add_special_tokens=False)["input_ids"]
    if tokenizer.bos_token_id is not None:
        prompt_ids = [tokenizer.bos_token_id] + prompt_ids
    ids = prompt_ids + answer_ids
    if max_length is not None and len(ids) > max_length:
        # keep the answer: cut the prompt from the left
        overflow = len(ids) - max_length
        prompt_ids = prompt_ids[overflow:]
        ids = prompt_ids + answer_ids
    return ids, len(prompt_ids)


def encode_example(task: Task, example: dict, tokenizer, max_length: int | None = 256, add_eos: bool = True) -> dict:
    """One training row: `input_ids`, `attention_mask`, `labels` (answer tokens only)."""
    ids, n_prompt = _encode_pair(tokenizer, task.prompt(example["text"]), task.answer(example["label"]), max_length)
    if add_eos and tokenizer.eos_token_id is not None:
        ids = ids + [tokenizer.eos_token_id]
    labels = [IGNORE_INDEX] * n_prompt + ids[n_prompt:]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def tokenize_task(task: Task, tokenizer, split: str = "train", max_length: int | None = 256):
    """The task's split as a `datasets.Dataset` of training rows (task name kept in `task_name`)."""
    data = task.train_dataset if split == "train" else task.eval_dataset
    if data is None:
        raise ValueError(f"task {task.name!r} has no {split} split")

    def encode(example):
        row = encode_example(task, example, tokenizer, max_length)
        row["task_name"] = task.name
        return row

    return data.map(encode, remove_columns=list(data.column_names))


class CausalLMCollator:
    """Pads `input_ids`/`attention_mask`/`labels` (labels with -100); drops non-tensor columns."""

    def __init__(self, tokenizer, pad_to_multiple_of: int | None = None) -> None:
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        length = max(len(r["input_ids"]) for r in rows)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = {"input_ids": [], "attention_mask": [], "labels": []}
        for r in rows:
            pad = length - len(r["input_ids"])
            batch["input_ids"].append(list(r["input_ids"]) + [self.pad_id] * pad)
            batch["attention_mask"].append(list(r.get("attention_mask", [1] * len(r["input_ids"]))) + [0] * pad)
            labels = r.get("labels", r["input_ids"])
            batch["labels"].append(list(labels) + [IGNORE_INDEX] * pad)
        return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}


def answer_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed log-probability of the labelled tokens of each row (rows: the batch dimension)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    logp = torch.log_softmax(logits, dim=-1).gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return (logp * mask).sum(-1)


@torch.no_grad()
def rank_classify(
    model, tokenizer, task: Task, examples: Sequence[dict] | Any, batch_size: int = 64, max_length: int | None = 256
) -> tuple[list[int], list[list[float]]]:
    """Predicted label and per-label log-likelihoods for each example (rank classification).

    Every (example, label) pair is one row; rows are batched `batch_size` examples at a time.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    collator = CausalLMCollator(tokenizer)
    n_labels = len(task.verbalizer)
    preds: list[int] = []
    scores: list[list[float]] = []
    examples = list(examples)
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        rows = []
        for ex in chunk:
            for label in range(n_labels):
                ids, n_prompt = _encode_pair(tokenizer, task.prompt(ex["text"]), task.verbalizer[label], max_length)
                rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * n_prompt + ids[n_prompt:]})
        batch = {k: v.to(device) for k, v in collator(rows).items()}
        ll = answer_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["labels"]).view(-1, n_labels)
        scores.extend(ll.cpu().tolist())
        preds.extend(ll.argmax(-1).cpu().tolist())
    model.train(was_training)
    return preds, scores


def task_accuracy(
    model, tokenizer, task: Task, split: str = "eval", batch_size: int = 64, limit: int | None = None
) -> float:
    """Rank-classification accuracy of `model` on the task's split."""
    data = task.eval_dataset if split == "eval" else task.train_dataset
    if limit is not None:
        data = data.select(range(min(limit, len(data))))
    preds, _ = rank_classify(model, tokenizer, task, data, batch_size=batch_size)
    labels = [int(x) for x in data["label"]]
    return float(sum(int(p == y) for p, y in zip(preds, labels)) / max(len(labels), 1))


def cross_entropy_per_row(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of each row over its labelled tokens (shifted as in causal LMs)."""
    logits = logits[:, :-1].float()
    targets = labels[:, 1:]
    mask = (targets != IGNORE_INDEX).float()
    ce = F.cross_entropy(logits.transpose(1, 2), targets.clamp_min(0), reduction="none")
    return (ce * mask).sum(-1) / mask.sum(-1).clamp_min(1.0)
