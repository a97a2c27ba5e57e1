"""Which parameters of a model train: one helper for the plugins that snapshot, restore or weigh them."""

from __future__ import annotations

import torch


def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The parameters with ``requires_grad=True``, by name (tied parameters once, in `named_parameters` order)."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


__all__ = ["trainable_parameters"]
