"""Physical head pruning: remove query heads (and key/value heads no longer used) from the projection weights.

transformers 5.x has no `prune_heads`, and its attention modules read the head count from the weight shapes
(`view(*, -1, head_dim)`) and the GQA fan-out from `module.num_key_value_groups`. So pruning a layer means:
slice the q rows / o columns of the kept query heads, keep the k/v rows of the kv heads that still serve a
query head, and set `num_key_value_groups`. GQA needs every kv slot to serve the same number `g` of
consecutive query slots, so when pruning leaves kv groups of unequal sizes c_i there are two exact layouts:

  * duplicate: `g = gcd(c_i)` and kv head i is stored `c_i / g` times (no padding);
  * pad: `g = max(c_i)`, each kv head stored once, and each group filled up to g with padding query slots whose
    q rows and o_proj columns are zero (their output adds exactly nothing).

Per layer the layout with fewer projection weights wins (q and o per query slot, k and v per kv slot, each
hidden x head_dim; `plan_sizes`), ties to the padded layout (fewer kv slots: a smaller KV cache, which decoding
reads at every token). Both are exact: the logits equal those of the
gated model with the dropped heads' gates at 0. A layer that loses every head keeps one query head whose o_proj
columns are zeroed (exactly what gates at 0 compute). Zeroed o_proj columns (a zeroed layer, padding slots) are
ordinary weights: fine-tuning the pruned model may train them, and the slot then acts as an extra head of its
kv group, one that pruning again drops (a padding slot is never a real head).

The per-layer layout is written into the config as `pruned_heads_layout`:
    {"<layer>": {"heads": [original query head ids kept, in slot order], "kv_heads": [original kv head id of each
                 kv slot], "padding": [indices of the padding query slots], "zeroed": bool}}
The layer has len(heads) + len(padding) query slots; the non-padding slots hold `heads` in order. (A layout
without "padding", written before it existed, has none.) The stock model classes size every layer from
`num_attention_heads`, so a plain `from_pretrained` refuses the checkpoint (size mismatch). Two ways back:
`load_pruned_model(path)` (hf_adaptive installed: empty model from the config, every layer reshaped from the
layout, then the weights), or, since `save_pruned_model` also writes a self-contained modeling file and an
`auto_map` into the folder, `AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)` anywhere
transformers is installed.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import pruned_modeling
from .gates import attention_modules
from .pruned_modeling import LAYOUT_KEY, reshape_to_layout, set_bookkeeping

REMOTE_CODE_FILE = "modeling_pruned_heads.py"


def _base(linear: nn.Module) -> nn.Linear:
    if hasattr(linear, "base_layer"):
        raise ValueError("prune_heads: the attention projections carry peft adapters; merge_and_unload() first")
    return linear


def current_layout(model: nn.Module) -> dict[str, dict[str, Any]]:
    """The per-layer head layout of `model` (the identity layout for an unpruned model); every entry has all keys."""
    stored = getattr(model.config, LAYOUT_KEY, None) or {}
    layout = {}
    for i, attn in enumerate(attention_modules(model)):
        if str(i) in stored:
            entry = {k: (list(v) if isinstance(v, list) else v) for k, v in stored[str(i)].items()}
            entry.setdefault("padding", [])
            layout[str(i)] = entry
            continue
        hd = int(attn.head_dim)
        nq = _base(attn.q_proj).out_features // hd
        nkv = _base(attn.k_proj).out_features // hd
        layout[str(i)] = {"heads": list(range(nq)), "kv_heads": list(range(nkv)), "padding": [], "zeroed": False}
    return layout


def _take_rows(linear: nn.Linear, rows: torch.Tensor) -> nn.Linear:
    """A new Linear with the given output rows of `linear`; a row index of -1 is a zero row (zero bias)."""
    new = nn.Linear(
        linear.in_features,
        len(rows),
        bias=linear.bias is not None,
        device=linear.weight.device,
        dtype=linear.weight.dtype,
    )
    real = rows >= 0
    with torch.no_grad():
        new.weight.zero_()
        new.weight[real] = linear.weight[rows[real]]
        if linear.bias is not None:
            new.bias.zero_()
            new.bias[real] = linear.bias[rows[real]]
    new.weight.requires_grad_(linear.weight.requires_grad)
    return new


def _take_cols(linear: nn.Linear, cols: torch.Tensor) -> nn.Linear:
    """A new Linear with the given input columns of `linear`; a column index of -1 is a zero column."""
    new = nn.Linear(
        len(cols),
        linear.out_features,
        bias=linear.bias is not None,
        device=linear.weight.device,
        dtype=linear.weight.dtype,
    )
    real = cols >= 0
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, real] = linear.weight[:, cols[real]]
        if linear.bias is not None:
            new.bias.copy_(linear.bias)
    new.weight.requires_grad_(linear.weight.requires_grad)
    return new


def _rows(slots: list[int | None], hd: int) -> torch.Tensor:
    """Weight rows of the given head slots (None: a padding slot, rows -1)."""
    return torch.tensor([-1 if s is None else s * hd + d for s in slots for d in range(hd)], dtype=torch.long)


def query_slots(entry: Mapping[str, Any]) -> list[int | None]:
    """The original query head id of each query slot of a layout entry (None: a padding slot)."""
    heads, padding = list(entry["heads"]), sorted(int(j) for j in entry.get("padding") or [])
    n = len(heads) + len(padding)
    if len(set(padding)) != len(padding) or any(not 0 <= j < n for j in padding):
        raise ValueError(f"{LAYOUT_KEY}: padding={padding} is not allowed: distinct query slots 0..{n - 1}")
    if not entry["kv_heads"] or n % len(entry["kv_heads"]):
        raise ValueError(
            f"{LAYOUT_KEY}: kv_heads={list(entry['kv_heads'])} is not allowed: their count must divide the {n} "
            "query slots"
        )
    it = iter(heads)
    pad = set(padding)
    return [None if j in pad else next(it) for j in range(n)]


def plan_sizes(counts: list[int]) -> dict[str, tuple[int, int]]:
    """(query slots, kv slots) of both exact GQA layouts for kept groups of `counts` query heads each:
    "duplicate" (groups of gcd size, kv heads repeated) and "pad" (groups padded to the largest, kv heads once)."""
    if not counts or min(counts) < 1:
        raise ValueError(f"plan_sizes: counts={counts} is not allowed: a non-empty list of integers >= 1")
    g = math.gcd(*counts)
    return {
        "duplicate": (sum(counts), sum(c // g for c in counts)),
        "pad": (max(counts) * len(counts), len(counts)),
    }


def choose_plan(counts: list[int]) -> str:
    """'pad' when it needs no more projection weights than 'duplicate' (q + o per query slot, k + v per kv slot,
    each hidden x head_dim), else 'duplicate'. Ties go to 'pad': it stores fewer kv slots (a smaller KV cache)."""
    sizes = plan_sizes(counts)
    cost = {name: 2 * nq + 2 * nkv for name, (nq, nkv) in sizes.items()}
    return "pad" if cost["pad"] <= cost["duplicate"] else "duplicate"


def _plan(entry: Mapping[str, Any], drop: set[int]) -> dict[str, Any]:
    """The new layout entry (original ids) and, per new slot, the current slot to copy (None: padding)."""
    slots, kv_heads = query_slots(entry), entry["kv_heads"]
    group = len(slots) // len(kv_heads)
    # current query slot j is served by current kv slot j // group, i.e. original kv head kv_heads[j // group]
    real = [j for j, h in enumerate(slots) if h is not None]
    keep = [] if entry.get("zeroed", False) else [j for j in real if slots[j] not in drop]
    zeroed = not keep
    if zeroed:  # keep one head, zero its output: exact equivalent of all gates at 0, no 0-sized tensors
        keep = real[:1]
    by_kv: dict[int, list[int]] = {}
    for j in keep:
        by_kv.setdefault(kv_heads[j // group], []).append(j)
    counts = [len(v) for v in by_kv.values()]
    padded = choose_plan(counts) == "pad"
    width = max(counts) if padded else math.gcd(*counts)
    q_slots: list[int | None] = []
    kv_slots: list[int] = []
    new_kv: list[int] = []
    for kv_orig, js in by_kv.items():  # dict order = order of first appearance = original head order
        chunks = [js] if padded else [js[c : c + width] for c in range(0, len(js), width)]
        for chunk in chunks:
            kv_slots.append(js[0] // group)
            new_kv.append(kv_orig)
            q_slots += [*chunk, *[None] * (width - len(chunk))]
    return {
        "heads": [slots[j] for j in q_slots if j is not None],
        "kv_heads": new_kv,
        "padding": [i for i, j in enumerate(q_slots) if j is None],
        "zeroed": zeroed,
        "q_slots": q_slots,
        "kv_slots": kv_slots,
    }


def prune_heads(model: nn.Module, heads_to_prune: Mapping[int, list[int]] | Mapping[str, list[int]]) -> nn.Module:
    """Remove the given query heads (original head ids per layer) from `model`, in place; returns `model`.

    Works on an already pruned model (ids stay the original ones; padding slots are dropped and re-planned).
    Updates `num_key_value_groups`, `num_heads` / `num_key_value_heads` where the module has them, and
    `config.pruned_heads_layout`.
    """
    attns = attention_modules(model)
    layout = current_layout(model)
    for key, drop in heads_to_prune.items():
        i = int(key)
        if not (0 <= i < len(attns)):
            raise ValueError(f"prune_heads: layer={key!r} is not allowed: layers are 0..{len(attns) - 1}")
        if not drop:
            continue
        attn = attns[i]
        hd = int(attn.head_dim)
        bad = [h for h in drop if not (0 <= int(h) < model.config.num_attention_heads)]
        if bad:
            raise ValueError(
                f"prune_heads: heads {bad} of layer {i} are not allowed: ids are 0.."
                f"{model.config.num_attention_heads - 1}"
            )
        plan = _plan(layout[str(i)], {int(h) for h in drop})
        q_rows, kv_rows = _rows(plan.pop("q_slots"), hd), _rows(plan.pop("kv_slots"), hd)
        attn.q_proj = _take_rows(_base(attn.q_proj), q_rows)
        attn.k_proj = _take_rows(_base(attn.k_proj), kv_rows)
        attn.v_proj = _take_rows(_base(attn.v_proj), kv_rows)
        attn.o_proj = _take_cols(_base(attn.o_proj), q_rows)
        if plan["zeroed"]:
            with torch.no_grad():
                attn.o_proj.weight.zero_()
        set_bookkeeping(attn, len(plan["heads"]) + len(plan["padding"]), len(plan["kv_heads"]))
        layout[str(i)] = plan
    setattr(model.config, LAYOUT_KEY, layout)
    return model


def _base_architecture(model: nn.Module) -> str:
    import transformers

    for cls in type(model).__mro__:
        if cls.__name__ != "PrunedCausalLM" and getattr(transformers, cls.__name__, None) is cls:
            return cls.__name__
    raise ValueError(f"save_pruned_model: {type(model).__name__} is not a transformers architecture")


def save_pruned_model(model: nn.Module, path: str | os.PathLike, remote_code: bool = True, **kwargs: Any) -> None:
    """`save_pretrained`; the layout travels in config.json.

    With `remote_code` (default) the folder also gets a small self-contained modeling file and an `auto_map`,
    so that `AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)` rebuilds the pruned shapes
    without hf_adaptive. `load_pruned_model` works either way, without remote code.
    Refuses a model that still carries head gates.
    """
    if getattr(model, "head_gates", None) is not None:
        raise ValueError("save_pruned_model: remove the head gates first (gated.remove())")
    config = model.config
    previous = getattr(config, "auto_map", None)
    if remote_code:
        config.auto_map = {**(previous or {}), "AutoModelForCausalLM": f"{REMOTE_CODE_FILE[:-3]}.PrunedCausalLM"}
    try:
        model.save_pretrained(path, **kwargs)
    finally:
        if previous is None and hasattr(config, "auto_map"):
            del config.auto_map
        elif previous is not None:
            config.auto_map = previous
    if remote_code:
        from ..utils.io import atomic_write_text

        source = Path(pruned_modeling.__file__).read_text(encoding="utf-8")
        source = source.replace('_BASE = "GemmaForCausalLM"', f'_BASE = "{_base_architecture(model)}"', 1)
        atomic_write_text(Path(path) / REMOTE_CODE_FILE, source)


def load_pruned_model(
    path: str | os.PathLike,
    dtype: torch.dtype | None = None,
    attn_implementation: str | None = None,
    **config_overrides: Any,
) -> nn.Module:
    """Load a model saved after `prune_heads`: empty model from config, reshaped from the layout, then weights."""
    from accelerate import init_empty_weights
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    config = AutoConfig.from_pretrained(path, **config_overrides)
    if hasattr(config, "auto_map"):  # the shapes are rebuilt here: no remote code needed
        del config.auto_map
    layout = getattr(config, LAYOUT_KEY, None)
    if not layout:
        raise ValueError(f"load_pruned_model: {path}/config.json has no {LAYOUT_KEY}: use from_pretrained")
    kwargs: dict[str, Any] = {}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, **kwargs)
        reshape_to_layout(model, layout)
    index = path / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    )
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(path / f)))
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = {k for k in missing if k.endswith("lm_head.weight")} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise ValueError(
            f"load_pruned_model: checkpoint does not match the layout: "
            f"missing={sorted(set(missing) - tied)}, unexpected={sorted(unexpected)}"
        )
    model.tie_weights()
    model.eval()
    return model
