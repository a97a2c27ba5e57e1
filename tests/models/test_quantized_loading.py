"""8-bit and 4-bit (nf4) loading through bitsandbytes, on CPU as on CUDA, and its input validation."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

from hf_adaptive.models import build_tiny_gemma, load_model_and_tokenizer
from hf_adaptive.models.loading import _target_device_type, bnb_compute_dtype

needs_bnb = pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is None, reason="quantized loading needs bitsandbytes (CPU or CUDA)"
)


def test_compute_dtype_is_float32_on_cpu_and_bfloat16_on_cuda():
    assert bnb_compute_dtype("cpu") == torch.float32
    assert bnb_compute_dtype("cuda") == torch.bfloat16
    assert bnb_compute_dtype("cpu", torch.bfloat16) == torch.bfloat16  # an explicit dtype wins
    assert bnb_compute_dtype("cuda", torch.float16) == torch.float16


def test_target_device_follows_cuda_and_device_map():
    if not torch.cuda.is_available():
        assert {_target_device_type(m) for m in (None, "auto", {"": 0}, "cuda:0")} == {"cpu"}
        return
    assert _target_device_type(None) == _target_device_type({"": 0}) == _target_device_type("auto") == "cuda"
    assert _target_device_type("cpu") == _target_device_type({"": "cpu", "lm_head": "disk"}) == "cpu"


@needs_bnb
@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_load_by_path_quantizes_the_linear_layers(tiny_gemma_dir, quantization):
    import bitsandbytes as bnb

    model, tok = load_model_and_tokenizer(tiny_gemma_dir, quantization=quantization)
    cls = bnb.nn.Linear4bit if quantization == "4bit" else bnb.nn.Linear8bitLt
    quantized = [n for n, m in model.named_modules() if isinstance(m, cls)]
    assert len(quantized) == 2 * 7  # q, k, v, o, gate, up, down of both layers
    assert not isinstance(model.lm_head, cls)
    device = next(model.parameters()).device
    config = model.config.quantization_config
    if quantization == "4bit":
        expected = torch.bfloat16 if device.type == "cuda" else torch.float32
        assert config.bnb_4bit_quant_type == "nf4" and config.bnb_4bit_compute_dtype == expected
        assert all(model.get_submodule(n).compute_dtype == expected for n in quantized)
    else:
        assert config.load_in_8bit and model.model.layers[0].self_attn.q_proj.weight.dtype == torch.int8
    # the quantized model still computes (nearly) the same function as the full-precision one
    ref, _ = build_tiny_gemma(tok, seed=0)
    ids = torch.randint(4, 60, (2, 9), generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        got = model(input_ids=ids.to(device)).logits.float().cpu()
        want = ref.eval()(input_ids=ids).logits
    assert got.dtype == torch.float32 and got.shape == want.shape
    rel = float((got - want).norm() / want.norm())
    assert 0 < rel < (0.05 if quantization == "4bit" else 0.01), rel


def test_quantization_values_are_validated():
    with pytest.raises(ValueError, match=r"quantization='2bit' is not allowed: use one of \(None, '8bit', '4bit'\)"):
        load_model_and_tokenizer("some/model", quantization="2bit")
    with pytest.raises(ValueError, match="quantization='8bit' is not allowed for the embedded tiny-gemma"):
        load_model_and_tokenizer("tiny-gemma", quantization="8bit")


def test_missing_bitsandbytes_is_a_clear_error(tiny_gemma_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # what `import bitsandbytes` sees when not installed
    with pytest.raises(
        ImportError, match=r"quantization='4bit' needs bitsandbytes: pip install 'hf_adaptive\[quant\]'"
    ):
        load_model_and_tokenizer(tiny_gemma_dir, quantization="4bit")
