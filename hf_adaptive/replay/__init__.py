"""Replay against forgetting: exact replay memory, LAMOL-style generative replay, feature replay.

Every plugin is a `ContinualPlugin` with a `from_config(ContinualConfig)` constructor and a `state_dict`
that persists its memory in checkpoints; each module's docstring states its memory bound per stored item.
"""

from .buffer import REPLAY_POLICIES, ReplayMemory
from .exact import ReplayPlugin
from .feature import FEATURE_TARGETS, FeatureReplayPlugin
from .generative import CONDITIONINGS, GenerativeReplayPlugin, TaskSpec, parse_generated

__all__ = [
    "CONDITIONINGS",
    "FEATURE_TARGETS",
    "REPLAY_POLICIES",
    "FeatureReplayPlugin",
    "GenerativeReplayPlugin",
    "ReplayMemory",
    "ReplayPlugin",
    "TaskSpec",
    "parse_generated",
]
