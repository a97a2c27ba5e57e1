"""Consolidation: what keeps earlier tasks from being forgotten.

* `config`: `EWCConfig`, `NeuromodulationConfig` and `EWC_OPTIONS` (light: no torch);
* `fisher`: the exact diagonal Fisher (vectorized per-sample gradients, a loop reference, a cheap approximation);
* `ewc`: `EWCPlugin`, separate or online EWC with optional gamma gating;
* `neuromodulation`: `GammaGain`, the training-signal gain of gamma-gated EWC.

Names are imported on first access (PEP 562), so `import hf_adaptive.consolidation.config` stays light.
`AdapterEarlyStoppingCallback` and `validation_loss` now live in `hf_adaptive.scheduling.early_stopping`; they stay
reachable here for backward compatibility (that module is imported only when one of them is accessed).
"""

from __future__ import annotations

from ..utils.lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "EWC_MODES": "config",
    "EWC_OPTIONS": "config",
    "EWCConfig": "config",
    "NeuromodulationConfig": "config",
    "EWCPlugin": "ewc",
    "FisherResult": "fisher",
    "compute_fisher": "fisher",
    "fisher_norm": "fisher",
    "minibatch_fisher": "fisher",
    "sample_true_labels": "fisher",
    "trainable_parameters": "fisher",
    "GammaGain": "neuromodulation",
    "answer_token_signals": "neuromodulation",
    # backward compatibility: early stopping moved to the training-control callbacks
    "AdapterEarlyStoppingCallback": "hf_adaptive.scheduling.early_stopping",
    "validation_loss": "hf_adaptive.scheduling.early_stopping",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
