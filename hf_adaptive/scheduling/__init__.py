"""Training control: adaptive LR / momentum / dither laws, selective freezing, per-task early stopping, and their
Trainer callbacks. Names are imported on first access (`import hf_adaptive.scheduling.config` stays light)."""

from __future__ import annotations

from ..utils.lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "ADAPTIVE_SCHEDULER_OPTIONS": "config",
    "EARLY_STOPPING_OPTIONS": "config",
    "FREEZING_OPTIONS": "config",
    "AdaptiveSchedulerCallbackConfig": "config",
    "AdaptiveSchedulerConfig": "config",
    "EarlyStoppingConfig": "config",
    "FreezingConfig": "config",
    "AdaptiveScheduler": "adaptive_scheduler",
    "SchedulerSnapshot": "adaptive_scheduler",
    "Freezer": "freezing",
    "AdaptiveSchedulerCallback": "callback",
    "SelectiveFreezingCallback": "callback",
    "AdapterEarlyStoppingCallback": "early_stopping",
    "validation_loss": "early_stopping",
    "validation_task": "early_stopping",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
