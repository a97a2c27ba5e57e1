"""The gradient-aggregation options: defaults, validation naming the field, option names, a light config module."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest

from hf_adaptive.aggregation.config import (
    AGGREGATORS,
    GRAD_AGGREGATION_OPTIONS,
    OBJECTIVES,
    SCALES,
    GradAggregationConfig,
)
from hf_adaptive.utils.options import build_config, options_dataclass
from hf_adaptive.utils.validation import OptionError


def test_defaults_and_option_names():
    config = GradAggregationConfig()
    assert (config.aggregator, config.objectives, config.scale) == ("upgrad", "terms", "sum")
    names = {option for source in GRAD_AGGREGATION_OPTIONS for option in source.names().values()}
    assert names == {"grad_aggregation_aggregator", "grad_aggregation_objectives", "grad_aggregation_scale"}


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("aggregator", "cagrad"),  # needs cvxpy: not offered
        ("aggregator", "UPGrad"),
        ("aggregator", 3),
        ("aggregator", None),
        ("objectives", "tasks"),
        ("objectives", True),
        ("scale", "norm"),
        ("scale", 1.0),
    ],
)
def test_a_bad_value_names_the_field(field, value):
    with pytest.raises(OptionError) as err:
        GradAggregationConfig(**{field: value})
    assert str(err.value).startswith(f"GradAggregationConfig.{field}={value!r} is not allowed: choose one of ")


@pytest.mark.parametrize(
    ("option", "value", "allowed"),
    [
        ("grad_aggregation_aggregator", "nash_mtl", AGGREGATORS),
        ("grad_aggregation_objectives", "all", OBJECTIVES),
        ("grad_aggregation_scale", "max", SCALES),
    ],
)
def test_build_config_restates_an_error_under_the_option_name(option, value, allowed):
    with pytest.raises(OptionError) as err:
        build_config(GRAD_AGGREGATION_OPTIONS[0], SimpleNamespace(**{option: value}), owner="ContinualConfig")
    assert str(err.value) == f"ContinualConfig.{option}={value!r} is not allowed: choose one of {list(allowed)}"


def test_the_options_parse_as_flags():
    from transformers import HfArgumentParser

    mixin = options_dataclass("GradAggregationOptions", GRAD_AGGREGATION_OPTIONS)
    flags = ["--grad_aggregation_aggregator", "pcgrad", "--grad_aggregation_objectives", "task_vs_rest"]
    (parsed,) = HfArgumentParser(mixin).parse_args_into_dataclasses([*flags, "--grad_aggregation_scale", "mean"])
    config = build_config(GRAD_AGGREGATION_OPTIONS[0], parsed, owner="ContinualConfig")
    assert (config.aggregator, config.objectives, config.scale) == ("pcgrad", "task_vs_rest", "mean")


def test_the_config_module_imports_neither_the_plugin_nor_torch():
    code = (
        "import sys, hf_adaptive.aggregation.config; "
        "print(sorted(m for m in sys.modules if m.startswith('hf_adaptive.aggregation.')), "
        "'torch' in sys.modules, 'torchjd' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['hf_adaptive.aggregation.config'] False False"


def test_the_plugin_is_built_from_the_options():
    pytest.importorskip("torchjd")
    from torchjd.aggregation import PCGrad

    from hf_adaptive.aggregation import GradAggregationPlugin

    options = SimpleNamespace(grad_aggregation_aggregator="pcgrad", grad_aggregation_scale="mean")
    plugin = GradAggregationPlugin.from_config(options)
    assert plugin.config == GradAggregationConfig(aggregator="pcgrad", objectives="terms", scale="mean")
    assert isinstance(plugin.aggregator, PCGrad)
    assert GradAggregationPlugin(plugin.config, objectives="task_vs_rest").config.objectives == "task_vs_rest"
    with pytest.raises(OptionError, match=r"^GradAggregationConfig\.scale='both' is not allowed"):
        GradAggregationPlugin(scale="both")
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['alpha'\]"):
        GradAggregationPlugin(alpha=0.5)
    with pytest.raises(TypeError, match="config must be a GradAggregationConfig"):
        GradAggregationPlugin(SimpleNamespace(aggregator="mean"))
