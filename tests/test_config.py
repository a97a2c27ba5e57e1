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
        ("lora_dropout", 1.0, "<= 0.999"),
        ("lora_target_modules", [], "non-empty"),
        ("gamma_gain_lambda", float("nan"), "NaN"),
        ("replay_buffer_size", 2.5, "integer"),
        # expert routing: the rules are RouterConfig's / SignatureConfig's / the plugin's, restated for the field
        ("router_scorer", "dot", "one of"),
        ("router_decision", "greedy", "one of"),
        ("router_normalize", "zscore", "one of"),
        ("router_reuse_threshold", float("nan"), "NaN"),
        ("router_reuse_threshold", "high", "a number"),
        ("router_fork_threshold", 0.9, "reuse_threshold (0.5)"),
        ("router_bootstrap_experts", -1, ">= 0"),
        ("router_index", "annoy", "one of"),
        ("router_top_k", 0, ">= 1"),
        ("router_tolerance", 1.5, "[0, 1]"),
        ("signature_parts", ["text", "pixels"], "subset of"),
        ("signature_parts", [], "non-empty"),
        ("signature_layers", [], "non-empty"),
        ("signature_sketch_dim", 0, ">= 1"),
        ("signature_text_dim", 0, ">= 1"),
        ("signature_text_dim", 2.5, "integer"),
        ("signature_text_encoder", "", "None or"),
        ("signature_n_examples", 0, ">= 1"),
    ],
)
def test_bad_value_names_field_value_and_allowed(tmp_path, field, value, allowed):
    with pytest.raises(ValueError) as err:
        ContinualConfig(output_dir=str(tmp_path), report_to=[], **{field: value})
    message = str(err.value)
    shown = value[-1] if isinstance(value, list) and value else value  # lists: the offending element is named
    assert f"ContinualConfig.{field}=" in message and repr(shown) in message and allowed in message


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


def test_routing_defaults_are_the_dataclass_defaults(tmp_path):
    """The router_* / signature_* defaults are RouterConfig's, SignatureConfig's and the plugin's (no drift)."""
    import dataclasses
    import inspect

    from hf_adaptive.experts import ExpertRoutingPlugin, RouterConfig, SignatureConfig

    config = ContinualConfig(output_dir=str(tmp_path), report_to=[])
    router = {f.name: f.default for f in dataclasses.fields(RouterConfig)}
    for name in ("scorer", "decision", "normalize", "reuse_threshold", "fork_threshold", "bootstrap_experts"):
        assert getattr(config, f"router_{name}") == router[name], name
    assert (config.router_index, config.router_top_k) == (router["index"], router["top_k"])
    signature = SignatureConfig()
    for name in ("parts", "layers", "sketch_dim", "text_dim", "text_encoder", "n_examples"):
        value = getattr(config, f"signature_{name}")
        assert (tuple(value) if name == "parts" else value) == getattr(signature, name), name
    tolerance = inspect.signature(ExpertRoutingPlugin.__init__).parameters["tolerance"].default
    assert config.router_tolerance == tolerance
    # the configs built from the defaults are the dataclasses' own defaults, field for field
    assert config.expert_signature_config() == SignatureConfig()
    assert config.expert_router_config(dim=7) == RouterConfig(dim=7)


def test_routing_options_parse_from_flags_and_reach_the_configs(tmp_path):
    from transformers import HfArgumentParser

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
    router = config.expert_router_config(dim=38)
    assert (router.scorer, router.decision, router.normalize) == ("linear", "ucb", "none")
    assert (router.reuse_threshold, router.fork_threshold, router.bootstrap_experts, router.top_k) == (0.9, 0.75, 2, 3)
    signature = config.expert_signature_config()
    assert signature.parts == ("text", "context") and signature.layers == ["input_embeddings"]
    assert (signature.sketch_dim, signature.text_dim, signature.n_examples) == (8, 32, 4)
    assert config.router_tolerance == 0.1
