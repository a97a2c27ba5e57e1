"""Compression during continual fine-tuning: gradual magnitude pruning on the Zhu & Gupta cubic schedule.

* `config`: `GradualPruningConfig` and `GRADUAL_PRUNING_OPTIONS` (light: no torch);
* `schedule`: the cubic schedule and the magnitude / MLP-channel masks, as pure functions;
* `gradual_pruning`: `GradualPruningPlugin`, masks enforced while training and kept across tasks.

Names are imported on first access (PEP 562), so `import hf_adaptive.compression.config` stays light.
"""

from __future__ import annotations

from ..utils.lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "DEFAULT_TARGETS": "config",
    "GRADUAL_PRUNING_OPTIONS": "config",
    "SCOPES": "config",
    "STRUCTURES": "config",
    "GradualPruningConfig": "config",
    "channel_scores": "schedule",
    "cubic_sparsity": "schedule",
    "lowest_masks": "schedule",
    "magnitude_masks": "schedule",
    "prune_count": "schedule",
    "update_index": "schedule",
    "GradualPruningPlugin": "gradual_pruning",
    "MLPGroup": "gradual_pruning",
    "mlp_groups": "gradual_pruning",
    "target_weights": "gradual_pruning",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
