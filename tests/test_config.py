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
