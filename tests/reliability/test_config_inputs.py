"""Issue #11 §5/§6 and #17: every `ContinualConfig` option of this package refuses a bad value with an error naming
the field, the value and what is allowed, and every option of every registry plugin is reachable from the config,
the CLI and YAML (issue #12: the options are the fields of each plugin's `OptionSource`s, composed into
`ContinualConfig`): a value set under the option's name is the value the built plugin keeps, and every field a
source excludes is listed here with the reason."""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
import types
import typing
from typing import Any

import pytest
import torch
from transformers import TrainingArguments

from hf_adaptive.config import ContinualConfig
from hf_adaptive.registry import PLUGINS, build_plugins, plugin_class, plugin_options

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
    # "must be True or False (a bool)"; ExpertRoutingConfig.verify_reuse words it "True or False (a bool)"
    expected = rf"ContinualConfig\.{name}={re.escape(repr(value))} is not allowed: (must be )?True or False"
    with pytest.raises(ValueError, match=expected):
        _config(**{name: value})


LIST_FIELDS = {
    "lora_target_modules": "q_proj",
    "signature_layers": "input_embeddings",
    "continual_metrics": "bwt",
    "signature_parts": "text",
    "gate_statistics": "entropy",
    "prune_target_modules": "q_proj",
}


#: list options of numbers: a (min, max) pair of the adaptive scheduler (`AdaptiveSchedulerConfig`), one valid pair each
PAIR_FIELDS = {
    "adaptive_lr_bounds": [1e-6, 0.5],
    "adaptive_momentum_bounds": [0.4, 0.9],
    "adaptive_sigma_bounds": [1e-4, 0.05],
}


#: list options of integers: a lone integer is a one-element list, a string is refused
INT_LIST_FIELDS = {"distill_feature_layers": 1}


def test_list_fields_are_all_listed():
    assert set(LIST_FIELDS) | set(PAIR_FIELDS) | set(INT_LIST_FIELDS) == {n for n in OWN if list in _members(n)}
    assert not set(LIST_FIELDS) & set(PAIR_FIELDS)


@pytest.mark.parametrize(("name", "value"), sorted(INT_LIST_FIELDS.items()))
def test_a_lone_int_is_a_one_element_list_and_a_string_is_refused(name, value):
    from hf_adaptive.registry import build_plugins

    (plugin,) = build_plugins(["distillation"], _config(**{name: value}))
    assert plugin.config.feature_layers == (value,)
    with pytest.raises(ValueError, match=rf"ContinualConfig\.{name}='1' is not allowed"):
        _config(**{name: "1"})


@pytest.mark.parametrize("name", sorted(PAIR_FIELDS))
@pytest.mark.parametrize("value", [[0.5], [0.5, 0.1, 0.2], "0.1", [math.nan, 0.5], [0.1, math.inf], [0.5, 0.1]])
def test_a_bad_pair_is_a_clear_error(name, value):
    allowed = r"(must be a pair \(min, max\)|both ends must be numbers in \[|min must be <= max)"
    with pytest.raises(
        ValueError, match=rf"ContinualConfig\.{name}={re.escape(repr(value))} is not allowed: {allowed}"
    ):
        _config(**{name: value})


@pytest.mark.parametrize("name", sorted(PAIR_FIELDS))
def test_a_valid_pair_is_kept(name):
    assert list(getattr(_config(**{name: PAIR_FIELDS[name]}), name)) == PAIR_FIELDS[name]


@pytest.mark.parametrize(("name", "value"), sorted(LIST_FIELDS.items()))
def test_a_lone_string_is_a_one_element_list_never_characters(name, value):
    assert getattr(_config(**{name: value}), name) == [value]


@pytest.mark.parametrize(
    ("name", "allowed"),
    [
        ("continual_metrics", "a list of"),
        ("lora_target_modules", "a list of"),
        ("signature_parts", "a non-empty subset of"),
        ("gate_statistics", "a list of"),
    ],
)
def test_none_for_a_list_option_is_a_clear_error(name, allowed):
    with pytest.raises(ValueError, match=rf"ContinualConfig\.{name}=None is not allowed: {allowed}"):
        _config(**{name: None})


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


EARLY_STOPPING_PATIENCE_NONE = (
    "ContinualConfig.early_stopping_patience=None is not allowed: an integer >= 1 (to train every epoch, leave the "
    "'early_stopping' plugin out)"
)


def test_early_stopping_patience_none_is_refused_not_turned_into_3():
    with pytest.raises(ValueError) as err:
        _config(early_stopping_patience=None)
    assert str(err.value) == EARLY_STOPPING_PATIENCE_NONE
    config = _config()
    assert build_plugins(["early_stopping"], config)[0].patience == config.early_stopping_patience == 3
    config.early_stopping_patience = None  # set after validation: the plugin refuses it too
    with pytest.raises(ValueError) as err:
        plugin_class("early_stopping").from_config(config)
    assert str(err.value) == EARLY_STOPPING_PATIENCE_NONE


# ------------------------------------------------------------------------------ every plugin option is reachable
def _get(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _build(name: str, **options: Any) -> Any:
    """Plugin `name` built by `build_plugins` from a `ContinualConfig` carrying `options`; a plugin that
    `needs_model` gets a fresh tiny model (gates and LoRA experts go on it)."""
    model = None
    if plugin_class(name).needs_model:
        from hf_adaptive.models import build_tiny_gemma

        model, _ = build_tiny_gemma()
    (plugin,) = build_plugins([name], _config(**options), model=model)
    return plugin


#: where a built plugin keeps the config built from each of its option sources (plugin -> config class -> path).
#: None: a source shared with another plugin, whose fields this plugin reads into its own config (`SHARED_AT`).
CONFIG_AT: dict[str, dict[str, str | None]] = {
    "ewc": {"EWCConfig": "config", "NeuromodulationConfig": "modulator.config"},  # the gain that uses it
    "early_stopping": {"EarlyStoppingConfig": "config"},
    "replay": {"ReplayConfig": "config"},
    "generative_replay": {"GenerativeReplayConfig": "config", "ReplayConfig": None},
    "feature_replay": {"FeatureReplayConfig": "config", "ReplayConfig": None},
    "adaptive_scheduler": {"AdaptiveSchedulerConfig": "config", "AdaptiveSchedulerCallbackConfig": "callback_config"},
    "freezing": {"FreezingConfig": "config"},
    "head_l0": {"HeadL0Config": "config", "GateConfig": "gate"},
    "gate_feedback": {"FeedbackConfig": "config", "GateControllerConfig": "controller.config", "GateConfig": "gate"},
    "expert_routing": {
        "RouterConfig": "router.config",
        "SignatureConfig": "signature_config",
        "ExpertRoutingConfig": "config",
        "MetaInitConfig": "meta_init.config",
    },
    "gradual_pruning": {"GradualPruningConfig": "config"},
    "distillation": {"DistillationConfig": "config"},
    "qat": {"QuantizationAwareTrainingConfig": "config"},
    "grad_aggregation": {"GradAggregationConfig": "config"},
    "olora": {"OLoRAConfig": "config"},
}

#: options other than the one under test that a source needs to act (plugin -> config class -> options):
#: the gamma gain exists only when gamma-gated EWC is on
COMPANIONS: dict[str, dict[str, dict[str, Any]]] = {"ewc": {"NeuromodulationConfig": {"gamma_gated_ewc": True}}}

#: fields of a shared source a plugin reads into its own config: (plugin, config class, field) -> path in the plugin
SHARED_AT: dict[tuple[str, str, str], str] = {
    ("generative_replay", "ReplayConfig", "alpha"): "config.alpha",
    ("generative_replay", "ReplayConfig", "batch_size"): "config.batch_size",
    ("feature_replay", "ReplayConfig", "buffer_size"): "config.max_rows",
    ("feature_replay", "ReplayConfig", "batch_size"): "config.batch_size",
}

#: fields of a shared source a plugin does not read, and why (the option is the other plugin's)
SHARED_NOT_USED: dict[tuple[str, str, str], str] = {
    ("generative_replay", "ReplayConfig", "buffer_size"): "exact replay's memory size (pseudo rows are generated)",
    ("generative_replay", "ReplayConfig", "policy"): "exact replay's memory policy (pseudo rows are generated)",
    ("generative_replay", "ReplayConfig", "examples_per_task"): "exact replay's rows stored per task",
    ("feature_replay", "ReplayConfig", "alpha"): "exact replay's weight; feature replay's is feature_replay_alpha",
    ("feature_replay", "ReplayConfig", "policy"): "exact replay's memory policy; feature replay keeps per-task rows",
    ("feature_replay", "ReplayConfig", "examples_per_task"): "exact replay's; feature replay's is samples_per_task",
}

#: a non-default valid value of every plugin option (expected back as given, unless in `EXPECTED`)
VALUES: dict[str, Any] = {
    # expert_routing's meta-learned initialisation
    "meta_init_method": "reptile",
    "meta_init_inner_steps": 3,
    "meta_init_inner_lr": 0.1,
    "meta_init_outer_steps": 4,
    "meta_init_outer_lr": 0.25,
    "meta_init_support_batch_size": 4,
    "meta_init_query_batch_size": 4,
    "meta_init_rows_per_task": 16,
    "meta_init_tasks_per_step": 2,
    "meta_init_seed": 7,
    # qat
    "qat_scheme": "int8_dynamic",
    "qat_group_size": 64,
    "qat_include_lm_head": True,
    "qat_tasks": "recovery",
    "qat_recovery_steps": 7,
    "qat_convert_at_end": False,
    # grad_aggregation
    "grad_aggregation_aggregator": "pcgrad",
    "grad_aggregation_objectives": "task_vs_rest",
    "grad_aggregation_scale": "mean",
    # olora
    "olora_orth_lambda": 0.25,
    "olora_l2_lambda": 0.01,
    # distillation
    "distill_lambda": 0.5,
    "distill_divergence": "reverse_kl",
    "distill_beta": 0.2,
    "distill_temperature": 2.0,
    "distill_positions": "sequence",
    "distill_teacher": "base",
    "distill_feature_layers": [0, 1],
    "distill_feature_lambda": 0.5,
    # gradual_pruning
    "prune_initial_sparsity": 0.2,
    "prune_final_sparsity": 0.7,
    "prune_begin_step": 3,
    "prune_num_updates": 4,
    "prune_frequency": 5,
    "prune_scope": "global",
    "prune_target_modules": ["up_proj", "down_proj"],
    "prune_structured": "mlp_channels",
    "prune_allow_regrowth": True,
    "prune_schedule_per_task": True,
    "prune_permanent_at_end": False,
    # ewc
    "ewc_lambda": 2.5,
    "ewc_mode": "online",
    "ewc_gamma": 0.5,
    "fisher_samples": 7,
    "fisher_type": "true",
    "fisher_chunk_size": 3,
    "fisher_method": "loop",
    "fisher_normalization": "max",
    "gamma_gated_ewc": True,
    "ewc_fixed_lambda_bypass_gamma": True,
    "gamma_gain_lambda": 1.5,
    "neuromod_ema_beta": 0.5,
    "neuromod_grad_warmup_steps": 2,
    # early_stopping
    "early_stopping_metric": "loss",
    "early_stopping_patience": 7,
    "early_stopping_min_epochs": 4,
    "early_stopping_min_delta": 0.25,
    "early_stopping_restore_best": False,
    # replay (shared with generative and feature replay)
    "replay_alpha": 0.75,
    "replay_buffer_size": 17,
    "replay_policy": "reservoir",
    "replay_batch_size": 3,
    "replay_examples_per_task": 11,
    # generative_replay
    "generative_replay_ratio": 0.5,
    "generative_replay_lm_lambda": 0.5,
    "generative_replay_conditioning": "prototype",
    "generative_replay_max_new_tokens": 5,
    "generative_replay_top_k": 4,
    "generative_replay_temperature": 0.7,
    "generative_replay_max_rounds": 6,
    "generative_replay_prototype_samples": 9,
    "generative_replay_prototypes_per_class": 4,
    "generative_replay_prefix_words": 3,
    # feature_replay
    "feature_replay_alpha": 0.75,
    "feature_replay_samples_per_task": 9,
    "feature_replay_target": "prototypes",
    "feature_replay_k_per_class": 3,
    "feature_replay_dtype": "bfloat16",
    # adaptive_scheduler (the gains of its laws were Python-only before issue #12)
    "adaptive_lr_up": 1.5,
    "adaptive_lr_down": 0.5,
    "adaptive_lr_bounds": PAIR_FIELDS["adaptive_lr_bounds"],
    "adaptive_variance_damping": 2.0,
    "adaptive_window": 4,
    "adaptive_ema_beta": 0.5,
    "adaptive_threshold": 0.01,
    "adaptive_noise_margin": 2.0,
    "adaptive_patience": 9,
    "adaptive_cooldown": 9,
    "adaptive_warmup": 7,
    "adaptive_nan_backoff": 0.25,
    "adaptive_spike_ratio": 5.0,
    "adaptive_spike_backoff": 0.25,
    "adaptive_anneal": "cosine",
    "adaptive_anneal_steps": 12,
    "adaptive_adapt_momentum": False,
    "adaptive_momentum_step": 0.05,
    "adaptive_momentum_bounds": PAIR_FIELDS["adaptive_momentum_bounds"],
    "adaptive_consistency": 5,
    "adaptive_noise_threshold": 0.1,
    "adaptive_dither": True,
    "adaptive_sigma": 0.005,
    "adaptive_sigma_bounds": PAIR_FIELDS["adaptive_sigma_bounds"],
    "adaptive_sigma_up": 2.0,
    "adaptive_sigma_down": 0.25,
    "adaptive_plateau_patience": 7,
    "adaptive_reward_key": "eval_accuracy",
    # freezing
    "freeze_threshold": 0.5,
    "freeze_threshold_mode": "relative",
    "freeze_granularity": "module",
    "freeze_ema_beta": 0.5,
    "freeze_warmup_steps": 3,
    "freeze_probe_every": 3,
    "freeze_max_frozen_fraction": 0.5,
    "freeze_change_window": 4,
    "freeze_percentile": 25.0,
    "freeze_drop_optimizer_state": False,
    # head_l0 / gate_feedback (gate_mode: per plugin, `PLUGIN_VALUES`)
    "gate_l0_weight": 0.5,
    "gate_feedback_every": 3,
    "gate_feedback_mode": "continuous",
    "gate_eval_size": 3,
    "gate_eval_batch_size": 3,
    "gate_statistics": ["entropy"],
    "gate_stats_batches": 3,
    "gate_preference": 0.5,
    "gate_log_gates": False,
    # the RL gate controller (its hyper-parameters were Python-only before issue #12)
    "gate_algorithm": "a2c",
    "gate_hidden_size": 16,
    "gate_head_embedding": 4,
    "gate_history": 2,
    "gate_lr": 0.01,
    "gate_gamma": 0.9,
    "gate_gae_lambda": 0.5,
    "gate_rollout_steps": 8,
    "gate_ppo_epochs": 2,
    "gate_clip_eps": 0.1,
    "gate_value_coef": 0.25,
    "gate_entropy_coef": 0.05,
    "gate_max_grad_norm": 0.5,
    "gate_min_active_fraction": 0.25,
    "gate_max_active_fraction": 0.75,
    "gate_min_active_heads": 2,  # of the tiny model's 8 heads (they take precedence over the fractions)
    "gate_max_active_heads": 6,
    "gate_max_changes": 2,
    "gate_keep_bias": 1.0,
    "gate_efficiency_factor": 0.5,
    "gate_reward_ema": 0.5,
    # expert_routing
    "router_scorer": "linear",
    "router_decision": "ucb",
    "router_normalize": "none",
    "router_normalize_prior": 1.0,
    "router_reuse_threshold": 0.6,
    "router_fork_threshold": 0.2,
    "router_ucb_c": 0.2,
    "router_ucb_reward_weight": 0.3,
    "router_p_reuse": 0.6,
    "router_p_fork": 0.3,
    "router_min_outcomes": 6,
    "router_tau_init": 0.6,
    "router_tau_lr": 0.2,
    "router_tau_min": 0.1,
    "router_tau_max": 0.95,
    "router_bootstrap_experts": 2,
    "router_bootstrap_duplicate": 0.8,
    "router_top_k": 3,
    "router_index": "auto",
    "router_mlp_hidden": 16,
    "router_ann_min_experts": 100,
    "router_hnsw_m": 16,
    "router_hnsw_ef_search": 32,
    "router_seed": 7,
    "router_tolerance": 0.2,
    "router_eval_limit": 9,
    "router_verify_reuse": False,
    "signature_parts": ["text", "context"],
    "signature_sketch_dim": 8,
    "signature_sketch_method": "countsketch",
    "signature_layers": ["input_embeddings"],
    "signature_n_examples": 4,
    "signature_batch_size": 4,
    "signature_seed": 7,
    "signature_text_encoder": "all-MiniLM-L6-v2",  # not loaded to build the plugin (signature_text_dim sizes it)
    "signature_text_dim": 32,
}

#: values that depend on the plugin: gate_mode is the kind of gates each gate plugin works with
PLUGIN_VALUES: dict[tuple[str, str], Any] = {
    ("head_l0", "gate_mode"): "hard_concrete",
    ("gate_feedback", "gate_mode"): "fixed",
}

#: the value the plugin keeps, where the config normalizes the option's (lists of the CLI / YAML -> tuples)
EXPECTED: dict[str, Any] = {
    "adaptive_lr_bounds": tuple(PAIR_FIELDS["adaptive_lr_bounds"]),
    "adaptive_momentum_bounds": tuple(PAIR_FIELDS["adaptive_momentum_bounds"]),
    "adaptive_sigma_bounds": tuple(PAIR_FIELDS["adaptive_sigma_bounds"]),
    "gate_statistics": ("entropy",),
    "signature_parts": ("text", "context"),
    "prune_target_modules": ("up_proj", "down_proj"),
    "distill_feature_layers": (0, 1),
}

#: where the plugin acts on an option beyond its config, checked as well: (plugin, option) -> (path, expected)
#: (expected None: the value the config keeps)
ALSO_AT: dict[tuple[str, str], tuple[str, Any]] = {
    ("replay", "replay_buffer_size"): ("memory.capacity", None),
    ("replay", "replay_policy"): ("memory.policy", None),
    ("feature_replay", "feature_replay_dtype"): ("feature_dtype", torch.bfloat16),
    ("ewc", "gamma_gain_lambda"): ("neuromodulation.gamma_gain_lambda", None),
    ("gate_feedback", "gate_min_active_heads"): ("controller.min_active", None),  # the controller's head budget
    ("gate_feedback", "gate_max_active_heads"): ("controller.max_active", None),
}


def _cases() -> list[tuple[str, str, str, str]]:
    """(plugin, config class, field, option) for every option field of every source of every registry plugin."""
    return [
        (name, source.config_class.__name__, field, option)
        for name in PLUGINS
        for source in plugin_options(name)
        for field, option in source.names().items()
    ]


CASES = _cases()


def _value(plugin: str, option: str) -> Any:
    return PLUGIN_VALUES.get((plugin, option), VALUES.get(option, dataclasses.MISSING))


def test_the_audit_covers_every_plugin_and_every_source():
    assert set(CONFIG_AT) == set(PLUGINS)
    for name in PLUGINS:
        cls = plugin_class(name)
        assert cls.options == plugin_options(name), name  # what the plugin builds from = what the registry lists
        assert set(CONFIG_AT[name]) == {s.config_class.__name__ for s in plugin_options(name)}, name
    options = {option for *_, option in CASES}
    assert len(options) > 120
    assert set(VALUES) <= options and {o for _, o in PLUGIN_VALUES} <= options  # no stale entries
    shared = {(p, c, f) for p, c, f, _ in CASES if CONFIG_AT[p][c] is None}
    assert shared == set(SHARED_AT) | set(SHARED_NOT_USED) and not set(SHARED_AT) & set(SHARED_NOT_USED)


@pytest.mark.parametrize(("plugin", "owner", "field", "option"), CASES, ids=[f"{c[0]}-{c[3]}" for c in CASES])
def test_each_option_reaches_the_plugin(plugin, owner, field, option):
    """Setting the option on `ContinualConfig` puts its value into the plugin `build_plugins` builds."""
    value = _value(plugin, option)
    assert value is not dataclasses.MISSING, f"give {option} a non-default valid value in VALUES"
    if (plugin, owner, field) in SHARED_NOT_USED:  # another plugin's option: this plugin's configs ignore it
        own = [at for at in CONFIG_AT[plugin].values() if at is not None]
        assert [_get(_build(plugin, **{option: value}), at) for at in own] == [_get(_build(plugin), at) for at in own]
        return
    default = getattr(_config(), option)
    assert value != default, f"pick a non-default value for {option}"
    expected = EXPECTED.get(option, value)
    at = CONFIG_AT[plugin][owner]
    path = SHARED_AT[plugin, owner, field] if at is None else f"{at}.{field}"
    companions = COMPANIONS.get(plugin, {}).get(owner, {})
    built = _build(plugin, **companions, **{option: value})
    if at is not None:
        assert type(_get(built, at)).__name__ == owner  # the config that source builds
    assert _get(built, path) == expected, (option, path)
    assert _get(_build(plugin, **companions), path) != expected  # the default is different: it is the option
    if (plugin, option) in ALSO_AT:
        also, also_expected = ALSO_AT[plugin, option]
        assert _get(built, also) == (expected if also_expected is None else also_expected), (option, also)


#: every field an option source excludes, and why: (config class, field) -> reason
EXCLUDED: dict[tuple[str, str], str] = {
    ("EWCConfig", "seed"): "the run's `seed` (TrainingArguments): one seed for the whole run (DERIVED)",
    ("EWCConfig", "progress_bar"): "not `disable_tqdm` (TrainingArguments): one switch for every bar (DERIVED)",
    ("NeuromodulationConfig", "signal_weights"): "a dict, which flags and HfArgumentParser do not read; Python only",
    ("EarlyStoppingConfig", "eval_batch_size"): "follows `continual_eval_batch_size` when scoring (checked below)",
    ("EarlyStoppingConfig", "eval_limit"): "follows `continual_eval_limit` when scoring (checked below)",
    ("ReplayConfig", "seed"): "the run's `seed` (DERIVED)",
    ("GenerativeReplayConfig", "alpha"): "the shared option `replay_alpha` (SHARED_AT)",
    ("GenerativeReplayConfig", "batch_size"): "the shared option `replay_batch_size` (SHARED_AT)",
    ("GenerativeReplayConfig", "seed"): "the run's `seed` (DERIVED)",
    ("FeatureReplayConfig", "max_rows"): "the shared option `replay_buffer_size` (SHARED_AT)",
    ("FeatureReplayConfig", "batch_size"): "the shared option `replay_batch_size` (SHARED_AT)",
    ("FeatureReplayConfig", "seed"): "the run's `seed` (DERIVED)",
    ("AdaptiveSchedulerConfig", "seed"): "the run's `seed` (DERIVED)",
    ("GateControllerConfig", "seed"): "the run's `seed` (DERIVED)",
    ("RouterConfig", "dim"): "the signature size, read from the model (checked below)",
    ("SignatureConfig", "weights"): "a dict, which HfArgumentParser cannot read from a flag; Python only",
}

#: excluded fields that follow another option: (plugin, option set, value, path in the plugin, expected)
DERIVED: list[tuple[str, str, Any, str, Any]] = [
    ("ewc", "seed", 7, "config.seed", 7),
    ("ewc", "disable_tqdm", True, "config.progress_bar", False),
    ("replay", "seed", 7, "config.seed", 7),
    ("replay", "seed", 7, "memory.seed", 7),
    ("generative_replay", "seed", 7, "config.seed", 7),
    ("feature_replay", "seed", 7, "config.seed", 7),
    ("adaptive_scheduler", "seed", 7, "config.seed", 7),
    ("gate_feedback", "seed", 7, "controller.config.seed", 7),
]


def test_every_excluded_field_is_documented():
    excluded = {
        (source.config_class.__name__, field)
        for name in PLUGINS
        for source in plugin_options(name)
        for field in source.exclude
    }
    assert excluded == set(EXCLUDED), (sorted(excluded - set(EXCLUDED)), sorted(set(EXCLUDED) - excluded))
    for name in PLUGINS:  # an excluded field is still a field of its config (not a typo that excludes nothing)
        for source in plugin_options(name):
            fields = {f.name for f in dataclasses.fields(source.config_class)}
            assert set(source.exclude) <= fields, (name, source.config_class.__name__)


@pytest.mark.parametrize(
    ("plugin", "option", "value", "path", "expected"), DERIVED, ids=[f"{d[0]}-{d[3]}" for d in DERIVED]
)
def test_each_derived_field_follows_its_option(plugin, option, value, path, expected):
    assert getattr(_config(), option) != value
    assert _get(_build(plugin, **{option: value}), path) == expected
    assert _get(_build(plugin), path) != expected


def test_early_stopping_scores_with_the_continual_eval_options(monkeypatch):
    """`EarlyStoppingConfig.eval_batch_size` / `eval_limit` are no options: left None, the validation split is
    scored with `continual_eval_batch_size` / `continual_eval_limit` of the run's config."""
    import hf_adaptive.tasks
    from hf_adaptive.tasks import builtin_suite

    (task,) = builtin_suite(["first_color"], n_train=4, n_eval=4, seed=0)
    seen: list[tuple[Any, Any]] = []
    scorings: list[dict[str, Any]] = []

    def task_accuracy(model, tokenizer, task, split, batch_size=None, limit=None, **scoring):
        seen.append((batch_size, limit))
        scorings.append(scoring)
        return 0.5

    monkeypatch.setattr(hf_adaptive.tasks, "task_accuracy", task_accuracy)
    for options, expected in (({}, (64, None)), ({"continual_eval_batch_size": 5, "continual_eval_limit": 9}, (5, 9))):
        config = _config(**options)
        (plugin,) = build_plugins(["early_stopping"], config)
        assert (plugin.config.eval_batch_size, plugin.config.eval_limit) == (None, None)
        plugin.task = task
        plugin.evaluate(None, None, config)
        assert seen[-1] == expected
        # and with the run's prompt options (the same prompts as the trainer's evaluation)
        assert scorings[-1] == {"max_length": 256, "prompt_format": "bos", "label_scoring": "sum", "token_budget": 8192}


def test_the_router_is_sized_by_the_signatures():
    """`RouterConfig.dim` is no option: the routing plugin reads it from the signature it computes on the model
    (text_dim + sketch_dim + 6 context statistics with every part)."""
    from hf_adaptive.experts.plugin import signature_dim

    default = _build("expert_routing")
    assert default.router.config.dim == 128 + 64 + 6
    built = _build("expert_routing", signature_text_dim=32, signature_sketch_dim=8)
    assert built.router.config.dim == 32 + 8 + 6 == signature_dim(built.library.model, built.signature_config)


#: constructor parameters of the plugins that are not config objects built from the plugin's options, and why
NOT_OPTIONS: dict[str, dict[str, str]] = {
    "olora": {"lora_config": "an object (a peft LoraConfig) of the new adapters; None: from the lora_* options"},
    "distillation": {"teacher": "an object: an explicit teacher model (a string is the distill_teacher option)"},
    "early_stopping": {
        "task": "an object (a Task); only needed with a plain Trainer, train_sequence passes each task",
        "processing_class": "an object (the tokenizer); the trainer passes its own",
    },
    "adaptive_scheduler": {"trainer": "an object: the Trainer it logs through (a ContinualTrainer binds itself)"},
    "freezing": {"trainer": "an object: the Trainer it logs through (a ContinualTrainer binds itself)"},
    "head_l0": {"model": "an object: the model that gets hard-concrete gates (needs_model)"},
    "gate_feedback": {
        "controller": "an object (GateController) built from the gate_* options, sized by the model's heads",
        "model": "an object: the model whose gates size the controller (needs_model)",
        "eval_dataset": "data, not an option: train_sequence uses each task's own eval split",
        "data_collator": "an object; only needed with a fixed eval_dataset",
    },
    "expert_routing": {
        "library": "an object (ExpertLibrary) built on the model, its LoRA shape from the lora_* options",
        "router": "an object (Router) built from the router_* options (RouterConfig), sized by the signatures",
    },
}


#: constructor parameters that are objects built from one of the plugin's option sources: (plugin, param) -> config
BUILT_FROM: dict[tuple[str, str], str] = {("expert_routing", "router"): "RouterConfig"}


def test_every_constructor_parameter_is_a_config_of_its_options_or_documented():
    """A plain parameter (`weight: float = 0.5`) would be a setting no option reaches: each parameter is a config
    object of one of the plugin's option sources, the keyword overrides of their fields, or listed above."""
    assert set(NOT_OPTIONS) <= set(PLUGINS)
    for name in PLUGINS:
        configs = {source.config_class.__name__ for source in plugin_options(name)}
        taken: set[str] = set()
        for param in list(inspect.signature(plugin_class(name).__init__).parameters.values())[1:]:
            if param.kind is inspect.Parameter.VAR_KEYWORD:
                continue  # keyword overrides of the config fields
            annotation = str(param.annotation).split("|")[0].strip()
            if annotation in configs:
                taken.add(annotation)
            else:
                assert param.name in NOT_OPTIONS.get(name, {}), (name, param.name)
                if (name, param.name) in BUILT_FROM:
                    taken.add(BUILT_FROM[name, param.name])
        shared = {c for c, at in CONFIG_AT[name].items() if at is None}
        assert taken | shared == configs, (name, sorted(configs - taken - shared))
        assert set(NOT_OPTIONS.get(name, {})) <= set(inspect.signature(plugin_class(name).__init__).parameters)


def _flag_words(value: Any) -> list[str]:
    """`value` as the words of a command-line flag (lists: one word per item)."""
    return [str(v) for v in value] if isinstance(value, list) else [str(value)]


@pytest.mark.parametrize("form", ["yaml", "flags"])
def test_every_plugin_option_is_reachable_from_yaml_and_flags(tmp_path, form):
    """Issue #17 through the CLI: all the values of `VALUES` set at once, from a YAML file or as flags, arrive on
    the parsed `ContinualConfig` (and from there in the plugins, `test_each_option_reaches_the_plugin`)."""
    import yaml

    from hf_adaptive.cli import parse_run_arguments

    values = {**VALUES, "gate_mode": "fixed"}
    base = {"output_dir": str(tmp_path / "o"), "report_to": "none"}
    if form == "yaml":
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump({**base, **values}))
        parsed = parse_run_arguments([str(path)])
    else:
        argv = [word for key, value in {**base, **values}.items() for word in (f"--{key}", *_flag_words(value))]
        parsed = parse_run_arguments(argv)
    (config,) = [p for p in parsed if isinstance(p, ContinualConfig)]
    for option, value in values.items():
        got = getattr(config, option)
        assert got == value and type(got) is type(value), (option, got, value)
