"""Models: the embedded tiny default, loading of any causal LM, per-head gates, head statistics and physical head
pruning. (The L0 penalty of hard-concrete gates, a trainer plugin, is `hf_adaptive.control.HeadGatePlugin`.)"""

from .gates import GATE_MODES, GatedModel, find_gates, gate_model, head_counts
from .head_importance import attention_entropy, head_importance, o_proj_magnitude
from .loading import TINY_MODEL_NAME, load_model_and_tokenizer
from .pruning import load_pruned_model, prune_heads, save_pruned_model
from .tiny import build_tiny_gemma, build_tokenizer, tiny_gemma_config

#: an alias of `GatedModel` kept for the README and older code: it gates Gemma (1/2/3) and Llama-family attention
GatedGemma = GatedModel

__all__ = [
    "GATE_MODES",
    "TINY_MODEL_NAME",
    "GatedGemma",
    "GatedModel",
    "attention_entropy",
    "build_tiny_gemma",
    "build_tokenizer",
    "find_gates",
    "gate_model",
    "head_counts",
    "head_importance",
    "load_model_and_tokenizer",
    "load_pruned_model",
    "o_proj_magnitude",
    "prune_heads",
    "save_pruned_model",
    "tiny_gemma_config",
]
