"""Models: the embedded tiny default, loading of any causal LM, per-head gates and physical head pruning."""

from .gated import GatedModel, HeadGatePlugin, attention_entropy, gate_model, head_importance, o_proj_magnitude
from .loading import TINY_MODEL_NAME, load_model_and_tokenizer
from .pruning import load_pruned_model, prune_heads, save_pruned_model
from .tiny import build_tiny_gemma, build_tokenizer, tiny_gemma_config

#: an alias of `GatedModel` kept for the README and older code: it gates Gemma (1/2/3) and Llama-family attention
GatedGemma = GatedModel

__all__ = [
    "TINY_MODEL_NAME",
    "GatedGemma",
    "GatedModel",
    "HeadGatePlugin",
    "attention_entropy",
    "build_tiny_gemma",
    "build_tokenizer",
    "gate_model",
    "head_importance",
    "load_model_and_tokenizer",
    "load_pruned_model",
    "o_proj_magnitude",
    "prune_heads",
    "save_pruned_model",
    "tiny_gemma_config",
]
