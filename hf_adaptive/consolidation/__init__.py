"""Consolidation: what keeps earlier tasks from being forgotten, and when to stop training a task.

* `fisher`: the exact diagonal Fisher (vectorized per-sample gradients, a loop reference, a cheap approximation);
* `ewc`: `EWCPlugin`, separate or online EWC with optional gamma gating;
* `neuromodulation`: `GammaGain`, the training-signal gain of gamma-gated EWC;
* `early_stopping`: `AdapterEarlyStoppingCallback`, per-task early stopping on the task's validation split.
"""

from .early_stopping import AdapterEarlyStoppingCallback, validation_loss
from .ewc import EWC_MODES, EWCPlugin
from .fisher import (
    FisherResult,
    compute_fisher,
    fisher_norm,
    minibatch_fisher,
    sample_true_labels,
    trainable_parameters,
)
from .neuromodulation import GammaGain, NeuromodulationConfig, answer_token_signals

__all__ = [
    "EWC_MODES",
    "AdapterEarlyStoppingCallback",
    "EWCPlugin",
    "FisherResult",
    "GammaGain",
    "NeuromodulationConfig",
    "answer_token_signals",
    "compute_fisher",
    "fisher_norm",
    "minibatch_fisher",
    "sample_true_labels",
    "trainable_parameters",
    "validation_loss",
]
