"""Options of the training-control plugins (light: dataclasses only, no torch).

* `AdaptiveSchedulerConfig`: the gains of the adaptive LR / momentum / dither laws (`adaptive_*` options);
* `AdaptiveSchedulerCallbackConfig`: what the scheduler callback reads from the Trainer's logs (`adaptive_*`);
* `FreezingConfig`: selective freezing (`freeze_*`);
* `EarlyStoppingConfig`: per-task early stopping (`early_stopping_*`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..utils.options import OptionSource
from ..utils.validation import check_bool, check_choice, check_number, check_str, fail

GRANULARITIES = ("parameter", "module", "layer")
THRESHOLD_MODES = ("absolute", "relative", "change", "percentile")
ANNEAL_MODES = ("none", "cosine", "linear")
EARLY_STOPPING_METRICS = ("accuracy", "loss")


def _check_bounds(owner: str, name: str, value: Any, low: float, high: float) -> tuple[float, float]:
    """A `(min, max)` pair of finite numbers in `[low, high]` with `min <= max`, returned as a tuple."""
    if isinstance(value, (str, bytes)) or not isinstance(value, (tuple, list)) or len(value) != 2:
        fail(owner, name, value, "must be a pair (min, max)")
    lo, hi = value
    for v in (lo, hi):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < low or v > high:
            fail(owner, name, value, f"both ends must be numbers in [{low}, {high}]")
    if lo > hi:
        fail(owner, name, value, "min must be <= max")
    return (lo, hi)


@dataclass
class AdaptiveSchedulerConfig:
    """Gains of the adaptive laws. Defaults follow the design note: mild u=1.02 / d=0.8, small dither off."""

    lr_up: float = field(default=1.02, metadata={"help": "LR multiplier u > 1 on improvement (before damping)."})
    lr_down: float = field(
        default=0.8, metadata={"help": "LR multiplier d in (0, 1) after `patience` non-improvements."}
    )
    lr_bounds: tuple[float, ...] = field(default=(1e-7, 1.0), metadata={"help": "Hard (min, max) of the LR."})
    variance_damping: float = field(
        default=10.0, metadata={"help": "lambda: an improvement multiplies the LR by 1 + (u-1)/(1 + lambda v)."}
    )
    window: int = field(default=10, metadata={"help": "Recent losses whose normalized variance is v."})
    ema_beta: float = field(default=0.9, metadata={"help": "EMA factor of the loss used to judge trends."})
    threshold: float = field(default=1e-3, metadata={"help": "Relative change of the loss EMA that counts."})
    noise_margin: float = field(
        default=1.0, metadata={"help": "An improvement must also exceed this many noise std's of the loss EMA."}
    )
    patience: int = field(default=5, metadata={"help": "Observations without improvement before the LR is cut."})
    cooldown: int = field(default=5, metadata={"help": "Observations after a cut (or NaN) without LR changes."})
    warmup: int = field(default=3, metadata={"help": "First observations that only fill the statistics."})
    nan_backoff: float = field(default=0.5, metadata={"help": "LR multiplier after a non-finite loss/gradient."})
    spike_ratio: float = field(
        default=3.0,
        metadata={
            "help": "A loss above spike_ratio x the loss EMA is a spike: the LR is cut at once by spike_backoff (no "
            "patience, warm-up included) and the spike is kept out of the EMA; 0 disables the rule."
        },
    )
    spike_backoff: float = field(default=0.5, metadata={"help": "LR multiplier on a loss spike, (0, 1]."})
    anneal: str = field(
        default="none",
        metadata={
            "help": "Decay applied on top of the law's LR over the run: 'none', 'cosine' (to 0 at the horizon, like "
            "lr_scheduler_type='cosine') or 'linear'. The law keeps adapting the LR it anneals.",
            "choices": list(ANNEAL_MODES),
        },
    )
    anneal_steps: int | None = field(
        default=None,
        metadata={
            "help": "Horizon of the anneal in observations (None: inside a Trainer, the training steps / "
            "logging_steps of each train() call; standalone, required when anneal is not 'none')."
        },
    )
    adapt_momentum: bool = field(default=True, metadata={"help": "Adapt SGD momentum / Adam beta1."})
    momentum_step: float = field(default=0.01, metadata={"help": "Additive change of the momentum per decision."})
    momentum_bounds: tuple[float, ...] = field(default=(0.5, 0.95), metadata={"help": "(min, max) momentum."})
    consistency: int = field(default=3, metadata={"help": "Improvements in a row that raise the momentum."})
    noise_threshold: float = field(
        default=0.05, metadata={"help": "Normalized loss variance v above which the run counts as noisy."}
    )
    dither: bool = field(default=False, metadata={"help": "Add exploration noise to the parameters after a step."})
    sigma: float = field(default=1e-3, metadata={"help": "Initial relative dither strength."})
    sigma_bounds: tuple[float, ...] = field(default=(1e-5, 1e-2), metadata={"help": "(min, max) of sigma."})
    sigma_up: float = field(default=1.5, metadata={"help": "Sigma multiplier on a plateau."})
    sigma_down: float = field(default=0.5, metadata={"help": "Sigma multiplier when unstable."})
    plateau_patience: int = field(default=5, metadata={"help": "Plateau observations in a row that raise sigma."})
    seed: int = field(default=0, metadata={"help": "Seed of the dither noise generator."})

    def __post_init__(self) -> None:
        c = type(self).__name__
        check_number(c, "lr_up", self.lr_up, 1.0)
        check_number(c, "lr_down", self.lr_down, 0.0, 1.0, low_open=True)
        self.lr_bounds = _check_bounds(c, "lr_bounds", self.lr_bounds, 0.0, math.inf)
        if self.lr_bounds[0] <= 0:
            fail(c, "lr_bounds", self.lr_bounds, "the minimum LR must be > 0")
        check_number(c, "variance_damping", self.variance_damping, 0.0)
        check_number(c, "window", self.window, 2, integer=True)
        check_number(c, "ema_beta", self.ema_beta, 0.0, 1.0, high_open=True)
        check_number(c, "threshold", self.threshold, 0.0)
        check_number(c, "noise_margin", self.noise_margin, 0.0)
        check_number(c, "patience", self.patience, 0, integer=True)
        check_number(c, "cooldown", self.cooldown, 0, integer=True)
        check_number(c, "warmup", self.warmup, 0, integer=True)
        check_number(c, "nan_backoff", self.nan_backoff, 0.0, 1.0, low_open=True)
        check_number(c, "spike_ratio", self.spike_ratio, 0.0)
        if 0 < self.spike_ratio <= 1:
            fail(c, "spike_ratio", self.spike_ratio, "must be 0 (off) or > 1 (a spike is above the loss EMA)")
        check_number(c, "spike_backoff", self.spike_backoff, 0.0, 1.0, low_open=True)
        check_choice(c, "anneal", self.anneal, ANNEAL_MODES)
        check_number(c, "anneal_steps", self.anneal_steps, 1, integer=True, optional=True)
        check_bool(c, "adapt_momentum", self.adapt_momentum)
        check_number(c, "momentum_step", self.momentum_step, 0.0, 1.0)
        self.momentum_bounds = _check_bounds(c, "momentum_bounds", self.momentum_bounds, 0.0, 0.9999)
        check_number(c, "consistency", self.consistency, 1, integer=True)
        check_number(c, "noise_threshold", self.noise_threshold, 0.0)
        check_bool(c, "dither", self.dither)
        check_number(c, "sigma", self.sigma, 0.0)
        self.sigma_bounds = _check_bounds(c, "sigma_bounds", self.sigma_bounds, 0.0, 1.0)
        check_number(c, "sigma_up", self.sigma_up, 1.0)
        check_number(c, "sigma_down", self.sigma_down, 0.0, 1.0, low_open=True)
        check_number(c, "plateau_patience", self.plateau_patience, 1, integer=True)
        check_number(c, "seed", self.seed, integer=True)


@dataclass
class AdaptiveSchedulerCallbackConfig:
    """What `AdaptiveSchedulerCallback` reads from the Trainer's logs besides the training loss."""

    reward_key: str | None = field(
        default=None,
        metadata={"help": "Adaptive scheduler: a logged metric also fed to the laws as a reward (None: loss only)."},
    )

    def __post_init__(self) -> None:
        check_str(type(self).__name__, "reward_key", self.reward_key, optional=True)


@dataclass
class FreezingConfig:
    """When a unit freezes and how often frozen units are probed."""

    threshold: float = field(default=1e-3, metadata={"help": "Gradient-norm EMA below which a unit freezes."})
    threshold_mode: str = field(
        default="absolute",
        metadata={
            "help": "'absolute' (EMA < threshold), 'relative' (EMA < threshold * mean EMA of the active units) or "
            "'change' (the EMA moved by less than threshold, relative, over the last change_window steps) or "
            "'percentile' (AutoFreeze's rule: at each change_window reading, a unit whose relative change is at or "
            "below the given percentile of the active units' changes; threshold is not used).",
            "choices": list(THRESHOLD_MODES),
        },
    )
    granularity: str = field(
        default="parameter",
        metadata={
            "help": "'parameter', 'module' (a module's own params) or 'layer' (one unit per decoder layer; only a "
            "prefix of layers freezes, and the backward pass stops above it).",
            "choices": list(GRANULARITIES),
        },
    )
    ema_beta: float = field(default=0.9, metadata={"help": "EMA factor of the gradient norms, [0, 1)."})
    warmup_steps: int = field(default=10, metadata={"help": "Steps before anything may freeze."})
    change_window: int = field(
        default=10, metadata={"help": "Steps between the EMA readings that threshold_mode='change' compares (>= 1)."}
    )
    percentile: float = field(
        default=50.0,
        metadata={
            "help": "threshold_mode='percentile': the percentile (0-100) of the active units' EMA changes at or below "
            "which a unit counts as converged (AutoFreeze: the median)."
        },
    )
    probe_every: int = field(default=20, metadata={"help": "Steps between probes of the frozen units; 0 never probes."})
    max_frozen_fraction: float = field(
        default=0.9, metadata={"help": "Most of the parameters (by count) frozen at once, in [0, 1)."}
    )
    drop_optimizer_state: bool = field(
        default=True,
        metadata={
            "help": "Free the optimizer state (e.g. Adam moments) of a unit when it freezes; a thawed unit starts "
            "afresh."
        },
    )

    def __post_init__(self) -> None:
        c = type(self).__name__
        check_number(c, "threshold", self.threshold, 0.0)
        check_choice(c, "threshold_mode", self.threshold_mode, THRESHOLD_MODES)
        check_choice(c, "granularity", self.granularity, GRANULARITIES)
        check_number(c, "ema_beta", self.ema_beta, 0.0, 1.0, high_open=True)
        check_number(c, "warmup_steps", self.warmup_steps, 0, integer=True)
        check_number(c, "change_window", self.change_window, 1, integer=True)
        check_number(c, "percentile", self.percentile, 0.0, 100.0)
        check_number(c, "probe_every", self.probe_every, 0, integer=True)
        check_number(c, "max_frozen_fraction", self.max_frozen_fraction, 0.0, 1.0, high_open=True)
        check_bool(c, "drop_optimizer_state", self.drop_optimizer_state)


@dataclass
class EarlyStoppingConfig:
    """When a task's training stops on its validation metric, and what is scored."""

    metric: str = field(
        default="accuracy",
        metadata={"help": "'accuracy' (maximized) or 'loss' (minimized).", "choices": list(EARLY_STOPPING_METRICS)},
    )
    patience: int = field(
        default=3,
        metadata={
            "help": "Early stopping: epochs without improvement before a task stops (an integer >= 1). It acts "
            "only with the 'early_stopping' plugin: to train every epoch, leave the plugin out."
        },
    )
    min_epochs: int = field(default=1, metadata={"help": "Epochs always run before stopping."})
    min_delta: float = field(default=0.001, metadata={"help": "Smallest change that counts."})
    restore_best: bool = field(
        default=True, metadata={"help": "Early stopping: restore the best epoch's weights when a task ends."}
    )
    eval_batch_size: int | None = field(
        default=None,
        metadata={"help": "Batch size of the validation scoring (None: the Trainer's `continual_eval_batch_size`)."},
    )
    eval_limit: int | None = field(
        default=None,
        metadata={"help": "Rows of the validation split scored (None: the Trainer's `continual_eval_limit`)."},
    )

    def __post_init__(self) -> None:
        c = type(self).__name__
        check_choice(c, "metric", self.metric, EARLY_STOPPING_METRICS)
        if self.patience is None:
            fail(c, "patience", None, "an integer >= 1 (to train every epoch, leave the 'early_stopping' plugin out)")
        check_number(c, "patience", self.patience, 1, integer=True)
        check_number(c, "min_epochs", self.min_epochs, 0, integer=True)
        check_number(c, "min_delta", self.min_delta, 0.0)
        check_bool(c, "restore_best", self.restore_best)
        check_number(c, "eval_batch_size", self.eval_batch_size, 1, integer=True, optional=True)
        check_number(c, "eval_limit", self.eval_limit, 1, integer=True, optional=True)


#: `seed` is not an option: the callback takes the run's `TrainingArguments.seed` (as before the redesign)
ADAPTIVE_SCHEDULER_OPTIONS = (
    OptionSource(AdaptiveSchedulerConfig, "adaptive_", exclude=("seed",)),
    OptionSource(AdaptiveSchedulerCallbackConfig, "adaptive_"),
)
FREEZING_OPTIONS = (OptionSource(FreezingConfig, "freeze_"),)
#: `eval_batch_size` / `eval_limit` are not options of their own: left None, they follow the evaluation options
#: `continual_eval_batch_size` / `continual_eval_limit` of the Trainer's arguments (read when scoring)
EARLY_STOPPING_OPTIONS = (
    OptionSource(EarlyStoppingConfig, "early_stopping_", exclude=("eval_batch_size", "eval_limit")),
)

__all__ = [
    "ADAPTIVE_SCHEDULER_OPTIONS",
    "ANNEAL_MODES",
    "EARLY_STOPPING_METRICS",
    "EARLY_STOPPING_OPTIONS",
    "FREEZING_OPTIONS",
    "GRANULARITIES",
    "THRESHOLD_MODES",
    "AdaptiveSchedulerCallbackConfig",
    "AdaptiveSchedulerConfig",
    "EarlyStoppingConfig",
    "FreezingConfig",
]
