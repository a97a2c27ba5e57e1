"""Options of O-LoRA, declared once (dataclasses only): `OLoRAConfig` and `OLORA_OPTIONS` (`olora_*`).

Light on purpose: `ContinualConfig` and the CLI read these fields to offer them as options without importing
torch, peft or the plugin. The LoRA shape of O-LoRA's adapters is the trainer's (`lora_r`, `lora_alpha`,
`lora_dropout`, `lora_target_modules`). The options of the `osf` adapter strategy live with the strategy
(`hf_adaptive.adapters.OSF_OPTIONS`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..utils.options import OptionSource
from ..utils.validation import check_number


@dataclass
class OLoRAConfig:
    """Options of `OLoRAPlugin` (Wang et al. 2023, "Orthogonal Subspace Learning for Language Model Continual
    Learning"): one LoRA per task, the earlier ones frozen, and a loss that keeps the new one orthogonal to them."""

    orth_lambda: float = field(
        default=0.5,
        metadata={
            "help": "O-LoRA: weight lambda_1 of the orthogonality loss sum over adapted modules and earlier tasks i "
            "of sum_jk |(A_i A_new^T)_jk| (the LoRA A matrices, rows spanning each task's input subspace); "
            "0 turns it off (then only the frozen earlier adapters remain)."
        },
    )
    l2_lambda: float = field(
        default=0.0,
        metadata={
            "help": "O-LoRA: weight lambda_2 of the L2 term on the new task's LoRA, the sum of the Frobenius norms "
            "of its A and B matrices (the authors' code); 0 (the default, as in their scripts) turns it off."
        },
    )

    def __post_init__(self) -> None:
        owner = type(self).__name__
        check_number(owner, "orth_lambda", self.orth_lambda, low=0)
        check_number(owner, "l2_lambda", self.l2_lambda, low=0)
        self.orth_lambda = float(self.orth_lambda)
        self.l2_lambda = float(self.l2_lambda)


#: OLoRAPlugin's options: `olora_orth_lambda`, `olora_l2_lambda`
OLORA_OPTIONS = (OptionSource(OLoRAConfig, "olora_"),)

__all__ = ["OLORA_OPTIONS", "OLoRAConfig"]
