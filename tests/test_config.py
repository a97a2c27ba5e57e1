"""Bad `ContinualConfig` values raise a ValueError naming the field, the value and what is allowed."""

from __future__ import annotations

import pytest

from hf_adaptive.config import ContinualConfig


@pytest.mark.parametrize(
    ("field", "value", "allowed"),
    [
        ("adapter_strategy", "lora_everything", "full"),
        ("ewc_lambda", -1.0, ">= 0"),
        ("replay_alpha", 1.5, "<= 1"),
        ("replay_alpha", -0.1, ">= 0"),
        ("feature_replay_alpha", 2.0, "<= 1"),
        ("ewc_gamma", 1.01, "<= 1"),
        ("ewc_mode", "offline", "separate"),
        ("fisher_type", "approximate", "empirical"),
        ("fisher_samples", 0, ">= 1"),
        ("replay_policy", "fifo", "reservoir"),
        ("continual_metrics", ["avg_acc", "accuracy"], "bwt"),
        ("early_stopping_metric", "f1", "accuracy"),
        ("early_stopping_patience", 0, ">= 1"),
        ("lora_r", 0, ">= 1"),
        ("lora_dropout", 1.0, "< 1"),
        ("lora_target_modules", [], "non-empty"),
        ("gamma_gain_lambda", float("nan"), "NaN"),
        ("replay_buffer_size", 2.5, "integer"),
        # expert routing: the rules are RouterConfig's / SignatureConfig's / the plugin's, restated for the field
        ("router_scorer", "dot", "one of"),
        ("router_decision", "greedy", "one of"),
        ("router_normalize", "zscore", "one of"),
        ("router_reuse_threshold", float("nan"), "NaN"),
        ("router_reuse_threshold", "high", "a number"),
        # the bound is the reuse threshold: the message must say so, not only show its value
        ("router_fork_threshold", 0.9, "reuse_threshold"),
        ("router_bootstrap_experts", -1, ">= 0"),
        ("router_index", "annoy", "one of"),
        ("router_top_k", 0, ">= 1"),
        ("router_tolerance", 1.5, "<= 1.0"),
        ("signature_parts", ["text", "pixels"], "subset of"),
        ("signature_parts", [], "non-empty"),
        ("signature_layers", [], "non-empty"),
        ("signature_sketch_dim", 0, ">= 1"),
        ("signature_text_dim", 0, ">= 1"),
        ("signature_text_dim", 2.5, "integer"),
        ("signature_text_encoder", "", "a non-empty string or None"),
        ("signature_n_examples", 0, ">= 1"),
    ],
)
def test_bad_value_names_field_value_and_allowed(tmp_path, field, value, allowed):
    with pytest.raises(ValueError) as err:
        ContinualConfig(output_dir=str(tmp_path), report_to=[], **{field: value})
    message = str(err.value)
    shown = [repr(value[-1] if isinstance(value, list) and value else value)]  # lists: the offending element
    if field == "signature_parts" and value == []:
        shown.append(repr(()))  # restated as SignatureConfig holds it (a tuple): still the empty value given
    assert f"ContinualConfig.{field}=" in message and any(s in message for s in shown) and allowed in message, message


def test_defaults_are_valid_and_parse_from_flags(tmp_path):
    from transformers import HfArgumentParser

    (config,) = HfArgumentParser(ContinualConfig).parse_args_into_dataclasses(
        args=[
            "--output_dir",
            str(tmp_path),
            "--ewc_lambda",
            "100",
            "--adapter_strategy",
            "lora_per_task",
            "--lora_target_modules",
            "q_proj",
            "v_proj",
            "--report_to",
            "none",
        ]
    )
    assert config.ewc_lambda == 100.0 and config.adapter_strategy == "lora_per_task"
    assert config.lora_target_modules == ["q_proj", "v_proj"]
    with pytest.raises(ValueError, match="ContinualConfig.adapter_strategy"):
        HfArgumentParser(ContinualConfig).parse_dict({"output_dir": str(tmp_path), "adapter_strategy": "x"})


def _routing_sources():
    """The option sources of the expert_routing plugin, by the config class they build."""
    from hf_adaptive.registry import plugin_options

    return {source.config_class.__name__: source for source in plugin_options("expert_routing")}


def test_routing_defaults_are_the_dataclass_defaults(tmp_path):
    """The router_* / signature_* defaults are RouterConfig's, SignatureConfig's and the plugin's (no drift)."""
    import dataclasses

    from hf_adaptive.experts.config import ExpertRoutingConfig, RouterConfig, SignatureConfig
    from hf_adaptive.utils.options import build_config

    config = ContinualConfig(output_dir=str(tmp_path), report_to=[])
    router = {f.name: f.default for f in dataclasses.fields(RouterConfig)}
    for name in ("scorer", "decision", "normalize", "reuse_threshold", "fork_threshold", "bootstrap_experts"):
        assert getattr(config, f"router_{name}") == router[name], name
    assert (config.router_index, config.router_top_k) == (router["index"], router["top_k"])
    signature = SignatureConfig()
    for name in ("parts", "layers", "sketch_dim", "text_dim", "text_encoder", "n_examples"):
        value = getattr(config, f"signature_{name}")
        assert (tuple(value) if name == "parts" else value) == getattr(signature, name), name
    plugin = ExpertRoutingConfig()
    assert (config.router_tolerance, config.router_eval_limit, config.router_verify_reuse) == (
        plugin.tolerance,
        plugin.eval_limit,
        plugin.verify_reuse,
    )
    # the configs built from the defaults are the dataclasses' own defaults, field for field
    sources = _routing_sources()
    assert build_config(sources["SignatureConfig"], config, owner="ContinualConfig") == SignatureConfig()
    assert build_config(sources["RouterConfig"], config, owner="ContinualConfig", dim=7) == RouterConfig(dim=7)
    assert build_config(sources["ExpertRoutingConfig"], config, owner="ContinualConfig") == ExpertRoutingConfig()


def test_routing_options_parse_from_flags_and_reach_the_configs(tmp_path):
    from transformers import HfArgumentParser

    from hf_adaptive.utils.options import build_config

    (config,) = HfArgumentParser(ContinualConfig).parse_args_into_dataclasses(
        args=[
            "--output_dir", str(tmp_path), "--report_to", "none",
            "--router_scorer", "linear", "--router_decision", "ucb", "--router_normalize", "none",
            "--router_reuse_threshold", "0.9", "--router_fork_threshold", "0.75", "--router_bootstrap_experts", "2",
            "--router_top_k", "3", "--router_tolerance", "0.1",
            "--signature_parts", "text", "context", "--signature_layers", "input_embeddings",
            "--signature_sketch_dim", "8", "--signature_text_dim", "32", "--signature_n_examples", "4",
        ]
    )  # fmt: skip
    sources = _routing_sources()
    router = build_config(sources["RouterConfig"], config, owner="ContinualConfig", dim=38)
    assert router.dim == 38
    assert (router.scorer, router.decision, router.normalize) == ("linear", "ucb", "none")
    assert (router.reuse_threshold, router.fork_threshold, router.bootstrap_experts, router.top_k) == (0.9, 0.75, 2, 3)
    signature = build_config(sources["SignatureConfig"], config, owner="ContinualConfig")
    assert signature.parts == ("text", "context") and signature.layers == ["input_embeddings"]
    assert (signature.sketch_dim, signature.text_dim, signature.n_examples) == (8, 32, 4)
    assert config.router_tolerance == 0.1
    assert build_config(sources["ExpertRoutingConfig"], config, owner="ContinualConfig").tolerance == 0.1


#: every option `ContinualConfig` had before the redesign (issue #12; commit 000d2dc, hf_adaptive/config.py), with
#: its default then, pasted literally: the options moved into their capability's config, their names and defaults
#: did not (except CHANGED_DEFAULTS)
OLD_OPTIONS = [
    ("adapter_strategy", "full"),
    ("lora_r", 8),
    ("lora_alpha", 16.0),
    ("lora_dropout", 0.0),
    ("lora_target_modules", ["q_proj", "k_proj", "v_proj", "o_proj"]),
    ("evaluate_unseen_tasks", True),
    ("continual_eval_batch_size", 64),
    ("continual_eval_limit", None),
    ("continual_metrics", ["avg_acc", "bwt", "fwt", "forgetting"]),
    ("save_results_plot", True),
    ("append_eos_token", True),
    ("nonfinite_patience", 5),
    # ("ewc_lambda", 0.0): changed, see CHANGED_DEFAULTS
    ("ewc_mode", "separate"),
    ("ewc_gamma", 1.0),
    ("fisher_samples", 50),
    ("fisher_type", "empirical"),
    ("fisher_chunk_size", None),
    ("fisher_method", "vmap"),
    ("fisher_normalization", "none"),
    ("gamma_gated_ewc", False),
    ("gamma_gain_lambda", 3.0),
    ("ewc_fixed_lambda_bypass_gamma", False),
    # ("replay_alpha", 0.0): changed, see CHANGED_DEFAULTS
    ("replay_buffer_size", 200),
    ("replay_policy", "balanced"),
    ("replay_batch_size", 8),
    ("replay_examples_per_task", None),
    # ("generative_replay_ratio", 0.0): changed, see CHANGED_DEFAULTS
    ("generative_replay_lm_lambda", 0.25),
    ("generative_replay_conditioning", "task"),
    ("generative_replay_max_new_tokens", 32),
    ("generative_replay_top_k", 0),
    ("generative_replay_temperature", 1.0),
    ("generative_replay_max_rounds", 3),
    ("generative_replay_prototype_samples", 64),
    ("generative_replay_prototypes_per_class", 2),
    ("generative_replay_prefix_words", 1),
    # ("feature_replay_alpha", 0.0): changed, see CHANGED_DEFAULTS
    ("feature_replay_samples_per_task", 64),
    ("feature_replay_target", "features"),
    ("feature_replay_k_per_class", 1),
    ("feature_replay_dtype", "float32"),
    ("early_stopping_patience", 3),  # 3 at 000d2dc too (None is refused, not turned into 3)
    ("early_stopping_metric", "accuracy"),
    ("early_stopping_min_epochs", 1),
    ("early_stopping_min_delta", 0.001),
    ("early_stopping_restore_best", True),
    ("adaptive_lr_up", 1.02),
    ("adaptive_lr_down", 0.8),
    ("adaptive_patience", 5),
    ("adaptive_cooldown", 5),
    ("adaptive_dither", False),
    ("adaptive_reward_key", None),
    ("freeze_threshold", 0.001),
    ("freeze_threshold_mode", "absolute"),
    ("freeze_granularity", "parameter"),
    ("freeze_probe_every", 20),
    ("freeze_ema_beta", 0.9),
    ("freeze_warmup_steps", 10),
    ("freeze_max_frozen_fraction", 0.9),
    ("gate_mode", None),
    ("gate_l0_weight", 0.01),
    ("gate_algorithm", "ppo"),
    ("gate_feedback_every", 50),
    ("gate_feedback_mode", "periodic"),
    ("gate_eval_size", 64),
    ("gate_min_active_fraction", 0.0),
    ("gate_max_active_fraction", 1.0),
    ("gate_efficiency_factor", 0.1),
    ("gate_eval_batch_size", 16),
    ("gate_statistics", ["importance", "entropy"]),
    ("gate_stats_batches", 1),
    ("gate_preference", None),
    ("gate_log_gates", True),
    ("optimizer_name", None),
    ("lookahead_inner", "adamw"),
    ("lookahead_k", 5),
    ("lookahead_alpha", 0.5),
    ("gradient_centralization", False),
    ("loss_weighting", "none"),
    ("router_scorer", "cosine"),
    ("router_decision", "threshold"),
    ("router_normalize", "standardize"),
    ("router_reuse_threshold", 0.5),
    ("router_fork_threshold", 0.3),
    ("router_bootstrap_experts", 0),
    ("router_index", "exact"),
    ("router_top_k", 8),
    ("router_tolerance", 0.05),
    ("router_eval_limit", 64),
    ("router_verify_reuse", True),
    ("signature_parts", ["text", "gradient", "context"]),
    ("signature_layers", None),
    ("signature_sketch_dim", 64),
    ("signature_text_dim", 128),
    ("signature_text_encoder", None),
    ("signature_n_examples", 16),
]
#: enabled by name, a plugin does something with its defaults (issue #12): the defaults that were a silent no-op
#: (old value -> new value)
CHANGED_DEFAULTS = {
    "ewc_lambda": (0.0, 1.0),
    "replay_alpha": (0.0, 0.2),
    "generative_replay_ratio": (0.0, 0.2),
    "feature_replay_alpha": (0.0, 0.1),
}


def test_every_option_from_before_the_redesign_keeps_its_name_and_default(tmp_path):
    import dataclasses

    from transformers import HfArgumentParser

    fields = {f.name for f in dataclasses.fields(ContinualConfig) if f.init}
    config = ContinualConfig(output_dir=str(tmp_path), report_to=[])
    (parsed,) = HfArgumentParser(ContinualConfig).parse_args_into_dataclasses(
        args=["--output_dir", str(tmp_path), "--report_to", "none"]
    )
    assert len(OLD_OPTIONS) + len(CHANGED_DEFAULTS) == 98  # the 98 options of 000d2dc, none forgotten
    assert not {name for name, _ in OLD_OPTIONS} & set(CHANGED_DEFAULTS)
    for name, default in OLD_OPTIONS:
        assert name in fields, f"option {name} is gone"
        for built in (config, parsed):  # from Python and from the command line
            value = getattr(built, name)
            assert value == default and type(value) is type(default), (name, value, default)
    for name, (old, new) in CHANGED_DEFAULTS.items():
        # enabled by name, a plugin does something with its defaults (issue #12)
        assert name in fields, f"option {name} is gone"
        assert getattr(config, name) == getattr(parsed, name) == new != old, name
    assert config.ewc_lambda == 1.0
    assert config.replay_alpha == 0.2
    assert config.generative_replay_ratio == 0.2
    assert config.feature_replay_alpha == 0.1
