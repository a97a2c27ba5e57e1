"""The options of `HeldOutWeightingPlugin`, declared once (dataclasses only, no torch).

Light on purpose, like every capability's `config.py`: the options can be read (CLI, YAML, `ContinualConfig`)
without importing torch or the plugin.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..utils.options import OptionSource
from ..utils.validation import check_choice, check_number, fail

#: what the log-weights descend: minus the cosine between the step and the held-out gradient, or the first-order
#: change of the held-out loss (which also rewards a larger step: see `heldout`)
HYPERGRADIENTS = ("alignment", "first_order")


@dataclass
class HeldOutWeightingConfig:
    """Options of `HeldOutWeightingPlugin` (loss-term weights learned from held-out rows, see `heldout`)."""

    holdout_rows: int = field(
        default=16,
        metadata={
            "help": "Rows of each task's training split held out (a seeded sample stratified by label): never "
            "trained on, never replayed, never in the Fisher; they give the held-out loss the weights follow."
        },
    )
    buffer_size: int = field(
        default=512,
        metadata={
            "help": "Most held-out rows kept over all tasks (a per-task balanced memory: when it is full, older "
            "tasks keep a stratified sample of their held-out rows)."
        },
    )
    batch_size: int = field(
        default=16,
        metadata={
            "help": "Held-out rows per weight update, spread evenly over the seen tasks (at least one each); the "
            "held-out loss is the mean over tasks of each task's mean answer loss."
        },
    )
    hypergradient: str = field(
        default="alignment",
        metadata={
            "help": "What the weights follow: 'alignment' (the derivative of the cosine between the step and the "
            "held-out gradient: a term gains weight only when it turns the step towards the held-out loss's descent) "
            "or 'first_order' (the derivative of the held-out loss after the step, to first order: it also rewards "
            "a larger step, so every term that agrees with the held-out gradient gains weight).",
            "choices": list(HYPERGRADIENTS),
        },
    )
    every: int = field(default=1, metadata={"help": "Optimizer steps between two weight updates (>= 1)."})
    lr: float = field(
        default=0.1,
        metadata={
            "help": "Step size of Adam on the log-weights: a term whose gradient keeps helping (or hurting) the "
            "held-out loss has its weight multiplied (divided) by about e^lr per update."
        },
    )
    betas: tuple[float, ...] = field(
        default=(0.9, 0.999), metadata={"help": "Adam's decay rates of the log-weights' moments, each in [0, 1)."}
    )
    min_weight: float = field(
        default=0.05, metadata={"help": "Smallest multiplier of a term's configured weight (> 0)."}
    )
    max_weight: float = field(
        default=20.0, metadata={"help": "Largest multiplier of a term's configured weight (>= min_weight)."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the held-out rows and of their sampling."})

    def __post_init__(self) -> None:
        owner = type(self).__name__
        for name in ("holdout_rows", "buffer_size", "batch_size", "every"):
            check_number(owner, name, getattr(self, name), low=1, integer=True)
        check_choice(owner, "hypergradient", self.hypergradient, HYPERGRADIENTS)
        check_number(owner, "lr", self.lr, low=0, low_open=True)
        betas = tuple(self.betas) if isinstance(self.betas, (list, tuple)) else self.betas
        if not isinstance(betas, tuple) or len(betas) != 2:
            fail(owner, "betas", self.betas, "two numbers in [0, 1)")
        for i, beta in enumerate(betas):
            check_number(owner, f"betas[{i}]", beta, low=0, high=1, high_open=True)
        self.betas = tuple(float(b) for b in betas)
        check_number(owner, "min_weight", self.min_weight, low=0, low_open=True)
        check_number(owner, "max_weight", self.max_weight, low=self.min_weight)
        if not math.isfinite(self.max_weight):
            fail(owner, "max_weight", self.max_weight, "a finite number")
        check_number(owner, "seed", self.seed, integer=True)


#: HeldOutWeightingPlugin's options: `heldout_weighting_holdout_rows`, ..., `heldout_weighting_lr`; the run's `seed`
#: seeds the held-out rows (not an option of its own, as for replay)
HELDOUT_WEIGHTING_OPTIONS = (OptionSource(HeldOutWeightingConfig, "heldout_weighting_", exclude=("seed",)),)

__all__ = ["HELDOUT_WEIGHTING_OPTIONS", "HYPERGRADIENTS", "HeldOutWeightingConfig"]
