"""The consolidation options: `EWCConfig` / `NeuromodulationConfig` defaults, validation, and their option names."""

from __future__ import annotations

import math
import subprocess
import sys
from types import SimpleNamespace

import pytest

from hf_adaptive.consolidation.config import EWC_OPTIONS, EWCConfig, NeuromodulationConfig
from hf_adaptive.utils.options import build_config, options_dataclass
from hf_adaptive.utils.validation import OptionError

#: the option names `ContinualConfig` had before the options moved here: YAML files and flags keep working
HISTORIC = {
    "ewc_lambda",
    "ewc_mode",
    "ewc_gamma",
    "fisher_samples",
    "fisher_type",
    "fisher_chunk_size",
    "fisher_method",
    "fisher_normalization",
    "gamma_gated_ewc",
    "gamma_gain_lambda",
    "ewc_fixed_lambda_bypass_gamma",
}


def test_defaults():
    config = EWCConfig()
    assert (config.ewc_lambda, config.mode, config.gamma) == (1.0, "separate", 1.0)
    assert (config.fisher_samples, config.fisher_type, config.fisher_chunk_size) == (50, "empirical", None)
    assert (config.fisher_method, config.fisher_normalization) == ("vmap", "none")
    assert (config.gamma_gated, config.bypass_gamma, config.seed, config.progress_bar) == (False, False, 0, True)
    gain = NeuromodulationConfig()
    assert (gain.gamma_gain_lambda, gain.ema_beta, gain.grad_warmup_steps) == (3.0, 0.9, 5)
    assert gain.signal_weights == {"nll": 1.0, "accuracy": 1.0, "grad_norm": 1.0, "entropy": 1.0}


def test_option_names_keep_the_historic_names():
    names = {option for source in EWC_OPTIONS for option in source.names().values()}
    assert names == HISTORIC | {"neuromod_ema_beta", "neuromod_grad_warmup_steps"}
    mixin = options_dataclass("EWCOptions", EWC_OPTIONS)
    defaults = mixin()
    assert defaults.ewc_lambda == 1.0 and defaults.fisher_chunk_size is None and defaults.gamma_gated_ewc is False
    assert defaults.gamma_gain_lambda == 3.0 and defaults.neuromod_grad_warmup_steps == 5


@pytest.mark.parametrize(
    ("cls", "field", "value"),
    [
        (EWCConfig, "ewc_lambda", -1.0),
        (EWCConfig, "ewc_lambda", math.inf),
        (EWCConfig, "ewc_lambda", "1"),
        (EWCConfig, "mode", "offline"),
        (EWCConfig, "gamma", 1.5),
        (EWCConfig, "fisher_samples", 0),
        (EWCConfig, "fisher_samples", 2.5),
        (EWCConfig, "fisher_type", "x"),
        (EWCConfig, "fisher_chunk_size", 0),
        (EWCConfig, "fisher_method", "jvp"),
        (EWCConfig, "fisher_normalization", "l2"),
        (EWCConfig, "gamma_gated", "yes"),
        (EWCConfig, "bypass_gamma", 1),
        (EWCConfig, "seed", 1.5),
        (EWCConfig, "progress_bar", None),
        (NeuromodulationConfig, "gamma_gain_lambda", -1),
        (NeuromodulationConfig, "gamma_gain_lambda", math.nan),
        (NeuromodulationConfig, "ema_beta", 1.0),
        (NeuromodulationConfig, "grad_warmup_steps", 0),
        (NeuromodulationConfig, "signal_weights", {"loss": 1.0}),
        (NeuromodulationConfig, "signal_weights", {"nll": 0.0}),
        (NeuromodulationConfig, "signal_weights", {"nll": math.inf}),
    ],
)
def test_a_bad_value_names_the_config_field(cls, field, value):
    with pytest.raises(OptionError) as err:
        cls(**{field: value})
    assert str(err.value).startswith(f"{cls.__name__}.{field}={value!r} is not allowed: ")


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("ewc_lambda", -2.0),
        ("ewc_mode", "offline"),
        ("fisher_samples", 0),
        ("gamma_gated_ewc", "yes"),
        ("ewc_fixed_lambda_bypass_gamma", 2),
        ("gamma_gain_lambda", -1.0),
        ("neuromod_ema_beta", 1.5),
    ],
)
def test_build_config_restates_an_error_under_the_option_name(option, value):
    options = SimpleNamespace(**{option: value})
    with pytest.raises(OptionError) as err:
        for source in EWC_OPTIONS:
            build_config(source, options, owner="ContinualConfig")
    assert str(err.value).startswith(f"ContinualConfig.{option}={value!r} is not allowed: ")


def test_build_config_reads_the_options():
    ewc, gain = EWC_OPTIONS
    options = SimpleNamespace(ewc_lambda=2.5, fisher_samples=7, gamma_gated_ewc=True, neuromod_ema_beta=0.5)
    config = build_config(ewc, options, owner="ContinualConfig")
    assert (config.ewc_lambda, config.fisher_samples, config.gamma_gated) == (2.5, 7, True)
    assert build_config(gain, options, owner="ContinualConfig").ema_beta == 0.5


def test_the_config_module_imports_no_plugin_code():
    code = (
        "import sys, hf_adaptive.consolidation.config; "
        "print(sorted(m for m in sys.modules if m.startswith('hf_adaptive.consolidation.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['hf_adaptive.consolidation.config']"


def test_the_options_parse_as_flags():
    """The composed options go through `HfArgumentParser` like the `ContinualConfig` fields they were."""
    from transformers import HfArgumentParser

    mixin = options_dataclass("EWCOptions", EWC_OPTIONS)
    flags = ["--ewc_lambda", "2", "--fisher_chunk_size", "3", "--gamma_gated_ewc", "true", "--neuromod_ema_beta", "0.5"]
    (parsed,) = HfArgumentParser(mixin).parse_args_into_dataclasses(flags)
    assert (parsed.ewc_lambda, parsed.fisher_chunk_size, parsed.gamma_gated_ewc) == (2.0, 3, True)
    ewc, gain = (build_config(source, parsed, owner="ContinualConfig") for source in EWC_OPTIONS)
    assert (ewc.ewc_lambda, ewc.fisher_chunk_size, ewc.gamma_gated, gain.ema_beta) == (2.0, 3, True, 0.5)
