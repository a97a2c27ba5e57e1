"""An importance prior for the gate controller: its policy starts as the greedy swap rule and RL refines it.

Why: on SmolLM2 a freshly initialised policy swaps heads at random (every step spends its `max_changes` flips on
heads drawn almost uniformly), so within tens of steps it drifts away from a good start (benchmarks/gates_stream.py:
+0.6 to +1.3 nats over a static ranking), while the plain rule "keep the heads of largest importance measured
under the current gates" follows a shift and beats every static ranking. The controller's state already holds that
importance; the prior hands it the rule as well.

The swap margin of a head is its importance (scaled by the largest, as in the controller's state) minus the cut
of the current head count k: tau = the midpoint of the k-th and (k+1)-th largest importances. An active head below
the cut (m < 0) should give way, a pruned head above it (m > 0) should come back; the greedy rule is "keep the top
k". The margins are 0 while every head or no head is active (no cut). The prior adds `-strength * m` to the prune
logit of an active head and `+strength * m` to the regrow logit of a pruned head (the keep logit is left alone), so
heads on the right side of the cut are held and the flips go to the heads across it. Being a fixed function of the
state, it is part of the policy's log-probabilities, so
PPO's ratios and the stored transitions need nothing new. `strength` 0 is the plain controller.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .config import GateControllerConfig
from .gate_controller import PRUNE, REGROW, GateController, GatePolicy

__all__ = ["ImportancePriorConfig", "PriorGateController", "PriorGatePolicy", "prior_logits", "swap_margins"]


@dataclass
class ImportancePriorConfig:
    """How strongly the controller's policy starts from the greedy swap rule."""

    strength: float = field(
        default=50.0,
        metadata={
            "help": "Importance prior: logits added per unit of swap margin (importance scaled by its largest; 0: "
            "none). On SmolLM2 at 50 % of heads the median head sits 0.10 from the cut (a quarter within 0.05), so "
            "50 gives it 5 logits: heads well inside their side are held, flips go to heads across the cut."
        },
    )

    def __post_init__(self) -> None:
        if isinstance(self.strength, bool) or not isinstance(self.strength, (int, float)):
            raise ValueError(f"ImportancePriorConfig.strength={self.strength!r} is not allowed: a number >= 0")
        if not math.isfinite(self.strength) or self.strength < 0:
            raise ValueError(f"ImportancePriorConfig.strength={self.strength!r} is not allowed: a finite number >= 0")
        self.strength = float(self.strength)


def swap_margins(importance: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """Per head (flat): importance minus the cut of the current head count (the midpoint of the k-th and (k+1)-th
    largest importances, k = active heads); zeros when every head or none is active. See the module docstring."""
    imp = importance.reshape(-1).float()
    active = gates.reshape(-1) > 0.5
    if imp.shape != active.shape:
        raise ValueError(f"swap_margins: {imp.numel()} importances for {active.numel()} gates is not allowed")
    k = int(active.sum())
    if k in (0, imp.numel()):
        return torch.zeros_like(imp)
    ranked = imp.sort(descending=True).values
    return imp - (ranked[k - 1] + ranked[k]) / 2


def prior_logits(importance: torch.Tensor, gates: torch.Tensor, strength: float) -> torch.Tensor:
    """(heads, 3) logits to add to the policy's: prune for active heads, regrow for pruned ones."""
    m = swap_margins(importance, gates)
    active = gates.reshape(-1) > 0.5
    out = torch.zeros(m.numel(), 3)
    out[:, PRUNE] = torch.where(active, -strength * m, torch.zeros_like(m))
    out[:, REGROW] = torch.where(active, torch.zeros_like(m), strength * m)
    return out


class PriorGatePolicy(GatePolicy):
    """`GatePolicy` plus the importance prior, read from the state's gate (column 0) and scaled importance
    (column 1) columns (`GateController._state`)."""

    def __init__(self, *args: Any, strength: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.strength = float(strength)

    def forward(self, head_x: torch.Tensor, global_x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, value = super().forward(head_x, global_x)
        if self.strength:
            logits = logits + prior_logits(head_x[:, 1], head_x[:, 0], self.strength)
        return logits, value


class PriorGateController(GateController):
    """A `GateController` whose policy starts from the greedy swap rule (`ImportancePriorConfig`). It needs the
    importance in `act(importance, ...)` (`FeedbackCallback` passes it when `statistics` holds 'importance'):
    without it the margins are 0 and it acts as the plain controller. Its initial weights are the plain
    controller's (same seed), and its state holds the prior, restored by `load` and `load_state_dict`."""

    def __init__(
        self,
        num_layers: int,
        num_heads: int,
        config: GateControllerConfig | None = None,
        prior: ImportancePriorConfig | None = None,
    ) -> None:
        if prior is not None and not isinstance(prior, ImportancePriorConfig):
            raise TypeError(f"PriorGateController: prior={prior!r} is not allowed: an ImportancePriorConfig or None")
        self.prior = prior or ImportancePriorConfig()
        super().__init__(num_layers, num_heads, config)

    def _make_policy(self, cfg: GateControllerConfig) -> PriorGatePolicy:
        return PriorGatePolicy(self.n, 4 + 3 * cfg.history, 3 + cfg.history, cfg, strength=self.prior.strength)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "prior": asdict(self.prior)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.prior = _saved_prior(state)
        self.policy.strength = self.prior.strength
        super().load_state_dict(state)

    @classmethod
    def _for_state(cls, state: dict[str, Any], config: GateControllerConfig) -> PriorGateController:
        return cls(*state["shape"], config, _saved_prior(state))


def _saved_prior(state: dict[str, Any]) -> ImportancePriorConfig:
    """The prior of a saved `PriorGateController` state; a state without a valid one is refused."""
    from ..utils.io import StateLoadError

    try:
        return ImportancePriorConfig(**state["prior"])
    except (KeyError, TypeError, ValueError) as err:
        detail = "no 'prior' entry (saved by a plain GateController?)" if isinstance(err, KeyError) else str(err)
        raise StateLoadError(f"PriorGateController state: the importance prior cannot be loaded: {detail}") from err
