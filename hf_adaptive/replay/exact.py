"""`ReplayPlugin`: exact experience replay as a weighted loss term.

At the end of every task the task's training rows are offered to a `ReplayMemory` (reservoir or per-task
balanced, capped by count). At every training step `replay_batch_size` stored rows are drawn, padded with the
tokenizer's pad id and run through the model; their causal-LM loss (mean over their answer tokens, exactly
the model's own ``outputs.loss`` on that padded batch) is returned as ``LossTerm("replay", loss,
weight=replay_alpha)``, which the trainer adds to the task loss and logs as ``loss_replay``.

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
from ._common import check_number, collate, model_device, task_rows, trainer_tokenizer
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
        seed: seed of the memory's admission and sampling draws.
        examples_per_task: offer at most this many training rows of each task (None: all).
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
        """From `replay_alpha`, `replay_buffer_size`, `replay_policy`, `replay_batch_size` and `seed`."""
        kwargs = dict(
            alpha=args.replay_alpha,
            buffer_size=args.replay_buffer_size,
            policy=args.replay_policy,
            batch_size=args.replay_batch_size,
            seed=args.seed,
        )
        kwargs.update(overrides)
        return cls(**kwargs)

    def on_train_begin(self, args, state, control, **kwargs):
        if kwargs.get("processing_class") is None and kwargs.get("tokenizer") is None:
            raise ValueError("ReplayPlugin needs the trainer's processing_class (a tokenizer) to pad replayed rows")

    def on_task_end(self, trainer: Any, task: Any, task_index: int) -> None:
        tokenizer = trainer_tokenizer(trainer, "ReplayPlugin")
        self.memory.add(task.name, task_rows(task, tokenizer, self.examples_per_task))

    def loss_terms(self, trainer: Any, model: torch.nn.Module, inputs: dict[str, Any], outputs: Any) -> list[LossTerm]:
        if self.alpha == 0 or len(self.memory) == 0 or not model.training:
            return []
        rows = self.memory.sample(self.batch_size)
        self.last_rows = rows
        batch = collate(rows, trainer_tokenizer(trainer, "ReplayPlugin"), model_device(model))
        loss = model(**batch).loss
        return [LossTerm("replay", loss, weight=self.alpha)]

    def state_dict(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "batch_size": self.batch_size, "memory": self.memory.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.memory.load_state_dict(state["memory"])
