"""The option dataclasses of the scheduling folder: defaults, refusals, option names, restated errors."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest

from hf_adaptive.scheduling.config import (
    ADAPTIVE_SCHEDULER_OPTIONS,
    FREEZING_OPTIONS,
    AdaptiveSchedulerCallbackConfig,
    AdaptiveSchedulerConfig,
    FreezingConfig,
)
from hf_adaptive.utils.options import build_config, options_dataclass
from hf_adaptive.utils.validation import OptionError

#: every option these configs had as `ContinualConfig` fields before the redesign keeps its exact name
FORMER_OPTIONS = {
    "adaptive_lr_up",
    "adaptive_lr_down",
    "adaptive_patience",
    "adaptive_cooldown",
    "adaptive_dither",
    "adaptive_reward_key",
    "freeze_threshold",
    "freeze_threshold_mode",
    "freeze_granularity",
    "freeze_probe_every",
    "freeze_ema_beta",
    "freeze_warmup_steps",
    "freeze_max_frozen_fraction",
}


def _option_names(sources) -> set[str]:
    return {name for source in sources for name in source.names().values()}


def test_every_field_is_an_option_and_the_former_names_are_kept():
    names = _option_names(ADAPTIVE_SCHEDULER_OPTIONS) | _option_names(FREEZING_OPTIONS)
    assert FORMER_OPTIONS <= names
    assert {"adaptive_lr_bounds", "adaptive_window", "adaptive_sigma_bounds", "adaptive_nan_backoff"} <= names
    assert "freeze_percentile" in names
    assert "adaptive_seed" not in names  # the dither seed is the run's TrainingArguments.seed
    cls = options_dataclass("SchedulingOptions", [*ADAPTIVE_SCHEDULER_OPTIONS, *FREEZING_OPTIONS])
    assert cls().adaptive_lr_bounds == [1e-7, 1.0]  # a list on the command line / in YAML


def test_defaults():
    cfg = AdaptiveSchedulerConfig()
    assert (cfg.lr_up, cfg.lr_down, cfg.patience, cfg.cooldown, cfg.dither, cfg.seed) == (1.02, 0.8, 5, 5, False, 0)
    assert cfg.lr_bounds == (1e-7, 1.0) and cfg.momentum_bounds == (0.5, 0.95)
    assert AdaptiveSchedulerCallbackConfig().reward_key is None
    f = FreezingConfig()
    assert (f.threshold, f.threshold_mode, f.granularity, f.ema_beta) == (1e-3, "absolute", "parameter", 0.9)
    assert (f.warmup_steps, f.probe_every, f.max_frozen_fraction) == (10, 20, 0.9)
    assert AdaptiveSchedulerConfig(lr_bounds=[1e-6, 0.5]).lr_bounds == (1e-6, 0.5)


@pytest.mark.parametrize(
    ("cls", "field", "value"),
    [
        (AdaptiveSchedulerConfig, "lr_up", 0.5),
        (AdaptiveSchedulerConfig, "lr_bounds", (1.0,)),
        (AdaptiveSchedulerConfig, "dither", "yes"),
        (AdaptiveSchedulerCallbackConfig, "reward_key", ""),
        (FreezingConfig, "threshold_mode", "median"),
        (FreezingConfig, "ema_beta", 1.0),
        (FreezingConfig, "percentile", 101.0),
    ],
)
def test_a_bad_value_names_the_config_field(cls, field, value):
    with pytest.raises(OptionError, match=rf"^{cls.__name__}\.{field}="):
        cls(**{field: value})


@pytest.mark.parametrize(
    ("sources", "option", "value"),
    [
        (ADAPTIVE_SCHEDULER_OPTIONS, "adaptive_lr_down", 1.5),
        (ADAPTIVE_SCHEDULER_OPTIONS, "adaptive_window", 1),
        (ADAPTIVE_SCHEDULER_OPTIONS, "adaptive_reward_key", ""),
        (FREEZING_OPTIONS, "freeze_granularity", "block"),
        (FREEZING_OPTIONS, "freeze_max_frozen_fraction", 1.0),
    ],
)
def test_build_config_restates_errors_under_the_option_name(sources, option, value):
    options = SimpleNamespace(**{option: value})
    with pytest.raises(OptionError, match=rf"^ContinualConfig\.{option}="):
        for source in sources:
            build_config(source, options, owner="ContinualConfig")


def test_from_config_reads_every_option_and_the_run_seed():
    from hf_adaptive.scheduling.callback import AdaptiveSchedulerCallback, SelectiveFreezingCallback

    options = SimpleNamespace(
        adaptive_lr_up=1.1, adaptive_window=4, adaptive_reward_key="reward", adaptive_lr_bounds=[1e-5, 0.1], seed=7
    )
    cb = AdaptiveSchedulerCallback.from_config(options)
    assert (cb.config.lr_up, cb.config.window, cb.config.lr_bounds, cb.config.seed) == (1.1, 4, (1e-5, 0.1), 7)
    assert cb.reward_key == "reward"
    freeze = SelectiveFreezingCallback.from_config(SimpleNamespace(freeze_granularity="module", freeze_warmup_steps=2))
    assert (freeze.config.granularity, freeze.config.warmup_steps) == ("module", 2)
    with pytest.raises(TypeError, match="lr_upp"):
        AdaptiveSchedulerCallback(lr_upp=2.0)
    assert AdaptiveSchedulerCallback(lr_up=1.5, reward_key="r").config.lr_up == 1.5


def test_the_config_module_is_light():
    code = (
        "import sys, hf_adaptive.scheduling.config, hf_adaptive.scheduling; "
        "bad = [m for m in ('hf_adaptive.scheduling.callback', 'hf_adaptive.scheduling.early_stopping', "
        "'hf_adaptive.trainer', 'hf_adaptive.config') if m in sys.modules]; print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
