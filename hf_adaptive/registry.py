"""Plugins and callbacks by name, so that YAML configs and `hf-adaptive run --plugins ...` can name them.

Each entry is imported lazily and built with its `from_config(config)` classmethod, which reads the matching
`ContinualConfig` options (e.g. `ewc_lambda` for "ewc"). Every constructor parameter of every plugin is set from an
option, except objects (model, tokenizer, datasets, built controllers/routers) and a documented list of fine gains
of the config objects some plugins take; `tests/reliability/test_config_inputs.py` keeps that audit complete.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

PLUGINS: dict[str, str] = {
    "ewc": "hf_adaptive.consolidation:EWCPlugin",
    "early_stopping": "hf_adaptive.consolidation:AdapterEarlyStoppingCallback",
    "replay": "hf_adaptive.replay:ReplayPlugin",
    "generative_replay": "hf_adaptive.replay:GenerativeReplayPlugin",
    "feature_replay": "hf_adaptive.replay:FeatureReplayPlugin",
    "adaptive_scheduler": "hf_adaptive.scheduling:AdaptiveSchedulerCallback",
    "freezing": "hf_adaptive.scheduling:SelectiveFreezingCallback",
    "head_l0": "hf_adaptive.models:HeadGatePlugin",
    "gate_feedback": "hf_adaptive.control:FeedbackCallback",
    "expert_routing": "hf_adaptive.experts:ExpertRoutingPlugin",
}
#: plugins whose `from_config` also needs the model (e.g. the gate controller is sized by the model's heads; the
#: expert library puts its LoRA experts on the model and the router is sized by the model's signatures)
NEEDS_MODEL = {"head_l0", "gate_feedback", "expert_routing"}


def plugin_class(name: str) -> type:
    if name not in PLUGINS:
        raise ValueError(f"plugins: unknown plugin name={name!r}; allowed: {sorted(PLUGINS)}")
    module, attr = PLUGINS[name].split(":")
    return getattr(importlib.import_module(module), attr)


def build_plugins(names: Sequence[str], config: Any, model: Any = None) -> list[Any]:
    """One instance per name, configured from `config` (a `ContinualConfig`) and, where needed, `model`."""
    if len(set(names)) != len(names):
        raise ValueError(f"plugins: names must be unique, got {list(names)}")
    return [
        plugin_class(name).from_config(config, model=model)
        if name in NEEDS_MODEL
        else plugin_class(name).from_config(config)
        for name in names
    ]
