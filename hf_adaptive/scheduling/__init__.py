"""Adaptive control of training: LR / momentum / dither laws, selective freezing, and their Trainer callbacks."""

from .adaptive_scheduler import AdaptiveScheduler, AdaptiveSchedulerConfig, SchedulerSnapshot
from .callback import AdaptiveSchedulerCallback
from .freezing import Freezer, FreezingConfig, SelectiveFreezingCallback

__all__ = [
    "AdaptiveScheduler",
    "AdaptiveSchedulerCallback",
    "AdaptiveSchedulerConfig",
    "Freezer",
    "FreezingConfig",
    "SchedulerSnapshot",
    "SelectiveFreezingCallback",
]
