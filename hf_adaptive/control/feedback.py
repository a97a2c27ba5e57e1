"""Closing the loop: measure the gated model, reward the gate controller, apply its next gates.

`FeedbackCallback` does it inside training (a `ContinualPlugin`, so a `ContinualTrainer` also saves the
controller in every checkpoint): every `eval_every` optimizer steps it measures the loss of a fixed validation
subset (``periodic`` mode) or takes the running training loss of the first log at least `eval_every` steps
after the previous update (``continuous`` mode; no extra forward passes, no head statistics), turns
it into a reward (`rewards.py`), records a Pareto point (`pareto.py`), lets the controller learn and act, and
sets the new gates. `OnlineGateAdapter` does it at inference time from rewards supplied by the caller (user
feedback), with no backward pass through the language model.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import TrainerControl, TrainerState, TrainingArguments

from ..models.gates import GatedModel, find_gates, gate_model
from ..models.head_importance import attention_entropy, head_importance
from ..plugins import ContinualPlugin, TaskContext
from ..tasks.losses import answer_cross_entropy
from ..utils.options import build_config
from ..utils.validation import OptionError
from .config import (
    FEEDBACK_SOURCE,
    GATE_CONTROLLER_SOURCE,
    GATE_FEEDBACK_OPTIONS,
    GATE_SOURCE,
    MODES,
    STATISTICS,
    FeedbackConfig,
    GateConfig,
    GateControllerConfig,
    with_overrides,
)
from .gate_controller import GateController
from .pareto import ParetoArchive

__all__ = [
    "MODES",
    "STATISTICS",
    "FeedbackCallback",
    "FeedbackConfig",
    "OnlineGateAdapter",
    "head_statistics",
    "validation_loss",
]


def _batches(rows: Any, collate: Callable, batch_size: int, limit: int | None = None) -> list[dict[str, torch.Tensor]]:
    n = len(rows) if limit is None else min(len(rows), limit)
    return [collate([rows[i] for i in range(s, min(s + batch_size, n))]) for s in range(0, n, batch_size)]


@torch.no_grad()
def validation_loss(model: torch.nn.Module, batches: Sequence[dict[str, torch.Tensor]]) -> float:
    """Token-weighted mean next-token cross-entropy over the labelled tokens of `batches` (eval mode)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0.0
    try:
        device = next(model.parameters()).device
        for batch in batches:
            ids = batch["input_ids"].to(device)
            labels = batch.get("labels", batch["input_ids"]).to(device)
            mask = batch.get("attention_mask")
            logits = model(input_ids=ids, attention_mask=None if mask is None else mask.to(device)).logits
            total += float(answer_cross_entropy(logits, labels, reduction="sum"))
            count += float((labels[:, 1:] != -100).sum())
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("validation_loss: the validation batches have no labelled tokens")
    return total / count


def head_statistics(
    model: torch.nn.Module, batches: Sequence[dict[str, torch.Tensor]], which: Sequence[str]
) -> dict[str, torch.Tensor | None]:
    """Importance (Michel) and attention entropy per head, for the controller's state."""
    return {
        "importance": head_importance(model, batches) if "importance" in which else None,
        "entropy": attention_entropy(model, batches) if "entropy" in which else None,
    }


class FeedbackCallback(ContinualPlugin):
    """Every `eval_every` steps: loss -> reward -> controller update -> new gates (see the module docstring).

    `FeedbackCallback(config, controller=...)` with a built `GateController`, or `FeedbackCallback(config,
    controller_config, model=model)` to build the controller sized by the model's gates (fixed gates are attached
    to a model that has none, as the registry does for the plugin `gate_feedback`).

    `eval_dataset` holds tokenized rows (input_ids/attention_mask/labels); its first `eval_size` rows are the
    fixed validation subset. Inside `ContinualTrainer.train_sequence` it may be None: each task's own tokenized
    eval split (`TaskContext.eval_dataset`) is then used, and the reward baseline and the Pareto front restart at
    each task (losses of different tasks do not compare; `controller.log` keeps the whole history).

    Each feedback round is logged through `Trainer.log` (`gate_loss`, `gate_reward`, `gate_active_fraction`,
    `gate_pareto_points`, `gate_values`), so every reporting integration receives it. Inside a task sequence the
    trainer is known from `on_task_begin`; with a plain `Trainer`, call `bind(trainer)` once it is built.
    """

    name = "gate_feedback"
    options = GATE_FEEDBACK_OPTIONS
    needs_model = True

    @classmethod
    def from_config(cls, config: Any, model: torch.nn.Module | None = None) -> FeedbackCallback:
        """The loop and its controller from the `gate_*` options; the controller is seeded by the run's `seed`
        (as before the options moved here) and sized by `model`'s gates."""
        owner = type(config).__name__
        seed = {"seed": config.seed} if hasattr(config, "seed") else {}
        return cls(
            build_config(FEEDBACK_SOURCE, config, owner=owner),
            build_config(GATE_CONTROLLER_SOURCE, config, owner=owner, **seed),
            build_config(GATE_SOURCE, config, owner=owner),
            model=model,
        )

    def __init__(
        self,
        config: FeedbackConfig | None = None,
        controller_config: GateControllerConfig | None = None,
        gate: GateConfig | None = None,
        *,
        controller: GateController | None = None,
        model: torch.nn.Module | None = None,
        eval_dataset: Any = None,
        data_collator: Callable | None = None,
        **overrides: Any,
    ) -> None:
        if isinstance(config, GateController):
            raise TypeError("FeedbackCallback: the controller is a keyword argument: FeedbackCallback(controller=...)")
        self.config = with_overrides(config, FeedbackConfig, overrides, type(self).__name__)
        self.gate = gate if gate is not None else GateConfig()
        if self.gate.mode not in (None, "fixed"):
            raise OptionError(
                type(self.gate).__name__,
                "mode",
                self.gate.mode,
                "gate_feedback sets fixed gates: 'fixed', or None (the plugin attaches them)",
            )
        if controller is None:
            if model is None:
                raise ValueError(
                    "FeedbackCallback: give controller= (a GateController) or model= (its gates size the controller)"
                )
            gated = gate_model(model, mode="fixed")  # the existing gates when attached already
            controller = GateController(gated.num_layers, gated.num_heads, controller_config)
        elif controller_config is not None:
            raise TypeError("FeedbackCallback: give controller= or controller_config, not both")
        self.controller = controller
        self.eval_dataset = eval_dataset
        self._per_task_eval = eval_dataset is None  # no fixed subset given: use each task's eval split
        self.data_collator = data_collator
        self.gated: GatedModel | None = None
        self.model: torch.nn.Module | None = None
        self.trainer: Any = None
        self._eval_batches: list[dict[str, torch.Tensor]] | None = None
        self._warned_unbound = False

    def bind(self, trainer: Any) -> FeedbackCallback:
        """The trainer whose `log` reports the feedback rounds (set by `on_task_begin` in a task sequence)."""
        self.trainer = trainer
        return self

    # ------------------------------------------------------------------ setup
    def _collator(self) -> Callable:
        if self.data_collator is None:
            raise ValueError("FeedbackCallback.data_collator is required with an eval_dataset (e.g. CausalLMCollator)")
        return self.data_collator

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, **kw):
        if model is None:
            raise ValueError("FeedbackCallback needs the trainer's model")
        gated = find_gates(model)
        if gated.mode != "fixed":
            raise ValueError(f"FeedbackCallback needs fixed gates (the controller sets them), got mode={gated.mode!r}")
        if (gated.num_layers, gated.num_heads) != (self.controller.num_layers, self.controller.num_heads):
            raise ValueError(
                f"FeedbackCallback: controller of shape {(self.controller.num_layers, self.controller.num_heads)}"
                f" is not allowed for a model with {(gated.num_layers, gated.num_heads)} heads"
            )
        if self.config.mode == "periodic" and self.eval_dataset is None:
            raise ValueError("FeedbackCallback.eval_dataset is required in periodic mode (or use it in train_sequence)")
        self.gated, self.model = gated, model
        gated.set_gates(self.controller.gates)
        if self.config.mode == "periodic" and self.controller.tracker.previous_loss is None:
            self.controller.feedback(validation_loss(model, self.eval_batches()), step=state.global_step)
            self._act(state)

    def eval_batches(self) -> list[dict[str, torch.Tensor]]:
        if self._eval_batches is None:
            self._eval_batches = _batches(
                self.eval_dataset, self._collator(), self.config.eval_batch_size, self.config.eval_size
            )
        return self._eval_batches

    def on_task_begin(self, trainer: Any, context: TaskContext) -> None:
        self.bind(trainer)
        if self.data_collator is None:
            self.data_collator = context.collator
        if self._per_task_eval:
            if context.eval_dataset is None and self.config.mode == "periodic":
                raise ValueError(
                    f"FeedbackCallback: task {context.task.name!r} has no eval split: periodic feedback scores one "
                    "(give the task an eval split, or use gate_feedback_mode='continuous')"
                )
            self.eval_dataset = context.eval_dataset  # already tokenized by the trainer
            self._eval_batches = None
        # a new task: its losses are not comparable to the last task's (reward baseline and Pareto front restart)
        self.controller.tracker.previous_loss = None
        self.controller.pending = None
        self.controller.archive = ParetoArchive(self.controller.n)

    # ------------------------------------------------------------------ the loop
    def _act(self, state: TrainerState) -> None:
        stats: dict[str, torch.Tensor | None] = {"importance": None, "entropy": None}
        if self.config.statistics and self.config.mode == "periodic":
            stats = head_statistics(
                self.model, self.eval_batches()[: self.config.stats_batches], self.config.statistics
            )
        gates = self.controller.act(stats["importance"], stats["entropy"])
        self.gated.set_gates(gates)

    def _feedback(self, loss: float, state: TrainerState) -> None:
        reward = self.controller.feedback(loss, step=state.global_step)
        self._act(state)
        record: dict[str, Any] = {
            "gate_loss": loss,
            "gate_reward": reward,
            "gate_active_fraction": float(self.controller.gates.mean()),
            "gate_pareto_points": len(self.controller.archive),
        }
        if self.config.log_gates:
            record["gate_values"] = self.controller.gates.reshape(-1).int().tolist()
        self._log(record)

    def _log(self, record: dict[str, Any]) -> None:
        """Through `Trainer.log` (the step is added there), so W&B / TensorBoard / ... receive it."""
        if self.trainer is not None:
            self.trainer.log(record)
        elif not self._warned_unbound:
            self._warned_unbound = True
            warnings.warn(
                "FeedbackCallback is not bound to a trainer: its rounds are kept in controller.log only "
                "(call feedback.bind(trainer) to log them)",
                stacklevel=2,
            )

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw):
        if self.config.mode == "periodic" and state.global_step % self.config.eval_every == 0:
            self._feedback(validation_loss(self.model, self.eval_batches()), state)

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs=None, **kw):
        if self.config.mode != "continuous" or not logs or "loss" not in logs:
            return
        if self.controller.tracker.previous_loss is None:  # the first running loss is the baseline
            self.controller.feedback(float(logs["loss"]), step=state.global_step)
            self._act(state)
        elif state.global_step - self.controller.log[-1]["step"] >= self.config.eval_every:
            self._feedback(float(logs["loss"]), state)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw):
        if self.config.preference is not None and len(self.controller.archive) and self.gated is not None:
            self.gated.set_gates(self.controller.pick(self.config.preference))

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"controller": self.controller.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.controller.load_state_dict(state["controller"])
        if self.gated is not None:
            self.gated.set_gates(self.controller.gates)


class OnlineGateAdapter:
    """Inference-time adaptation: rewards from outside (user feedback) drive the controller; no LM backward.

    Each `feedback(reward)` scores the gates used since the previous call with
    `tanh(reward + efficiency_factor * pruned_fraction)` (smoothed like training rewards), lets the controller
    learn, and applies its next gates. Head statistics, if given, are forward-only (e.g. `attention_entropy`).
    """

    def __init__(self, model: torch.nn.Module, controller: GateController) -> None:
        self.model = model
        self.gated = find_gates(model)
        if self.gated.mode != "fixed":
            raise ValueError(f"OnlineGateAdapter needs fixed gates, got mode={self.gated.mode!r}")
        self.controller = controller
        if self.controller.pending is None:
            self.gated.set_gates(self.controller.act())
        else:
            self.gated.set_gates(self.controller.gates)

    def feedback(self, reward: float, entropy: torch.Tensor | None = None) -> torch.Tensor:
        """Reward the current gates; returns the gates to use next."""
        if not math.isfinite(reward):
            raise ValueError(f"OnlineGateAdapter.feedback: reward={reward!r} is not allowed: a finite number")
        pruned = 1.0 - float(self.controller.gates.mean())
        shaped = math.tanh(reward + self.controller.config.efficiency_factor * pruned)
        self.controller.observe(self.controller.tracker.smooth(shaped))
        gates = self.controller.act(entropy=entropy)
        self.gated.set_gates(gates)
        return gates

    @torch.no_grad()
    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return self.model.generate(*args, **kwargs)
