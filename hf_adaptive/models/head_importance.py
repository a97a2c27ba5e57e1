"""Three per-head statistics of a causal LM, each a (layers, heads) tensor: what a gate controller or a pruning
rule reads.

  * `head_importance`: Michel et al. (2019), the expected absolute gradient of the per-example loss with respect to
    each head's gate (needs the gates of `gates.py`);
  * `attention_entropy`: the mean entropy of each head's attention distribution (forward only, eager kernel);
  * `o_proj_magnitude`: a weight-only baseline, the norm of each head's `o_proj` input columns.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..tasks.losses import answer_cross_entropy
from .gates import attention_modules, find_gates


def head_importance(
    model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], normalize_layers: bool = True
) -> torch.Tensor:
    """Michel et al. (2019) head importance: E_x |dL(x)/d gate_h| at the current gates, (layers, heads).

    Every example gets its own copy of the gates, so one backward gives the per-example gradients whose
    absolute values are averaged (the expectation is over examples, not batches). The model's parameter
    gradients are left untouched. `normalize_layers` divides each layer by its L2 norm, as in the paper.
    """
    gated = find_gates(model)
    was_training = model.training
    model.eval()
    total = torch.zeros(gated.num_layers, gated.num_heads)
    n = 0
    params = [p for p in model.parameters() if p.requires_grad]
    saved_flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        base = gated.deterministic_gates()
        for batch in batches:
            batch = {k: v.to(base.device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
            bsz = batch["input_ids"].shape[0]
            g = base.unsqueeze(0).repeat(bsz, 1, 1).requires_grad_(True)
            gated.per_example = g
            logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits
            labels = batch.get("labels", batch["input_ids"])
            per_example = answer_cross_entropy(logits, labels, reduction="per_row")
            (grad,) = torch.autograd.grad(per_example.sum(), g)
            total += grad.abs().sum(0).detach().cpu()
            n += bsz
    finally:
        gated.per_example = None
        for p, flag in zip(params, saved_flags, strict=True):
            p.requires_grad_(flag)
        model.train(was_training)
    if n == 0:
        raise ValueError("head_importance: batches is empty")
    imp = total / n
    if normalize_layers:
        imp = imp / imp.norm(dim=1, keepdim=True).clamp(min=1e-12)
    return imp


@torch.no_grad()
def attention_entropy(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> torch.Tensor:
    """Mean entropy (nats) of each head's attention distribution over real query tokens, (layers, heads).

    Attention weights are only materialised by the eager kernel, so the model is switched to eager for
    this measurement and switched back afterwards.
    """
    config = model.config
    previous = config._attn_implementation
    if previous != "eager":
        model.set_attn_implementation("eager")
    was_training = model.training
    model.eval()
    sums: torch.Tensor | None = None
    count = 0.0
    try:
        for batch in batches:
            dev = next(model.parameters()).device
            ids = batch["input_ids"].to(dev)
            mask = batch.get("attention_mask")
            mask = torch.ones_like(ids) if mask is None else mask.to(dev)
            out = model(input_ids=ids, attention_mask=mask, output_attentions=True)
            per_layer = []
            for att in out.attentions:  # (batch, heads, q, k)
                ent = -(att.float() * att.float().clamp(min=1e-12).log()).sum(-1)  # (batch, heads, q)
                per_layer.append((ent * mask[:, None, :]).sum((0, 2)))
            s = torch.stack(per_layer).cpu()
            sums = s if sums is None else sums + s
            count += float(mask.sum())
    finally:
        if previous != "eager":
            model.set_attn_implementation(previous)
        model.train(was_training)
    if sums is None:
        raise ValueError("attention_entropy: batches is empty")
    return sums / max(count, 1.0)


def o_proj_magnitude(model: nn.Module) -> torch.Tensor:
    """A weight-only importance baseline: the L2 norm of each head's o_proj input columns, (layers, heads)."""
    rows = []
    for attn in attention_modules(model):
        w = getattr(attn.o_proj, "base_layer", attn.o_proj).weight.detach().float()
        hd = int(attn.head_dim)
        rows.append(w.view(w.shape[0], -1, hd).norm(dim=(0, 2)).cpu())
    return torch.stack(rows)
