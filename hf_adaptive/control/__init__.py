"""Control loops: the RL gate controller, its reward and Pareto archive, the feedback callback that drives the head
gates (`gate_feedback`), the L0 penalty of hard-concrete gates (`head_l0`) and the differentiable loss weighting.

Names are imported on first access (PEP 562), so `import hf_adaptive.control.config` stays light.
"""

from __future__ import annotations

from ..utils.lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    # options (light)
    "ALGORITHMS": "config",
    "GATE_FEEDBACK_OPTIONS": "config",
    "GATE_OPTIONS": "config",
    "HEAD_L0_OPTIONS": "config",
    "FeedbackConfig": "config",
    "GateConfig": "config",
    "GateControllerConfig": "config",
    "HeadL0Config": "config",
    # controller, reward, archive
    "GateController": "gate_controller",
    "ParetoArchive": "pareto",
    "ParetoPoint": "pareto",
    "RewardTracker": "rewards",
    "gate_reward": "rewards",
    # plugins and loops
    "FeedbackCallback": "feedback",
    "OnlineGateAdapter": "feedback",
    "head_statistics": "feedback",
    "validation_loss": "feedback",
    "HeadGatePlugin": "head_l0",
    # loss weighting
    "ControlledScalar": "loss_weighting",
    "LossWeightController": "loss_weighting",
    "SoftmaxWeighting": "loss_weighting",
    "UncertaintyWeighting": "loss_weighting",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
