"""Plugins by name: the one place that lists the capabilities, so YAML configs and `--plugins` can name them.

Each entry says where the plugin class lives and where its options are declared (a light `config.py` beside the
plugin: dataclasses only). `ContinualConfig` composes every entry's options, `build_plugins` builds the named
plugins from them. Adding a capability = its folder + one line here.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .utils.options import OptionSource


@dataclass(frozen=True)
class PluginSpec:
    """`plugin`: "module:Class" of the plugin; `options`: "module:NAME" of its tuple of `OptionSource`s."""

    plugin: str
    options: str


PLUGINS: dict[str, PluginSpec] = {
    "ewc": PluginSpec("hf_adaptive.consolidation.ewc:EWCPlugin", "hf_adaptive.consolidation.config:EWC_OPTIONS"),
    "early_stopping": PluginSpec(
        "hf_adaptive.scheduling.early_stopping:AdapterEarlyStoppingCallback",
        "hf_adaptive.scheduling.config:EARLY_STOPPING_OPTIONS",
    ),
    "replay": PluginSpec("hf_adaptive.replay.exact:ReplayPlugin", "hf_adaptive.replay.config:REPLAY_OPTIONS"),
    "generative_replay": PluginSpec(
        "hf_adaptive.replay.generative:GenerativeReplayPlugin", "hf_adaptive.replay.config:GENERATIVE_REPLAY_OPTIONS"
    ),
    "feature_replay": PluginSpec(
        "hf_adaptive.replay.feature:FeatureReplayPlugin", "hf_adaptive.replay.config:FEATURE_REPLAY_OPTIONS"
    ),
    "adaptive_scheduler": PluginSpec(
        "hf_adaptive.scheduling.callback:AdaptiveSchedulerCallback",
        "hf_adaptive.scheduling.config:ADAPTIVE_SCHEDULER_OPTIONS",
    ),
    "freezing": PluginSpec(
        "hf_adaptive.scheduling.callback:SelectiveFreezingCallback", "hf_adaptive.scheduling.config:FREEZING_OPTIONS"
    ),
    "head_l0": PluginSpec("hf_adaptive.control.head_l0:HeadGatePlugin", "hf_adaptive.control.config:HEAD_L0_OPTIONS"),
    "gate_feedback": PluginSpec(
        "hf_adaptive.control.feedback:FeedbackCallback", "hf_adaptive.control.config:GATE_FEEDBACK_OPTIONS"
    ),
    "expert_routing": PluginSpec(
        "hf_adaptive.experts.plugin:ExpertRoutingPlugin", "hf_adaptive.experts.config:EXPERT_ROUTING_OPTIONS"
    ),
    "distillation": PluginSpec(
        "hf_adaptive.distillation.plugin:DistillationPlugin", "hf_adaptive.distillation.config:DISTILLATION_OPTIONS"
    ),
    "gradual_pruning": PluginSpec(
        "hf_adaptive.compression.gradual_pruning:GradualPruningPlugin",
        "hf_adaptive.compression.config:GRADUAL_PRUNING_OPTIONS",
    ),
    "qat": PluginSpec("hf_adaptive.compression.qat:QATPlugin", "hf_adaptive.compression.config:QAT_OPTIONS"),
    "grad_aggregation": PluginSpec(
        "hf_adaptive.aggregation.plugin:GradAggregationPlugin",
        "hf_adaptive.aggregation.config:GRAD_AGGREGATION_OPTIONS",
    ),
    "olora": PluginSpec("hf_adaptive.orthogonal.olora:OLoRAPlugin", "hf_adaptive.orthogonal.config:OLORA_OPTIONS"),
}

#: `ContinualConfig.loss_weighting` modes -> the differentiable controller that implements them
LOSS_WEIGHTINGS: dict[str, str] = {
    "uncertainty": "hf_adaptive.control.loss_weighting:LossWeightController",
    "softmax": "hf_adaptive.control.loss_weighting:LossWeightController",
}


def _load(path: str) -> Any:
    module, attr = path.split(":")
    return getattr(importlib.import_module(module), attr)


def plugin_class(name: str) -> type:
    if name not in PLUGINS:
        raise ValueError(f"plugins: unknown plugin name={name!r}; allowed: {sorted(PLUGINS)}")
    return _load(PLUGINS[name].plugin)


def plugin_options(name: str) -> tuple[OptionSource, ...]:
    """The option sources of plugin `name` (from its light config module: the plugin itself is not imported)."""
    if name not in PLUGINS:
        raise ValueError(f"plugins: unknown plugin name={name!r}; allowed: {sorted(PLUGINS)}")
    return tuple(_load(PLUGINS[name].options))


def all_option_sources() -> list[OptionSource]:
    """Every plugin's option sources, each once, in registry order (what `ContinualConfig` is composed of)."""
    sources: list[OptionSource] = []
    for name in PLUGINS:
        for source in plugin_options(name):
            if source not in sources:
                sources.append(source)
    return sources


def loss_weighting_class(mode: str) -> type:
    if mode not in LOSS_WEIGHTINGS:
        raise ValueError(
            f"ContinualConfig.loss_weighting={mode!r} is not allowed: choose one of {sorted(LOSS_WEIGHTINGS)}"
        )
    return _load(LOSS_WEIGHTINGS[mode])


def build_plugins(names: Sequence[str], config: Any, model: Any = None) -> list[Any]:
    """One instance per name, configured from `config` (a `ContinualConfig`) and, where needed, `model`."""
    if isinstance(names, str):
        names = [names]
    if len(set(names)) != len(names):
        raise ValueError(f"plugins: names must be unique, got {list(names)}")
    return [plugin_class(name).from_config(config, model=model) for name in names]
