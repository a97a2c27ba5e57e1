"""Turning task examples into causal-LM training rows, and scoring by rank classification.

Training rows are `prompt + " " + answer`, followed by the tokenizer's eos token when `append_eos` is True (the
default, as in `ContinualConfig.append_eos_token`); the loss covers only the answer tokens (and the eos), prompt
tokens get label -100. Without the eos the answer carries the whole loss of a row; with it, part of the loss teaches
the model to stop, which is what generative replay relies on to end its pseudo-examples.
Classification scores every verbalized label by the summed log-likelihood of its tokens after the prompt and
predicts the best one, all labels of a batch of examples in one forward pass.

The prompt and each label word are tokenized separately (the answer as `" " + word`), so every label word has
one fixed id sequence per tokenizer: `label_token_ids` computes it once and rejects label words that the tokenizer
cannot tell apart (rank classification between identical sequences is a coin toss that looks like an accuracy).
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from ..utils.validation import OptionError, check_bool, check_number
from .losses import IGNORE_INDEX, answer_cross_entropy
from .task import Task

_SPLITS = {"train": "train_dataset", "eval": "eval_dataset"}

logger = logging.getLogger(__name__)


def _split_data(task: Task, split: str, owner: str) -> Any:
    """The task's `split` ("train" or "eval") as a non-empty Dataset, or an error naming the task and split."""
    if split not in _SPLITS:
        raise OptionError(owner, "split", split, f"one of {sorted(_SPLITS)} (task {task.name!r})")
    data = getattr(task, _SPLITS[split])
    if data is None:
        raise ValueError(
            f"{owner}: task {task.name!r} has no {split} split (Task.{_SPLITS[split]}=None); give the task one "
            f"to {'train on' if split == 'train' else 'evaluate'} it"
        )
    if len(data) == 0:
        raise ValueError(f"{owner}: task {task.name!r} has 0 rows in its {split} split (Task.{_SPLITS[split]})")
    return data


def label_token_ids(task: Task, tokenizer: Any) -> list[list[int]]:
    """Token ids of every label word as it is encoded after the prompt (`" " + word`), one list per label.

    Raises when a word tokenizes to nothing or two words tokenize to the same ids (e.g. two emoji that both become
    `<unk>`): rank classification could not tell them apart and would report a fixed, meaningless accuracy.
    """
    ids = [list(tokenizer(" " + word, add_special_tokens=False)["input_ids"]) for word in task.verbalizer]
    seen: dict[tuple[int, ...], str] = {}
    for word, word_ids in zip(task.verbalizer, ids):
        if not word_ids:
            raise OptionError(
                "Task",
                "verbalizer",
                task.verbalizer,
                f"label words with tokens; {word!r} has none (task {task.name!r})",
            )
        other = seen.setdefault(tuple(word_ids), word)
        if other != word:
            raise OptionError(
                "Task",
                "verbalizer",
                task.verbalizer,
                f"label words this tokenizer tells apart; {other!r} and {word!r} both tokenize to ids {word_ids} "
                f"(task {task.name!r})",
            )
    return ids


def _check_max_length(owner: str, max_length: Any, answers: list[list[int]]) -> None:
    """`max_length` must leave room for the longest answer and at least one prompt token before it."""
    check_number(owner, "max_length", max_length, 1, integer=True, optional=True)
    longest = max(len(a) for a in answers)
    if max_length is not None and max_length <= longest:
        allowed = f"None or > {longest} (the longest label word's token count)"
        raise OptionError(owner, "max_length", max_length, allowed)


def _join(
    prompt_ids: list[int], answer_ids: list[int], bos: int | None, max_length: int | None
) -> tuple[list[int], int]:
    """`[bos] + prompt + answer`, the prompt cut from the left to fit `max_length`; also the prompt's length."""
    if bos is not None:
        prompt_ids = [bos] + list(prompt_ids)
    if max_length is not None and len(prompt_ids) + len(answer_ids) > max_length:
        prompt_ids = prompt_ids[len(prompt_ids) + len(answer_ids) - max_length :]  # keep the answer
    return list(prompt_ids) + list(answer_ids), len(prompt_ids)


def _training_row(
    prompt_ids: list[int], answer_ids: list[int], bos: int | None, eos: int | None, max_length: int | None
) -> dict:
    ids, n_prompt = _join(prompt_ids, answer_ids, bos, max_length)
    if eos is not None:
        ids = ids + [eos]  # `max_length` bounds prompt + answer, so training and scoring see the same prompt
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [IGNORE_INDEX] * n_prompt + ids[n_prompt:]}


def _encode_pair(tokenizer, prompt: str, answer: str, max_length: int | None) -> tuple[list[int], int]:
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(" " + answer, add_special_tokens=False)["input_ids"]
    return _join(prompt_ids, answer_ids, tokenizer.bos_token_id, max_length)


def encode_example(
    task: Task,
    example: dict,
    tokenizer,
    max_length: int | None = 256,
    append_eos: bool = True,
    *,
    add_eos: bool | None = None,
) -> dict:
    """One training row: `input_ids`, `attention_mask`, `labels` (answer tokens, and the eos when appended).

    `add_eos` is the former name of `append_eos` (kept so older callers work).
    """
    if add_eos is not None:
        append_eos = add_eos
    if not isinstance(example, dict) or "text" not in example or "label" not in example:
        raise OptionError(
            "encode_example", "example", example, f"a dict with 'text' (str) and 'label' (int) (task {task.name!r})"
        )
    prompt_ids = tokenizer(task.prompt(example["text"]), add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(" " + task.answer(example["label"]), add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id if append_eos else None
    return _training_row(prompt_ids, answer_ids, tokenizer.bos_token_id, eos, max_length)


@contextmanager
def quiet_datasets() -> Iterator[None]:
    """`datasets` progress bars off inside the block, the previous setting restored after it.

    The "Map: 100%" bars of tokenization were most of a run's log. The environment variable
    `HF_DATASETS_DISABLE_PROGRESS_BARS=0` still wins (then bars show, as that setting asks).
    """
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    if not was_disabled:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled and are_progress_bars_disabled():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                enable_progress_bars()


def _fingerprint(*parts: Any) -> str:
    """A deterministic `datasets` fingerprint, so `map` never hashes (pickles) the tokenizer."""
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:32]


def tokenize_task(task: Task, tokenizer, split: str = "train", max_length: int | None = 256, append_eos: bool = True):
    """The task's split as a `datasets.Dataset` of training rows (task name kept in `task_name`).

    `append_eos` (default True): end every row with the tokenizer's eos token, trained on like the answer.
    Tokenizes in batches, in memory (no cache files) and without progress bars.
    """
    data = _split_data(task, split, "tokenize_task")
    check_bool("tokenize_task", "append_eos", append_eos)
    answers = label_token_ids(task, tokenizer)
    _check_max_length("tokenize_task", max_length, answers)
    bos = tokenizer.bos_token_id
    eos = tokenizer.eos_token_id if append_eos else None

    def encode(batch: dict[str, list]) -> dict[str, list]:
        out: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": [], "task_name": []}
        prompts = tokenizer([task.prompt(t) for t in batch["text"]], add_special_tokens=False)["input_ids"]
        for prompt_ids, label in zip(prompts, batch["label"]):
            row = _training_row(prompt_ids, answers[task.label_index(label)], bos, eos, max_length)
            for key, value in row.items():
                out[key].append(value)
            out["task_name"].append(task.name)
        return out

    fingerprint = _fingerprint(
        getattr(data, "_fingerprint", None),
        task.name,
        task.template,
        task.verbalizer,
        split,
        max_length,
        append_eos,
        type(tokenizer).__name__,
        getattr(tokenizer, "name_or_path", None),
        answers,
        bos,
        eos,
    )
    with quiet_datasets():
        return data.map(
            encode,
            batched=True,
            remove_columns=list(data.column_names),
            keep_in_memory=True,
            load_from_cache_file=False,
            new_fingerprint=fingerprint,
        )


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
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    return -answer_cross_entropy(logits, labels, reduction="per_row_sum")


def _texts(task: Task, examples: Any) -> list[str]:
    if hasattr(examples, "column_names"):
        if "text" not in examples.column_names:
            raise OptionError("rank_classify", "examples", examples, f"rows with a 'text' field (task {task.name!r})")
        return list(examples["text"])
    texts = []
    for i, ex in enumerate(examples):
        if not isinstance(ex, dict) or "text" not in ex:
            raise OptionError("rank_classify", f"examples[{i}]", ex, f"a dict with a 'text' field (task {task.name!r})")
        texts.append(ex["text"])
    return texts


@torch.no_grad()
def rank_classify(
    model, tokenizer, task: Task, examples: Sequence[dict] | Any, batch_size: int = 64, max_length: int | None = 256
) -> tuple[list[int], list[list[float]]]:
    """Predicted label and per-label log-likelihoods for each example (rank classification).

    Every (example, label) pair is one row; rows are batched `batch_size` examples at a time. An example whose
    scores are not all finite (a diverged model) is predicted as -1, never as an argmax over NaN that would count
    as a guess.
    """
    check_number("rank_classify", "batch_size", batch_size, 1, integer=True)
    answers = label_token_ids(task, tokenizer)
    _check_max_length("rank_classify", max_length, answers)
    texts = _texts(task, examples)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    collator = CausalLMCollator(tokenizer)
    n_labels = len(answers)
    preds: list[int] = []
    scores: list[list[float]] = []
    try:
        for start in range(0, len(texts), batch_size):
            prompts = [task.prompt(t) for t in texts[start : start + batch_size]]
            rows = []
            for prompt_ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]:
                for answer_ids in answers:
                    ids, n_prompt = _join(prompt_ids, answer_ids, tokenizer.bos_token_id, max_length)
                    rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * n_prompt + ids[n_prompt:]})
            batch = {k: v.to(device) for k, v in collator(rows).items()}
            ll = answer_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["labels"]).view(-1, n_labels)
            finite = torch.isfinite(ll).all(-1)
            scores.extend(ll.cpu().tolist())
            preds.extend(
                torch.where(finite, ll.argmax(-1), torch.full_like(finite, -1, dtype=torch.long)).cpu().tolist()
            )
    finally:
        model.train(was_training)
    return preds, scores


def task_accuracy(
    model, tokenizer, task: Task, split: str = "eval", batch_size: int = 64, limit: int | None = None
) -> float:
    """Rank-classification accuracy of `model` on the task's split ("eval" or "train").

    NaN (with a warning naming the task) when the model's scores are not finite: a diverged model has no accuracy,
    and an argmax over NaN would look like chance.
    """
    data = _split_data(task, split, "task_accuracy")
    check_number("task_accuracy", "limit", limit, 1, integer=True, optional=True)
    if limit is not None and limit < len(data):
        data = data.select(range(limit))
    preds, _ = rank_classify(model, tokenizer, task, data, batch_size=batch_size)
    bad = sum(p < 0 for p in preds)
    if bad:
        logger.warning(
            "task_accuracy: task %r (%s split): the model's label scores are not finite for %d of %d examples; "
            "accuracy is NaN",
            task.name,
            split,
            bad,
            len(preds),
        )
        return float("nan")
    labels = [task.label_index(x) for x in data["label"]]
    return float(sum(int(p == y) for p, y in zip(preds, labels)) / len(labels))


def cross_entropy_per_row(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of each row over its labelled tokens (shifted as in causal LMs)."""
    return answer_cross_entropy(logits, labels, reduction="per_row")
