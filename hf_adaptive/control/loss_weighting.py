"""A differentiable loss-weight controller: the weights of the loss terms are tensors inside the loss.

A small network reads batch statistics (log of each loss term, log-ratios of each term to the task loss, the
model's mean predictive entropy) and outputs one control value per weighted term. Since the weights are tensors in
the graph, `total_loss.backward()` trains the controller together with the model; its `parameters()` only need to be
in the optimizer. The statistics are detached: the controller reads them, the model is not pushed to change them.

Minimizing sum_i w_i * L_i over free weights drives every w_i to 0, so the weights are never free:

* ``"uncertainty"`` (default; Kendall, Gal & Cipolla 2018): the network outputs a log-variance s_i per term and
  total = sum_i (1/2 e^{-s_i} L_i + 1/2 s_i). The 1/2 s_i term penalizes small weights; for a fixed L_i the optimum
  is s_i = log L_i, i.e. weight 1/2 e^{-s_i} = 1/(2 L_i): a term's weight tracks the inverse of its size and cannot
  collapse to 0. s_i is softly bounded (`log_var_bounds`, via tanh) so a term that is exactly 0 (an EWC penalty at
  the start of a task) cannot send its weight to infinity. The output bias starts at log(1/2), so every weight
  starts at 1: the run begins as the unweighted sum.
* ``"softmax"``: weights w = T * softmax(z) (T = `total_weight`), summing to a fixed total, with an entropy bonus
  -tau * T * H(w / T). Without it the minimizer puts all weight on the smallest term (collapse onto one term); with
  it the optimum is w_i = T * exp(-L_i / tau) / Z, which keeps every weight positive. Note the direction: this mode
  leans towards the terms that are already small; uncertainty weighting is the better default.

`ControlledScalar` covers the other quantities a plugin may expose as tensors (a distillation temperature, a
mixing coefficient): a learnable scalar squashed into (low, high), optionally conditioned on the same statistics.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..utils.validation import fail

MODES = ("uncertainty", "softmax")
TASK = "task"


def predictive_entropy(outputs: Any) -> torch.Tensor | None:
    """Mean entropy (nats) of the next-token distribution in `outputs.logits` (detached), or None without logits."""
    logits = getattr(outputs, "logits", None)
    if logits is None and isinstance(outputs, dict):
        logits = outputs.get("logits")
    if not isinstance(logits, torch.Tensor):
        return None
    with torch.no_grad():
        logp = F.log_softmax(logits.detach().float(), dim=-1)
        return -(logp.exp() * logp).sum(-1).mean()


class ControlledScalar(nn.Module):
    """A tensor in (low, high): low + (high - low) * sigmoid(theta + w . features); starts at `init`."""

    def __init__(self, low: float, high: float, init: float, num_features: int = 0) -> None:
        super().__init__()
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            fail(type(self).__name__, "low/high", (low, high), "need finite low < high")
        if not low < init < high:
            fail(type(self).__name__, "init", init, f"must lie strictly inside ({low}, {high})")
        self.low, self.high = float(low), float(high)
        p = (init - low) / (high - low)
        self.theta = nn.Parameter(torch.tensor(math.log(p / (1 - p))))
        self.proj = nn.Linear(num_features, 1, bias=False) if num_features else None
        if self.proj is not None:
            nn.init.zeros_(self.proj.weight)

    def forward(self, features: torch.Tensor | None = None) -> torch.Tensor:
        z = self.theta
        if self.proj is not None and features is not None:
            z = z + self.proj(features.to(self.theta.dtype)).squeeze(-1)
        return self.low + (self.high - self.low) * torch.sigmoid(z)


class LossWeightController(nn.Module):
    """Returns `(total_loss, weights)` for the task loss and the named plugin terms, all as graph tensors.

    Called by the trainer as ``controller(task_loss, terms, outputs)``; `terms` maps each plugin term's name to its
    scalar value. The names are fixed at construction (the network's input and output sizes depend on them); a
    term missing from a batch is skipped (its input slot reads 0, its weight is not used).
    """

    def __init__(
        self,
        term_names: list[str],
        mode: str = "uncertainty",
        hidden_size: int = 16,
        weight_task: bool = True,
        log_var_bounds: tuple[float, float] = (-3.0, 5.0),
        total_weight: float | None = None,
        entropy_tau: float = 1.0,
    ) -> None:
        super().__init__()
        c = type(self).__name__
        if mode not in MODES:
            fail(c, "mode", mode, f"choose one of {list(MODES)}")
        if not isinstance(term_names, (list, tuple)) or not all(isinstance(n, str) and n for n in term_names):
            fail(c, "term_names", term_names, "must be a list of non-empty names")
        if TASK in term_names or len(set(term_names)) != len(term_names):
            fail(c, "term_names", term_names, f"names must be unique and not {TASK!r}")
        if not isinstance(hidden_size, int) or hidden_size < 1:
            fail(c, "hidden_size", hidden_size, "must be an integer >= 1")
        lo, hi = log_var_bounds
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < 0 < hi):
            fail(c, "log_var_bounds", log_var_bounds, "need finite low < 0 < high")
        if entropy_tau <= 0:
            fail(c, "entropy_tau", entropy_tau, "must be > 0")
        self.mode = mode
        self.term_names = list(term_names)
        self.weighted = ([TASK] if weight_task else []) + self.term_names
        if not self.weighted:
            fail(c, "term_names", term_names, "nothing to weight: give terms or weight_task=True")
        if mode == "softmax" and len(self.weighted) < 2:
            fail(c, "term_names", term_names, "softmax weighting needs at least two weighted terms")
        self.log_var_bounds = (float(lo), float(hi))
        self.total_weight = float(total_weight if total_weight is not None else len(self.weighted))
        if not self.total_weight > 0:
            fail(c, "total_weight", total_weight, "must be > 0")
        self.entropy_tau = float(entropy_tau)
        self.num_features = 2 + 2 * len(self.term_names)  # log L_task, log L_i, log(L_i / L_task), entropy
        self.net = nn.Sequential(
            nn.Linear(self.num_features, hidden_size),
            nn.LayerNorm(hidden_size),
            nn.Tanh(),
            nn.Linear(hidden_size, len(self.weighted)),
        )
        last = self.net[-1]
        nn.init.normal_(last.weight, std=1e-3)
        if mode == "uncertainty":
            nn.init.constant_(last.bias, self._raw_for(math.log(0.5)))  # every weight 1/2 e^{-s} starts at 1
        else:
            nn.init.zeros_(last.bias)  # uniform: every weight starts at total_weight / n
        self.controls = nn.ModuleDict()

    # ------------------------------------------------------------------------------------------------ statistics
    def features(self, task_loss: torch.Tensor, terms: dict[str, torch.Tensor], outputs: Any = None) -> torch.Tensor:
        """The detached statistics vector the network reads."""
        eps = 1e-8
        with torch.no_grad():
            log_task = torch.log(task_loss.detach().float().abs() + eps)
            logs, ratios = [], []
            for name in self.term_names:
                value = terms.get(name)
                if value is None:
                    logs.append(torch.zeros_like(log_task))
                    ratios.append(torch.zeros_like(log_task))
                else:
                    log_term = torch.log(value.detach().float().abs() + eps)
                    logs.append(log_term)
                    ratios.append(log_term - log_task)
            entropy = predictive_entropy(outputs)
            entropy = torch.zeros_like(log_task) if entropy is None else entropy.to(log_task.device)
            feats = torch.stack([log_task, *logs, *ratios, entropy])
        return torch.nan_to_num(feats, nan=0.0, posinf=20.0, neginf=-20.0).to(self.net[0].weight.dtype)

    # ---------------------------------------------------------------------------------------------------- control
    def _raw_for(self, s: float) -> float:
        lo, hi = self.log_var_bounds
        mid, half = (hi + lo) / 2, (hi - lo) / 2
        return math.atanh((s - mid) / half)

    def _log_vars(self, raw: torch.Tensor) -> torch.Tensor:
        lo, hi = self.log_var_bounds
        mid, half = (hi + lo) / 2, (hi - lo) / 2
        return mid + half * torch.tanh(raw)

    def forward(
        self, task_loss: torch.Tensor, terms: dict[str, torch.Tensor], outputs: Any = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        unknown = set(terms) - set(self.term_names)
        if unknown:
            fail(type(self).__name__, "terms", sorted(unknown), f"known terms are {self.term_names}")
        raw = self.net(self.features(task_loss, terms, outputs))
        values = {TASK: task_loss, **terms}
        present = [i for i, name in enumerate(self.weighted) if name in values]
        if self.mode == "uncertainty":
            s = self._log_vars(raw)
            weights = {self.weighted[i]: 0.5 * torch.exp(-s[i]) for i in present}
            total = sum(weights[self.weighted[i]] * values[self.weighted[i]] + 0.5 * s[i] for i in present)
        else:
            probs = torch.softmax(raw[present], dim=0)
            weights = {self.weighted[i]: self.total_weight * probs[j] for j, i in enumerate(present)}
            total = sum(weights[name] * values[name] for name in weights)
            entropy = -(probs * torch.log(probs.clamp_min(1e-12))).sum()
            total = total - self.entropy_tau * self.total_weight * entropy
        if TASK not in self.weighted:
            total = total + task_loss
        return total, weights

    # --------------------------------------------------------------------------------- temperatures and mixings
    def add_control(
        self, name: str, low: float, high: float, init: float, conditioned: bool = False
    ) -> ControlledScalar:
        """Register a bounded tensor a plugin reads with `control(name, ...)` (e.g. a temperature or a mixing rho)."""
        if not isinstance(name, str) or not name or name in self.controls:
            fail(type(self).__name__, "control name", name, "must be a new non-empty name")
        self.controls[name] = ControlledScalar(low, high, init, num_features=self.num_features if conditioned else 0)
        return self.controls[name]

    def control(
        self,
        name: str,
        task_loss: torch.Tensor | None = None,
        terms: dict[str, torch.Tensor] | None = None,
        outputs: Any = None,
    ) -> torch.Tensor:
        """The current value of a registered control, as a tensor in the graph of its parameters."""
        if name not in self.controls:
            fail(type(self).__name__, "control name", name, f"registered controls are {list(self.controls)}")
        module = self.controls[name]
        feats = None
        if module.proj is not None and task_loss is not None:
            feats = self.features(task_loss, terms or {}, outputs)
        return module(feats)


class UncertaintyWeighting(LossWeightController):
    """`LossWeightController` in the default "uncertainty" mode: 1/2 e^{-s_i} L_i + 1/2 s_i."""

    def __init__(self, term_names: list[str], **kwargs: Any) -> None:
        super().__init__(term_names, mode="uncertainty", **kwargs)


class SoftmaxWeighting(LossWeightController):
    """`LossWeightController` in "softmax" mode: weights summing to `total_weight`, entropy-regularized."""

    def __init__(self, term_names: list[str], **kwargs: Any) -> None:
        super().__init__(term_names, mode="softmax", **kwargs)
