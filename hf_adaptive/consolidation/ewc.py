"""Elastic Weight Consolidation as a `ContinualPlugin`: a quadratic pull towards what earlier tasks learned.

Penalty (added to the training loss as the term ``ewc``, logged as ``loss_ewc``)
    separate mode:  Σ_t (λ/2) Σ_p F_t,p (θ_p − θ*_t,p)²   one Fisher F_t and anchor θ*_t per finished task t
    online mode:    (λ/2) Σ_p F*_p (θ_p − θ*_p)²          F* ← γ F* + F_new and θ* ← θ at every task end
                                                          (Schwarz et al. 2018, "Progress & Compress")
The sums run over the parameters that are trainable now *and* had a Fisher measured (LoRA or full weights);
frozen parameters cannot move, so they are skipped.

At the end of every task (`on_task_end`) the diagonal Fisher of the task just learned is measured exactly
on `fisher_samples` of its training rows (`hf_adaptive.consolidation.fisher.compute_fisher`: per-sample
gradients with vmap, summed across processes). With gamma-gated EWC the new Fisher is multiplied by the
neuromodulatory `gamma_gain` (`neuromodulation.GammaGain`) before it is stored or accumulated;
`bypass_gamma` (`ewc_fixed_lambda_bypass_gamma`) keeps the gain at 1.

Memory: two float32 copies of the trainable parameters (Fisher + anchor) per task in separate mode, one
pair in online mode. Everything is in `state_dict` (tensors → safetensors in each checkpoint), so a resumed
run has the same penalty.
"""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING, Any

import torch

from ..plugins import ContinualPlugin, LossTerm
from .fisher import FISHER_METHODS, FISHER_TYPES, compute_fisher, trainable_parameters
from .neuromodulation import GammaGain, NeuromodulationConfig, gradient_norm

if TYPE_CHECKING:  # pragma: no cover
    from ..config import ContinualConfig
    from ..tasks import Task

logger = logging.getLogger(__name__)

EWC_MODES = ("separate", "online")


def _fail(field_name: str, value: Any, allowed: str) -> None:
    raise ValueError(f"EWCPlugin.{field_name}={value!r} is not allowed: {allowed}")


def _number(field_name: str, value: Any, low: float, high: float | None = None) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not value >= low
        or (high is not None and value > high)
    ):
        _fail(field_name, value, f"must be a number >= {low}" + (f" and <= {high}" if high is not None else ""))
    return float(value)


def _positive_int(field_name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        _fail(field_name, value, "must be an integer >= 1")
    return int(value)


FISHER_NORMALIZATIONS = ("none", "max", "mean")


class _QuadraticPenalty(torch.autograd.Function):
    """scale · Σ_i Σ F_i (θ_i − θ*_i)², with the gradient 2·scale·F_i (θ_i − θ*_i) written out."""

    @staticmethod
    def forward(ctx, scale, fishers, anchors, *params):  # type: ignore[override]
        with torch.no_grad():
            diffs = torch._foreach_sub([p.float() for p in params], anchors)
            weighted = torch._foreach_mul(diffs, fishers)
            # dot products read F·d and d once and write nothing param-sized
            value = torch.stack([torch.dot(w.reshape(-1), d.reshape(-1)) for w, d in zip(weighted, diffs)]).sum()
            value = value * scale
        ctx.save_for_backward(*weighted)
        ctx.scale = scale
        ctx.dtypes = [p.dtype for p in params]
        return value

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        factor = grad_output * (2.0 * ctx.scale)
        grads = torch._foreach_mul(list(ctx.saved_tensors), factor)
        return (None, None, None, *(g.to(dtype) for g, dtype in zip(grads, ctx.dtypes)))


def _unwrap(trainer: Any, model: torch.nn.Module) -> torch.nn.Module:
    """The model without DDP / compile wrappers, whose parameter names match `trainer.model`'s."""
    accelerator = getattr(trainer, "accelerator", None)
    return accelerator.unwrap_model(model) if accelerator is not None else model


class EWCPlugin(ContinualPlugin):
    """EWC (separate or online) with an exact per-sample Fisher and optional gamma gating.

    Parameters mirror `ContinualConfig` (see `from_config`): `ewc_lambda` (λ, 0 disables the plugin),
    `mode` ("separate" / "online"), `gamma` (online decay γ in [0, 1]), `fisher_samples`, `fisher_type`
    ("empirical" / "true"), `fisher_chunk_size` (rows per vmap call; None: as many as fit the memory
    budget of `compute_fisher`), `fisher_method` ("vmap" / "loop"), `gamma_gated`,
    `fisher_normalization` ("none"; "max" / "mean": each task's Fisher divided by its largest / mean entry,
    so that λ is a stiffness that does not shrink when the model is nearly certain on its task: the Fisher
    of a saturated classifier is ~p(1-p) ≈ 0 and plain EWC then needs λ ~ 1e6), `bypass_gamma`,
    `neuromodulation` (how the gain is computed), `seed` (which rows measure the Fisher and
    the label sampling of the true Fisher), `progress_bar`.
    """

    name = "ewc"

    def __init__(
        self,
        ewc_lambda: float = 1.0,
        mode: str = "separate",
        gamma: float = 1.0,
        fisher_samples: int = 50,
        fisher_type: str = "empirical",
        fisher_chunk_size: int | None = None,
        fisher_method: str = "vmap",
        fisher_normalization: str = "none",
        gamma_gated: bool = False,
        bypass_gamma: bool = False,
        neuromodulation: NeuromodulationConfig | None = None,
        seed: int = 0,
        progress_bar: bool = True,
    ) -> None:
        self.ewc_lambda = _number("ewc_lambda", ewc_lambda, 0.0)
        if mode not in EWC_MODES:
            _fail("mode", mode, f"choose one of {list(EWC_MODES)}")
        self.mode = mode
        self.gamma = _number("gamma", gamma, 0.0, 1.0)
        self.fisher_samples = _positive_int("fisher_samples", fisher_samples)
        if fisher_type not in FISHER_TYPES:
            _fail("fisher_type", fisher_type, f"choose one of {list(FISHER_TYPES)}")
        self.fisher_type = fisher_type
        self.fisher_chunk_size = (
            None if fisher_chunk_size is None else _positive_int("fisher_chunk_size", fisher_chunk_size)
        )
        if fisher_method not in FISHER_METHODS:
            _fail("fisher_method", fisher_method, f"choose one of {list(FISHER_METHODS)}")
        self.fisher_method = fisher_method
        if fisher_normalization not in FISHER_NORMALIZATIONS:
            _fail("fisher_normalization", fisher_normalization, f"choose one of {list(FISHER_NORMALIZATIONS)}")
        self.fisher_normalization = fisher_normalization
        self.gamma_gated = bool(gamma_gated)
        self.bypass_gamma = bool(bypass_gamma)
        self.seed = int(seed)
        self.progress_bar = bool(progress_bar)
        self.modulator = GammaGain(neuromodulation) if self.uses_gamma_gain else None
        #: one entry per finished task (separate) or a single running entry (online):
        #: {"task": str, "gamma_gain": float, "fisher": {name: tensor}, "anchor": {name: tensor}}
        self.entries: list[dict[str, Any]] = []
        #: per finished task: name, gamma_gain, Fisher rows, method, seconds
        self.history: list[dict[str, Any]] = []
        self._param_cache: tuple[int, dict[str, torch.nn.Parameter]] | None = None

    @classmethod
    def from_config(cls, args: ContinualConfig, **overrides: Any) -> EWCPlugin:
        """The plugin described by the EWC fields of a `ContinualConfig` (keyword `overrides` win)."""
        kwargs: dict[str, Any] = dict(
            ewc_lambda=args.ewc_lambda,
            mode=args.ewc_mode,
            gamma=args.ewc_gamma,
            fisher_samples=args.fisher_samples,
            fisher_type=args.fisher_type,
            fisher_chunk_size=args.fisher_chunk_size,
            fisher_method=args.fisher_method,
            fisher_normalization=args.fisher_normalization,
            gamma_gated=args.gamma_gated_ewc,
            bypass_gamma=args.ewc_fixed_lambda_bypass_gamma,
            neuromodulation=NeuromodulationConfig(gamma_gain_lambda=args.gamma_gain_lambda),
            seed=args.seed,
            progress_bar=not args.disable_tqdm,
        )
        kwargs.update(overrides)
        return cls(**kwargs)

    # ------------------------------------------------------------------------------------------ properties
    @property
    def enabled(self) -> bool:
        return self.ewc_lambda > 0

    @property
    def uses_gamma_gain(self) -> bool:
        """Gamma-gated EWC and not bypassed: the new Fisher is scaled by `gamma_gain`."""
        return self.gamma_gated and not self.bypass_gamma

    # -------------------------------------------------------------------------------------------- penalty
    def _trainable(self, model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
        # named_parameters() walks the whole module tree: cache it per model (reset at every task begin)
        if self._param_cache is None or self._param_cache[0] != id(model):
            self._param_cache = (id(model), trainable_parameters(model))
        return self._param_cache[1]

    def penalty(self, model: torch.nn.Module) -> torch.Tensor | None:
        """(λ/2) Σ F (θ − θ*)² over all entries (None when there is nothing to penalize).

        Computed by `_QuadraticPenalty` with fused multi-tensor (`torch._foreach_*`) kernels and an analytic
        backward (∂/∂θ = λ F (θ − θ*)), instead of one small autograd graph per parameter: the value and the
        gradient are the same, the step is cheaper (see `benchmarks/overhead.py`).
        """
        params = self._trainable(model)
        fishers: list[torch.Tensor] = []
        anchors: list[torch.Tensor] = []
        used: list[torch.nn.Parameter] = []
        for entry in self.entries:
            fisher, anchor = entry["fisher"], entry["anchor"]
            for name, f in fisher.items():
                p = params.get(name)
                if p is None:
                    continue
                if f.shape != p.shape:  # a Fisher of another model (e.g. a loaded state) must not broadcast
                    _fail(f"fisher[{name!r}].shape", tuple(f.shape), f"the parameter has shape {tuple(p.shape)}")
                if f.device != p.device:  # loaded from a checkpoint on CPU: move once
                    fisher[name] = f = f.to(p.device)
                    anchor[name] = anchor[name].to(p.device)
                fishers.append(f)
                anchors.append(anchor[name])
                used.append(p)
        if not used:
            return None
        return _QuadraticPenalty.apply(0.5 * self.ewc_lambda, fishers, anchors, *used)

    def loss_terms(self, trainer: Any, model: torch.nn.Module, inputs: dict[str, Any], outputs: Any) -> list[LossTerm]:
        if not self.enabled:
            return []
        if self.modulator is not None and model.training:
            logits = getattr(outputs, "logits", None)
            labels = inputs.get("labels")
            if logits is not None and labels is not None:
                self.modulator.observe_batch(logits, labels)
        value = self.penalty(_unwrap(trainer, model))
        return [] if value is None else [LossTerm(self.name, value, 1.0)]

    # ------------------------------------------------------------------------------------------- callbacks
    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if self.modulator is not None and self.enabled and model is not None:
            self.modulator.observe_grad_norm(gradient_norm(p for p in model.parameters() if p.requires_grad))

    def on_task_begin(self, trainer: Any, task: Task, task_index: int) -> None:
        self._param_cache = None
        if self.modulator is not None:
            self.modulator.reset()

    def on_task_end(self, trainer: Any, task: Task, task_index: int) -> None:
        """Measure the Fisher of `task` at the weights just trained and store or accumulate it."""
        self._param_cache = None
        if not self.enabled:
            return
        from ..tasks import tokenize_task

        model = _unwrap(trainer, trainer.model)
        rows = tokenize_task(task, trainer.processing_class, "train")
        rows = rows.shuffle(seed=self.seed + task_index).select(range(min(self.fisher_samples, len(rows))))
        started = time.perf_counter()
        result = compute_fisher(
            model,
            rows,
            fisher_type=self.fisher_type,
            method=self.fisher_method,
            chunk_size=self.fisher_chunk_size,
            seed=self.seed + task_index,
            progress_bar=self.progress_bar,
            desc=f"Fisher {task.name}",
        )
        seconds = time.perf_counter() - started
        gain = self.modulator.gain() if self.modulator is not None else 1.0
        signals = self.modulator.scores() if self.modulator is not None else {}
        anchor = {n: p.detach().float().clone() for n, p in trainable_parameters(model).items()}
        self.consolidate(task.name, result.fisher, anchor, gain)
        record = {
            "task": task.name,
            "gamma_gain": gain,
            "signals": signals,
            "fisher_samples": result.num_samples,
            "fisher_method": result.method,
            "fisher_seconds": seconds,
        }
        self.history.append(record)
        logger.info(
            "EWC: Fisher of task %r from %d rows (%s) in %.2fs, gamma_gain %.3f",
            task.name,
            result.num_samples,
            result.method,
            seconds,
            gain,
        )

    def consolidate(
        self, task_name: str, fisher: dict[str, torch.Tensor], anchor: dict[str, torch.Tensor], gain: float = 1.0
    ) -> None:
        """Store (separate) or accumulate (online: F* ← γ F* + gain · F) a task's Fisher with its anchor."""
        fisher = {n: f.detach().float() for n, f in fisher.items()}
        if self.fisher_normalization != "none" and fisher:
            flat = torch.cat([f.reshape(-1) for f in fisher.values()])
            scale = flat.max() if self.fisher_normalization == "max" else flat.mean()
            if scale > 0:
                fisher = {n: f / scale for n, f in fisher.items()}
        fisher = {n: gain * f for n, f in fisher.items()}
        anchor = {n: anchor[n].detach().float().clone() for n in fisher}
        if self.mode == "separate" or not self.entries:
            self.entries.append({"task": task_name, "gamma_gain": float(gain), "fisher": fisher, "anchor": anchor})
            return
        running = self.entries[0]
        old_fisher, old_anchor = running["fisher"], running["anchor"]
        merged_fisher: dict[str, torch.Tensor] = {}
        merged_anchor: dict[str, torch.Tensor] = {}
        for name in {**old_fisher, **fisher}:
            if name in fisher:
                decayed = self.gamma * old_fisher[name].to(fisher[name].device) if name in old_fisher else 0.0
                merged_fisher[name] = fisher[name] + decayed
                merged_anchor[name] = anchor[name]
            else:  # not trainable in this task: it did not move, keep its anchor, decay its importance
                merged_fisher[name] = self.gamma * old_fisher[name]
                merged_anchor[name] = old_anchor[name]
        self.entries[0] = {
            "task": task_name,
            "gamma_gain": float(gain),
            "fisher": merged_fisher,
            "anchor": merged_anchor,
        }

    # ----------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "entries": [
                {
                    "task": e["task"],
                    "gamma_gain": e["gamma_gain"],
                    "fisher": dict(e["fisher"]),
                    "anchor": dict(e["anchor"]),
                }
                for e in self.entries
            ],
            "history": [dict(h) for h in self.history],
            "modulator": self.modulator.state_dict() if self.modulator is not None else None,
        }

    @staticmethod
    def _check_entry(i: int, entry: dict[str, Any]) -> None:
        """A loaded Fisher/anchor pair: same names, same shapes, finite, Fisher >= 0 (checked at load, because a
        NaN or a wrongly shaped Fisher otherwise loads, broadcasts in the penalty and poisons training later)."""
        from ..utils.io import StateLoadError, check_tensor

        fisher, anchor = entry["fisher"], entry["anchor"]
        if set(fisher) != set(anchor):
            odd = sorted(set(fisher) ^ set(anchor))[:3]
            raise StateLoadError(f"EWCPlugin state entries[{i}]: fisher and anchor name different parameters ({odd})")
        if not math.isfinite(entry["gamma_gain"]):
            raise StateLoadError(f"EWCPlugin state entries[{i}].gamma_gain={entry['gamma_gain']!r} is not allowed")
        for name, f in fisher.items():
            check_tensor(f"EWCPlugin state entries[{i}].fisher[{name!r}]", f, nonnegative=True)
            check_tensor(f"EWCPlugin state entries[{i}].anchor[{name!r}]", anchor[name], f.shape)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("mode", self.mode) != self.mode:
            _fail("mode", self.mode, f"the saved state was written in mode {state.get('mode')!r}; use the same mode")
        entries = [
            {
                "task": e["task"],
                "gamma_gain": float(e["gamma_gain"]),
                "fisher": {n: t.float() for n, t in e["fisher"].items()},
                "anchor": {n: t.float() for n, t in e["anchor"].items()},
            }
            for e in state.get("entries", [])
        ]
        for i, e in enumerate(entries):
            self._check_entry(i, e)
        self.entries = entries
        self.history = [dict(h) for h in state.get("history", [])]
        if self.modulator is not None and state.get("modulator"):
            self.modulator.load_state_dict(state["modulator"])
        self._param_cache = None


__all__ = ["EWC_MODES", "EWCPlugin"]
