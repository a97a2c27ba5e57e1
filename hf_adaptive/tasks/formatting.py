"""Turning task examples into causal-LM training rows, and scoring by rank classification.

Training rows are `prompt + " " + answer`, followed by the tokenizer's eos token when `append_eos` is True (the
default, as in `ContinualConfig.append_eos_token`); the loss covers only the answer tokens (and the eos), prompt
tokens get label -100. Without the eos the answer carries the whole loss of a row; with it, part of the loss teaches
the model to stop, which is what generative replay relies on to end its pseudo-examples.
Classification ranks the verbalized labels by their log-likelihood after the prompt (`label_scoring`: summed,
mean per token, or PMI against a content-free prompt) and predicts the best one; `tasks.scoring` scores all labels
of an example in one packed pass over its prompt.

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

from ..utils.validation import OptionError, check_bool, check_choice, check_number
from .losses import IGNORE_INDEX, answer_cross_entropy
from .prompting import LABEL_SCORINGS, PromptEncoder
from .scoring import score_label_continuations
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


def label_token_ids(task: Task, tokenizer: Any, prompt_format: str = "bos") -> list[list[int]]:
    """Token ids of every label word as it is encoded after the prompt, one list per label.

    `" " + word` after a plain or BOS prompt, `word` after a chat prompt. Raises when a word tokenizes to nothing or
    two words tokenize to the same ids (e.g. two emoji that both become `<unk>`): rank classification could not
    tell them apart and would report a fixed, meaningless accuracy.
    """
    return PromptEncoder(task, tokenizer, None, prompt_format, "label_token_ids").answers


def _training_row(prompt_ids: list[int], answer_ids: list[int], eos: int | None) -> dict:
    ids = list(prompt_ids) + list(answer_ids) + ([eos] if eos is not None else [])
    n_prompt = len(prompt_ids)
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [IGNORE_INDEX] * n_prompt + ids[n_prompt:]}


def encode_example(
    task: Task,
    example: dict,
    tokenizer,
    max_length: int | None = 256,
    append_eos: bool = True,
    *,
    prompt_format: str = "bos",
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
    encoder = PromptEncoder(task, tokenizer, max_length, prompt_format, "encode_example")
    eos = tokenizer.eos_token_id if append_eos else None
    answer = encoder.answers[task.label_index(example["label"])]
    return _training_row(encoder.prompts([example["text"]])[0], answer, eos)


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


def tokenize_task(
    task: Task,
    tokenizer,
    split: str = "train",
    max_length: int | None = 256,
    append_eos: bool = True,
    *,
    prompt_format: str = "bos",
):
    """The task's split as a `datasets.Dataset` of training rows (task name kept in `task_name`).

    `max_length`: tokens of prompt + longest label word (the input text is cut to fit, `PromptEncoder`).
    `append_eos` (default True): end every row with the tokenizer's eos token, trained on like the answer.
    `prompt_format`: "bos", "plain" or "chat" (`hf_adaptive.tasks.prompting`).
    Tokenizes in batches, in memory (no cache files) and without progress bars.
    """
    data = _split_data(task, split, "tokenize_task")
    check_bool("tokenize_task", "append_eos", append_eos)
    encoder = PromptEncoder(task, tokenizer, max_length, prompt_format, "tokenize_task")
    answers = encoder.answers
    eos = tokenizer.eos_token_id if append_eos else None

    def encode(batch: dict[str, list]) -> dict[str, list]:
        out: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": [], "task_name": []}
        for prompt_ids, label in zip(encoder.prompts(batch["text"]), batch["label"]):
            row = _training_row(prompt_ids, answers[task.label_index(label)], eos)
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
        prompt_format,
        type(tokenizer).__name__,
        getattr(tokenizer, "name_or_path", None),
        answers,
        tokenizer.bos_token_id,
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
    """Pads `input_ids`/`attention_mask`/`labels` (labels with -100); drops non-tensor columns.

    `padding_side`: "right" (default) or "left". Left padding lines up the ends of the rows, so the answer tokens
    of every row sit in the last columns and a model can compute logits there only (`logits_to_keep`, the
    trainer's `answer_only_logits`). Left-padded batches also carry `position_ids` (0 from each row's first real
    token), so a left-padded row sees the positions it would see unpadded.
    """

    PADDING_SIDES = ("right", "left")

    def __init__(self, tokenizer, pad_to_multiple_of: int | None = None, padding_side: str = "right") -> None:
        check_choice("CausalLMCollator", "padding_side", padding_side, self.PADDING_SIDES)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.pad_to_multiple_of = pad_to_multiple_of
        self.padding_side = padding_side

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        length = max(len(r["input_ids"]) for r in rows)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        left = self.padding_side == "left"
        batch = {"input_ids": [], "attention_mask": [], "labels": []}
        for r in rows:
            pad = length - len(r["input_ids"])
            columns = (
                (r["input_ids"], self.pad_id),
                (r.get("attention_mask", [1] * len(r["input_ids"])), 0),
                (r.get("labels", r["input_ids"]), IGNORE_INDEX),
            )
            for key, (values, fill) in zip(batch, columns):
                batch[key].append([fill] * pad + list(values) if left else list(values) + [fill] * pad)
        out = {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}
        if left:
            out["position_ids"] = (out["attention_mask"].cumsum(-1) - 1).clamp_min(0)
        return out


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
    model,
    tokenizer,
    task: Task,
    examples: Sequence[dict] | Any,
    batch_size: int = 64,
    max_length: int | None = 256,
    *,
    prompt_format: str = "bos",
    label_scoring: str = "sum",
    token_budget: int = 8192,
) -> tuple[list[int], list[list[float]]]:
    """Predicted label and per-label scores for each example (rank classification).

    Each example's prompt runs once with all its label words packed after it (`score_label_continuations`):
    `token_budget` bounds the tokens of one forward pass, `batch_size` the examples in it. `label_scoring`: "sum"
    (log-likelihood of the label's tokens), "mean" (per token) or "pmi" (sum minus the label's log-likelihood after
    the instruction with an empty input). An example whose scores are not all finite (a diverged model) is
    predicted as -1, never as an argmax over NaN that would count as a guess.
    """
    check_number("rank_classify", "batch_size", batch_size, 1, integer=True)
    check_number("rank_classify", "token_budget", token_budget, 1, integer=True)
    check_choice("rank_classify", "label_scoring", label_scoring, LABEL_SCORINGS)
    encoder = PromptEncoder(task, tokenizer, max_length, prompt_format, "rank_classify")
    texts = _texts(task, examples)
    was_training = model.training
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    scoring = "mean" if label_scoring == "mean" else "sum"
    try:
        prompts = encoder.prompts(texts)
        longest = max((len(p) for p in prompts), default=0)
        budget = max(token_budget, longest + sum(len(a) for a in encoder.answers))  # one example always fits
        ll = score_label_continuations(model, prompts, encoder.answers, pad, budget, scoring, batch_size)
        if label_scoring == "pmi":
            ll = ll - score_label_continuations(model, [encoder.null_prompt()], encoder.answers, pad, budget, "sum")
    finally:
        model.train(was_training)
    finite = torch.isfinite(ll).all(-1)
    preds = torch.where(finite, ll.argmax(-1), torch.full_like(finite, -1, dtype=torch.long)).tolist()
    return preds, ll.tolist()


def task_accuracy(
    model,
    tokenizer,
    task: Task,
    split: str = "eval",
    batch_size: int = 64,
    limit: int | None = None,
    *,
    max_length: int | None = 256,
    prompt_format: str = "bos",
    label_scoring: str = "sum",
    token_budget: int = 8192,
) -> float:
    """Rank-classification accuracy of `model` on the task's split ("eval" or "train"); options as `rank_classify`.

    NaN (with a warning naming the task) when the model's scores are not finite: a diverged model has no accuracy,
    and an argmax over NaN would look like chance.
    """
    data = _split_data(task, split, "task_accuracy")
    check_number("task_accuracy", "limit", limit, 1, integer=True, optional=True)
    if limit is not None and limit < len(data):
        data = data.select(range(limit))
    preds, _ = rank_classify(
        model,
        tokenizer,
        task,
        data,
        batch_size=batch_size,
        max_length=max_length,
        prompt_format=prompt_format,
        label_scoring=label_scoring,
        token_budget=token_budget,
    )
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
