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

`threshold_mode="change"` measures what AutoFreeze measures: every `change_window` steps the relative change of each
unit's EMA since the previous reading is measured, and a unit whose gradient norm has stopped moving
(change < threshold) counts as converged, whatever its scale (the lowest layers of a pretrained LM can have the
largest gradients).
`threshold_mode="percentile"` is AutoFreeze's actual rule: a fixed relative threshold may never be reached in a short
fine-tuning run (on SmolLM2, 32 LoRA steps of a task, every layer's EMA still moved 12-29 % per 4 steps, so
`change` at 10 % froze nothing), so at each reading a unit is converged when its change is at or below the
`percentile`-th percentile of the active units' changes (the median by default): the layers that move least
relative to the others. Decisions are taken at the readings only (a reading is used once; a probed unit stays
thawed until the next reading).

With `granularity="layer"` (AutoFreeze's policy) each decoder layer is one unit (the input embeddings go with layer 0,
unless they are tied to the output head) and only a prefix of layers freezes: layer i may freeze only once every layer
below it is frozen. While layer 0 is frozen, the input embeddings' output is detached, so autograd builds no graph
through the frozen prefix at all, even when the embedding matrix still trains through a tied head: the backward pass
stops at the lowest trainable layer and the prefix's activations are not kept. With `drop_optimizer_state` a freezing
unit's optimizer state (Adam's moments) is freed.
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
    first_frozen_step: int | None = None
    reference: float | None = None  # EMA at the last change_window reading (threshold_mode="change")
    change: float | None = None  # relative change of the EMA between the last two readings


class Freezer:
    """Gradient-norm EMA per unit; freezes quiet units and probes them periodically. Call `update()` after backward."""

    def __init__(self, model: nn.Module, config: FreezingConfig | None = None) -> None:
        self.model = model
        self.config = config or FreezingConfig()
        self.steps = 0
        self._optimizer: torch.optim.Optimizer | None = None
        self._hook: torch.utils.hooks.RemovableHandle | None = None
        self._embeddings: nn.Module | None = None
        if self.config.granularity == "layer":
            self.units = self._layer_units(model)
        else:
            groups: dict[str, list[tuple[str, nn.Parameter]]] = {}
            for name, p in model.named_parameters():  # shared (tied) parameters appear once
                if not p.requires_grad:
                    continue  # not ours to manage (e.g. the frozen base of a LoRA model)
                key = name if self.config.granularity == "parameter" else name.rpartition(".")[0]
                groups.setdefault(key, []).append((name, p))
            self.units = [_Unit(k, [p for _, p in v], sum(p.numel() for _, p in v)) for k, v in groups.items()]
        self.total_numel = sum(u.numel for u in self.units)
        self._trainable = {id(p) for p in model.parameters() if p.requires_grad}
        if not self.total_numel:
            raise ValueError("Freezer.model has no trainable parameter: nothing to freeze")

    def _layer_units(self, model: nn.Module) -> list[_Unit]:
        """One unit per decoder layer (its trainable params; the untied input embeddings join layer 0)."""
        name, layers = find_decoder_layers(model)
        embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        if not isinstance(embeddings, nn.Module):
            raise ValueError(
                f"Freezer.granularity='layer' needs the model's input embeddings (get_input_embeddings()); "
                f"{type(model).__name__} has none"
            )
        self._embeddings = embeddings
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        tied = {id(p) for p in head.parameters()} if isinstance(head, nn.Module) else set()
        units = []
        for i, layer in enumerate(layers):
            params = [p for p in layer.parameters() if p.requires_grad]
            if i == 0:
                params += [p for p in embeddings.parameters() if p.requires_grad and id(p) not in tied]
            units.append(_Unit(f"{name}.{i}", params, sum(p.numel() for p in params)))
        return units

    # --------------------------------------------------------------------------------------------------- queries
    def frozen_fraction(self) -> float:
        return sum(u.numel for u in self.units if u.frozen) / max(self.total_numel, 1)

    def frozen_names(self) -> list[str]:
        return [u.name for u in self.units if u.frozen]

    def frozen_layers(self) -> int:
        """How many leading units are frozen (with `granularity="layer"`: the frozen prefix of decoder layers)."""
        count = 0
        for unit in self.units:
            if not unit.frozen:
                break
            count += 1
        return count

    def freeze_history(self) -> dict[str, int]:
        """The step at which each unit first froze (units that never froze are absent)."""
        return {u.name: u.first_frozen_step for u in self.units if u.first_frozen_step is not None}

    def manages(self, model: nn.Module) -> bool:
        """Whether this freezer was built for exactly the trainable parameters of `model` (frozen ones included)."""
        ours = self._trainable | {id(p) for u in self.units for p in u.params}
        theirs = {id(p) for p in model.parameters() if p.requires_grad or id(p) in ours}
        return model is self.model and ours == theirs

    # --------------------------------------------------------------------------------------------------- updates
    def _set(self, unit: _Unit, frozen: bool) -> None:
        unit.frozen = frozen
        for p in unit.params:
            p.requires_grad_(not frozen)
            if frozen:
                p.grad = None
                if self._optimizer is not None and self.config.drop_optimizer_state:
                    self._optimizer.state.pop(p, None)
        if frozen and unit.first_frozen_step is None:
            unit.first_frozen_step = self.steps
        self._sync_hook()

    def _use_optimizer(self, optimizer: torch.optim.Optimizer | None) -> None:
        """Remember the optimizer whose state freezing units give up (the one accelerate wraps, if wrapped)."""
        if optimizer is not None:
            inner = getattr(optimizer, "optimizer", None)
            self._optimizer = inner if isinstance(inner, torch.optim.Optimizer) else optimizer

    def _sync_hook(self) -> None:
        """Detach the input embeddings' output exactly while layer 0 is frozen (layer granularity only)."""
        wanted = self._embeddings is not None and self.units[0].frozen
        if wanted and self._hook is None:
            self._hook = self._embeddings.register_forward_hook(_detach_output)
        elif not wanted and self._hook is not None:
            self._hook.remove()
            self._hook = None

    def freeze_prefix(self, count: int, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Freeze the first `count` units now (with `granularity="layer"`: the lowest `count` decoder layers);
        their state in `optimizer` is freed as in `update` (`drop_optimizer_state`)."""
        self._use_optimizer(optimizer)
        if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= len(self.units):
            raise ValueError(f"Freezer.freeze_prefix count={count!r} is not allowed: must be in [0, {len(self.units)}]")
        for unit in self.units[:count]:
            if not unit.frozen:
                self._set(unit, True)

    @torch.no_grad()
    def update(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Read this step's gradients (before the optimizer step): update EMAs, freeze, refreeze failed probes.

        `optimizer`: the one stepping the model; a freezing unit's state in it is freed (`drop_optimizer_state`)."""
        cfg = self.config
        self._use_optimizer(optimizer)
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
        active = [u for u in self.units if not u.frozen and u.ema is not None]
        reading = self.steps % cfg.change_window == 0
        if cfg.threshold_mode in ("change", "percentile") and reading:
            for unit in active:
                if unit.reference is not None and unit.reference > 0:
                    unit.change = abs(unit.ema - unit.reference) / unit.reference
                unit.reference = unit.ema
        threshold = cfg.threshold
        if cfg.threshold_mode == "relative" and active:
            threshold = cfg.threshold * sum(u.ema for u in active) / len(active)
        decide = self.steps > cfg.warmup_steps
        if cfg.threshold_mode == "percentile":
            changes = [u.change for u in active if u.change is not None]
            decide = decide and reading and len(changes) >= 2
            threshold = percentile(changes, cfg.percentile) if decide else math.inf
            threshold = math.nextafter(threshold, math.inf)  # "at or below": the unit at the percentile is quiet
        if decide:
            budget = cfg.max_frozen_fraction * self.total_numel - sum(u.numel for u in self.units if u.frozen)
            if cfg.granularity == "layer":  # a prefix only: stop at the first layer that must keep training
                for unit in self.units:
                    if unit.frozen:
                        continue
                    quiet = unit.numel == 0 or self._signal(unit) < threshold
                    if not quiet or unit.numel > budget:
                        break
                    self._set(unit, True)
                    budget -= unit.numel
            else:
                for unit in sorted(active, key=self._signal):
                    if self._signal(unit) >= threshold:
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

    def _signal(self, unit: _Unit) -> float:
        """What the threshold is compared with: the EMA, or its relative change (`change`, `percentile`); inf =
        unknown."""
        value = unit.change if self.config.threshold_mode in ("change", "percentile") else unit.ema
        return math.inf if value is None else value

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
            "units": {
                u.name: {
                    "ema": u.ema,
                    "frozen": u.frozen,
                    "probing": u.probing,
                    "first_frozen": u.first_frozen_step,
                    "reference": u.reference,
                    "change": u.change,
                }
                for u in self.units
            },
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
            unit.first_frozen_step = saved.get("first_frozen")
            unit.reference = saved.get("reference")
            unit.change = saved.get("change")


def percentile(values: list[float], q: float) -> float:
    """The `q`-th percentile (0-100) of `values`, linearly interpolated between the closest ranks (numpy's default),
    in float64 so that a unit exactly at the percentile compares as equal."""
    return torch.quantile(torch.tensor(values, dtype=torch.float64), q / 100.0).item()


def _detach_output(module: nn.Module, args: Any, output: Any) -> Any:
    return output.detach() if isinstance(output, torch.Tensor) else output


_LAYER_LIST_NAMES = ("layers", "h", "layer", "blocks")


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's list of decoder layers (the longest `ModuleList` named layers / h / layer / blocks) and its name."""
    found = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) and name.rpartition(".")[2] in _LAYER_LIST_NAMES
    ]
    if not found:
        raise ValueError(
            f"Freezer.granularity='layer' needs a list of decoder layers (an nn.ModuleList named one of "
            f"{_LAYER_LIST_NAMES}); {type(model).__name__} has none"
        )
    return max(found, key=lambda item: len(item[1]))


__all__ = ["GRANULARITIES", "THRESHOLD_MODES", "Freezer", "FreezingConfig", "find_decoder_layers"]
