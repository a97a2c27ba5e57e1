"""`HeldOutWeightingPlugin`: the loss terms' weights follow the loss on held-out rows of every seen task.

Why: a weighting that balances the terms' loss scales (`control.loss_weighting`: uncertainty, softmax) cannot see
what decides accuracy. On SmolLM2 with EWC + replay (`benchmarks/loss_weighting_real.py`), accuracy wanted less
replay pressure than the default, while both controllers gave replay more weight, because its loss is small. What
the weights should minimize is the loss the sequence is judged on: that of every task seen so far, on rows the
model is not trained on.

How (a hypergradient, Baydin et al. 2018, on each term's log-weight):

1. at the start of every task of a sequence (`on_task_begin`), `holdout_rows` rows of its training split (a seeded
   sample stratified by label) are held out: the task's training rows lose them (the trainer's `train_dataset`,
   and the `TaskContext`'s task and rows, which replay, EWC's Fisher and the other plugins read) and a per-task
   balanced memory keeps them. They are never trained on;
2. each term i (replay, EWC, ...) has a multiplier w_i of its configured weight (`replay_alpha`, ...), starting at
   1; the task loss keeps weight 1. The step is g = g_task + sum_i w_i g_i (g_i: the gradient of the term as the
   plugin weighs it), and g_val is the gradient of the held-out loss (the mean over seen tasks of each task's mean
   answer loss on `batch_size` held-out rows spread over them);
3. every `every` optimizer steps (on the first micro-batch), the plugin computes g_val and each g_i and takes one
   Adam step (`lr`, `betas`) on every log w_i along h_i, then clips the log-weights to
   [log min_weight, log max_weight]. With c = cos(g, g_val):

   * ``hypergradient="alignment"`` (default): h_i = -dc/dlog w_i
     = -(<g_val, w_i g_i> - c |g_val| <g, w_i g_i> / |g|) / (|g_val| |g|). The weights turn the step towards the
     held-out loss's steepest descent; how long the step is stays the learning rate's business (scaling every
     weight, the task's included, leaves c unchanged);
   * ``"first_order"``: h_i = -<g_val, w_i g_i> / (|g_val| |g|), the derivative of the held-out loss after the
     step, L_val(theta - lr g), to first order, without the learning rate and divided by the norms (unitless).
     It also rewards a longer step: every term whose gradient agrees with g_val gains weight, whether or not it
     improves the direction. Measured on SmolLM2 (`benchmarks/loss_weighting_heldout.py`): replay's and EWC's
     multipliers climbed to 9 and 6 within one task while its held-out loss rose (seed 0); hence the default;
4. the step uses the new weights: the gradient handed back (`combine_gradients`) is g_task + sum_i w_i g_i. On
   steps without an update it is one backward of the weighted sum, the cost of the summed loss.

A term that turns the step towards the held-out loss's descent gains weight, one that turns it away loses weight,
whatever its loss scale. Cost of an update: one backward per objective (as `GradAggregationPlugin`) plus one
forward and backward over the held-out batch; the training rows lost to the hold-out are the price of the signal.

Outside a task sequence (a plain `train()`) nothing is held out: the weights stay at 1 and the step is the summed
loss's. Logged every logging step as ``heldout_weighting/weight_<term>``, ``heldout_weighting/heldout_loss`` and
``heldout_weighting/cosine`` (the cosine between g and g_val at the last update); every update is in the
sequence's results (`extra_results`). Under DDP the hypergradients are averaged over the processes, so every process
keeps the same weights. State (`state_dict`): the held-out memory, the log-weights and Adam's moments, the tasks
already held out and the update history: a resumed run continues with the same held-out rows and weights.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch

from ..aggregation.plugin import objective_gradients, objective_rows, per_parameter
from ..plugins import ContinualPlugin, TaskContext
from ..replay._common import answer_loss, collate, configure, run_seed, select_rows, task_row_indices, trainer_tokenizer
from ..replay.buffer import ReplayMemory
from ..utils.io import StateLoadError, check_tensor
from ..utils.options import OptionSource, build_config
from ..utils.validation import fail
from .config import HELDOUT_WEIGHTING_OPTIONS, HeldOutWeightingConfig

OWNER = "HeldOutWeightingPlugin"
TASK = "task"
#: Adam's epsilon on the normalized hypergradients (unitless, at most 1 in size)
ADAM_EPS = 1e-8
#: what a saved state must hold (besides the held-out `memory` and the `history`)
_STATE_KEYS = ("names", "log_weights", "adam_m", "adam_v", "adam_t", "held_out_tasks")


def adam_step(
    log_weight: float, moments: tuple[float, float, int], grad: float, lr: float, betas: tuple[float, float]
) -> tuple[float, tuple[float, float, int]]:
    """One Adam step (bias-corrected, no weight decay) on a scalar: the new value and moments (m, v, t)."""
    m, v, t = moments
    t += 1
    m = betas[0] * m + (1 - betas[0]) * grad
    v = betas[1] * v + (1 - betas[1]) * grad * grad
    m_hat = m / (1 - betas[0] ** t)
    v_hat = v / (1 - betas[1] ** t)
    return log_weight - lr * m_hat / (math.sqrt(v_hat) + ADAM_EPS), (m, v, t)


def task_without_rows(task: Any, drop: Sequence[int]) -> Any:
    """A copy of `task` whose train split lacks the rows `drop` (indices), validated like any task."""
    dropped = set(drop)
    keep = [i for i in range(len(task.train_dataset)) if i not in dropped]
    return dataclasses.replace(task, train_dataset=task.train_dataset.select(keep))


class HeldOutWeightingPlugin(ContinualPlugin):
    """Learns a multiplier of every loss term's weight from the loss on held-out rows (module docstring).

    Args:
        config: a `HeldOutWeightingConfig` (None: its defaults); keyword `overrides` replace single fields of it
            (`holdout_rows=`, `lr=`, ...).
    """

    name = "heldout_weighting"
    options: ClassVar[tuple[OptionSource, ...]] = HELDOUT_WEIGHTING_OPTIONS
    aggregates_gradients = True

    def __init__(self, config: HeldOutWeightingConfig | None = None, **overrides: Any) -> None:
        self.config = configure(HeldOutWeightingConfig, config, overrides, OWNER)
        self.memory = ReplayMemory(self.config.buffer_size, policy="balanced", seed=self.config.seed)
        self.log_weights: dict[str, float] = {}
        self.moments: dict[str, tuple[float, float, int]] = {}
        #: indices (in the sequence) of the tasks whose rows were held out already (a resumed task is not added twice)
        self.held_out_tasks: list[int] = []
        #: one entry per update: step, task, held-out loss, cosine, hypergradients and weights after it
        self.history: list[dict[str, Any]] = []
        self._last_update: tuple[int | None, int] | None = None
        self._window: dict[str, Any] = {}

    @classmethod
    def from_config(cls, config: Any, model: torch.nn.Module | None = None, **overrides: Any) -> HeldOutWeightingPlugin:
        """From the `heldout_weighting_*` options and the run's `seed`."""
        source = HELDOUT_WEIGHTING_OPTIONS[0]
        return cls(build_config(source, config, owner=type(config).__name__, **run_seed(config)), **overrides)

    @property
    def term_names(self) -> tuple[str, ...]:
        """None: this plugin adds no loss term, it weighs the others'."""
        return ()

    def weight(self, term: str) -> float:
        """The current multiplier of `term`'s configured weight (1 before its first update)."""
        return math.exp(self.log_weights.get(term, 0.0))

    # ------------------------------------------------------------------------------------------- the hold-out
    def on_task_begin(self, trainer: Any, context: TaskContext) -> None:
        """Hold out `holdout_rows` rows of the task: out of the rows trained on, into the held-out memory."""
        n = len(context.train_dataset)
        if self.config.holdout_rows >= n:
            fail(
                OWNER,
                "holdout_rows",
                self.config.holdout_rows,
                f"fewer than the {n} training rows of task {context.task.name!r} (some must be left to train on)",
            )
        seed, index = self.config.seed, context.index
        held = task_row_indices(context.task, self.config.holdout_rows, seed, index)
        if index not in self.held_out_tasks:  # a resumed task's rows are in the restored memory already
            self.memory.add(context.task.name, select_rows(context.task, context.train_dataset, len(held), seed, index))
            self.held_out_tasks.append(index)
        dropped = set(held)
        keep = [i for i in range(n) if i not in dropped]
        context.task = task_without_rows(context.task, held)
        context.train_dataset = context.train_dataset.select(keep)
        trainer.train_dataset = context.train_dataset

    # ------------------------------------------------------------------------------------------------ the step
    def _due(self, trainer: Any) -> bool:
        """Whether this micro-batch updates the weights: the first one of every `every`-th optimizer step."""
        if len(self.memory) == 0:
            return False
        step = int(getattr(getattr(trainer, "state", None), "global_step", 0) or 0)
        key = (getattr(trainer, "current_task_index", None), step)
        if step % self.config.every or key == self._last_update:
            return False
        self._last_update = key
        return True

    def weighted_sum(self, values: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The task's value plus every term's times its multiplier (losses or flat gradients alike)."""
        items = [v if name == TASK else self.weight(name) * v for name, v in values.items()]
        return sum(items[1:], items[0])

    def heldout_loss(self, trainer: Any, model: torch.nn.Module) -> torch.Tensor:
        """The mean over the seen tasks of each task's mean answer loss on held-out rows (`batch_size` spread)."""
        tasks = list(self.memory.tasks)
        per_task = max(1, self.config.batch_size // len(tasks))
        tokenizer = trainer_tokenizer(trainer, OWNER)
        device = next(model.parameters()).device
        losses = []
        for task in tasks:
            rows = self.memory.sample(per_task, tasks=[task])
            if rows:
                losses.append(answer_loss(trainer, model, collate(rows, tokenizer, device)))
        return torch.stack(losses).mean()

    def hypergradients(self, rows: Mapping[str, torch.Tensor], heldout: torch.Tensor) -> tuple[dict[str, float], float]:
        """The derivative of the configured objective in each term's log-weight, to descend (flat gradient rows),
        and c = cos(g, g_val). ``"first_order"``: h_i = -<g_val, w_i g_i> / (|g_val| |g|); ``"alignment"``:
        h_i = -dc/dlog w_i = -(<g_val, w_i g_i> - c |g_val| <g, w_i g_i> / |g|) / (|g_val| |g|)."""
        step = self.weighted_sum(rows)
        step_norm, heldout_norm = float(step.norm()), float(heldout.norm())
        norm = heldout_norm * step_norm
        if norm == 0.0:
            return {}, 0.0
        cosine = float(heldout @ step) / norm
        hyper = {}
        for name, row in rows.items():
            if name == TASK or not bool(row.ne(0).any()):  # an exact-zero row (EWC at its anchor) says nothing
                continue
            scaled = self.weight(name) * row
            along = float(heldout @ scaled)
            if self.config.hypergradient == "alignment":
                along -= cosine * heldout_norm * float(step @ scaled) / step_norm
            hyper[name] = -along / norm
        return hyper, cosine

    def update(self, hyper: Mapping[str, float]) -> None:
        """One Adam step on the log-weights along `hyper`, clipped to the configured bounds."""
        low, high = math.log(self.config.min_weight), math.log(self.config.max_weight)
        betas = (self.config.betas[0], self.config.betas[1])
        for name, grad in hyper.items():
            value, moments = adam_step(
                self.log_weights.get(name, 0.0), self.moments.get(name, (0.0, 0.0, 0)), grad, self.config.lr, betas
            )
            self.log_weights[name] = min(max(value, low), high)
            self.moments[name] = moments

    def combine_gradients(
        self,
        trainer: Any,
        model: torch.nn.Module,
        objectives: dict[str, torch.Tensor],
        params: list[torch.Tensor],
    ) -> list[torch.Tensor | None]:
        live = {n: v for n, v in objectives.items() if torch.is_tensor(v) and v.requires_grad}
        if not live:
            return [None] * len(params)
        if not self._due(trainer) or len(live) < 2:
            return list(torch.autograd.grad(self.weighted_sum(live), params, allow_unused=True))
        heldout_value = self.heldout_loss(trainer, model)
        heldout_grads = torch.autograd.grad(heldout_value, params, allow_unused=True)
        grads = objective_gradients(live, params)
        rows = dict(zip(grads, objective_rows(grads, params), strict=True))
        heldout = objective_rows({"heldout": heldout_grads}, params)[0]
        finite = bool(torch.isfinite(heldout).all()) and all(bool(torch.isfinite(r).all()) for r in rows.values())
        if finite:
            hyper, cosine = self.hypergradients(rows, heldout)
            hyper = self._all_processes_mean(hyper)
            self.update(hyper)
            self._record(trainer, heldout_value.item(), cosine, hyper)
        return per_parameter(self.weighted_sum(rows), grads, params)

    @staticmethod
    def _all_processes_mean(hyper: dict[str, float]) -> dict[str, float]:
        """The hypergradients averaged over the processes of a distributed run (the same weights everywhere)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()) or not hyper:
            return hyper
        names = sorted(hyper)
        values = torch.tensor([hyper[n] for n in names], dtype=torch.float64)
        if torch.distributed.get_backend() == "nccl":
            values = values.cuda()
        torch.distributed.all_reduce(values)
        values /= torch.distributed.get_world_size()
        return dict(zip(names, values.cpu().tolist(), strict=True))

    # ------------------------------------------------------------------------------------------- reporting
    def _record(self, trainer: Any, heldout_loss: float, cosine: float, hyper: Mapping[str, float]) -> None:
        entry = {
            "task": getattr(trainer, "current_task_index", None),
            "step": int(getattr(getattr(trainer, "state", None), "global_step", 0) or 0),
            "heldout_loss": heldout_loss,
            "cosine": cosine,
            "hypergradients": dict(hyper),
            "weights": {name: self.weight(name) for name in sorted(self.log_weights)},
        }
        self.history.append(entry)
        self._window = entry

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        """After each training-loss log: the weights, and the held-out loss and cosine of the last update."""
        if not logs or "loss" not in logs or not self._window or self.trainer is None:
            return
        entry, self._window = self._window, {}
        values = {f"heldout_weighting/weight_{name}": w for name, w in entry["weights"].items()}
        values["heldout_weighting/heldout_loss"] = entry["heldout_loss"]
        values["heldout_weighting/cosine"] = entry["cosine"]
        self.trainer.log(values)

    def extra_results(self) -> dict[str, Any]:
        """The settings, the final weights and every update."""
        return {
            "heldout_weighting": {
                **dataclasses.asdict(self.config),
                "weights": {name: self.weight(name) for name in sorted(self.log_weights)},
                "updates": len(self.history),
                "history": list(self.history),
            }
        }

    # ----------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        names = sorted(self.log_weights)
        moments = [self.moments.get(n, (0.0, 0.0, 0)) for n in names]
        return {
            "names": names,
            "log_weights": torch.tensor([self.log_weights[n] for n in names], dtype=torch.float64),
            "adam_m": torch.tensor([m[0] for m in moments], dtype=torch.float64),
            "adam_v": torch.tensor([m[1] for m in moments], dtype=torch.float64),
            "adam_t": [int(m[2]) for m in moments],
            "held_out_tasks": list(self.held_out_tasks),
            "history": list(self.history),
            "memory": self.memory.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = [k for k in _STATE_KEYS if k not in state]
        if missing:
            raise StateLoadError(f"{OWNER} state lacks {missing}")
        names = state["names"]
        if (
            not isinstance(names, list)
            or not all(isinstance(n, str) and n for n in names)
            or len(set(names)) != len(names)
        ):
            raise StateLoadError(f"{OWNER} state names={names!r} is not allowed: a list of distinct term names")
        k = len(names)
        low, high = math.log(self.config.min_weight), math.log(self.config.max_weight)
        log_weights = check_tensor(f"{OWNER} state log_weights", state["log_weights"], (k,), floating=True)
        if k and not (float(log_weights.min()) >= low - 1e-9 and float(log_weights.max()) <= high + 1e-9):
            raise StateLoadError(
                f"{OWNER} state log_weights={log_weights.tolist()} is not allowed: within [log min_weight, "
                f"log max_weight] = [{low:.4g}, {high:.4g}]"
            )
        adam_m = check_tensor(f"{OWNER} state adam_m", state["adam_m"], (k,), floating=True)
        adam_v = check_tensor(f"{OWNER} state adam_v", state["adam_v"], (k,), floating=True, nonnegative=True)
        steps = state["adam_t"]
        if not isinstance(steps, list) or len(steps) != k or not all(type(t) is int and t >= 0 for t in steps):
            raise StateLoadError(f"{OWNER} state adam_t={steps!r} is not allowed: {k} integers >= 0")
        held = state["held_out_tasks"]
        if not isinstance(held, list) or not all(type(i) is int and i >= 0 for i in held):
            raise StateLoadError(f"{OWNER} state held_out_tasks={held!r} is not allowed: task indices >= 0")
        if "memory" in state:
            self.memory.load_state_dict(state["memory"])
        self.log_weights = dict(zip(names, log_weights.tolist(), strict=True))
        self.moments = {
            n: (float(m), float(v), int(t)) for n, m, v, t in zip(names, adam_m.tolist(), adam_v.tolist(), steps)
        }
        self.held_out_tasks = list(held)
        self.history = list(state.get("history", []))
        self._last_update, self._window = None, {}
