"""`ReplayPlugin`: exact experience replay as a weighted loss term.

At the end of every task a seeded random sample of the task's training rows, stratified by label (each
label's share of the sample is its share of the task), is offered to a `ReplayMemory` (reservoir or per-task
balanced, capped by count; under ``"balanced"`` the sample has the size of the task's share, so the memory
keeps it whole and keeps the label shares when it later shrinks the task). At every training step
`replay_batch_size` stored rows are drawn, padded with the tokenizer's pad id and run through the model; their
causal-LM loss (mean over their answer tokens, exactly the model's own ``outputs.loss`` on that padded batch;
label-smoothed like the task loss when ``args.label_smoothing_factor > 0``, see `_common.answer_loss`) is
returned as ``LossTerm("replay", loss, weight=replay_alpha)``, which the trainer adds to the task loss and logs
as ``loss_replay``.

Why a loss term and not a mixed dataset: the new task's data loader, epochs and early stopping stay
untouched, and the replay strength is one number (`replay_alpha`) independent of the memory size.

Memory bound: see `ReplayMemory` (8 bytes per stored token + ~ 200 bytes per item, at most
`replay_buffer_size` items; 104 bytes of payload per item on the built-in suite). Compute: one extra
forward/backward of `replay_batch_size` rows per training step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ..plugins import ContinualPlugin, LossTerm
from ._common import answer_loss, check_number, collate, model_device, task_rows, trainer_tokenizer
from .buffer import REPLAY_POLICIES, ReplayMemory

if TYPE_CHECKING:  # pragma: no cover
    from ..config import ContinualConfig


class ReplayPlugin(ContinualPlugin):
    """Exact replay of stored past examples, weighted by `alpha` (`replay_alpha`).

    Args:
        alpha: weight of the replay loss, in [0, 1]; 0 stores examples but adds no term.
        buffer_size: the most examples kept (all tasks together).
        policy: ``"reservoir"`` or ``"balanced"``.
        batch_size: stored rows replayed per training step.
        seed: seed of the memory's admission and sampling draws, and (with the task index) of the rows kept
            of each task (`args.seed` in `from_config`; a loaded state brings its own).
        examples_per_task: offer at most this many training rows of each task (None: all); the rows are a
            seeded sample stratified by label (`_common.task_rows`), not the first ones.
    """

    name = "replay"

    def __init__(
        self,
        alpha: float = 0.2,
        buffer_size: int = 200,
        policy: str = "balanced",
        batch_size: int = 8,
        seed: int = 0,
        examples_per_task: int | None = None,
    ) -> None:
        check_number("ReplayPlugin", "alpha", alpha, 0, 1)
        check_number("ReplayPlugin", "batch_size", batch_size, 1, integer=True)
        if examples_per_task is not None:
            check_number("ReplayPlugin", "examples_per_task", examples_per_task, 1, integer=True)
        if policy not in REPLAY_POLICIES:
            raise ValueError(f"ReplayPlugin.policy={policy!r} is not allowed: choose one of {list(REPLAY_POLICIES)}")
        self.alpha = float(alpha)
        self.batch_size = batch_size
        self.examples_per_task = examples_per_task
        self.memory = ReplayMemory(buffer_size, policy=policy, seed=seed)
        self.last_rows: list[dict[str, Any]] = []  # the rows replayed at the last step (for inspection/tests)

    @classmethod
    def from_config(cls, args: ContinualConfig, **overrides: Any) -> ReplayPlugin:
        """From `replay_alpha`, `replay_buffer_size`, `replay_policy`, `replay_batch_size`,
        `replay_examples_per_task` and `seed`."""
        kwargs = dict(
            alpha=args.replay_alpha,
            buffer_size=args.replay_buffer_size,
            policy=args.replay_policy,
            batch_size=args.replay_batch_size,
            seed=args.seed,
            examples_per_task=args.replay_examples_per_task,
        )
        kwargs.update(overrides)
        return cls(**kwargs)

    def on_train_begin(self, args, state, control, **kwargs):
        if kwargs.get("processing_class") is None and kwargs.get("tokenizer") is None:
            raise ValueError("ReplayPlugin needs the trainer's processing_class (a tokenizer) to pad replayed rows")

    def on_task_end(self, trainer: Any, task: Any, task_index: int) -> None:
        tokenizer = trainer_tokenizer(trainer, "ReplayPlugin")
        limit = self.examples_per_task
        if self.memory.policy == "balanced":
            # offer only what the task's share holds, so the share is the stratified sample itself (a larger
            # offer would be thinned by the memory's uniform, label-blind draw)
            share = self.memory.share(task.name)
            limit = share if limit is None else min(limit, share)
        self.memory.add(task.name, task_rows(task, tokenizer, limit, seed=self.memory.seed, task_index=task_index))

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
