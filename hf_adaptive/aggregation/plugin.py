"""`GradAggregationPlugin`: Jacobian descent between the objectives of continual learning (torchjd).

Why: summing the task loss and the memory terms (replay, EWC, distillation) lets the gradient of one objective undo
the progress of another. An aggregator such as UPGrad combines the per-objective gradients so that, to first order,
none of them increases: the update has a non-negative inner product with every objective's gradient.

How, per micro-batch (`combine_gradients`, called by `ContinualTrainer.compute_loss` for the one plugin that
`aggregates_gradients`):

1. the objectives: the trainer passes the task loss and each loss term, each already weighted (`replay_alpha`,
   `ewc_lambda`, ...) and scaled for gradient accumulation as in the summed loss; ``objectives="terms"`` keeps
   them apart, ``"task_vs_rest"`` makes two: the task loss and the sum of the terms. The weights therefore act
   before the aggregation (UPGrad and most others are not invariant to them);
2. one row per objective: its gradient over the trainable parameters (`objective_gradients`: one
   `torch.autograd.grad` each; the task loss and a replay term have their own forwards, so together they cost
   about the summed backward they replace). An objective with no gradient path (a term that does not require
   grad, or one no trainable parameter reaches) or an exactly zero gradient (EWC at its anchor, the first step
   of a task) is dropped rather than kept as a zero row, which would shrink the mean-like aggregators;
3. the rows, as an ``m x n`` float32 Jacobian over the n trainable parameters (LoRA keeps n small; a full
   fine-tune holds m copies of the gradient), go through the torchjd aggregator; the result is brought to the
   configured `scale` and split back per parameter. The trainer backpropagates it in place of the summed loss's
   gradient, through the Trainer's own backward: the accumulation division, a grad scaler and the non-finite guard
   are unchanged. A Jacobian with a NaN / inf entry is not aggregated: the sum of its rows is returned, non-finite,
   and the guard skips the step.

Scale: torchjd's aggregators come on two scales (`NATIVE_SCALE`): upgrad, dualproj, aligned_mtl, mgda, imtl_g and
mean average (their weights sum to 1: two agreeing objectives give their mean gradient), pcgrad and gradvac sum.
``scale="sum"`` (default) multiplies the mean-like ones by m, so that the update has the size of the summed loss's
gradient (equal to it whenever the objectives do not conflict, for upgrad / dualproj / pcgrad) and a learning rate
tuned without aggregation carries over; ``scale="mean"`` divides the sum-like ones by m. Every aggregator here is
positively homogeneous, so neither rescaling changes the direction. With a single objective its gradient is used
as is. ``aggregator="mean"`` with ``scale="sum"`` is exactly the summed loss's gradient: the control.

Cost, logged every logging step (``grad_aggregation/*``: means since the last log) and in the sequence's results
(`extra_results`): the wall time of the per-objective backward passes (`jacobian_seconds`, which replaces the
summed backward) and of the aggregation (`aggregator_seconds`), the number of objectives, the size of the Jacobian,
and how often the objectives conflict (the smallest pairwise cosine of their gradients, and the fraction of
micro-batches where it is negative). The timing synchronizes CUDA around both parts.

State (`state_dict`): those running totals, and GradVac's moving target of the cosines (the only stateful
aggregator here), so a resumed run continues with them.

Not supported: a learned `loss_weighting` (refused by the trainer: both decide how the objectives combine), and
reentrant gradient checkpointing (`torch.autograd.grad` cannot run through it: use ``use_reentrant=False``, the
default of recent transformers). Not tested here: DDP (each process would aggregate its own Jacobian, and DDP's
reduction average the combined gradients as it does plain ones), DeepSpeed ZeRO (partitioned parameters), and
fp16 with a grad scaler (the rows are computed without the scaler's factor and may underflow: prefer bf16).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch

from ..plugins import ContinualPlugin
from ..utils.io import StateLoadError, check_tensor
from ..utils.options import OptionSource
from ..utils.validation import fail
from .config import GRAD_AGGREGATION_OPTIONS, GradAggregationConfig

OWNER = "GradAggregationPlugin"
#: the scale each aggregator returns: "mean" when its weights sum to 1 (two equal gradients give that gradient),
#: "sum" when it adds the (possibly projected) rows. `scale` rescales from this one.
NATIVE_SCALE: dict[str, str] = {
    "upgrad": "mean",
    "dualproj": "mean",
    "aligned_mtl": "mean",
    "mgda": "mean",
    "imtl_g": "mean",
    "mean": "mean",
    "pcgrad": "sum",
    "gradvac": "sum",
}
#: the running totals kept in the state (and summed into `extra_results`)
_TOTALS = (
    "calls",
    "objectives",
    "compared",
    "conflicts",
    "min_cosine_sum",
    "jacobian_seconds",
    "aggregator_seconds",
    "max_jacobian_numel",
)
_INT_TOTALS = ("calls", "objectives", "compared", "conflicts", "max_jacobian_numel")


def build_aggregator(name: str) -> Any:
    """The torchjd aggregator `name` (one of `AGGREGATORS`), with torchjd's defaults."""
    try:
        from torchjd import aggregation
    except ImportError as err:
        raise ImportError(
            f"{OWNER} needs torchjd (and quadprog / qpsolvers for upgrad and dualproj): "
            "pip install 'hf_adaptive[aggregation]'"
        ) from err
    classes = {
        "upgrad": aggregation.UPGrad,
        "dualproj": aggregation.DualProj,
        "mgda": aggregation.MGDA,
        "pcgrad": aggregation.PCGrad,
        "imtl_g": aggregation.IMTLG,
        "aligned_mtl": aggregation.AlignedMTL,
        "gradvac": aggregation.GradVac,
        "mean": aggregation.Mean,
    }
    if name not in classes:
        fail(OWNER, "aggregator", name, f"choose one of {sorted(classes)}")
    return classes[name]()


def objective_gradients(
    objectives: Mapping[str, torch.Tensor], params: Sequence[torch.Tensor]
) -> dict[str, tuple[torch.Tensor | None, ...]]:
    """Each objective's gradient over `params` (None where it does not reach a parameter), one backward each.

    An objective that does not require grad, or reaches none of `params`, is left out. The graph is kept until
    the last backward (objectives may share parts of it, e.g. a term computed from the task's logits)."""
    if not params:
        return {}
    names = [n for n, v in objectives.items() if torch.is_tensor(v) and v.requires_grad]
    grads: dict[str, tuple[torch.Tensor | None, ...]] = {}
    for i, name in enumerate(names):
        value = objectives[name]
        if value.numel() != 1:
            raise ValueError(f"{OWNER}: objective {name!r} has shape {tuple(value.shape)}; every objective is a scalar")
        row = torch.autograd.grad(value.reshape(()), params, retain_graph=i < len(names) - 1, allow_unused=True)
        if any(g is not None for g in row):
            grads[name] = row
    return grads


def objective_rows(grads: Mapping[str, Sequence[torch.Tensor | None]], params: Sequence[torch.Tensor]) -> torch.Tensor:
    """The ``m x n`` float32 Jacobian: one flattened row per objective (zeros where it does not reach a param)."""
    rows = [
        torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).float() for g, p in zip(row, params)])
        for row in grads.values()
    ]
    return torch.stack(rows)


def per_parameter(
    flat: torch.Tensor, grads: Mapping[str, Sequence[torch.Tensor | None]], params: Sequence[torch.Tensor]
) -> list[torch.Tensor | None]:
    """`flat` (a row of `objective_rows`) cut back into one gradient per parameter, in its dtype; None for a
    parameter that no objective of `grads` reached (it gets no gradient, as with the summed loss)."""
    out: list[torch.Tensor | None] = []
    offset = 0
    for k, p in enumerate(params):
        n = p.numel()
        reached = any(row[k] is not None for row in grads.values())
        out.append(flat[offset : offset + n].view_as(p).to(p.dtype) if reached else None)
        offset += n
    return out


class GradAggregationPlugin(ContinualPlugin):
    """Combines the gradients of the task loss and of the loss terms with a torchjd aggregator (module docstring).

    Args:
        config: a `GradAggregationConfig` (None: its defaults); keyword `overrides` replace single fields of it
            (`aggregator=`, `objectives=`, `scale=`).
    """

    name = "grad_aggregation"
    options: ClassVar[tuple[OptionSource, ...]] = GRAD_AGGREGATION_OPTIONS
    aggregates_gradients = True

    def __init__(self, config: GradAggregationConfig | None = None, **overrides: Any) -> None:
        if config is not None and not isinstance(config, GradAggregationConfig):
            raise TypeError(f"{OWNER}: config must be a GradAggregationConfig (or None), got {type(config).__name__}")
        known = [f.name for f in dataclasses.fields(GradAggregationConfig)]
        unknown = sorted(set(overrides) - set(known))
        if unknown:
            raise TypeError(f"{OWNER} got unknown option(s) {unknown}; the options of GradAggregationConfig: {known}")
        self.config = dataclasses.replace(config or GradAggregationConfig(), **overrides)
        self.aggregator = build_aggregator(self.config.aggregator)
        self.totals: dict[str, float | int] = self._zero_totals()
        self._window: dict[str, float | int] = self._zero_totals()

    @property
    def term_names(self) -> tuple[str, ...]:
        """None: this plugin adds no loss term, it combines the gradients of the others'."""
        return ()

    # --------------------------------------------------------------------------------------------- the step
    def group(self, objectives: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The objectives to aggregate: as given (``"terms"``), or the task vs the sum of the rest."""
        if self.config.objectives == "terms":
            return dict(objectives)
        rest = [v for name, v in objectives.items() if name != "task"]
        grouped = {"task": objectives["task"]}
        if rest:
            grouped["rest"] = sum(rest[1:], rest[0])
        return grouped

    def scale_factor(self, m: int) -> float:
        """What the aggregator's result is multiplied by to be on the configured `scale` (`NATIVE_SCALE`)."""
        native = NATIVE_SCALE[self.config.aggregator]
        if native == self.config.scale:
            return 1.0
        return float(m) if self.config.scale == "sum" else 1.0 / m

    def aggregate(self, jacobian: torch.Tensor) -> torch.Tensor:
        """The combined gradient (length n) of the rows of `jacobian` (m x n), on the configured scale."""
        m = jacobian.shape[0]
        if not bool(torch.isfinite(jacobian).all()):
            return jacobian.sum(dim=0)  # non-finite on purpose: the trainer's guard skips the step
        if m == 1:
            return jacobian[0]
        return self.aggregator(jacobian) * self.scale_factor(m)

    def combine_gradients(
        self,
        trainer: Any,
        model: torch.nn.Module,
        objectives: dict[str, torch.Tensor],
        params: list[torch.Tensor],
    ) -> list[torch.Tensor | None]:
        cuda = any(p.is_cuda for p in params)
        started = _now(cuda)
        grads = objective_gradients(self.group(objectives), params)
        if not grads:
            return [None] * len(params)
        jacobian = objective_rows(grads, params)
        live = jacobian.ne(0).any(dim=1)  # an exact-zero row (EWC at its anchor) asks nothing of this step
        jacobian = jacobian[live] if bool(live.any()) else jacobian[:1]
        computed = _now(cuda)
        combined = self.aggregate(jacobian)
        finished = _now(cuda)
        self._record(jacobian, computed - started, finished - computed)
        return per_parameter(combined, grads, params)

    # ------------------------------------------------------------------------------------------- reporting
    @staticmethod
    def _zero_totals() -> dict[str, float | int]:
        return {k: (0 if k in _INT_TOTALS else 0.0) for k in _TOTALS}

    def _record(self, jacobian: torch.Tensor, jacobian_seconds: float, aggregator_seconds: float) -> None:
        m = jacobian.shape[0]
        step: dict[str, float | int] = {
            "calls": 1,
            "objectives": m,
            "jacobian_seconds": jacobian_seconds,
            "aggregator_seconds": aggregator_seconds,
            "max_jacobian_numel": jacobian.numel(),
        }
        if m >= 2 and bool(torch.isfinite(jacobian).all()):
            cosine = min_cosine(jacobian)
            step.update(compared=1, conflicts=int(cosine < 0), min_cosine_sum=cosine)
        for totals in (self.totals, self._window):
            for key, value in step.items():
                totals[key] = max(totals[key], value) if key == "max_jacobian_numel" else totals[key] + value

    @staticmethod
    def _summary(totals: Mapping[str, float | int]) -> dict[str, float | None]:
        calls, compared = totals["calls"], totals["compared"]
        return {
            "calls": calls,
            "mean_objectives": totals["objectives"] / calls if calls else None,
            "jacobian_seconds": totals["jacobian_seconds"] / calls if calls else None,
            "aggregator_seconds": totals["aggregator_seconds"] / calls if calls else None,
            "max_jacobian_numel": totals["max_jacobian_numel"],
            "conflict_fraction": totals["conflicts"] / compared if compared else None,
            "mean_min_cosine": totals["min_cosine_sum"] / compared if compared else None,
        }

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if getattr(args, "gradient_checkpointing", False) and (
            (getattr(args, "gradient_checkpointing_kwargs", None) or {}).get("use_reentrant") is True
        ):
            raise ValueError(
                f"{OWNER}: gradient_checkpointing_kwargs={args.gradient_checkpointing_kwargs!r} is not allowed: the "
                "per-objective gradients (torch.autograd.grad) cannot run through reentrant checkpointing; set "
                "use_reentrant=False"
            )

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        """After each training-loss log: the means of the micro-batches since the previous one, as their own log."""
        if not logs or "loss" not in logs or not self._window["calls"] or self.trainer is None:
            return
        summary = self._summary(self._window)
        self._window = self._zero_totals()
        values = {
            f"grad_aggregation/{key}": value
            for key, value in summary.items()
            if value is not None and key not in ("calls", "max_jacobian_numel")
        }
        self.trainer.log(values)

    def extra_results(self) -> dict[str, Any]:
        """The cost and the conflicts over the whole sequence (per-call means), and the settings."""
        return {"grad_aggregation": {**dataclasses.asdict(self.config), **self._summary(self.totals)}}

    # ----------------------------------------------------------------------------------------------- state
    def _gradvac_weighting(self) -> Any:
        return self.aggregator.gramian_weighting if self.config.aggregator == "gradvac" else None

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"aggregator": self.config.aggregator, "totals": dict(self.totals)}
        weighting = self._gradvac_weighting()
        if weighting is not None and weighting._phi_t is not None:
            state["gradvac_phi"] = weighting._phi_t.detach().clone()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("aggregator")
        if saved != self.config.aggregator:
            fail(
                OWNER,
                "aggregator",
                self.config.aggregator,
                f"the saved state was written with aggregator {saved!r}; resume with the same aggregator",
            )
        totals = state.get("totals")
        if not isinstance(totals, dict) or set(totals) != set(_TOTALS):
            raise StateLoadError(
                f"{OWNER} state totals={totals!r} is not allowed: a dict with the keys {list(_TOTALS)}"
            )
        for key, value in totals.items():
            kind = int if key in _INT_TOTALS else (int, float)
            if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value):
                raise StateLoadError(f"{OWNER} state totals[{key!r}]={value!r} is not allowed: a finite number")
            if key != "min_cosine_sum" and value < 0:
                raise StateLoadError(f"{OWNER} state totals[{key!r}]={value!r} is not allowed: a number >= 0")
        phi = state.get("gradvac_phi")
        weighting = self._gradvac_weighting()
        if phi is not None:
            phi = check_tensor(f"{OWNER} state gradvac_phi", phi, floating=True)
            if phi.dim() != 2 or phi.shape[0] != phi.shape[1]:
                raise StateLoadError(
                    f"{OWNER} state gradvac_phi.shape={tuple(phi.shape)} is not allowed: a square matrix"
                )
        self.totals = {k: (int(v) if k in _INT_TOTALS else float(v)) for k, v in totals.items()}
        self._window = self._zero_totals()
        if weighting is not None:
            weighting.reset()
            if phi is not None:  # GradVac keeps its target on the CPU, keyed by (objectives, dtype)
                weighting._phi_t = phi.detach().to("cpu").clone()
                weighting._state_key = (phi.shape[0], phi.dtype)


def min_cosine(jacobian: torch.Tensor) -> float:
    """The smallest cosine between two rows of `jacobian` (rows of norm 0 are left out; 1.0 when no pair is)."""
    gramian = jacobian @ jacobian.T
    norms = gramian.diagonal().clamp(min=0).sqrt()
    live = norms > 0
    if int(live.sum()) < 2:
        return 1.0
    cosine = gramian[live][:, live] / (norms[live][:, None] * norms[live][None, :])
    off = ~torch.eye(cosine.shape[0], dtype=torch.bool, device=cosine.device)
    return float(cosine[off].min().clamp(-1.0, 1.0))


def _now(cuda: bool) -> float:
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter()
