"""`AdaptiveSchedulerCallback`: the adaptive scheduler inside a `transformers.Trainer` (or `ContinualTrainer`).

The Trainer owns the optimizer step, so the scheduler's pieces run at its hooks:

* `on_pre_optimizer_step`: non-finite gradients (a NaN/inf loss) are dropped, so `optimizer.step()` changes nothing.
  Inside a `ContinualTrainer` its always-on guard has already decided (and skipped, counted and logged the step, and
  applies `nonfinite_patience`): the callback takes that decision instead of its own, so a skip is counted once;
* `on_optimizer_step`: exploration dither (when enabled);
* `on_step_end`: the adaptive LR/momentum are written back over what the Trainer's own LR scheduler just wrote;
* `on_log`: each logged training loss (every `logging_steps`) is one observation of the adaptive laws; a skipped
  step since the last log counts as a non-finite observation (LR backed off).

Each `train()` call builds a fresh scheduler on the optimizer the Trainer created (in a task sequence every task
starts from the configured LR); a state loaded with `load_state_dict` (a resumed checkpoint) is applied on top.
Set `logging_steps=1` for per-step control. The callback owns the learning rate, so the Trainer's schedule must be
`lr_scheduler_type="constant"`; both are checked in `on_train_begin`, like `EarlyStoppingCallback` does.
"""

from __future__ import annotations

from typing import Any

from ..plugins import ContinualPlugin
from ..trainer import NONFINITE_SKIP_ATTR as TRAINER_SKIP_ATTR
from .adaptive_scheduler import AdaptiveScheduler, AdaptiveSchedulerConfig


class AdaptiveSchedulerCallback(ContinualPlugin):
    """Feedback control of LR / momentum / dither from the Trainer's logged training loss (and an optional reward)."""

    name = "adaptive_scheduler"

    @classmethod
    def from_config(cls, args: Any, **overrides: Any) -> AdaptiveSchedulerCallback:
        """The callback described by the `adaptive_*` fields of a `ContinualConfig` (keyword overrides win)."""
        values = dict(
            lr_up=args.adaptive_lr_up,
            lr_down=args.adaptive_lr_down,
            patience=args.adaptive_patience,
            cooldown=args.adaptive_cooldown,
            dither=args.adaptive_dither,
            seed=args.seed,
        )
        reward_key = overrides.pop("reward_key", args.adaptive_reward_key)
        values.update(overrides)
        return cls(AdaptiveSchedulerConfig(**values), reward_key=reward_key)

    def __init__(self, config: AdaptiveSchedulerConfig | None = None, reward_key: str | None = None) -> None:
        self.config = config or AdaptiveSchedulerConfig()
        self.reward_key = reward_key
        self.scheduler: AdaptiveScheduler | None = None
        self.history: list[dict[str, Any]] = []
        self._pending: dict[str, Any] | None = None
        self._skipped_since_log = False
        self._skipped_this_step = False
        self._trainer_guards = False

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
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
            self.scheduler = AdaptiveScheduler(optimizer, self.config)
        if self._pending is not None:
            self.scheduler.load_state_dict(self._pending)
            self._pending = None

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.scheduler is None:
            return
        decided = getattr(self.scheduler.optimizer, TRAINER_SKIP_ATTR, None)
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
        if self.scheduler is not None:
            self.scheduler.apply_gains()
            self._sync_logged_lr(lr_scheduler)

    def _sync_logged_lr(self, lr_scheduler) -> None:
        """Make the Trainer's logged `learning_rate` (read from its scheduler's last LR) the one really in force."""
        if lr_scheduler is not None and hasattr(lr_scheduler, "_last_lr"):
            lr_scheduler._last_lr = [float(g["lr"]) for g in self.scheduler.optimizer.param_groups]

    def on_log(self, args, state, control, logs=None, lr_scheduler=None, **kwargs):
        if self.scheduler is None or logs is None or "loss" not in logs:
            return
        reward = logs.get(self.reward_key) if self.reward_key else None
        snap = self.scheduler.observe(logs["loss"], reward=reward, skipped=self._skipped_since_log)
        self._sync_logged_lr(lr_scheduler)
        self._skipped_since_log = False
        extra = {"adaptive_lr": snap.lr, "adaptive_sigma": snap.sigma}
        if not self._trainer_guards:  # otherwise the trainer logs its own count, `nonfinite_steps_skipped`
            extra["skipped_steps"] = self.scheduler.num_skipped
        if snap.momentum is not None:
            extra["adaptive_momentum"] = snap.momentum
        logs.update(extra)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)
        self.history.append({"step": state.global_step, **snap.to_dict()})

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
