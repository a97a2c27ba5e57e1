"""The options of `GradAggregationPlugin`, declared once (dataclasses only, no torch, no torchjd).

Light on purpose: `ContinualConfig` and the CLI read these fields to offer them as options
(`GRAD_AGGREGATION_OPTIONS`, prefix `grad_aggregation_`) without importing torch, torchjd or the plugin.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..utils.options import OptionSource
from ..utils.validation import check_choice

#: torchjd aggregators that run with torchjd's `aggregation` extra only (quadprog / qpsolvers for the dual-cone
#: projections of upgrad and dualproj). CAGrad and Nash-MTL are left out: they need cvxpy. 'mean' is the control.
AGGREGATORS = ("upgrad", "dualproj", "mgda", "pcgrad", "imtl_g", "aligned_mtl", "gradvac", "mean")
#: how the objectives are split: every loss term its own objective, or the task against the sum of the terms
OBJECTIVES = ("terms", "task_vs_rest")
#: the scale of the combined gradient: that of the summed-loss gradient, or 1/m of it (m objectives)
SCALES = ("sum", "mean")


@dataclass
class GradAggregationConfig:
    """Options of `GradAggregationPlugin` (Jacobian descent between the objectives, see `plugin`)."""

    aggregator: str = field(
        default="upgrad",
        metadata={
            "help": "How the per-objective gradients are combined (torchjd): 'upgrad' (none of the objectives "
            "increases, to first order), 'dualproj', 'mgda', 'pcgrad', 'imtl_g', 'aligned_mtl', 'gradvac' (keeps "
            "a moving target of the gradients' cosines, part of the checkpointed state), or 'mean' (the control: "
            "every objective's gradient with the same weight; with scale 'sum' exactly the summed loss's gradient).",
            "choices": list(AGGREGATORS),
        },
    )
    objectives: str = field(
        default="terms",
        metadata={
            "help": "'terms': the task loss and each plugin loss term (replay, ewc, ...) are separate objectives; "
            "'task_vs_rest': the task loss against the sum of all the terms. Each term keeps its weight "
            "(replay_alpha, ...) inside its objective, applied before the aggregation.",
            "choices": list(OBJECTIVES),
        },
    )
    scale: str = field(
        default="sum",
        metadata={
            "help": "'sum': the combined gradient on the scale of the summed loss's (equal to it when the "
            "objectives do not conflict, for upgrad / dualproj / pcgrad / mean), so a learning rate tuned without "
            "aggregation carries over; 'mean': 1/m of that for m objectives (torchjd's own convention for upgrad).",
            "choices": list(SCALES),
        },
    )

    def __post_init__(self) -> None:
        owner = type(self).__name__
        check_choice(owner, "aggregator", self.aggregator, AGGREGATORS)
        check_choice(owner, "objectives", self.objectives, OBJECTIVES)
        check_choice(owner, "scale", self.scale, SCALES)


#: GradAggregationPlugin's options: `grad_aggregation_aggregator`, `grad_aggregation_objectives`,
#: `grad_aggregation_scale`
GRAD_AGGREGATION_OPTIONS = (OptionSource(GradAggregationConfig, "grad_aggregation_"),)

__all__ = ["AGGREGATORS", "GRAD_AGGREGATION_OPTIONS", "OBJECTIVES", "SCALES", "GradAggregationConfig"]
