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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import TrainerControl, TrainerState, TrainingArguments

from ..models.gated import GatedModel, attention_entropy, find_gates, head_importance
from ..plugins import ContinualPlugin
from .gate_controller import GateController, GateControllerConfig
from .pareto import ParetoArchive

MODES = ("periodic", "continuous")
STATISTICS = ("importance", "entropy")


@dataclass
class FeedbackConfig:
    """How often and on what `FeedbackCallback` measures the model."""

    eval_every: int = 50
    mode: str = "periodic"
    eval_size: int = 64
    eval_batch_size: int = 16
    statistics: tuple[str, ...] = ("importance", "entropy")
    stats_batches: int = 1
    preference: float | None = None  # at train end, apply the Pareto point picked with this preference
    log_gates: bool = True

    def __post_init__(self) -> None:
        def bad(field: str, allowed: str) -> ValueError:
            return ValueError(f"FeedbackConfig.{field}={getattr(self, field)!r} is not allowed: {allowed}")

        if int(self.eval_every) < 1:
            raise bad("eval_every", "an integer >= 1")
        if self.mode not in MODES:
            raise bad("mode", f"one of {MODES}")
        for name in ("eval_size", "eval_batch_size", "stats_batches"):
            if int(getattr(self, name)) < 1:
                raise bad(name, "an integer >= 1")
        self.statistics = tuple(self.statistics)
        if not set(self.statistics) <= set(STATISTICS):
            raise bad("statistics", f"a subset of {STATISTICS}")
        if self.preference is not None and not (self.preference >= 0 and math.isfinite(self.preference)):
            raise bad("preference", "None or a finite number >= 0")


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
            targets = labels[:, 1:]
            valid = targets != -100
            ce = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().transpose(1, 2), targets.clamp_min(0), reduction="none"
            )
            total += float((ce * valid).sum())
            count += float(valid.sum())
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

    `eval_dataset` holds tokenized rows (input_ids/attention_mask/labels); its first `eval_size` rows are the
    fixed validation subset. Inside `ContinualTrainer.train_sequence` it may be None: each task's own eval split
    is then used, and the reward baseline and the Pareto front restart at each task (losses of different tasks
    do not compare; `controller.log` keeps the whole history).
    """

    name = "gate_feedback"

    @classmethod
    def from_config(cls, args: Any, model: Any = None) -> FeedbackCallback:
        """Controller and feedback loop from the `gate_*` fields of a `ContinualConfig`, sized by `model`'s gates."""
        if model is None:
            raise ValueError("FeedbackCallback.from_config: model=None is not allowed: the gates size the policy")
        gated = find_gates(model)
        controller = GateController(
            gated.num_layers,
            gated.num_heads,
            GateControllerConfig(
                algorithm=args.gate_algorithm,
                min_active_fraction=args.gate_min_active_fraction,
                max_active_fraction=args.gate_max_active_fraction,
                efficiency_factor=args.gate_efficiency_factor,
                seed=args.seed,
            ),
        )
        config = FeedbackConfig(
            eval_every=args.gate_feedback_every,
            mode=args.gate_feedback_mode,
            eval_size=args.gate_eval_size,
            eval_batch_size=args.gate_eval_batch_size,
            statistics=tuple(args.gate_statistics),
            stats_batches=args.gate_stats_batches,
            preference=args.gate_preference,
            log_gates=args.gate_log_gates,
        )
        return cls(controller, config=config)

    def __init__(
        self,
        controller: GateController,
        eval_dataset: Any = None,
        data_collator: Callable | None = None,
        config: FeedbackConfig | None = None,
    ) -> None:
        self.controller = controller
        self.eval_dataset = eval_dataset
        self._per_task_eval = eval_dataset is None  # no fixed subset given: use each task's eval split
        self.data_collator = data_collator
        self.config = config or FeedbackConfig()
        self.gated: GatedModel | None = None
        self.model: torch.nn.Module | None = None
        self._eval_batches: list[dict[str, torch.Tensor]] | None = None
        self._last_train_loss: float | None = None

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

    def on_task_begin(self, trainer, task, task_index: int) -> None:
        from ..tasks import CausalLMCollator, tokenize_task

        if self.data_collator is None:
            self.data_collator = CausalLMCollator(trainer.processing_class)
        if self._per_task_eval:
            self.eval_dataset = tokenize_task(task, trainer.processing_class, "eval")
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
            "step": state.global_step,
            "gate_loss": loss,
            "gate_reward": reward,
            "gate_active_fraction": float(self.controller.gates.mean()),
            "gate_pareto_points": len(self.controller.archive),
        }
        if self.config.log_gates:
            record["gate_values"] = self.controller.gates.reshape(-1).int().tolist()
        state.log_history.append(record)

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
