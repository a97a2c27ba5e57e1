"""Options of the control plugins, declared once: the head gates, the RL gate controller, the feedback loop that
drives it (`gate_feedback`) and the L0 penalty of hard-concrete gates (`head_l0`).

Dataclasses only (no torch): `ContinualConfig`, the CLI and the YAML configs take their `gate_*` options from here
(`OptionSource`), and the plugins build these configs from those options. Every option keeps the name it had as a
`ContinualConfig` field (`gate_feedback_every`, `gate_l0_weight`, ...); the RL controller's hyper-parameters are
options too (`gate_lr`, `gate_ppo_epochs`, ...).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..utils.options import OptionSource
from ..utils.validation import check_bool, check_choice, check_number, check_order, check_str_list, fail

#: gate kinds `hf_adaptive.models.gate_model` attaches (equal to `hf_adaptive.models.GATE_MODES`, checked by a test;
#: repeated because this light module may not import the models)
GATE_MODES = ("fixed", "hard_concrete")
#: policy-gradient algorithms of `GateController`
ALGORITHMS = ("reinforce", "a2c", "ppo")
#: where `FeedbackCallback` takes its loss: a fixed validation subset, or the running training loss
MODES = ("periodic", "continuous")
#: head statistics the controller's state may hold
STATISTICS = ("importance", "entropy")


@dataclass
class GateConfig:
    """The gates themselves, shared by the CLI and both gate plugins (`head_l0`, `gate_feedback`)."""

    mode: str | None = field(
        default=None,
        metadata={
            "help": "Attach one gate per attention head: None (no gates, unless a gate plugin attaches the kind it "
            "needs), 'fixed' (set by the RL controller) or 'hard_concrete' (learnable L0 gates)."
        },
    )

    def __post_init__(self) -> None:
        check_choice(type(self).__name__, "mode", self.mode, (None, *GATE_MODES))


@dataclass
class GateControllerConfig:
    """Hyper-parameters of `GateController` (validated on construction)."""

    algorithm: str = field(default="ppo", metadata={"help": "Gate controller: 'reinforce', 'a2c' or 'ppo'."})
    hidden_size: int = field(default=64, metadata={"help": "Gate controller: width of the policy MLP."})
    head_embedding: int = field(
        default=8, metadata={"help": "Gate controller: size of the learned per-head embedding (0: none)."}
    )
    history: int = field(
        default=4, metadata={"help": "Gate controller: past actions and rewards in the state (0: none)."}
    )
    lr: float = field(default=3e-3, metadata={"help": "Gate controller: Adam learning rate of the policy."})
    gamma: float = field(default=0.5, metadata={"help": "Gate controller: discount factor of the returns, [0, 1]."})
    gae_lambda: float = field(default=0.9, metadata={"help": "Gate controller: GAE lambda (ppo), [0, 1]."})
    rollout_steps: int = field(default=4, metadata={"help": "Gate controller: controller steps per policy update."})
    ppo_epochs: int = field(default=4, metadata={"help": "Gate controller: PPO epochs per rollout."})
    clip_eps: float = field(default=0.2, metadata={"help": "Gate controller: PPO clipping range (> 0)."})
    value_coef: float = field(default=0.5, metadata={"help": "Gate controller: weight of the value loss."})
    entropy_coef: float = field(default=0.01, metadata={"help": "Gate controller: weight of the entropy bonus."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gate controller: gradient clipping of the policy."})
    min_active_fraction: float = field(default=0.0, metadata={"help": "Fewest heads kept, as a fraction."})
    max_active_fraction: float = field(default=1.0, metadata={"help": "Compute budget: most heads active."})
    min_active_heads: int | None = field(
        default=None,
        metadata={"help": "Fewest heads kept, as a count (>= 0; None: from min_active_fraction, which it overrides)."},
    )
    max_active_heads: int | None = field(
        default=None,
        metadata={
            "help": "Compute budget as a count: most heads active (>= 1; None: from max_active_fraction, which it "
            "overrides). min = max = k keeps exactly k heads, for any k (a fraction may fall between two counts)."
        },
    )
    max_changes: int | None = field(
        default=None, metadata={"help": "Gate controller: most gate flips per step (None: any number)."}
    )
    keep_bias: float = field(
        default=2.0, metadata={"help": "Gate controller: initial logit bias towards 'keep' (a fresh policy keeps)."}
    )
    efficiency_factor: float = field(default=0.1, metadata={"help": "Reward per pruned fraction of heads."})
    reward_ema: float = field(
        default=0.0, metadata={"help": "Gate controller: moving-average decay of the rewards, [0, 1) (0: none)."}
    )
    seed: int = field(default=0, metadata={"help": "Gate controller: seed of the policy and of its sampling."})

    def __post_init__(self) -> None:
        owner = type(self).__name__
        check_choice(owner, "algorithm", self.algorithm, ALGORITHMS)
        for name in ("hidden_size", "rollout_steps", "ppo_epochs"):
            check_number(owner, name, getattr(self, name), low=1, integer=True)
        for name in ("head_embedding", "history"):
            check_number(owner, name, getattr(self, name), low=0, integer=True)
        check_number(owner, "lr", self.lr, low=0, low_open=True)
        for name in ("gamma", "gae_lambda", "min_active_fraction", "max_active_fraction"):
            check_number(owner, name, getattr(self, name), low=0, high=1)
        if self.min_active_fraction > self.max_active_fraction:
            fail(
                owner,
                "max_active_fraction",
                self.max_active_fraction,
                f">= min_active_fraction={self.min_active_fraction}",
            )
        check_number(owner, "clip_eps", self.clip_eps, low=0, low_open=True)
        for name in ("value_coef", "entropy_coef", "max_grad_norm", "efficiency_factor"):
            check_number(owner, name, getattr(self, name), low=0)
        check_number(owner, "max_changes", self.max_changes, low=1, integer=True, optional=True)
        check_number(owner, "min_active_heads", self.min_active_heads, low=0, integer=True, optional=True)
        check_number(owner, "max_active_heads", self.max_active_heads, low=1, integer=True, optional=True)
        if self.min_active_heads is not None and self.max_active_heads is not None:
            check_order(owner, "min_active_heads", self.min_active_heads, "max_active_heads", self.max_active_heads)
        check_number(owner, "keep_bias", self.keep_bias)
        check_number(owner, "reward_ema", self.reward_ema, low=0, high=1, high_open=True)
        check_number(owner, "seed", self.seed, integer=True)


@dataclass
class FeedbackConfig:
    """How often and on what `FeedbackCallback` measures the model."""

    eval_every: int = field(
        default=50,
        metadata={"help": "Steps between controller feedback rounds.", "option": "gate_feedback_every"},
    )
    mode: str = field(
        default="periodic",
        metadata={
            "help": "'periodic' (validation subset) or 'continuous' (training loss).",
            "option": "gate_feedback_mode",
        },
    )
    eval_size: int = field(default=64, metadata={"help": "Validation rows scored per feedback round."})
    eval_batch_size: int = field(default=16, metadata={"help": "Gate feedback: rows per validation batch."})
    statistics: tuple[str, ...] = field(
        default=STATISTICS,
        metadata={
            "help": "Gate feedback: per-head statistics in the controller's state, from 'importance', 'entropy'."
        },
    )
    stats_batches: int = field(default=1, metadata={"help": "Gate feedback: batches the statistics use."})
    preference: float | None = field(
        default=None,
        metadata={"help": "Gate feedback: at train end apply the Pareto point picked with this preference (>= 0)."},
    )
    log_gates: bool = field(default=True, metadata={"help": "Gate feedback: log the gate values of every round."})

    def __post_init__(self) -> None:
        owner = type(self).__name__
        check_number(owner, "eval_every", self.eval_every, low=1, integer=True)
        check_choice(owner, "mode", self.mode, MODES)
        for name in ("eval_size", "eval_batch_size", "stats_batches"):
            check_number(owner, name, getattr(self, name), low=1, integer=True)
        self.statistics = tuple(
            check_str_list(owner, "statistics", self.statistics, choices=STATISTICS, allow_empty=True)
        )
        check_number(owner, "preference", self.preference, low=0, optional=True)
        check_bool(owner, "log_gates", self.log_gates)


@dataclass
class HeadL0Config:
    """The L0 penalty of hard-concrete gates (`HeadGatePlugin`)."""

    weight: float = field(
        default=0.01,
        metadata={"help": "Weight of the L0 penalty of hard-concrete gates.", "option": "gate_l0_weight"},
    )

    def __post_init__(self) -> None:
        check_number(type(self).__name__, "weight", self.weight, low=0)


#: `gate_mode`: one source, listed by both gate plugins (and read by the CLI to attach gates)
GATE_SOURCE = OptionSource(GateConfig, "gate_")
GATE_OPTIONS = (GATE_SOURCE,)
#: `seed` is not a `gate_*` option: the run's `seed` (TrainingArguments) seeds the controller, as it always did
GATE_CONTROLLER_SOURCE = OptionSource(GateControllerConfig, "gate_", exclude=("seed",))
FEEDBACK_SOURCE = OptionSource(FeedbackConfig, "gate_")
HEAD_L0_SOURCE = OptionSource(HeadL0Config, "gate_")
#: the options of the `gate_feedback` plugin (`FeedbackCallback`) and of the `head_l0` plugin (`HeadGatePlugin`)
GATE_FEEDBACK_OPTIONS = (FEEDBACK_SOURCE, GATE_CONTROLLER_SOURCE, GATE_SOURCE)
HEAD_L0_OPTIONS = (HEAD_L0_SOURCE, GATE_SOURCE)


def with_overrides(config: Any, config_class: type, overrides: dict[str, Any], owner: str) -> Any:
    """`config` (or the defaults of `config_class`) with `overrides` applied; an unknown name is a TypeError that
    names it and the known fields."""
    names = [f.name for f in dataclasses.fields(config_class) if f.init]
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        raise TypeError(f"{owner}() got unknown option(s) {unknown}: the fields of {config_class.__name__} are {names}")
    base = config if config is not None else config_class()
    if not isinstance(base, config_class):
        raise TypeError(f"{owner}: config={base!r} is not allowed: a {config_class.__name__}")
    return dataclasses.replace(base, **overrides) if overrides else base
