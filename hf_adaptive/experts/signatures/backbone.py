"""The backbone under a (possibly peft-wrapped) model: its device, its own parameters, adapters switched off."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch


def device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def backbone_only(model: torch.nn.Module) -> AbstractContextManager:
    """Context in which `model` computes with its adapters disabled (a plain model: unchanged)."""
    return model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext()


def base_of(model: torch.nn.Module) -> torch.nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def normalise_name(name: str) -> str:
    """Parameter names as in the plain backbone (peft inserts `base_layer.` and wraps with `base_model.model.`)."""
    return name.replace(".base_layer.", ".")
