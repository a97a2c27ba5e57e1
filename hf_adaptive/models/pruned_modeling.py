"""Self-contained remote code for a head-pruned checkpoint: `from_pretrained(path, trust_remote_code=True)`.

`save_pruned_model(..., remote_code=True)` copies this file into the checkpoint (with `_BASE` set to the
model's architecture) and points `auto_map` at `PrunedCausalLM`, so the pruned model reloads with plain
`AutoModelForCausalLM.from_pretrained` on a machine without hf_adaptive (padding query slots included; the
layout is described in `pruning`'s docstring). It imports only torch and transformers.
`hf_adaptive.models.pruning` uses `reshape_to_layout` from here too (one definition).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import transformers
from torch import nn

_BASE = "GemmaForCausalLM"
LAYOUT_KEY = "pruned_heads_layout"


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    found = [
        m
        for m in model.modules()
        if all(hasattr(m, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")) and hasattr(m, "head_dim")
    ]
    found.sort(key=lambda m: getattr(m, "layer_idx", 0))
    return found


def set_bookkeeping(attn: nn.Module, n_heads: int, n_kv: int) -> None:
    """The attributes attention kernels read: the GQA fan-out and, where present, the head counts."""
    attn.num_key_value_groups = n_heads // n_kv
    for name, value in (("num_heads", n_heads), ("num_attention_heads", n_heads), ("num_key_value_heads", n_kv)):
        if hasattr(attn, name):
            setattr(attn, name, value)


def reshape_to_layout(model: nn.Module, layout: Mapping[str, Mapping[str, Any]]) -> None:
    """Give every attention layer the projection shapes of `layout` (weights uninitialised): one query slot per kept
    head and per padding slot (a layout written before padding existed has no "padding": none)."""
    for i, attn in enumerate(_attention_modules(model)):
        entry = layout.get(str(i))
        if entry is None:
            continue
        hd = int(attn.head_dim)
        nq, nkv = len(entry["heads"]) + len(entry.get("padding") or []), len(entry["kv_heads"])
        hidden = attn.q_proj.in_features
        bias, o_bias = attn.q_proj.bias is not None, attn.o_proj.bias is not None
        dev, dt = attn.q_proj.weight.device, attn.q_proj.weight.dtype
        attn.q_proj = nn.Linear(hidden, nq * hd, bias=bias, device=dev, dtype=dt)
        attn.k_proj = nn.Linear(hidden, nkv * hd, bias=bias, device=dev, dtype=dt)
        attn.v_proj = nn.Linear(hidden, nkv * hd, bias=bias, device=dev, dtype=dt)
        attn.o_proj = nn.Linear(nq * hd, attn.o_proj.out_features, bias=o_bias, device=dev, dtype=dt)
        set_bookkeeping(attn, nq, nkv)


class PrunedCausalLM(getattr(transformers, _BASE)):
    """The base architecture, with each attention layer shaped by `config.pruned_heads_layout`."""

    def __init__(self, config, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        reshape_to_layout(self, getattr(config, LAYOUT_KEY, None) or {})
