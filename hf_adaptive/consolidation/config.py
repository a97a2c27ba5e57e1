"""The options of consolidation, declared once: `EWCConfig` (the EWC plugin) and `NeuromodulationConfig` (the
gamma gain of gamma-gated EWC).

Light on purpose (dataclasses and the validation helpers only): `ContinualConfig` and the CLI read these fields
to offer them as options (`EWC_OPTIONS`) without importing torch or the plugin.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..utils.options import OptionSource
from ..utils.validation import check_bool, check_choice, check_number, fail

EWC_MODES = ("separate", "online")
FISHER_TYPES = ("empirical", "true")
FISHER_METHODS = ("vmap", "loop")
FISHER_NORMALIZATIONS = ("none", "max", "mean")
#: the training signals of the gamma gain
SIGNALS = ("nll", "accuracy", "grad_norm", "entropy")


@dataclass
class EWCConfig:
    """Options of `EWCPlugin` (separate / online EWC with an exact per-sample Fisher and optional gamma gating)."""

    ewc_lambda: float = field(
        default=1.0,
        metadata={
            "option": "ewc_lambda",
            "help": "EWC strength lambda in (lambda/2) sum F (theta - theta*)^2; 0 disables EWC. With the default "
            "fisher_normalization='none' the Fisher of a task the model predicts with near certainty is ~0: use "
            "fisher_normalization='max' for a lambda that does not depend on it.",
        },
    )
    mode: str = field(
        default="separate",
        metadata={
            "help": "'separate' (one Fisher and anchor per task) or 'online' (decayed running Fisher).",
            "choices": list(EWC_MODES),
        },
    )
    gamma: float = field(default=1.0, metadata={"help": "Online EWC decay of the old Fisher, in [0, 1]."})
    fisher_samples: int = field(
        default=50, metadata={"option": "fisher_samples", "help": "Examples of a task used for its Fisher."}
    )
    fisher_type: str = field(
        default="empirical",
        metadata={
            "option": "fisher_type",
            "help": "'empirical' (dataset labels) or 'true' (labels sampled from the model).",
            "choices": list(FISHER_TYPES),
        },
    )
    fisher_chunk_size: int | None = field(
        default=None,
        metadata={
            "option": "fisher_chunk_size",
            "help": "Rows per vmap call of the per-sample Fisher; None: as many as fit the memory budget.",
        },
    )
    fisher_method: str = field(
        default="vmap",
        metadata={
            "option": "fisher_method",
            "help": "'vmap' (vectorized per-sample gradients) or 'loop' (one row at a time, the reference).",
        },
    )
    fisher_normalization: str = field(
        default="none",
        metadata={
            "option": "fisher_normalization",
            "help": "'none', 'max' or 'mean': divide each task's Fisher by its largest/mean entry so that "
            "ewc_lambda does not depend on how confident the model is on the task.",
        },
    )
    gamma_gated: bool = field(
        default=False,
        metadata={
            "option": "gamma_gated_ewc",
            "help": "Scale how much new Fisher accumulates by the neuromodulatory gamma gain.",
        },
    )
    bypass_gamma: bool = field(
        default=False,
        metadata={
            "option": "ewc_fixed_lambda_bypass_gamma",
            "help": "Ignore the gamma gain even when gamma_gated_ewc is on.",
        },
    )
    # not options (see EWC_OPTIONS): built from a config, they follow the TrainingArguments `seed` / `disable_tqdm`
    seed: int = field(
        default=0, metadata={"help": "Which rows measure the Fisher and the label sampling of the true Fisher."}
    )
    progress_bar: bool = field(default=True, metadata={"help": "Show a progress bar while the Fisher is measured."})

    def __post_init__(self) -> None:
        owner = type(self).__name__
        check_number(owner, "ewc_lambda", self.ewc_lambda, low=0)
        check_choice(owner, "mode", self.mode, EWC_MODES)
        check_number(owner, "gamma", self.gamma, low=0, high=1)
        check_number(owner, "fisher_samples", self.fisher_samples, low=1, integer=True)
        check_choice(owner, "fisher_type", self.fisher_type, FISHER_TYPES)
        check_number(owner, "fisher_chunk_size", self.fisher_chunk_size, low=1, integer=True, optional=True)
        check_choice(owner, "fisher_method", self.fisher_method, FISHER_METHODS)
        check_choice(owner, "fisher_normalization", self.fisher_normalization, FISHER_NORMALIZATIONS)
        check_bool(owner, "gamma_gated", self.gamma_gated)
        check_bool(owner, "bypass_gamma", self.bypass_gamma)
        check_number(owner, "seed", self.seed, integer=True)
        check_bool(owner, "progress_bar", self.progress_bar)
        self.ewc_lambda = float(self.ewc_lambda)
        self.gamma = float(self.gamma)


@dataclass
class NeuromodulationConfig:
    """How the gamma gain of gamma-gated EWC is computed (formulas: `hf_adaptive.consolidation.neuromodulation`)."""

    gamma_gain_lambda: float = field(
        default=3.0, metadata={"option": "gamma_gain_lambda", "help": "Global scale of the gamma gain (>= 0)."}
    )
    signal_weights: dict[str, float] = field(
        default_factory=lambda: dict.fromkeys(SIGNALS, 1.0),
        metadata={"help": f"Weight of each signal in the gain, keys among {list(SIGNALS)} (missing: 0)."},
    )
    ema_beta: float = field(
        default=0.9, metadata={"help": "Decay of the bias-corrected moving average of every signal, in [0, 1)."}
    )
    grad_warmup_steps: int = field(
        default=5, metadata={"help": "Optimizer steps whose mean gradient norm is the task's starting norm (>= 1)."}
    )

    def __post_init__(self) -> None:
        owner = type(self).__name__
        check_number(owner, "gamma_gain_lambda", self.gamma_gain_lambda, low=0)
        weights = self.signal_weights
        if not isinstance(weights, dict) or set(weights) - set(SIGNALS):
            fail(owner, "signal_weights", weights, f"a dict whose keys are among {list(SIGNALS)}")
        if any(
            isinstance(w, bool) or not isinstance(w, (int, float)) or not (0 <= w < float("inf"))
            for w in weights.values()
        ) or not any(w > 0 for w in weights.values()):
            fail(owner, "signal_weights", weights, "weights must be finite numbers >= 0, at least one > 0")
        check_number(owner, "ema_beta", self.ema_beta, low=0, high=1, high_open=True)
        check_number(owner, "grad_warmup_steps", self.grad_warmup_steps, low=1, integer=True)


#: EWCPlugin's options: the EWC fields (option names as `ContinualConfig` always had them: `ewc_lambda`, `ewc_mode`,
#: `ewc_gamma`, `fisher_*`, `gamma_gated_ewc`, `ewc_fixed_lambda_bypass_gamma`) and the gain's (`gamma_gain_lambda`,
#: `neuromod_ema_beta`, `neuromod_grad_warmup_steps`)
EWC_OPTIONS = (
    # seed / progress_bar: `EWCPlugin.from_config` takes them from the TrainingArguments `seed` and `disable_tqdm`
    # (one seed for the whole run, one switch for every progress bar), so they are not options of their own
    OptionSource(EWCConfig, "ewc_", exclude=("seed", "progress_bar")),
    # signal_weights: a dict, which neither flags nor HfArgumentParser read; a fine gain with a tested default
    # (set it in Python: `EWCPlugin(neuromodulation=NeuromodulationConfig(signal_weights=...))`)
    OptionSource(NeuromodulationConfig, "neuromod_", exclude=("signal_weights",)),
)

__all__ = [
    "EWC_MODES",
    "EWC_OPTIONS",
    "FISHER_METHODS",
    "FISHER_NORMALIZATIONS",
    "FISHER_TYPES",
    "SIGNALS",
    "EWCConfig",
    "NeuromodulationConfig",
]
