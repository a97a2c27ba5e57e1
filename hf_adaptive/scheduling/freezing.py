"""Selective freezing: stop computing gradients for parameters whose gradient signal has died out.

Each unit (one parameter, or all direct parameters of one module) keeps an EMA of its gradient norm. A unit whose
EMA stays below a threshold (absolute, or relative to the mean EMA of the active units) is frozen with
`requires_grad_(False)`, so autograd really skips it: its `.grad` stays `None`, the optimizer leaves it (and its
buffers, weight decay included) untouched, and the backward pass does less work. Every `probe_every` steps all frozen
units are thawed for one step (a probe); a unit whose probe gradient norm is back above the threshold stays active,
the others are frozen again before the optimizer step, so a probe never moves a frozen unit.

A cap (`max_frozen_fraction`, by element count) keeps at least part of the model trainable, so the loss always has a
gradient. `release()` thaws everything: `SelectiveFreezingCallback` calls it at the end of training so the next
`Trainer` (which builds its optimizer from the parameters with `requires_grad`) sees every parameter again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..plugins import ContinualPlugin
from .adaptive_scheduler import _check_number, _fail

GRANULARITIES = ("parameter", "module")
THRESHOLD_MODES = ("absolute", "relative")


@dataclass
class FreezingConfig:
    """When a unit freezes and how often frozen units are probed."""

    threshold: float = field(default=1e-3, metadata={"help": "Gradient-norm EMA below which a unit freezes."})
    threshold_mode: str = field(
        default="absolute",
        metadata={
            "help": "'absolute' (EMA < threshold) or 'relative' (EMA < threshold * mean EMA of the active units)."
        },
    )
    granularity: str = field(default="parameter", metadata={"help": "'parameter' or 'module' (a module's own params)."})
    ema_beta: float = field(default=0.9, metadata={"help": "EMA factor of the gradient norms."})
    warmup_steps: int = field(default=10, metadata={"help": "Steps before anything may freeze."})
    probe_every: int = field(default=20, metadata={"help": "Steps between probes of the frozen units; 0 never probes."})
    max_frozen_fraction: float = field(
        default=0.9, metadata={"help": "Most of the parameters (by count) frozen at once."}
    )

    def __post_init__(self) -> None:
        c = type(self).__name__
        _check_number(c, "threshold", self.threshold, 0.0)
        if self.threshold_mode not in THRESHOLD_MODES:
            _fail(c, "threshold_mode", self.threshold_mode, f"choose one of {list(THRESHOLD_MODES)}")
        if self.granularity not in GRANULARITIES:
            _fail(c, "granularity", self.granularity, f"choose one of {list(GRANULARITIES)}")
        _check_number(c, "ema_beta", self.ema_beta, 0.0, 1.0, high_open=True)
        _check_number(c, "warmup_steps", self.warmup_steps, 0, integer=True)
        _check_number(c, "probe_every", self.probe_every, 0, integer=True)
        _check_number(c, "max_frozen_fraction", self.max_frozen_fraction, 0.0, 1.0, high_open=True)


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


class SelectiveFreezingCallback(ContinualPlugin):
    """Runs a `Freezer` inside a `Trainer`: updates before each optimizer step, logs `frozen_fraction`."""

    name = "selective_freezing"

    @classmethod
    def from_config(cls, args: Any, **overrides: Any) -> SelectiveFreezingCallback:
        """The callback described by the `freeze_*` fields of a `ContinualConfig` (keyword overrides win)."""
        values = dict(
            threshold=args.freeze_threshold,
            threshold_mode=args.freeze_threshold_mode,
            granularity=args.freeze_granularity,
            probe_every=args.freeze_probe_every,
            ema_beta=args.freeze_ema_beta,
            warmup_steps=args.freeze_warmup_steps,
            max_frozen_fraction=args.freeze_max_frozen_fraction,
        )
        values.update(overrides)
        return cls(FreezingConfig(**values))

    def __init__(self, config: FreezingConfig | None = None) -> None:
        self.config = config or FreezingConfig()
        self.freezer: Freezer | None = None
        self._pending: dict[str, Any] | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise ValueError("SelectiveFreezingCallback.model=None is not allowed: the Trainer must pass its model")
        if self.freezer is None or not self.freezer.manages(model):
            self.freezer = Freezer(model, self.config)
        if self._pending is not None:
            self.freezer.load_state_dict(self._pending)
            self._pending = None

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.freezer is not None:
            self.freezer.update()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.freezer is None or logs is None or "loss" not in logs:
            return
        logs["frozen_fraction"] = self.freezer.frozen_fraction()
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1]["frozen_fraction"] = logs["frozen_fraction"]

    def on_train_end(self, args, state, control, **kwargs):
        if self.freezer is not None:
            self.freezer.release()

    def state_dict(self) -> dict[str, Any]:
        if self.freezer is None:
            return dict(self._pending or {})
        return self.freezer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Applied now if running, and again in `on_train_begin` (a resumed Trainer rebuilds its optimizer first)."""
        if not state:
            return
        self._pending = state
        if self.freezer is not None:
            self.freezer.load_state_dict(state)
