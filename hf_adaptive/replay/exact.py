"""`ReplayPlugin`: exact experience replay as a weighted loss term.

At the end of every task a seeded random sample of the task's training rows (the rows the trainer tokenized,
`TaskContext.train_dataset`), stratified by label (each label's share of the sample is its share of the task),
is offered to a `ReplayMemory` (reservoir or per-task balanced, capped by count; under ``"balanced"`` the sample
has the size of the task's share, so the memory keeps it whole and keeps the label shares when it later shrinks
the task). At every training step `replay_batch_size` stored rows are drawn, padded with the tokenizer's pad id
and run through the model; their causal-LM loss (`answer_cross_entropy`: the mean over their answer tokens, the
model's own ``outputs.loss`` on that padded batch; label-smoothed like the task loss when
``args.label_smoothing_factor > 0``, see `_common.answer_loss`) is returned as
``LossTerm("replay", loss, weight=replay_alpha)``, which the trainer adds to the task loss and logs as
``loss_replay``.

Why a loss term and not a mixed dataset: the new task's data loader, epochs and early stopping stay
untouched, and the replay strength is one number (`replay_alpha`) independent of the memory size.

Memory bound: see `ReplayMemory` (8 bytes per stored token + ~ 200 bytes per item, at most
`replay_buffer_size` items; 104 bytes of payload per item on the built-in suite). Compute: one extra
forward/backward of `replay_batch_size` rows per training step.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from ..plugins import ContinualPlugin, LossTerm, TaskContext
from ..utils.options import OptionSource, build_config
from ._common import (
    ConfigValue,
    answer_loss,
    collate,
    configure,
    context_rows,
    model_device,
    run_seed,
    trainer_tokenizer,
)
from .buffer import ReplayMemory
from .config import REPLAY_OPTIONS, REPLAY_SOURCE, ReplayConfig


class ReplayPlugin(ContinualPlugin):
    """Exact replay of stored past examples, weighted by `alpha` (`replay_alpha`).

    Args:
        config: a `ReplayConfig` (None: its defaults); keyword `overrides` replace single fields of it:
        alpha: weight of the replay loss, in [0, 1]; 0 stores examples but adds no term.
        buffer_size: the most examples kept (all tasks together).
        policy: ``"reservoir"`` or ``"balanced"``.
        batch_size: stored rows replayed per training step.
        seed: seed of the memory's admission and sampling draws, and (with the task index) of the rows kept
            of each task (`args.seed` in `from_config`; a loaded state brings its own).
        examples_per_task: offer at most this many training rows of each task (None: all); the rows are a
            seeded sample stratified by label (`_common.select_rows`), not the first ones.
    """

    name = "replay"
    options: ClassVar[tuple[OptionSource, ...]] = REPLAY_OPTIONS

    alpha = ConfigValue()
    batch_size = ConfigValue()
    examples_per_task = ConfigValue()

    def __init__(self, config: ReplayConfig | None = None, **overrides: Any) -> None:
        self.config = configure(ReplayConfig, config, overrides, "ReplayPlugin")
        self.memory = ReplayMemory(self.config.buffer_size, policy=self.config.policy, seed=self.config.seed)
        self.last_rows: list[dict[str, Any]] = []  # the rows replayed at the last step (for inspection/tests)

    @classmethod
    def from_config(cls, config: Any, model: torch.nn.Module | None = None, **overrides: Any) -> ReplayPlugin:
        """From the `replay_*` options and the run's `seed`."""
        return cls(build_config(REPLAY_SOURCE, config, owner=type(config).__name__, **run_seed(config)), **overrides)

    def on_train_begin(self, args, state, control, **kwargs):
        if kwargs.get("processing_class") is None and kwargs.get("tokenizer") is None:
            raise ValueError("ReplayPlugin needs the trainer's processing_class (a tokenizer) to pad replayed rows")

    def on_task_end(self, trainer: Any, context: TaskContext) -> None:
        limit = self.examples_per_task
        if self.memory.policy == "balanced":
            # offer only what the task's share holds, so the share is the stratified sample itself (a larger
            # offer would be thinned by the memory's uniform, label-blind draw)
            share = self.memory.share(context.task.name)
            limit = share if limit is None else min(limit, share)
        self.memory.add(context.task.name, context_rows(context, limit, seed=self.memory.seed))

    def loss_terms(self, trainer: Any, model: torch.nn.Module, inputs: dict[str, Any], outputs: Any) -> list[LossTerm]:
        if self.alpha == 0 or len(self.memory) == 0 or not model.training:
            return []
        rows = self.memory.sample(self.batch_size)
        self.last_rows = rows
        batch = collate(rows, trainer_tokenizer(trainer, "ReplayPlugin"), model_device(model))
        return [LossTerm("replay", answer_loss(trainer, model, batch), weight=self.alpha)]

    def state_dict(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "batch_size": self.batch_size, "memory": self.memory.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.memory.load_state_dict(state["memory"])
