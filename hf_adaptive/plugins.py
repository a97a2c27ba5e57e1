"""The small protocol through which the trainer knows its plugins.

A plugin is a `TrainerCallback` that may also
  * contribute loss terms (`loss_terms`), which `ContinualTrainer.compute_loss` weights, adds and logs;
  * react to task boundaries of a task sequence (`on_task_begin` / `on_task_end`);
  * keep state that survives a restart (`state_dict` / `load_state_dict`: tensors + JSON values only,
    saved as safetensors + JSON into every checkpoint).

The trainer never imports EWC, replay, ... by name: it only calls these methods.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from transformers import TrainerCallback

if TYPE_CHECKING:  # pragma: no cover
    from .tasks import Task
    from .trainer import ContinualTrainer


@dataclass
class LossTerm:
    """One weighted loss term. `value` is a scalar tensor in the graph; `weight` a float or a tensor."""

    name: str
    value: torch.Tensor
    weight: float | torch.Tensor = 1.0


class ContinualPlugin(TrainerCallback):
    """Base class of every plugin. Subclasses override only what they need."""

    #: unique name; used for logging (`loss_<name>`) and for the checkpoint folder of the plugin's state
    name: str = "plugin"

    @property
    def term_names(self) -> tuple[str, ...]:
        """Names of the loss terms this plugin may return (a learned loss weighting sizes itself by them)."""
        return (self.name,)

    def loss_terms(
        self, trainer: ContinualTrainer, model: torch.nn.Module, inputs: dict[str, Any], outputs: Any
    ) -> list[LossTerm]:
        """Extra loss terms for this batch (each a per-batch quantity, not scaled for accumulation)."""
        return []

    def on_task_begin(self, trainer: ContinualTrainer, task: Task, task_index: int) -> None:
        """Called by `train_sequence` after the trainable parameters of `task` are set up, before training."""

    def on_task_end(self, trainer: ContinualTrainer, task: Task, task_index: int) -> None:
        """Called by `train_sequence` after `task` is trained, before the evaluation of all tasks."""

    def state_dict(self) -> dict[str, Any]:
        """State to restore on resume: a nested dict of tensors and JSON values."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of `state_dict`."""


def is_plugin(callback: Any) -> bool:
    return isinstance(callback, ContinualPlugin)
