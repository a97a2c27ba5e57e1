"""Elastic Weight Consolidation as a `ContinualPlugin`: a quadratic pull towards what earlier tasks learned.

Penalty (added to the training loss as the term ``ewc``, logged as ``loss_ewc``)
    separate mode:  Σ_t (λ/2) Σ_p F_t,p (θ_p − θ*_t,p)²   one Fisher F_t and anchor θ*_t per finished task t
    online mode:    (λ/2) Σ_p F*_p (θ_p − θ*_p)²          F* ← γ F* + F_new and θ* ← θ at every task end
                                                          (Schwarz et al. 2018, "Progress & Compress")
The sums run over the parameters that are trainable now *and* had a Fisher measured (LoRA or full weights);
frozen parameters cannot move, so they are skipped.

At the end of every task (`on_task_end`) the diagonal Fisher of the task just learned is measured exactly
on `fisher_samples` of its training rows, as the trainer tokenized them (`TaskContext.train_dataset`), by
`hf_adaptive.consolidation.fisher.compute_fisher` (per-sample gradients with vmap, summed across processes).
With gamma-gated EWC the new Fisher is multiplied by the neuromodulatory `gamma_gain`
(`neuromodulation.GammaGain`) before it is stored or accumulated; `bypass_gamma`
(`ewc_fixed_lambda_bypass_gamma`) keeps the gain at 1.

Options: `EWCConfig` and `NeuromodulationConfig` (`hf_adaptive.consolidation.config`), offered as the options
`ewc_lambda`, `ewc_mode`, `ewc_gamma`, `fisher_*`, `gamma_gated_ewc`, `ewc_fixed_lambda_bypass_gamma`,
`gamma_gain_lambda`, `neuromod_*` (`EWC_OPTIONS`). Enabled by name with no option, EWC is separate EWC with
λ = 1 on the raw Fisher.

Memory: two float32 copies of the trainable parameters (Fisher + anchor) per task in separate mode, one
pair in online mode. Everything is in `state_dict` (tensors → safetensors in each checkpoint), so a resumed
run has the same penalty.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Any

import torch

from ..plugins import ContinualPlugin, LossTerm, TaskContext
from ..utils.options import build_config
from ..utils.validation import fail
from .config import EWC_MODES, EWC_OPTIONS, EWCConfig, NeuromodulationConfig
from .fisher import compute_fisher, trainable_parameters
from .neuromodulation import GammaGain, gradient_norm

logger = logging.getLogger(__name__)


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


def _option(name: str) -> property:
    return property(lambda self: getattr(self.config, name), doc=f"`EWCConfig.{name}` of this plugin (read-only).")


class EWCPlugin(ContinualPlugin):
    """EWC (separate or online) with an exact per-sample Fisher and optional gamma gating.

    Built from an `EWCConfig` (every field can also be passed as a keyword, e.g. `EWCPlugin(ewc_lambda=2.0)`):
    `ewc_lambda` (λ, 0 disables the plugin), `mode` ("separate" / "online"), `gamma` (online decay γ in [0, 1]),
    `fisher_samples`, `fisher_type` ("empirical" / "true"), `fisher_chunk_size` (rows per vmap call; None: as many
    as fit the memory budget of `compute_fisher`), `fisher_method` ("vmap" / "loop"), `gamma_gated`,
    `fisher_normalization` ("none"; "max" / "mean": each task's Fisher divided by its largest / mean entry,
    so that λ is a stiffness that does not shrink when the model is nearly certain on its task: the Fisher
    of a saturated classifier is ~p(1-p) ≈ 0 and plain EWC then needs λ ~ 1e6), `bypass_gamma`, `seed` (which
    rows measure the Fisher and the label sampling of the true Fisher), `progress_bar`; and from a
    `NeuromodulationConfig` (`neuromodulation`): how the gain of gamma-gated EWC is computed.
    """

    name = "ewc"
    options = EWC_OPTIONS

    def __init__(
        self,
        config: EWCConfig | None = None,
        neuromodulation: NeuromodulationConfig | None = None,
        **overrides: Any,
    ) -> None:
        self.config = dataclasses.replace(config or EWCConfig(), **overrides)
        self.neuromodulation = neuromodulation or NeuromodulationConfig()
        self.modulator = GammaGain(self.neuromodulation) if self.uses_gamma_gain else None
        #: one entry per finished task (separate) or a single running entry (online):
        #: {"task": str, "gamma_gain": float, "fisher": {name: tensor}, "anchor": {name: tensor}}
        self.entries: list[dict[str, Any]] = []
        #: per finished task: name, gamma_gain, Fisher rows, method, seconds
        self.history: list[dict[str, Any]] = []
        self._param_cache: tuple[int, dict[str, torch.nn.Parameter]] | None = None

    @classmethod
    def from_config(cls, config: Any, model: torch.nn.Module | None = None) -> EWCPlugin:
        """The plugin described by the EWC options on `config` (a `ContinualConfig`); `seed` and `progress_bar`
        follow its TrainingArguments `seed` and `disable_tqdm` when it has them."""
        owner = type(config).__name__
        fixed: dict[str, Any] = {}
        if hasattr(config, "seed"):
            fixed["seed"] = config.seed
        if hasattr(config, "disable_tqdm"):
            fixed["progress_bar"] = not config.disable_tqdm
        ewc, neuromodulation = cls.options
        return cls(build_config(ewc, config, owner=owner, **fixed), build_config(neuromodulation, config, owner=owner))

    # ------------------------------------------------------------------------------------------ properties
    # the options, read from `self.config` (the one place they are stored)
    ewc_lambda = _option("ewc_lambda")
    mode = _option("mode")
    gamma = _option("gamma")
    fisher_samples = _option("fisher_samples")
    fisher_type = _option("fisher_type")
    fisher_chunk_size = _option("fisher_chunk_size")
    fisher_method = _option("fisher_method")
    fisher_normalization = _option("fisher_normalization")
    gamma_gated = _option("gamma_gated")
    bypass_gamma = _option("bypass_gamma")
    seed = _option("seed")
    progress_bar = _option("progress_bar")

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
                    fail(
                        "EWCPlugin",
                        f"fisher[{name!r}].shape",
                        tuple(f.shape),
                        f"the parameter has shape {tuple(p.shape)}",
                    )
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

    def on_task_begin(self, trainer: Any, context: TaskContext) -> None:
        self._param_cache = None
        if self.modulator is not None:
            self.modulator.reset()

    def on_task_end(self, trainer: Any, context: TaskContext) -> None:
        """Measure the Fisher of the task just trained, at its weights, on `fisher_samples` of the rows it was
        trained on (`context.train_dataset`), and store or accumulate it."""
        self._param_cache = None
        if not self.enabled:
            return
        task, seed = context.task, self.seed + context.index
        model = _unwrap(trainer, trainer.model)
        rows = context.train_dataset.shuffle(seed=seed).select(
            range(min(self.fisher_samples, len(context.train_dataset)))
        )
        started = time.perf_counter()
        result = compute_fisher(
            model,
            rows,
            fisher_type=self.fisher_type,
            method=self.fisher_method,
            chunk_size=self.fisher_chunk_size,
            seed=seed,
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
            fail(
                "EWCPlugin",
                "mode",
                self.mode,
                f"the saved state was written in mode {state.get('mode')!r}; use the same mode",
            )
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


__all__ = ["EWC_MODES", "EWCPlugin", "EWCConfig"]
