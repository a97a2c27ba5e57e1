"""A converted GGUF model is an ordinary float32 model: not marked quantized, so `Trainer` fine-tunes it."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("gguf")

from test_gguf_loading import write_tiny_llama_gguf  # noqa: E402 - the tiny GQA Llama GGUF the loading tests write

from hf_adaptive.models import gguf as gguf_loading  # noqa: E402
from hf_adaptive.models import load_model_and_tokenizer  # noqa: E402


def _trainable(model) -> bool:
    from transformers import Trainer, TrainingArguments

    Trainer(model=model, args=TrainingArguments(output_dir="unused", report_to=[], use_cpu=True))
    return getattr(model, "hf_quantizer", None) is None and not hasattr(model.config, "quantization_config")


def test_a_converted_model_is_not_marked_quantized(tmp_path, monkeypatch):
    monkeypatch.setenv(gguf_loading.CACHE_ENV, str(tmp_path / "cache"))
    path = write_tiny_llama_gguf(tmp_path / "tiny-llama.gguf")
    model, _ = load_model_and_tokenizer(str(path))
    assert _trainable(model)
    config = tmp_path / "cache" / "models" / path.stem / "config.json"
    assert "quantization_config" not in json.loads(config.read_text())

    # a cache written by an earlier conversion still carries the GGUF entry: it is dropped when loading
    values = json.loads(config.read_text())
    values["quantization_config"] = {"quant_method": "gguf", "dequantize": False, "gguf_file": path.name}
    config.write_text(json.dumps(values))
    monkeypatch.setattr(gguf_loading, "convert_gguf", lambda *a, **k: pytest.fail("the cache is still valid"))
    again, _ = load_model_and_tokenizer(str(path))
    assert _trainable(again) and "quantization_config" not in json.loads(config.read_text())
