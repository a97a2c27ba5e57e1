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


def test_tiny_presets_are_the_one_table_of_tiny_layouts():
    from transformers import LlamaConfig

    from hf_adaptive.models.tiny import TINY_PRESETS, tiny_gemma_config, tiny_layout

    default = tiny_gemma_config(100)
    assert {k: getattr(default, k) for k in TINY_PRESETS["tiny"]} == TINY_PRESETS["tiny"]
    assert (default.pad_token_id, default.eos_token_id, default.bos_token_id) == (0, 1, 2)
    bench = tiny_gemma_config(100, "bench", num_hidden_layers=1)
    assert bench.hidden_size == 256 and bench.num_hidden_layers == 1
    assert LlamaConfig(vocab_size=64, **tiny_layout("micro")).head_dim == 8
    tiny_layout("tiny")["hidden_size"] = 1  # a copy: the table is not changed
    assert TINY_PRESETS["tiny"]["hidden_size"] == 64
    with pytest.raises(ValueError, match=r"tiny_layout\.preset='huge' is not allowed"):
        tiny_layout("huge")


def test_lora_config_is_the_one_factory(tiny_model):
    from types import SimpleNamespace

    from hf_adaptive.adapters import lora_config, lora_config_from_args

    config = lora_config(4, 8.0, 0.1, "q_proj")
    assert (config.r, config.lora_alpha, config.lora_dropout, config.target_modules) == (4, 8.0, 0.1, {"q_proj"})
    assert config.task_type == "CAUSAL_LM"
    args = SimpleNamespace(lora_r=4, lora_alpha=8.0, lora_dropout=0.1, lora_target_modules=["q_proj"])
    assert lora_config_from_args(args) == config
    assert lora_config(args) == config  # the former `lora_config(args)` call
    assert lora_config(init_lora_weights=False).init_lora_weights is False
