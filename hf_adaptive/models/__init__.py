"""Models: the embedded tiny default, loading of any causal LM."""

from .loading import TINY_MODEL_NAME, load_model_and_tokenizer
from .tiny import build_tiny_gemma, build_tokenizer, tiny_gemma_config

__all__ = ["TINY_MODEL_NAME", "build_tiny_gemma", "build_tokenizer", "load_model_and_tokenizer", "tiny_gemma_config"]
