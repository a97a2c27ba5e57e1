"""Distillation: keep the model's outputs (and optionally hidden states) close to a teacher's.

* `config`: `DistillationConfig` and `DISTILLATION_OPTIONS` (light: no torch);
* `losses`: forward / reverse KL and TRL's generalised JSD with a temperature, the hidden-state MSE, position masks;
* `plugin`: `DistillationPlugin`, Learning without Forgetting (the previous task's model as teacher), the
  adapter-free base model, or any same-vocabulary teacher.

Names are imported on first access (PEP 562), so `import hf_adaptive.distillation.config` stays light.
"""

from __future__ import annotations

from ..utils.lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "DISTILLATION_OPTIONS": "config",
    "DIVERGENCES": "config",
    "POSITIONS": "config",
    "TEACHERS": "config",
    "DistillationConfig": "config",
    "distillation_loss": "losses",
    "feature_loss": "losses",
    "generalized_jsd": "losses",
    "position_mask": "losses",
    "DistillationPlugin": "plugin",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
