"""The training-control callbacks: the adaptive scheduler and selective freezing inside a `transformers.Trainer`.

`AdaptiveSchedulerCallback` — the Trainer owns the optimizer step, so the scheduler's pieces run at its hooks:

* `on_pre_optimizer_step`: non-finite gradients (a NaN/inf loss) are dropped, so `optimizer.step()` changes nothing.
  Inside a `ContinualTrainer` its always-on guard has already decided (and skipped, counted and logged the step, and
  applies `nonfinite_patience`): the callback takes that decision instead of its own, so a skip is counted once;
* `on_optimizer_step`: exploration dither (when enabled);
* `on_log`: each logged training loss (every `logging_steps`) is one observation of the adaptive laws; a skipped
  step since the last log counts as a non-finite observation (LR backed off).

The learning rate goes through the Trainer's own (constant) LR scheduler, by its public API: the callback re-bases
the schedule at the adaptive LR (`base_lrs`) and steps it after each decision, so the scheduler itself writes the
optimizer's LR and its `get_last_lr()` — what the Trainer logs as `learning_rate` — is the LR really in force (the
scheduler's `last_epoch` then counts the decisions too, which a constant schedule ignores). Momentum is written
into the optimizer's param groups. Decisions (`adaptive_lr`, `adaptive_momentum`, `adaptive_sigma`) are logged with
`trainer.log` when the callback knows its trainer (`trainer=`, or the `ContinualTrainer` of a task sequence), so
every reporting integration and `state.log_history` receive them; without one they are added to the `logs` dict of
the training log, seen by the callbacks after this one.

Each `train()` call builds a fresh scheduler on the optimizer the Trainer created (in a task sequence every task
starts from the configured LR, and an anneal spans that call's logged steps); a state loaded with `load_state_dict`
(a resumed checkpoint) is applied on top.
Set `logging_steps=1` for per-step control. The callback owns the learning rate, so the Trainer's schedule must be
`lr_scheduler_type="constant"`; both are checked in `on_train_begin`, like `EarlyStoppingCallback` does.

`SelectiveFreezingCallback` runs a `Freezer` (updated before each optimizer step, released at the end of training)
and logs `frozen_fraction` the same way.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from ..plugins import NONFINITE_SKIP_ATTR, ContinualPlugin, TaskContext
from ..utils.options import build_config
from .adaptive_scheduler import AdaptiveScheduler
from .config import (
    ADAPTIVE_SCHEDULER_OPTIONS,
    FREEZING_OPTIONS,
    AdaptiveSchedulerCallbackConfig,
    AdaptiveSchedulerConfig,
    FreezingConfig,
)
from .freezing import Freezer

#: set on the optimizer by `ContinualTrainer`'s non-finite guard before every optimizer step (True: skipped);


def _split_overrides(overrides: dict[str, Any], *config_classes: type, owner: str) -> list[dict[str, Any]]:
    """Keyword overrides routed to the config class that has the field; an unknown name is refused."""
    parts: list[dict[str, Any]] = [{} for _ in config_classes]
    for name, value in overrides.items():
        for part, cls in zip(parts, config_classes, strict=True):
            if name in {f.name for f in dataclasses.fields(cls) if f.init}:
                part[name] = value
                break
        else:
            known = sorted({f.name for cls in config_classes for f in dataclasses.fields(cls) if f.init})
            raise TypeError(f"{owner}() got an unexpected keyword argument {name!r}; options: {known}")
    return parts


class _LogsThroughTrainer:
    """Reports values through `trainer.log` when the trainer is known, else into the `logs` of the current log."""

    trainer: Any = None

    def on_task_begin(self, trainer: Any, context: TaskContext) -> None:
        self.trainer = trainer

    def _report(self, logs: dict[str, Any], values: dict[str, Any]) -> None:
        if self.trainer is not None:
            self.trainer.log(dict(values))
        else:
            logs.update(values)


class AdaptiveSchedulerCallback(_LogsThroughTrainer, ContinualPlugin):
    """Feedback control of LR / momentum / dither from the Trainer's logged training loss (and an optional reward).

    `AdaptiveSchedulerCallback(config, callback_config, trainer=None, **overrides)`: keyword overrides set fields of
    either config (`lr_up=...`, `reward_key=...`). `trainer`: the Trainer to log decisions through (a
    `ContinualTrainer` in a task sequence binds itself).
    """

    name = "adaptive_scheduler"
    options = ADAPTIVE_SCHEDULER_OPTIONS

    @classmethod
    def from_config(cls, config: Any, model: torch.nn.Module | None = None) -> AdaptiveSchedulerCallback:
        """From the `adaptive_*` options; the dither seed is the run's `seed` (TrainingArguments)."""
        owner = type(config).__name__
        scheduler_source, callback_source = cls.options
        seed = getattr(config, "seed", None)
        fixed = {"seed": seed} if seed is not None else {}
        return cls(
            build_config(scheduler_source, config, owner=owner, **fixed),
            build_config(callback_source, config, owner=owner),
        )

    def __init__(
        self,
        config: AdaptiveSchedulerConfig | None = None,
        callback_config: AdaptiveSchedulerCallbackConfig | None = None,
        *,
        trainer: Any = None,
        **overrides: Any,
    ) -> None:
        own, callback_own = _split_overrides(
            overrides, AdaptiveSchedulerConfig, AdaptiveSchedulerCallbackConfig, owner=type(self).__name__
        )
        self.config = dataclasses.replace(config or AdaptiveSchedulerConfig(), **own)
        self.callback_config = dataclasses.replace(callback_config or AdaptiveSchedulerCallbackConfig(), **callback_own)
        self.trainer = trainer
        self.scheduler: AdaptiveScheduler | None = None
        self.history: list[dict[str, Any]] = []
        self._pending: dict[str, Any] | None = None
        self._skipped_since_log = False
        self._skipped_this_step = False
        self._trainer_guards = False

    @property
    def reward_key(self) -> str | None:
        return self.callback_config.reward_key

    def on_train_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        if str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)) != "constant":
            raise ValueError(
                f"TrainingArguments.lr_scheduler_type={str(args.lr_scheduler_type)!r} is not allowed with "
                "AdaptiveSchedulerCallback: use 'constant' (the callback owns the learning rate)"
            )
        if str(getattr(args.logging_strategy, "value", args.logging_strategy)) != "steps":
            raise ValueError(
                f"TrainingArguments.logging_strategy={str(args.logging_strategy)!r} is not allowed with "
                "AdaptiveSchedulerCallback: use 'steps' (each logged training loss is one observation)"
            )
        if optimizer is None:
            raise ValueError("AdaptiveSchedulerCallback.optimizer=None is not allowed: the Trainer must pass one")
        if self.scheduler is None or self.scheduler.optimizer is not optimizer:
            self.scheduler = AdaptiveScheduler(optimizer, self.config, horizon=self._horizon(args, state))
        if self._pending is not None:
            self.scheduler.load_state_dict(self._pending)
            self._pending = None
        self._follow(lr_scheduler, step=False)

    @staticmethod
    def _horizon(args: Any, state: Any) -> int:
        """Observations in this `train()` call (one per logged training loss): the anneal's default horizon."""
        every = getattr(state, "logging_steps", None) or args.logging_steps
        if isinstance(every, float) and every < 1:  # a fraction of the run, as transformers reads it
            every = math.ceil(state.max_steps * every)
        return max(1, int(state.max_steps) // max(1, int(every)))

    def _follow(self, lr_scheduler: Any, step: bool) -> None:
        """Re-base the Trainer's constant schedule at the adaptive LRs now in the optimizer (public `base_lrs`), so
        its own steps keep them; `step`: step it now, so its `get_last_lr()` reports them."""
        if not isinstance(lr_scheduler, torch.optim.lr_scheduler.LRScheduler):
            return

        def unwrapped(optimizer: Any) -> Any:
            # the optimizer the callbacks get may be accelerate's AcceleratedOptimizer around the torch optimizer the
            # schedule holds (transformers 5.0 with accelerate 1.4): compare the torch ones
            return getattr(optimizer, "optimizer", optimizer)

        if unwrapped(lr_scheduler.optimizer) is not unwrapped(self.scheduler.optimizer):
            return
        lr_scheduler.base_lrs = [float(g["lr"]) for g in self.scheduler.optimizer.param_groups]
        if step:
            lr_scheduler.step()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.scheduler is None:
            return
        decided = getattr(self.scheduler.optimizer, NONFINITE_SKIP_ATTR, None)
        self._trainer_guards = decided is not None
        if self._trainer_guards:  # the trainer's guard ran first (and already dropped the gradients)
            self._skipped_this_step = bool(decided)
        else:  # a plain Trainer: guard here
            self._skipped_this_step = not self.scheduler.guard_gradients()
        self._skipped_since_log |= self._skipped_this_step

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self.scheduler is not None and not self._skipped_this_step:
            self.scheduler.apply_dither()

    def on_step_end(self, args, state, control, lr_scheduler=None, **kwargs):
        if self.scheduler is not None:  # a schedule that is not a torch LRScheduler may have written its own LR
            self.scheduler.apply_gains()

    def on_log(self, args, state, control, logs=None, lr_scheduler=None, **kwargs):
        if self.scheduler is None or logs is None or "loss" not in logs:
            return
        reward = logs.get(self.reward_key) if self.reward_key else None
        snap = self.scheduler.observe(logs["loss"], reward=reward, skipped=self._skipped_since_log)
        self._follow(lr_scheduler, step=True)
        self._skipped_since_log = False
        extra = {"adaptive_lr": snap.lr, "adaptive_sigma": snap.sigma}
        if not self._trainer_guards:  # otherwise the trainer logs its own count, `nonfinite_steps_skipped`
            extra["skipped_steps"] = self.scheduler.num_skipped
        if snap.momentum is not None:
            extra["adaptive_momentum"] = snap.momentum
        self.history.append({"step": state.global_step, **snap.to_dict()})
        self._report(logs, extra)

    def state_dict(self) -> dict[str, Any]:
        if self.scheduler is None:
            return dict(self._pending or {})
        return self.scheduler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Applied now if running, and again in `on_train_begin` (a resumed Trainer rebuilds its optimizer first)."""
        if not state:
            return
        self._pending = state
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state)


class SelectiveFreezingCallback(_LogsThroughTrainer, ContinualPlugin):
    """Runs a `Freezer` inside a `Trainer`: updates before each optimizer step, logs `frozen_fraction`.

    `SelectiveFreezingCallback(config, trainer=None, **overrides)`: overrides set fields of `FreezingConfig`.
    """

    name = "selective_freezing"
    options = FREEZING_OPTIONS

    def __init__(self, config: FreezingConfig | None = None, *, trainer: Any = None, **overrides: Any) -> None:
        (own,) = _split_overrides(overrides, FreezingConfig, owner=type(self).__name__)
        self.config = dataclasses.replace(config or FreezingConfig(), **own)
        self.trainer = trainer
        self.freezer: Freezer | None = None
        self._pending: dict[str, Any] | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise ValueError("SelectiveFreezingCallback.model=None is not allowed: the Trainer must pass its model")
        if self.freezer is None or not self.freezer.manages(model):
            self.freezer = Freezer(model, self.config)
        if self._pending is not None:
            self.freezer.load_state_dict(self._pending)
            self._pending = None

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if self.freezer is not None:
            self.freezer.update(optimizer)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.freezer is None or logs is None or "loss" not in logs:
            return
        extra = {"frozen_fraction": self.freezer.frozen_fraction()}
        if self.freezer.config.granularity == "layer":
            extra["frozen_layers"] = self.freezer.frozen_layers()
        self._report(logs, extra)

    def on_train_end(self, args, state, control, **kwargs):
        if self.freezer is not None:
            self.freezer.release()

    def state_dict(self) -> dict[str, Any]:
        if self.freezer is None:
            return dict(self._pending or {})
        return self.freezer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Applied now if running, and again in `on_train_begin` (a resumed Trainer rebuilds its optimizer first)."""
        if not state:
            return
        self._pending = state
        if self.freezer is not None:
            self.freezer.load_state_dict(state)


__all__ = ["NONFINITE_SKIP_ATTR", "AdaptiveSchedulerCallback", "SelectiveFreezingCallback"]
