"""Issue #11 §5/§6 and #17: every `ContinualConfig` option of this package refuses a bad value with an error naming
the field, the value and what is allowed, and every parameter of every registry plugin is reachable from the config
(or is in a documented allow-list)."""

from __future__ import annotations

import dataclasses
import inspect
import math
import types
import typing
from typing import Any

import pytest
import torch
from transformers import TrainingArguments

from hf_adaptive.config import ContinualConfig
from hf_adaptive.registry import NEEDS_MODEL, PLUGINS, build_plugins, plugin_class

HINTS = typing.get_type_hints(ContinualConfig)
TRAINING_ARGS = {f.name for f in dataclasses.fields(TrainingArguments)}
OWN = [f.name for f in dataclasses.fields(ContinualConfig) if f.init and f.name not in TRAINING_ARGS]


def _config(**kwargs: Any) -> ContinualConfig:
    return ContinualConfig(output_dir="unused", report_to=[], **kwargs)


def _members(name: str) -> set[Any]:
    tp = HINTS[name]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return {typing.get_origin(t) or t for t in typing.get_args(tp)}
    return {typing.get_origin(tp) or tp}


def _wrong_type(name: str) -> Any:
    """A value of a type the field does not take (never a lone string for a list field: that is a 1-element list)."""
    members = _members(name)
    if list in members:
        return {"not": "a list"}
    if str in members:
        return 3
    if bool in members:
        return "yes"
    return "3"  # int / float fields: a string (the CLI converts strings; Python callers must not pass them)


def test_the_package_has_its_own_options():
    assert len(OWN) > 90 and "ewc_lambda" in OWN and "output_dir" not in OWN


@pytest.mark.parametrize("name", OWN)
def test_every_own_option_refuses_a_wrong_type(name):
    value = _wrong_type(name)
    with pytest.raises(ValueError) as err:
        _config(**{name: value})
    assert f"ContinualConfig.{name}={value!r} is not allowed: " in str(err.value)


FLOATS = [n for n in OWN if float in _members(n)]


def test_every_float_option_is_listed():
    assert "ewc_lambda" in FLOATS and "gate_efficiency_factor" in FLOATS and len(FLOATS) >= 25


@pytest.mark.parametrize("name", FLOATS)
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_every_float_option_must_be_finite(name, value):
    with pytest.raises(ValueError) as err:
        _config(**{name: value})
    assert f"ContinualConfig.{name}=" in str(err.value) and "is not allowed" in str(err.value)


BOOLS = [n for n in OWN if _members(n) == {bool}]


def test_the_bool_options_are_found():
    assert {"save_results_plot", "evaluate_unseen_tasks", "append_eos_token", "gradient_centralization"} <= set(BOOLS)


@pytest.mark.parametrize("name", BOOLS)
@pytest.mark.parametrize("value", ["yes", "false", 2, 0, None])
def test_bools_must_be_real_bools(name, value):
    with pytest.raises(ValueError, match=rf"ContinualConfig\.{name}={value!r} is not allowed: must be True or False"):
        _config(**{name: value})


LIST_FIELDS = {
    "lora_target_modules": "q_proj",
    "signature_layers": "input_embeddings",
    "continual_metrics": "bwt",
    "signature_parts": "text",
    "gate_statistics": "entropy",
}


def test_list_fields_are_all_listed():
    assert set(LIST_FIELDS) == {n for n in OWN if list in _members(n)}


@pytest.mark.parametrize(("name", "value"), sorted(LIST_FIELDS.items()))
def test_a_lone_string_is_a_one_element_list_never_characters(name, value):
    assert getattr(_config(**{name: value}), name) == [value]


@pytest.mark.parametrize(
    ("name", "value"), [("continual_metrics", None), ("lora_target_modules", None), ("signature_parts", None)]
)
def test_none_for_a_list_option_is_a_clear_error(name, value):
    with pytest.raises(ValueError, match=rf"ContinualConfig\.{name}=None is not allowed: a list of"):
        _config(**{name: value})


def test_gate_efficiency_factor_is_validated():
    for value in (-0.1, "0.1", math.inf):
        with pytest.raises(ValueError, match="ContinualConfig.gate_efficiency_factor="):
            _config(gate_efficiency_factor=value)


def test_router_reuse_threshold_error_names_the_reuse_threshold():
    with pytest.raises(ValueError) as err:
        _config(router_reuse_threshold=-1)
    assert "ContinualConfig.router_reuse_threshold=-1" in str(err.value)
    with pytest.raises(ValueError, match=r"ContinualConfig\.router_reuse_threshold=1\.5 is not allowed"):
        _config(router_reuse_threshold=1.5)


@pytest.mark.parametrize("optimizer_name", ["lookahead", None, "adamw"])
def test_a_bad_lookahead_inner_is_named_as_lookahead_inner(optimizer_name):
    with pytest.raises(ValueError) as err:
        _config(optimizer_name=optimizer_name, lookahead_inner="bogus")
    assert "ContinualConfig.lookahead_inner='bogus' is not allowed" in str(err.value)
    assert "optimizer_name" not in str(err.value)


def test_early_stopping_patience_none_is_refused_not_turned_into_3():
    from hf_adaptive.consolidation import AdapterEarlyStoppingCallback

    with pytest.raises(ValueError, match="ContinualConfig.early_stopping_patience=None is not allowed"):
        _config(early_stopping_patience=None)
    config = _config()
    assert build_plugins(["early_stopping"], config)[0].patience == config.early_stopping_patience == 3
    config.early_stopping_patience = None  # set after validation: the plugin refuses it too
    with pytest.raises(ValueError, match="early_stopping_patience=None is not allowed with the early_stopping plugin"):
        AdapterEarlyStoppingCallback.from_config(config)


# ------------------------------------------------------------------------------ every plugin option is reachable
def _get(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


#: plugin -> constructor parameter -> (ContinualConfig field, a non-default value, attribute path, expected value)
#: (expected None: the value itself). Each is checked alone, built by `build_plugins` from a config.
MAPPED: dict[str, dict[str, tuple]] = {
    "ewc": {
        "ewc_lambda": ("ewc_lambda", 2.5, "ewc_lambda", None),
        "mode": ("ewc_mode", "online", "mode", None),
        "gamma": ("ewc_gamma", 0.5, "gamma", None),
        "fisher_samples": ("fisher_samples", 7, "fisher_samples", None),
        "fisher_type": ("fisher_type", "true", "fisher_type", None),
        "fisher_chunk_size": ("fisher_chunk_size", 3, "fisher_chunk_size", None),
        "fisher_method": ("fisher_method", "loop", "fisher_method", None),
        "fisher_normalization": ("fisher_normalization", "max", "fisher_normalization", None),
        "gamma_gated": ("gamma_gated_ewc", True, "gamma_gated", None),
        "bypass_gamma": ("ewc_fixed_lambda_bypass_gamma", True, "bypass_gamma", None),
        "neuromodulation": ("gamma_gain_lambda", 1.5, "modulator.config.gamma_gain_lambda", None),
        "seed": ("seed", 7, "seed", None),
        "progress_bar": ("disable_tqdm", True, "progress_bar", False),
    },
    "early_stopping": {
        "metric": ("early_stopping_metric", "loss", "metric", None),
        "patience": ("early_stopping_patience", 7, "patience", None),
        "min_epochs": ("early_stopping_min_epochs", 4, "min_epochs", None),
        "min_delta": ("early_stopping_min_delta", 0.25, "min_delta", None),
        "restore_best": ("early_stopping_restore_best", False, "restore_best", None),
        "eval_batch_size": ("continual_eval_batch_size", 5, "eval_batch_size", None),
        "eval_limit": ("continual_eval_limit", 9, "eval_limit", None),
    },
    "replay": {
        "alpha": ("replay_alpha", 0.75, "alpha", None),
        "buffer_size": ("replay_buffer_size", 17, "memory.capacity", None),
        "policy": ("replay_policy", "reservoir", "memory.policy", None),
        "batch_size": ("replay_batch_size", 3, "batch_size", None),
        "seed": ("seed", 7, "memory.seed", None),
        "examples_per_task": ("replay_examples_per_task", 11, "examples_per_task", None),
    },
    "generative_replay": {
        "ratio": ("generative_replay_ratio", 0.5, "ratio", None),
        "alpha": ("replay_alpha", 0.75, "alpha", None),
        "lm_lambda": ("generative_replay_lm_lambda", 0.5, "lm_lambda", None),
        "batch_size": ("replay_batch_size", 3, "batch_size", None),
        "conditioning": ("generative_replay_conditioning", "prototype", "conditioning", None),
        "max_new_tokens": ("generative_replay_max_new_tokens", 5, "max_new_tokens", None),
        "top_k": ("generative_replay_top_k", 4, "top_k", None),
        "temperature": ("generative_replay_temperature", 0.7, "temperature", None),
        "max_rounds": ("generative_replay_max_rounds", 6, "max_rounds", None),
        "prototype_samples": ("generative_replay_prototype_samples", 9, "prototype_samples", None),
        "prototypes_per_class": ("generative_replay_prototypes_per_class", 4, "prototypes_per_class", None),
        "prefix_words": ("generative_replay_prefix_words", 3, "prefix_words", None),
        "seed": ("seed", 7, "seed", None),
    },
    "feature_replay": {
        "alpha": ("feature_replay_alpha", 0.75, "alpha", None),
        "samples_per_task": ("feature_replay_samples_per_task", 9, "samples_per_task", None),
        "max_rows": ("replay_buffer_size", 17, "max_rows", None),
        "target": ("feature_replay_target", "prototypes", "target", None),
        "k_per_class": ("feature_replay_k_per_class", 3, "k_per_class", None),
        "batch_size": ("replay_batch_size", 3, "batch_size", None),
        "seed": ("seed", 7, "seed", None),
        "feature_dtype": ("feature_replay_dtype", "bfloat16", "feature_dtype", torch.bfloat16),
    },
    "adaptive_scheduler": {"reward_key": ("adaptive_reward_key", "eval_accuracy", "reward_key", None)},
    "head_l0": {"weight": ("gate_l0_weight", 0.5, "weight", None)},
    "expert_routing": {
        "tolerance": ("router_tolerance", 0.2, "tolerance", None),
        "eval_limit": ("router_eval_limit", 9, "eval_limit", None),
        "verify_reuse": ("router_verify_reuse", False, "verify_reuse", None),
    },
}

#: fields of the config objects some plugins take, each mapped like `MAPPED` (plugin -> parameter -> field -> ...)
NESTED: dict[str, dict[str, dict[str, tuple]]] = {
    "adaptive_scheduler": {
        "config": {
            "lr_up": ("adaptive_lr_up", 1.5, "config.lr_up", None),
            "lr_down": ("adaptive_lr_down", 0.5, "config.lr_down", None),
            "patience": ("adaptive_patience", 9, "config.patience", None),
            "cooldown": ("adaptive_cooldown", 9, "config.cooldown", None),
            "dither": ("adaptive_dither", True, "config.dither", None),
            "seed": ("seed", 7, "config.seed", None),
        }
    },
    "freezing": {
        "config": {
            "threshold": ("freeze_threshold", 0.5, "config.threshold", None),
            "threshold_mode": ("freeze_threshold_mode", "relative", "config.threshold_mode", None),
            "granularity": ("freeze_granularity", "module", "config.granularity", None),
            "probe_every": ("freeze_probe_every", 3, "config.probe_every", None),
            "ema_beta": ("freeze_ema_beta", 0.5, "config.ema_beta", None),
            "warmup_steps": ("freeze_warmup_steps", 3, "config.warmup_steps", None),
            "max_frozen_fraction": ("freeze_max_frozen_fraction", 0.5, "config.max_frozen_fraction", None),
        }
    },
    "gate_feedback": {
        "config": {
            "eval_every": ("gate_feedback_every", 3, "config.eval_every", None),
            "mode": ("gate_feedback_mode", "continuous", "config.mode", None),
            "eval_size": ("gate_eval_size", 3, "config.eval_size", None),
            "eval_batch_size": ("gate_eval_batch_size", 3, "config.eval_batch_size", None),
            "statistics": ("gate_statistics", ["entropy"], "config.statistics", ("entropy",)),
            "stats_batches": ("gate_stats_batches", 3, "config.stats_batches", None),
            "preference": ("gate_preference", 0.5, "config.preference", None),
            "log_gates": ("gate_log_gates", False, "config.log_gates", None),
        },
        "controller": {
            "algorithm": ("gate_algorithm", "a2c", "controller.config.algorithm", None),
            "min_active_fraction": ("gate_min_active_fraction", 0.25, "controller.config.min_active_fraction", None),
            "max_active_fraction": ("gate_max_active_fraction", 0.75, "controller.config.max_active_fraction", None),
            "efficiency_factor": ("gate_efficiency_factor", 0.5, "controller.config.efficiency_factor", None),
            "seed": ("seed", 7, "controller.config.seed", None),
        },
    },
}

#: constructor parameters that are deliberately not options, and why
NOT_OPTIONS: dict[str, dict[str, str]] = {
    "early_stopping": {
        "task": "an object (a Task); only needed with a plain Trainer, train_sequence passes each task",
        "processing_class": "an object (the tokenizer); the trainer passes its own",
    },
    "adaptive_scheduler": {"config": "a config object: its fields are the adaptive_* options (NESTED)"},
    "freezing": {"config": "a config object: its fields are the freeze_* options (NESTED)"},
    "gate_feedback": {
        "controller": "an object (GateController) built from the gate_* options, sized by the model's heads",
        "eval_dataset": "data, not an option: train_sequence uses each task's own eval split",
        "data_collator": "an object; only needed with a fixed eval_dataset",
        "config": "a config object: its fields are the gate_* options (NESTED)",
    },
    "expert_routing": {
        "library": "an object (ExpertLibrary) built on the model from the lora_* options",
        "router": "an object (Router) built from the router_* options, sized by the model's signatures",
        "signature_config": "a config object built from the signature_* options (tests/test_config.py)",
    },
}

#: fields of those config objects that are deliberately not options: fine gains of the control laws / the RL
#: controller with tested defaults; set them in Python by passing the config object to the plugin's constructor
NESTED_NOT_OPTIONS: dict[str, dict[str, set[str]]] = {
    "adaptive_scheduler": {
        "config": {
            "lr_bounds",
            "variance_damping",
            "window",
            "ema_beta",
            "threshold",
            "noise_margin",
            "warmup",
            "nan_backoff",
            "adapt_momentum",
            "momentum_step",
            "momentum_bounds",
            "consistency",
            "noise_threshold",
            "sigma",
            "sigma_bounds",
            "sigma_up",
            "sigma_down",
            "plateau_patience",
        }  # fmt: skip
    },
    "freezing": {"config": set()},
    "gate_feedback": {
        "config": set(),
        "controller": {
            "hidden_size",
            "head_embedding",
            "history",
            "lr",
            "gamma",
            "gae_lambda",
            "rollout_steps",
            "ppo_epochs",
            "clip_eps",
            "value_coef",
            "entropy_coef",
            "max_grad_norm",
            "max_changes",
            "keep_bias",
            "reward_ema",
        },  # fmt: skip
    },
}


def _build(name: str, model: Any, **fields: Any) -> Any:
    if name == "expert_routing":  # it puts LoRA experts on the model: a fresh one each time
        from hf_adaptive.models import build_tiny_gemma

        model, _ = build_tiny_gemma()
    (plugin,) = build_plugins([name], _config(**fields), model=model if name in NEEDS_MODEL else None)
    return plugin


@pytest.fixture(scope="module")
def gated_model():
    from hf_adaptive.models import build_tiny_gemma, gate_model

    model, _ = build_tiny_gemma()
    gate_model(model, mode="fixed")
    return model


def test_every_plugin_parameter_is_an_option_or_documented():
    assert set(MAPPED) | set(NOT_OPTIONS) == set(PLUGINS)
    for name in PLUGINS:
        params = [p for p in inspect.signature(plugin_class(name).__init__).parameters if p != "self"]
        covered = set(MAPPED.get(name, {})) | set(NOT_OPTIONS.get(name, {}))
        assert set(params) == covered, (name, sorted(set(params) - covered), sorted(covered - set(params)))


def test_every_field_of_a_plugin_config_object_is_an_option_or_documented():
    from hf_adaptive.control.feedback import FeedbackConfig
    from hf_adaptive.control.gate_controller import GateControllerConfig
    from hf_adaptive.scheduling.adaptive_scheduler import AdaptiveSchedulerConfig
    from hf_adaptive.scheduling.freezing import FreezingConfig

    classes = {
        ("adaptive_scheduler", "config"): AdaptiveSchedulerConfig,
        ("freezing", "config"): FreezingConfig,
        ("gate_feedback", "config"): FeedbackConfig,
        ("gate_feedback", "controller"): GateControllerConfig,
    }
    assert set(classes) == {(plugin, obj) for plugin, objects in NESTED.items() for obj in objects}
    for (plugin, param), cls in classes.items():
        fields = {f.name for f in dataclasses.fields(cls)}
        covered = set(NESTED[plugin][param]) | NESTED_NOT_OPTIONS[plugin][param]
        assert fields == covered, (plugin, param, sorted(fields - covered), sorted(covered - fields))


CASES = [(plugin, param, spec) for plugin, params in MAPPED.items() for param, spec in params.items()] + [
    (plugin, f"{obj}.{field}", spec)
    for plugin, objects in NESTED.items()
    for obj, fields in objects.items()
    for field, spec in fields.items()
]


@pytest.mark.parametrize(("plugin", "param", "spec"), CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_each_mapped_option_reaches_the_plugin(gated_model, plugin, param, spec):
    field, value, path, expected = spec
    expected = value if expected is None else expected
    default = getattr(_config(), field)
    assert value != default, f"pick a non-default value for {field}"
    extra = {"gamma_gated_ewc": True} if param == "neuromodulation" else {}
    if field == "gate_max_active_fraction":
        extra["gate_min_active_fraction"] = 0.0
    built = _build(plugin, gated_model, **extra, **{field: value})
    assert _get(built, path) == expected
    assert _get(_build(plugin, gated_model, **extra), path) != expected  # the default is different: it is the field
