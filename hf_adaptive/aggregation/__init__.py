"""Gradient aggregation between the objectives of continual learning (Jacobian descent, on torchjd).

* `config`: `GradAggregationConfig` and `GRAD_AGGREGATION_OPTIONS` (light: no torch, no torchjd);
* `plugin`: `GradAggregationPlugin`, which combines the gradients of the task loss and of each loss term (replay,
  EWC, ...) with a torchjd aggregator (UPGrad, MGDA, PCGrad, ...) instead of summing the losses.

Names are imported on first access (PEP 562), so `import hf_adaptive.aggregation.config` stays light.
"""

from __future__ import annotations

from ..utils.lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "AGGREGATORS": "config",
    "GRAD_AGGREGATION_OPTIONS": "config",
    "OBJECTIVES": "config",
    "SCALES": "config",
    "GradAggregationConfig": "config",
    "NATIVE_SCALE": "plugin",
    "GradAggregationPlugin": "plugin",
    "build_aggregator": "plugin",
    "objective_rows": "plugin",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
