"""Early stopping of per-task (adapter) training on that task's own validation set.

After every epoch the callback scores the current task's validation split — rank-classification
`accuracy` (maximized, the default) or the mean answer-token `loss` (minimized) — and stops the task once
`patience` epochs in a row brought no improvement larger than `min_delta`, but never before `min_epochs`
epochs. At the end of training it puts back the best epoch's weights (only the trainable parameters: the
adapter under LoRA, so the snapshot is small) and reports how many epochs, and roughly how much time, the
stop saved.

Validation split: `task.metadata["validation_dataset"]` when the task has one, else `task.eval_dataset`
(the built-in tasks have no separate validation split; stopping on the evaluation split makes the final
accuracy of the stopped task slightly optimistic — give tasks a validation split for clean numbers).

Works inside `ContinualTrainer.train_sequence` (the task and its tokenized eval split come from the
`TaskContext` of `on_task_begin`: the loss is scored on those rows, not on a second tokenization) and with a
plain `Trainer` (pass `task=`; the callback then tokenizes the validation split once itself, as it does for a
separate validation split the trainer never tokenizes). Every process evaluates the same full split, so all of
them stop together.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Any

import torch

from ..plugins import ContinualPlugin, TaskContext
from ..tasks import Task
from ..tasks.losses import IGNORE_INDEX, answer_cross_entropy
from ..utils.params import trainable_parameters
from ..utils.validation import fail
from .config import EARLY_STOPPING_METRICS, EARLY_STOPPING_OPTIONS, EarlyStoppingConfig

logger = logging.getLogger(__name__)

METRICS = EARLY_STOPPING_METRICS


def validation_task(task: Task) -> Task:
    """`task` whose eval split is its validation split (see the module docstring)."""
    validation = (task.metadata or {}).get("validation_dataset")
    return task if validation is None else dataclasses.replace(task, eval_dataset=validation)


def _has_validation_split(task: Task) -> bool:
    return (task.metadata or {}).get("validation_dataset") is not None


@torch.no_grad()
def validation_loss(
    model: torch.nn.Module,
    tokenizer: Any,
    data: Any,
    batch_size: int = 64,
    limit: int | None = None,
    collator: Any = None,
    **tokenize_options: Any,
) -> float:
    """Mean next-token NLL over all answer tokens (the training loss, without dropout).

    `data`: rows of `tokenize_task` (e.g. a `TaskContext.eval_dataset`), or a `Task`, whose eval split is then
    tokenized here (standalone use) with `tokenize_options` (`max_length`, `append_eos`, `prompt_format`: pass the
    run's, or the rows differ from the ones it trains on). `collator` defaults to `CausalLMCollator(tokenizer)`.
    """
    from ..tasks import CausalLMCollator, tokenize_task

    if tokenize_options and not isinstance(data, Task):
        fail(
            "validation_loss",
            "tokenize_options",
            sorted(tokenize_options),
            "only for a Task (rows are already tokenized: tokenize them with these options instead)",
        )
    rows = tokenize_task(data, tokenizer, "eval", **tokenize_options) if isinstance(data, Task) else data
    if limit is not None:
        rows = rows.select(range(min(limit, len(rows)))) if hasattr(rows, "select") else rows[:limit]
    collator = collator or CausalLMCollator(tokenizer)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for start in range(0, len(rows), batch_size):
            batch = collator([rows[i] for i in range(start, min(start + batch_size, len(rows)))])
            batch = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            total += float(answer_cross_entropy(logits, batch["labels"], reduction="sum"))
            count += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    finally:
        model.train(was_training)
    return total / max(count, 1)


class AdapterEarlyStoppingCallback(ContinualPlugin):
    """Stop a task's training when its validation metric stops improving; restore the best weights.

    `AdapterEarlyStoppingCallback(config=None, *, task=None, processing_class=None, **overrides)`; the options
    (`EarlyStoppingConfig`, keyword overrides allowed): `metric`: "accuracy" (default) or "loss"; `patience` (3):
    epochs without an improvement > `min_delta` (0.001) before stopping; `min_epochs` (1): epochs always run;
    `restore_best` (True); `eval_batch_size` / `eval_limit`: how the validation split is scored (None: the
    Trainer's `continual_eval_batch_size` / `continual_eval_limit`). `task` / `processing_class`: needed only with
    a plain `Trainer`. `reports` holds one dict per finished task (epochs run, planned, saved, best epoch, seconds
    saved).
    """

    name = "early_stopping"
    options = EARLY_STOPPING_OPTIONS

    def __init__(
        self,
        config: EarlyStoppingConfig | None = None,
        *,
        task: Task | None = None,
        processing_class: Any = None,
        **overrides: Any,
    ) -> None:
        self.config = dataclasses.replace(config or EarlyStoppingConfig(), **overrides)
        self.task = task
        self.processing_class = processing_class
        self.reports: list[dict[str, Any]] = []
        self._rows: Any = None  # the tokenized validation split of `task`, once known
        self._collator: Any = None
        self._resumed = False
        self._reset(task.name if task is not None else None)

    # the options, read where they always were
    metric = property(lambda self: self.config.metric)
    patience = property(lambda self: self.config.patience)
    min_epochs = property(lambda self: self.config.min_epochs)
    min_delta = property(lambda self: float(self.config.min_delta))
    restore_best = property(lambda self: self.config.restore_best)
    eval_batch_size = property(lambda self: self.config.eval_batch_size)
    eval_limit = property(lambda self: self.config.eval_limit)

    # ----------------------------------------------------------------------------------------------- state
    def _reset(self, task_name: str | None) -> None:
        self.task_name = task_name
        self.best: float | None = None
        self.best_epoch = 0
        self.epochs_done = 0
        self.wait = 0
        self.stopped = False
        self.epoch_seconds: list[float] = []
        self.values: list[float] = []
        self.best_weights: dict[str, torch.Tensor] = {}
        self._epoch_started: float | None = None

    def state_dict(self) -> dict[str, Any]:
        return {
            "task_name": self.task_name,
            "best": self.best,
            "best_epoch": self.best_epoch,
            "epochs_done": self.epochs_done,
            "wait": self.wait,
            "stopped": self.stopped,
            "epoch_seconds": list(self.epoch_seconds),
            "values": list(self.values),
            "best_weights": dict(self.best_weights),
            "reports": [dict(r) for r in self.reports],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.task_name = state.get("task_name")
        self.best = state.get("best")
        self.best_epoch = int(state.get("best_epoch", 0))
        self.epochs_done = int(state.get("epochs_done", 0))
        self.wait = int(state.get("wait", 0))
        self.stopped = bool(state.get("stopped", False))
        self.epoch_seconds = [float(s) for s in state.get("epoch_seconds", [])]
        self.values = [float(v) for v in state.get("values", [])]
        self.best_weights = {n: t.detach().clone() for n, t in state.get("best_weights", {}).items()}
        self.reports = [dict(r) for r in state.get("reports", [])]
        self._resumed = True

    # ------------------------------------------------------------------------------------------- callbacks
    def on_task_begin(self, trainer: Any, context: TaskContext) -> None:
        self.task = context.task
        # the trainer's tokenized eval split, unless the task has a separate validation split (tokenized on use)
        self._rows = None if _has_validation_split(context.task) else context.eval_dataset
        self._collator = context.collator
        self._reset(context.task.name)
        self._resumed = False

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.task is None:
            raise ValueError(
                "AdapterEarlyStoppingCallback.task=None is not allowed with a plain Trainer: pass task= (the "
                "task being trained), or run it inside ContinualTrainer.train_sequence"
            )
        if self.processing_class is None and kwargs.get("processing_class") is None:
            raise ValueError(
                "AdapterEarlyStoppingCallback.processing_class=None is not allowed: give the Trainer a "
                "processing_class (the tokenizer) or pass processing_class= to the callback"
            )
        if self._rows is not None and self.task_name != self.task.name:
            self._rows = None
        resuming = self._resumed and self.task_name == self.task.name and state.global_step > 0
        if not resuming:
            self._reset(self.task.name)
        self._resumed = False

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._epoch_started = time.perf_counter()

    def evaluate(self, model: torch.nn.Module, tokenizer: Any, args: Any = None) -> float:
        """The validation metric of the current task for `model`."""
        from ..tasks import task_accuracy, tokenize_task
        from ..tasks.prompting import row_options, scoring_options

        batch_size = self.eval_batch_size or getattr(args, "continual_eval_batch_size", None) or 64
        limit = self.eval_limit if self.eval_limit is not None else getattr(args, "continual_eval_limit", None)
        task = validation_task(self.task)
        if self.metric == "accuracy":
            return task_accuracy(
                model, tokenizer, task, "eval", batch_size=batch_size, limit=limit, **scoring_options(args)
            )
        if self._rows is None:  # a plain Trainer, or a validation split the trainer did not tokenize
            self._rows = tokenize_task(task, tokenizer, "eval", **row_options(args))  # as the run trains on them
        return validation_loss(
            model, tokenizer, self._rows, batch_size=batch_size, limit=limit, collator=self._collator
        )

    def _improved(self, value: float) -> bool:
        if self.best is None:
            return math.isfinite(value)
        if self.metric == "accuracy":
            return value > self.best + self.min_delta
        return value < self.best - self.min_delta

    def on_epoch_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        tokenizer = self.processing_class or kwargs.get("processing_class")
        value = self.evaluate(model, tokenizer, args)
        started = self._epoch_started if self._epoch_started is not None else time.perf_counter()
        self.epoch_seconds.append(time.perf_counter() - started)
        self._epoch_started = None
        self.epochs_done += 1
        self.values.append(value)
        if self._improved(value):
            self.best, self.best_epoch, self.wait = value, self.epochs_done, 0
            if self.restore_best:
                self.best_weights = {n: p.detach().to("cpu", copy=True) for n, p in trainable_parameters(model).items()}
        else:
            self.wait += 1
        logger.info(
            "early stopping [%s] epoch %d: %s %.4f (best %.4f at epoch %d, %d without improvement)",
            self.task_name,
            self.epochs_done,
            self.metric,
            value,
            self.best if self.best is not None else value,
            self.best_epoch,
            self.wait,
        )
        if self.epochs_done >= self.min_epochs and self.wait >= self.patience:
            self.stopped = True
            control.should_training_stop = True

    def on_train_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        restored = False
        if self.restore_best and self.best_weights and self.best_epoch < self.epochs_done and model is not None:
            params = trainable_parameters(model)
            missing = sorted(set(self.best_weights) - set(params))
            if missing:
                raise ValueError(
                    f"AdapterEarlyStoppingCallback: cannot restore the best weights, parameters "
                    f"{missing[:3]} are no longer trainable in the model"
                )
            with torch.no_grad():
                for name, saved in self.best_weights.items():
                    params[name].copy_(saved.to(params[name].device, params[name].dtype))
            restored = True
        planned = int(math.ceil(float(getattr(state, "num_train_epochs", 0) or args.num_train_epochs)))
        saved_epochs = max(planned - self.epochs_done, 0) if self.stopped else 0
        per_epoch = sum(self.epoch_seconds) / len(self.epoch_seconds) if self.epoch_seconds else 0.0
        report = {
            "task": self.task_name,
            "metric": self.metric,
            "best": self.best,
            "best_epoch": self.best_epoch,
            "epochs_run": self.epochs_done,
            "epochs_planned": planned,
            "epochs_saved": saved_epochs,
            "stopped_early": self.stopped,
            "restored_best": restored,
            "seconds_per_epoch": per_epoch,
            "seconds_saved_estimate": saved_epochs * per_epoch,
            "values": list(self.values),
        }
        self.reports.append(report)
        logger.info(
            "early stopping [%s]: %d/%d epochs, best %s %.4f at epoch %d, ~%.1fs saved",
            self.task_name,
            self.epochs_done,
            planned,
            self.metric,
            self.best if self.best is not None else float("nan"),
            self.best_epoch,
            report["seconds_saved_estimate"],
        )
        self.best_weights = {}  # the weights are back in the model; do not carry them into later checkpoints


__all__ = ["METRICS", "AdapterEarlyStoppingCallback", "EarlyStoppingConfig", "validation_loss", "validation_task"]
