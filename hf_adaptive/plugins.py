"""The protocol through which the trainer knows its plugins: everything it may call is declared here.

A plugin is a `TrainerCallback` that may also
  * be built from options (`options`: the config dataclasses it reads; `from_config` builds it from them), and
    know the trainer it serves (`bind`, called by `ContinualTrainer`), to log through `trainer.log`;
  * contribute loss terms (`loss_terms`), which `ContinualTrainer.compute_loss` weights, adds and logs; a plugin
    that reads the logits of the whole input there sets `needs_full_logits` (otherwise, with `answer_only_logits`,
    `outputs.logits` holds only the last `k` positions of the batch, those that predict answer tokens, and
    `inputs["labels"]` is cut to the same `k` columns);
  * combine the gradients of the objectives (the task loss and the weighted terms) itself instead of the trainer
    backpropagating their sum (`aggregates_gradients` / `combine_gradients`: at most one such plugin per trainer);
  * react to task boundaries of a task sequence (`on_task_begin` / `on_task_end`), receiving the `TaskContext`
    the trainer built once: the task, its tokenized splits, the tokenizer and the collator (no plugin tokenizes
    a task again);
  * ask the trainer for a model or adapter to train a task with (`setup_task` returns a `TaskSetup`; only the
    trainer swaps models, adapters and optimizers) and say which adapter scores a finished task
    (`adapter_for_task`);
  * keep state that survives a restart (`state_dict` / `load_state_dict`: tensors + JSON values only, saved as
    safetensors + JSON into `<checkpoint>/continual/<name>/`), rebuilding model parts first where its state needs
    them (`restore_model`);
  * add to the sequence's results (`extra_results`).

The trainer never imports EWC, replay, ... by name: it only calls these methods. The protocol sits on the
lowest floor: it imports nothing of the package above `tasks` and `utils`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from transformers import TrainerCallback

from .tasks import Task
from .utils.options import OptionSource, build_config

#: folder (inside a checkpoint or snapshot) that holds one sub-folder of state per plugin
PLUGIN_STATE_DIR = "continual"
#: set on the optimizer by the trainer's non-finite guard before every optimizer step: True when that step is
#: skipped. Callbacks that also guard against NaN (the adaptive scheduler) read it instead of deciding on their own.
NONFINITE_SKIP_ATTR = "hf_adaptive_step_skipped"


@dataclass
class LossTerm:
    """One weighted loss term. `value` is a scalar tensor in the graph; `weight` a float or a tensor."""

    name: str
    value: torch.Tensor
    weight: float | torch.Tensor = 1.0


@dataclass
class TaskContext:
    """What a plugin needs of the task being learned, built once by the trainer."""

    task: Task
    index: int
    train_dataset: Any  # rows of `tokenize_task` (input_ids, attention_mask, labels, task_name)
    eval_dataset: Any | None
    tokenizer: Any
    collator: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def build(
        cls, task: Task, index: int, tokenizer: Any, append_eos: bool = True, collator: Any = None, **prompt: Any
    ):
        """Tokenize `task` (train, and eval when it has one) the way the trainer trains on it.

        `prompt`: `tokenize_task`'s `max_length` / `prompt_format` (a run's are `prompt_options(args)`).
        """
        from .tasks import CausalLMCollator, tokenize_task

        train = tokenize_task(task, tokenizer, "train", append_eos=append_eos, **prompt)
        evaluation = (
            tokenize_task(task, tokenizer, "eval", append_eos=append_eos, **prompt) if task.eval_dataset else None
        )
        return cls(task, index, train, evaluation, tokenizer, collator or CausalLMCollator(tokenizer))


@dataclass
class TaskSetup:
    """A plugin's request for the coming task: train `model` (when it replaces the trainer's model, e.g. after
    putting LoRA experts on it) with `adapter` active and trainable."""

    model: torch.nn.Module | None = None
    adapter: str | None = None


class ContinualPlugin(TrainerCallback):
    """Base class of every plugin. Subclasses override only what they need."""

    #: unique name; used for logging (`loss_<name>`) and for the checkpoint folder of the plugin's state
    name: str = "plugin"
    #: the config dataclasses this plugin is built from, and the option names their fields take
    options: ClassVar[tuple[OptionSource, ...]] = ()
    #: whether `from_config` needs the model (e.g. to size a gate controller by the model's heads)
    needs_model: ClassVar[bool] = False
    #: the trainer this plugin serves, set by `bind` (plugins report through `trainer.log`)
    trainer: Any = None
    #: True when `loss_terms` reads `outputs.logits` beyond the answer positions (e.g. an LM loss over the whole
    #: input): the trainer then computes the logits of every position (`answer_only_logits` is off while it is True)
    needs_full_logits: bool = False
    #: True when the plugin combines the objectives' gradients itself (`combine_gradients`) instead of the trainer
    #: backpropagating their sum; at most one plugin of a trainer may set it
    aggregates_gradients: bool = False

    def bind(self, trainer: Any) -> None:
        """Called by `ContinualTrainer.__init__` for every plugin; a plain `Trainer` user calls it once."""
        self.trainer = trainer

    @classmethod
    def from_config(cls, config: Any, model: torch.nn.Module | None = None) -> ContinualPlugin:
        """Build the plugin from the option values on `config` (a `ContinualConfig`, or one config per source).

        The default passes one built config per option source, positionally, plus `model=` when `needs_model`.
        """
        owner = type(config).__name__
        built = [build_config(source, config, owner=owner) for source in cls.options]
        return cls(*built, model=model) if cls.needs_model else cls(*built)

    @property
    def term_names(self) -> tuple[str, ...]:
        """Names of the loss terms this plugin may return (a learned loss weighting sizes itself by them)."""
        return (self.name,)

    def loss_terms(self, trainer: Any, model: torch.nn.Module, inputs: dict[str, Any], outputs: Any) -> list[LossTerm]:
        """Extra loss terms for this batch (each a per-batch quantity, not scaled for accumulation)."""
        return []

    def combine_gradients(
        self,
        trainer: Any,
        model: torch.nn.Module,
        objectives: dict[str, torch.Tensor],
        params: list[torch.Tensor],
    ) -> list[torch.Tensor | None]:
        """Only when `aggregates_gradients`: this micro-batch's gradient for `params` (the trainable parameters),
        one tensor (or None: no gradient) per parameter, combined from `objectives`.

        `objectives`: ``"task"`` (the task loss) and one entry per loss term, each already weighted and scaled for
        gradient accumulation exactly as in the summed loss the trainer would otherwise backpropagate (their sum is
        that loss). The trainer then backpropagates the returned gradient in place of the sum's, through the
        Trainer's own `backward` (the accumulation division and a grad scaler still apply).
        """
        raise NotImplementedError(f"{type(self).__name__} sets aggregates_gradients but has no combine_gradients")

    def setup_task(self, trainer: Any, context: TaskContext) -> TaskSetup | None:
        """Before the task's parameters are set up: a model / adapter for the trainer to train, or None."""
        return None

    def on_task_begin(self, trainer: Any, context: TaskContext) -> None:
        """Called by `train_sequence` after the trainable parameters of the task are set up, before training."""

    def on_task_end(self, trainer: Any, context: TaskContext) -> None:
        """Called by `train_sequence` after the task is trained, before the evaluation of all tasks."""

    def adapter_for_task(self, task_name: str) -> str | None:
        """The adapter that scores the finished task `task_name` (a routing plugin's choice), or None."""
        return None

    def restore_model(self, snapshot: Path, model: torch.nn.Module) -> torch.nn.Module | None:
        """Before a snapshot's weights load: rebuild what the plugin put on the model (e.g. LoRA experts) and
        return the model to load them into, or None when the plugin adds nothing to the model."""
        return None

    def extra_results(self) -> dict[str, Any]:
        """Entries this plugin adds to the sequence's `results.json` (`extra`)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """State to restore on resume: a nested dict of tensors and JSON values."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of `state_dict`."""


def is_plugin(callback: Any) -> bool:
    return isinstance(callback, ContinualPlugin)
