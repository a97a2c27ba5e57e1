"""Selective freezing: stop computing gradients for parameters whose gradient signal has died out.

Each unit (one parameter, or all direct parameters of one module) keeps an EMA of its gradient norm. A unit whose
EMA stays below a threshold (absolute, or relative to the mean EMA of the active units) is frozen with
`requires_grad_(False)`, so autograd really skips it: its `.grad` stays `None`, the optimizer leaves it (and its
buffers, weight decay included) untouched, and the backward pass does less work. Every `probe_every` steps all frozen
units are thawed for one step (a probe); a unit whose probe gradient norm is back above the threshold stays active,
the others are frozen again before the optimizer step, so a probe never moves a frozen unit.

A cap (`max_frozen_fraction`, by element count) keeps at least part of the model trainable, so the loss always has a
gradient. `release()` thaws everything: `SelectiveFreezingCallback` (in `callback.py`) calls it at the end of training
so the next `Trainer` (which builds its optimizer from the parameters with `requires_grad`) sees every parameter
again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .config import GRANULARITIES, THRESHOLD_MODES, FreezingConfig


@dataclass
class _Unit:
    name: str
    params: list[nn.Parameter]
    numel: int
    ema: float | None = None
    frozen: bool = False
    probing: bool = False


class Freezer:
    """Gradient-norm EMA per unit; freezes quiet units and probes them periodically. Call `update()` after backward."""

    def __init__(self, model: nn.Module, config: FreezingConfig | None = None) -> None:
        self.model = model
        self.config = config or FreezingConfig()
        self.steps = 0
        groups: dict[str, list[tuple[str, nn.Parameter]]] = {}
        for name, p in model.named_parameters():  # shared (tied) parameters appear once
            if not p.requires_grad:
                continue  # not ours to manage (e.g. the frozen base of a LoRA model)
            key = name if self.config.granularity == "parameter" else name.rpartition(".")[0]
            groups.setdefault(key, []).append((name, p))
        self.units = [_Unit(k, [p for _, p in v], sum(p.numel() for _, p in v)) for k, v in groups.items()]
        self.total_numel = sum(u.numel for u in self.units)
        if not self.units:
            raise ValueError("Freezer.model has no trainable parameter: nothing to freeze")

    # --------------------------------------------------------------------------------------------------- queries
    def frozen_fraction(self) -> float:
        return sum(u.numel for u in self.units if u.frozen) / max(self.total_numel, 1)

    def frozen_names(self) -> list[str]:
        return [u.name for u in self.units if u.frozen]

    def manages(self, model: nn.Module) -> bool:
        """Whether this freezer was built for exactly the trainable parameters of `model` (frozen ones included)."""
        ours = {id(p) for u in self.units for p in u.params}
        theirs = {id(p) for p in model.parameters() if p.requires_grad or id(p) in ours}
        return model is self.model and ours == theirs

    # --------------------------------------------------------------------------------------------------- updates
    @staticmethod
    def _set(unit: _Unit, frozen: bool) -> None:
        unit.frozen = frozen
        for p in unit.params:
            p.requires_grad_(not frozen)
            if frozen:
                p.grad = None

    @torch.no_grad()
    def update(self) -> None:
        """Read this step's gradients (before the optimizer step): update EMAs, freeze, refreeze failed probes."""
        cfg = self.config
        self.steps += 1
        for unit in self.units:
            if unit.frozen:
                continue
            grads = [p.grad for p in unit.params if p.grad is not None]
            if not grads:
                continue
            norm = math.sqrt(sum(float(g.detach().float().pow(2).sum()) for g in grads))
            if not math.isfinite(norm):
                continue
            if unit.ema is None or unit.probing:
                unit.ema = norm  # a probe measures the signal afresh
            else:
                unit.ema = cfg.ema_beta * unit.ema + (1 - cfg.ema_beta) * norm
        threshold = cfg.threshold
        active = [u for u in self.units if not u.frozen and u.ema is not None]
        if cfg.threshold_mode == "relative" and active:
            threshold = cfg.threshold * sum(u.ema for u in active) / len(active)
        if self.steps > cfg.warmup_steps:
            budget = cfg.max_frozen_fraction * self.total_numel - sum(u.numel for u in self.units if u.frozen)
            for unit in sorted(active, key=lambda u: u.ema):
                if unit.ema >= threshold:
                    break
                if unit.numel <= budget:
                    self._set(unit, True)
                    budget -= unit.numel
        for unit in self.units:
            unit.probing = False
        if cfg.probe_every and self.steps % cfg.probe_every == 0:
            for unit in self.units:
                if unit.frozen:
                    self._set(unit, False)
                    unit.probing = True

    def release(self) -> None:
        """Thaw every unit (their EMAs are kept)."""
        for unit in self.units:
            if unit.frozen:
                self._set(unit, False)
            unit.probing = False

    # ----------------------------------------------------------------------------------------------- resumability
    def state_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "units": {u.name: {"ema": u.ema, "frozen": u.frozen, "probing": u.probing} for u in self.units},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])
        for unit in self.units:
            saved = state["units"].get(unit.name)
            if saved is None:
                continue
            unit.ema = saved["ema"]
            self._set(unit, bool(saved["frozen"]))
            unit.probing = bool(saved["probing"])


__all__ = ["GRANULARITIES", "THRESHOLD_MODES", "Freezer", "FreezingConfig"]
