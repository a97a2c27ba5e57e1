"""Fixtures of the model tests: tiny models of the other attention families (Llama, Gemma 2, Gemma 3)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def family_model():
    """`family_model(name)`: a tiny eager-attention causal LM of `name` (llama, gemma2, gemma3) with the tiny Gemma's
    head layout at half width (the `micro` preset: 2 layers, 4 heads, 2 kv heads, head_dim 8), seeded, in eval mode."""
    from transformers import (
        Gemma2Config,
        Gemma2ForCausalLM,
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        LlamaConfig,
        LlamaForCausalLM,
    )

    from hf_adaptive.models.tiny import tiny_layout

    families = {
        "llama": (LlamaForCausalLM, LlamaConfig),
        "gemma2": (Gemma2ForCausalLM, Gemma2Config),
        "gemma3": (Gemma3ForCausalLM, Gemma3TextConfig),
    }

    def build(name: str) -> torch.nn.Module:
        cls, cfg = families[name]
        torch.manual_seed(0)
        config = cfg(vocab_size=64, **tiny_layout("micro"))
        config._attn_implementation = "eager"  # Gemma 2 has no sdpa path in transformers 5
        return cls(config).eval()

    return build
