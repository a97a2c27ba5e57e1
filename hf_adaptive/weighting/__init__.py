"""Weights of the loss terms learned from feedback on held-out rows.

* `config`: `HeldOutWeightingConfig` and `HELDOUT_WEIGHTING_OPTIONS` (light: no torch);
* `heldout`: `HeldOutWeightingPlugin`, which holds out rows of every task and moves each term's weight (replay,
  EWC, ...) along the hypergradient of the loss on them.

The differentiable controllers that balance the terms' loss scales (uncertainty, softmax) are
`hf_adaptive.control.loss_weighting`. Names are imported on first access (PEP 562), so
`import hf_adaptive.weighting.config` stays light.
"""

from __future__ import annotations

from ..utils.lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "HELDOUT_WEIGHTING_OPTIONS": "config",
    "HeldOutWeightingConfig": "config",
    "HeldOutWeightingPlugin": "heldout",
    "adam_step": "heldout",
    "task_without_rows": "heldout",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
