"""Compatibility module: the per-head gates now live in `gates.py`, the head statistics in `head_importance.py` and
the L0 plugin in `hf_adaptive.control.head_l0`. Import from `hf_adaptive.models` (or those modules) instead."""

from __future__ import annotations

from .gates import GATE_MODES, GatedModel, attention_modules, find_gates, gate_model, head_counts
from .head_importance import attention_entropy, head_importance, o_proj_magnitude

__all__ = [
    "GATE_MODES",
    "GatedModel",
    "attention_entropy",
    "attention_modules",
    "find_gates",
    "gate_model",
    "head_counts",
    "head_importance",
    "o_proj_magnitude",
]
