"""Control loops: the RL gate controller, its reward and Pareto archive, and the feedback callback."""

from .feedback import FeedbackCallback, FeedbackConfig, OnlineGateAdapter, head_statistics, validation_loss
from .gate_controller import ALGORITHMS, GateController, GateControllerConfig
from .pareto import ParetoArchive, ParetoPoint
from .rewards import RewardTracker, gate_reward

__all__ = [
    "ALGORITHMS",
    "FeedbackCallback",
    "FeedbackConfig",
    "GateController",
    "GateControllerConfig",
    "OnlineGateAdapter",
    "ParetoArchive",
    "ParetoPoint",
    "RewardTracker",
    "gate_reward",
    "head_statistics",
    "validation_loss",
]
