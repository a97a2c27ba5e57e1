"""The embedded tiny Gemma, its offline tokenizer, and loading any causal LM by name or path."""

from __future__ import annotations

import sys

import pytest
import torch

from hf_adaptive.models import build_tiny_gemma, build_tokenizer, load_model_and_tokenizer
from hf_adaptive.tasks import builtin_vocabulary


def test_tokenizer_covers_builtin_suite_offline():
    tok = build_tokenizer()
    ids = tok(" ".join(builtin_vocabulary()))["input_ids"]
    assert tok.unk_token_id not in ids
    assert tok.pad_token_id is not None and tok.eos_token_id is not None


def test_tiny_gemma_is_deterministic_and_small(tokenizer):
    a, _ = build_tiny_gemma(tokenizer, seed=0)
    b, _ = build_tiny_gemma(tokenizer, seed=0)
    c, _ = build_tiny_gemma(tokenizer, seed=1)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert not all(torch.equal(x, y) for x, y in zip(a.parameters(), c.parameters()))
    assert a.config.num_hidden_layers == 2 and sum(p.numel() for p in a.parameters()) < 200_000


def test_load_by_path_passes_attention_implementation(tmp_path, tiny_model, tokenizer):
    tiny_model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model, tok = load_model_and_tokenizer(str(tmp_path), attn_implementation="eager")
    assert model.config._attn_implementation == "eager"
    ids = tok("first_color : red cat ?", return_tensors="pt")["input_ids"]
    torch.testing.assert_close(model(ids).logits, tiny_model(ids).logits)


def test_quantization_needs_bitsandbytes_and_is_validated(tiny_gemma_dir, monkeypatch):
    """8-bit loading of a model by path without bitsandbytes installed is an ImportError that says what to install
    (not transformers' own error deep inside `from_pretrained`); bad values are rejected before anything loads."""
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # what `import bitsandbytes` sees when not installed
    with pytest.raises(
        ImportError, match=r"quantization='8bit' needs bitsandbytes: pip install 'hf_adaptive\[quant\]'"
    ):
        load_model_and_tokenizer(tiny_gemma_dir, quantization="8bit")
    with pytest.raises(ValueError, match=r"quantization='2bit' is not allowed: use one of \(None, '8bit', '4bit'\)"):
        load_model_and_tokenizer(tiny_gemma_dir, quantization="2bit")
    with pytest.raises(ValueError, match="quantization='8bit' is not allowed for the embedded tiny-gemma"):
        load_model_and_tokenizer("tiny-gemma", quantization="8bit")
