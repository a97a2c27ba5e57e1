"""The options of `DistillationPlugin`, declared once (dataclasses only, no torch).

Light on purpose: `ContinualConfig` and the CLI read these fields to offer them as options (`DISTILLATION_OPTIONS`,
prefix `distill_`) without importing torch or the plugin.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..utils.options import OptionSource
from ..utils.validation import OptionError, check_choice, check_number, fail

#: the divergences between the student's and the teacher's next-token distributions (`losses.generalized_jsd`)
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
#: where the divergence is taken: the positions that predict an answer token, or every non-pad position
POSITIONS = ("answer", "sequence")
#: where the teacher comes from (an explicit teacher model passed to the plugin takes precedence)
TEACHERS = ("previous_task", "base")
#: `beta`'s default (`forward_kl` / `reverse_kl` ignore `beta`; `DistillationPlugin` warns when it is set for them:
#: not an error, so that every option can be set on its own, as the option audit of the registry does)
DEFAULT_BETA = 0.5


@dataclass
class DistillationConfig:
    """Options of `DistillationPlugin` (knowledge distillation / Learning without Forgetting, see `plugin`)."""

    distill_lambda: float = field(
        default=1.0,
        metadata={
            "option": "distill_lambda",
            "help": "Weight of the divergence between the model's and the teacher's next-token distributions "
            "(>= 0; 0 turns the logit term off).",
        },
    )
    divergence: str = field(
        default="forward_kl",
        metadata={
            "help": "'forward_kl' KL(teacher || model), 'reverse_kl' KL(model || teacher), or 'jsd': the "
            "generalised Jensen-Shannon divergence of weight distill_beta (TRL's generalized_jsd_loss).",
            "choices": list(DIVERGENCES),
        },
    )
    beta: float = field(
        default=DEFAULT_BETA,
        metadata={
            "help": "Generalised JSD interpolation in [0, 1], read by divergence='jsd' only (forward_kl / reverse_kl "
            "ignore it, with a warning): 0 is forward KL, 1 reverse KL, as in TRL's generalized_jsd_loss."
        },
    )
    temperature: float = field(
        default=1.0,
        metadata={"help": "Softmax temperature (> 0) of both distributions; the loss is not rescaled by T^2 (TRL)."},
    )
    positions: str = field(
        default="answer",
        metadata={
            "help": "'answer': positions whose next token is an answer token (label != -100); 'sequence': every "
            "non-pad position (the trainer then computes the logits of the whole input).",
            "choices": list(POSITIONS),
        },
    )
    teacher: str = field(
        default="previous_task",
        metadata={
            "help": "'previous_task' (LwF: the model as it was at the end of the previous task; nothing on the "
            "first task) or 'base' (the model with its LoRA adapters disabled; needs a LoRA adapter_strategy).",
            "choices": list(TEACHERS),
        },
    )
    feature_layers: tuple[int, ...] = field(
        default=(),
        metadata={
            "help": "Decoder-layer indices (0-based) whose output hidden states are pulled towards the teacher's "
            "by a mean squared error; empty: no feature distillation."
        },
    )
    feature_lambda: float = field(
        default=1.0,
        metadata={"help": "Weight of the hidden-state MSE at feature_layers (>= 0)."},
    )

    def __post_init__(self) -> None:
        owner = type(self).__name__
        check_number(owner, "distill_lambda", self.distill_lambda, low=0)
        check_choice(owner, "divergence", self.divergence, DIVERGENCES)
        check_number(owner, "beta", self.beta, low=0, high=1)
        check_number(owner, "temperature", self.temperature, low=0, low_open=True)
        check_choice(owner, "positions", self.positions, POSITIONS)
        check_choice(owner, "teacher", self.teacher, TEACHERS)
        layers = self.feature_layers
        if isinstance(layers, int) and not isinstance(layers, bool):
            layers = (layers,)  # a lone index is a one-element list
        if not isinstance(layers, (list, tuple)) or not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers
        ):
            fail(owner, "feature_layers", self.feature_layers, "a list of decoder-layer indices (integers >= 0)")
        if len(set(layers)) != len(layers):
            fail(owner, "feature_layers", self.feature_layers, "each layer index at most once")
        check_number(owner, "feature_lambda", self.feature_lambda, low=0)
        if layers and self.feature_lambda == 0:
            raise OptionError(
                owner,
                "feature_lambda",
                self.feature_lambda,
                "must be > 0 when {0} names layers (or name no layers)",
                related=(("feature_layers", list(layers)),),
            )
        self.feature_layers = tuple(sorted(layers))
        self.distill_lambda = float(self.distill_lambda)
        self.beta = float(self.beta)
        self.temperature = float(self.temperature)
        self.feature_lambda = float(self.feature_lambda)

    @property
    def trl_beta(self) -> float:
        """The `beta` of TRL's `generalized_jsd_loss` this divergence is: 0 forward KL, 1 reverse KL."""
        return {"forward_kl": 0.0, "reverse_kl": 1.0}.get(self.divergence, self.beta)


#: DistillationPlugin's options: `distill_lambda`, `distill_divergence`, `distill_beta`, `distill_temperature`,
#: `distill_positions`, `distill_teacher`, `distill_feature_layers`, `distill_feature_lambda`
DISTILLATION_OPTIONS = (OptionSource(DistillationConfig, "distill_"),)

__all__ = ["DEFAULT_BETA", "DISTILLATION_OPTIONS", "DIVERGENCES", "POSITIONS", "TEACHERS", "DistillationConfig"]
