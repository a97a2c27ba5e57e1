"""The options of the control plugins: defaults, validation, option names (the former `ContinualConfig` fields),
restating errors under the option name, and building the plugins from a `ContinualConfig`-like object."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from types import SimpleNamespace

import pytest

from hf_adaptive.control.config import (
    GATE_CONTROLLER_SOURCE,
    GATE_FEEDBACK_OPTIONS,
    GATE_OPTIONS,
    GATE_SOURCE,
    HEAD_L0_OPTIONS,
    FeedbackConfig,
    GateConfig,
    GateControllerConfig,
    HeadL0Config,
)
from hf_adaptive.utils.options import OptionSource, build_config, check_unique_options, options_dataclass
from hf_adaptive.utils.validation import OptionError

#: every `gate_*` field of the former `ContinualConfig`, with its default there
FORMER = {
    "gate_mode": None,
    "gate_l0_weight": 0.01,
    "gate_algorithm": "ppo",
    "gate_feedback_every": 50,
    "gate_feedback_mode": "periodic",
    "gate_eval_size": 64,
    "gate_min_active_fraction": 0.0,
    "gate_max_active_fraction": 1.0,
    "gate_efficiency_factor": 0.1,
    "gate_eval_batch_size": 16,
    "gate_statistics": ["importance", "entropy"],
    "gate_stats_batches": 1,
    "gate_preference": None,
    "gate_log_gates": True,
}
RL_OPTIONS = {
    "gate_hidden_size",
    "gate_head_embedding",
    "gate_history",
    "gate_lr",
    "gate_gamma",
    "gate_gae_lambda",
    "gate_rollout_steps",
    "gate_ppo_epochs",
    "gate_clip_eps",
    "gate_value_coef",
    "gate_entropy_coef",
    "gate_max_grad_norm",
    "gate_max_changes",
    "gate_keep_bias",
    "gate_reward_ema",
    "gate_min_active_heads",
    "gate_max_active_heads",
}


def _mixin() -> type:
    return options_dataclass("GateOptions", [*GATE_FEEDBACK_OPTIONS, *HEAD_L0_OPTIONS])


def test_former_option_names_and_defaults_are_kept_and_rl_options_added():
    fields = {f.name: f for f in dataclasses.fields(_mixin())}
    defaults = {name: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
                for name, f in fields.items()}  # fmt: skip
    assert {k: defaults[k] for k in FORMER} == FORMER
    assert set(fields) == set(FORMER) | RL_OPTIONS
    check_unique_options([*GATE_FEEDBACK_OPTIONS, *HEAD_L0_OPTIONS], reserved=["seed", "output_dir"])
    assert all(f.metadata.get("help") for f in fields.values())


def test_gate_mode_is_one_source_shared_by_both_plugins():
    from hf_adaptive.control.feedback import FeedbackCallback
    from hf_adaptive.control.head_l0 import HeadGatePlugin

    assert GATE_OPTIONS == (GATE_SOURCE,)
    assert GATE_SOURCE in FeedbackCallback.options and GATE_SOURCE in HeadGatePlugin.options
    assert FeedbackCallback.options == GATE_FEEDBACK_OPTIONS and HeadGatePlugin.options == HEAD_L0_OPTIONS
    assert "seed" in GATE_CONTROLLER_SOURCE.exclude  # the run's seed seeds the controller


def test_defaults():
    assert GateConfig().mode is None
    assert HeadL0Config().weight == 0.01
    fb = FeedbackConfig()
    assert (fb.eval_every, fb.mode, fb.eval_size, fb.eval_batch_size) == (50, "periodic", 64, 16)
    assert fb.statistics == ("importance", "entropy") and fb.preference is None and fb.log_gates is True
    gc = GateControllerConfig()
    assert (gc.algorithm, gc.lr, gc.rollout_steps, gc.max_changes, gc.seed) == ("ppo", 3e-3, 4, None, 0)
    assert FeedbackConfig(statistics="entropy").statistics == ("entropy",)  # a lone value is a one-element list


@pytest.mark.parametrize(
    ("cls", "field", "value", "option"),
    [
        (GateConfig, "mode", "soft", "gate_mode"),
        (HeadL0Config, "weight", -0.1, "gate_l0_weight"),
        (HeadL0Config, "weight", float("nan"), "gate_l0_weight"),
        (FeedbackConfig, "eval_every", 0, "gate_feedback_every"),
        (FeedbackConfig, "mode", "sometimes", "gate_feedback_mode"),
        (FeedbackConfig, "statistics", ["importance", "gradient"], "gate_statistics"),
        (FeedbackConfig, "preference", -1.0, "gate_preference"),
        (FeedbackConfig, "log_gates", "yes", "gate_log_gates"),
        (GateControllerConfig, "algorithm", "dqn", "gate_algorithm"),
        (GateControllerConfig, "lr", 0.0, "gate_lr"),
        (GateControllerConfig, "ppo_epochs", 0, "gate_ppo_epochs"),
        (GateControllerConfig, "max_changes", 0, "gate_max_changes"),
        (GateControllerConfig, "reward_ema", 1.0, "gate_reward_ema"),
        (GateControllerConfig, "efficiency_factor", -0.1, "gate_efficiency_factor"),
        (GateControllerConfig, "max_active_fraction", 1.5, "gate_max_active_fraction"),
        (GateControllerConfig, "min_active_heads", -1, "gate_min_active_heads"),
        (GateControllerConfig, "min_active_heads", 2.5, "gate_min_active_heads"),
        (GateControllerConfig, "max_active_heads", 0, "gate_max_active_heads"),
        (GateControllerConfig, "max_active_heads", "4", "gate_max_active_heads"),
    ],
)
def test_bad_value_names_the_field_and_the_option(cls, field, value, option):
    with pytest.raises(OptionError, match=rf"^{cls.__name__}\.{field}="):
        cls(**{field: value})
    source = next(s for s in [*GATE_FEEDBACK_OPTIONS, *HEAD_L0_OPTIONS] if s.config_class is cls)
    with pytest.raises(OptionError, match=rf"^ContinualConfig\.{option}="):
        build_config(source, SimpleNamespace(**{option: value}), owner="ContinualConfig")


def test_min_above_max_active_fraction_is_refused():
    with pytest.raises(OptionError, match=r"GateControllerConfig\.max_active_fraction=0\.5 .*min_active_fraction=0\.8"):
        GateControllerConfig(min_active_fraction=0.8, max_active_fraction=0.5)
    with pytest.raises(OptionError, match=r"^ContinualConfig\.gate_max_active_fraction=0\.5"):
        build_config(
            GATE_CONTROLLER_SOURCE,
            SimpleNamespace(gate_min_active_fraction=0.8, gate_max_active_fraction=0.5),
            owner="ContinualConfig",
        )


def test_min_above_max_active_heads_is_refused_naming_both():
    with pytest.raises(
        OptionError,
        match=r"^GateControllerConfig\.min_active_heads=5 is not allowed: must be <= "
        r"GateControllerConfig\.max_active_heads=4$",
    ):
        GateControllerConfig(min_active_heads=5, max_active_heads=4)
    with pytest.raises(
        OptionError, match=r"^ContinualConfig\.gate_min_active_heads=5 .*ContinualConfig\.gate_max_active_heads=4$"
    ):
        build_config(
            GATE_CONTROLLER_SOURCE,
            SimpleNamespace(gate_min_active_heads=5, gate_max_active_heads=4),
            owner="ContinualConfig",
        )
    cfg = GateControllerConfig(min_active_heads=0, max_active_heads=1)  # the smallest budget
    assert (cfg.min_active_heads, cfg.max_active_heads) == (0, 1)
    assert (GateControllerConfig().min_active_heads, GateControllerConfig().max_active_heads) == (None, None)


def test_build_config_reads_the_options():
    options = SimpleNamespace(gate_lr=0.01, gate_feedback_every=3, gate_statistics=["entropy"], gate_l0_weight=0.5)
    assert build_config(GATE_CONTROLLER_SOURCE, options).lr == 0.01
    fb = build_config(GATE_FEEDBACK_OPTIONS[0], options)
    assert fb.eval_every == 3 and fb.statistics == ("entropy",)
    assert build_config(HEAD_L0_OPTIONS[0], options).weight == 0.5
    assert build_config(OptionSource(GateConfig, "gate_"), SimpleNamespace(gate_mode="fixed")).mode == "fixed"


def test_feedback_from_config_sizes_and_seeds_the_controller(tokenizer):
    from hf_adaptive.control.feedback import FeedbackCallback
    from hf_adaptive.models import build_tiny_gemma
    from hf_adaptive.models.gates import find_gates, gate_model

    model, _ = build_tiny_gemma(tokenizer, seed=0)
    options = SimpleNamespace(seed=7, gate_algorithm="a2c", gate_lr=0.02, gate_feedback_every=3, gate_mode=None)
    cb = FeedbackCallback.from_config(options, model=model)
    assert find_gates(model).mode == "fixed"  # attached: the plugin enabled by name does something
    ctrl = cb.controller
    assert (ctrl.num_layers, ctrl.num_heads) == (2, 4)
    assert (ctrl.config.algorithm, ctrl.config.lr, ctrl.config.seed) == ("a2c", 0.02, 7)
    assert cb.config.eval_every == 3
    assert FeedbackCallback.from_config(SimpleNamespace(), model=model).controller.config.seed == 0
    with pytest.raises(OptionError, match=r"^SimpleNamespace\.gate_ppo_epochs=0"):
        FeedbackCallback.from_config(SimpleNamespace(gate_ppo_epochs=0), model=model)
    with pytest.raises(OptionError, match=r"GateConfig\.mode='hard_concrete'"):
        FeedbackCallback.from_config(SimpleNamespace(gate_mode="hard_concrete"), model=model)
    with pytest.raises(ValueError, match="model="):
        FeedbackCallback.from_config(SimpleNamespace(), model=None)
    with pytest.raises(TypeError, match="eval_evry"):
        FeedbackCallback(model=model, eval_evry=3)
    assert FeedbackCallback(model=model, eval_every=3).config.eval_every == 3
    hc, _ = build_tiny_gemma(tokenizer, seed=0)
    gate_model(hc, mode="hard_concrete")
    with pytest.raises(ValueError, match="already has 'hard_concrete' gates"):
        FeedbackCallback(model=hc)


def test_config_module_is_light():
    code = (
        "import sys, hf_adaptive.control.config, hf_adaptive.control; "
        "print(sorted(m for m in sys.modules if m.startswith('hf_adaptive.control')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['hf_adaptive.control', 'hf_adaptive.control.config']"


def test_lazy_package_exports():
    import hf_adaptive.control as control

    for name in control.__all__:
        assert getattr(control, name) is not None
    assert "HeadGatePlugin" in dir(control)
    with pytest.raises(AttributeError):
        control.NoSuchThing  # noqa: B018
