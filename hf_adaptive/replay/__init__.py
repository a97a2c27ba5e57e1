"""Replay against forgetting: exact replay memory, LAMOL-style generative replay, feature replay.

Every plugin is a `ContinualPlugin` built from its config (`replay.config`: `ReplayConfig`,
`GenerativeReplayConfig`, `FeatureReplayConfig`, the options they offer) with a `state_dict` that persists its
memory in checkpoints; each module's docstring states its memory bound per stored item. Names are imported on
first access (PEP 562), so `import hf_adaptive.replay.config` loads no model code.
"""

from __future__ import annotations

from ..utils.lazy import lazy_exports

#: public name -> submodule that defines it
_EXPORTS: dict[str, str] = {
    "CONDITIONINGS": "config",
    "FEATURE_DTYPES": "config",
    "FEATURE_REPLAY_OPTIONS": "config",
    "FEATURE_TARGETS": "config",
    "GENERATIVE_REPLAY_OPTIONS": "config",
    "REPLAY_OPTIONS": "config",
    "REPLAY_POLICIES": "config",
    "FeatureReplayConfig": "config",
    "GenerativeReplayConfig": "config",
    "ReplayConfig": "config",
    "ReplayMemory": "buffer",
    "ReplayPlugin": "exact",
    "FeatureReplayPlugin": "feature",
    "GenerativeReplayPlugin": "generative",
    "TaskSpec": "generative",
    "parse_generated": "generative",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
