"""Loading any causal LM by name or path, or the embedded tiny default."""

from __future__ import annotations

from typing import Any

import torch

from .tiny import build_tiny_gemma

TINY_MODEL_NAME = "tiny-gemma"
_QUANT_ALLOWED = (None, "8bit", "4bit")


def load_model_and_tokenizer(
    model_name_or_path: str = TINY_MODEL_NAME,
    attn_implementation: str | None = None,
    quantization: str | None = None,
    torch_dtype: str | torch.dtype | None = None,
    seed: int = 0,
    **kwargs: Any,
):
    """`(model, tokenizer)` for `model_name_or_path`.

    `tiny-gemma` builds the embedded default offline. Any other name goes through
    `AutoModelForCausalLM.from_pretrained` (e.g. `google/gemma-2b`), with `attn_implementation`
    (`eager`, `sdpa`, `flash_attention_2`) and 8-bit/4-bit loading through bitsandbytes passed through.
    """
    if quantization not in _QUANT_ALLOWED:
        raise ValueError(f"quantization={quantization!r} is not allowed; use one of {_QUANT_ALLOWED}")
    if model_name_or_path == TINY_MODEL_NAME:
        if quantization is not None:
            raise ValueError("quantization is not supported for the embedded tiny-gemma; pass a real model name")
        return build_tiny_gemma(seed=seed, attn_implementation=attn_implementation or "sdpa")

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_kwargs: dict[str, Any] = dict(kwargs)
    if attn_implementation is not None:
        model_kwargs["attn_implementation"] = attn_implementation
    if torch_dtype is not None:
        model_kwargs["dtype"] = getattr(torch, torch_dtype) if isinstance(torch_dtype, str) else torch_dtype
    if quantization is not None:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as err:  # pragma: no cover - depends on the optional extra
            raise ImportError(
                f"quantization={quantization!r} needs bitsandbytes: pip install 'hf_adaptive[quant]'"
            ) from err
        from transformers import BitsAndBytesConfig

        model_kwargs["quantization_config"] = (
            BitsAndBytesConfig(load_in_8bit=True)
            if quantization == "8bit"
            else BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
        )
    tokenizer = AutoTokenizer.from_pretrained(model_name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_name_or_path, **model_kwargs)
    return model, tokenizer
