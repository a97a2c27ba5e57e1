"""The gate controller's reward: validation-loss improvement plus an efficiency bonus, squashed and smoothed.

    improvement = (previous_loss - current_loss) / max(previous_loss, eps)
    reward      = tanh(improvement + efficiency_factor * pruned_fraction)
    smoothed    = ema_decay * smoothed + (1 - ema_decay) * reward      (the first reward starts the average)

The improvement is *relative* (normalised by the previous loss) so that the same efficiency factor means the
same trade-off whether the loss is 3.0 early in training or 0.05 late: a 1% loss increase is worth the same
number of pruned heads at any scale. `tanh` keeps rewards in (-1, 1) so that value targets and advantages
stay in a stable range; the exponential moving average damps the noise of a small validation subset.
An `ema_decay` of 0 disables the smoothing.

A paired reward (`observe(..., reference_loss=)`) compares with a loss measured on the same data under the gates
that were serving before the action, instead of the previous loss: on a stream whose batches differ in difficulty,
a harder batch then does not count as a worse action.
"""

from __future__ import annotations

import math
from typing import Any

from ..utils.validation import check_number

_EPS = 1e-8


def gate_reward(previous_loss: float, current_loss: float, pruned_fraction: float, efficiency_factor: float) -> float:
    """`tanh(relative loss improvement + efficiency_factor * pruned_fraction)` (see the module docstring)."""
    check_number("gate_reward", "pruned_fraction", pruned_fraction, low=0, high=1)
    check_number("gate_reward", "previous_loss", previous_loss)
    check_number("gate_reward", "current_loss", current_loss)
    improvement = (previous_loss - current_loss) / max(abs(previous_loss), _EPS)
    return math.tanh(improvement + efficiency_factor * pruned_fraction)


class RewardTracker:
    """Turns a stream of losses into smoothed rewards; remembers the previous loss and the running average."""

    def __init__(self, efficiency_factor: float = 0.1, ema_decay: float = 0.0) -> None:
        check_number(type(self).__name__, "ema_decay", ema_decay, low=0, high=1, high_open=True)
        check_number(type(self).__name__, "efficiency_factor", efficiency_factor)
        self.efficiency_factor = float(efficiency_factor)
        self.ema_decay = float(ema_decay)
        self.previous_loss: float | None = None
        self.ema: float | None = None
        self.last_raw: float | None = None

    def smooth(self, reward: float) -> float:
        """Fold `reward` into the moving average and return the new average."""
        self.ema = reward if self.ema is None else self.ema_decay * self.ema + (1.0 - self.ema_decay) * reward
        self.last_raw = float(reward)
        return self.ema

    def observe(self, loss: float, pruned_fraction: float, reference_loss: float | None = None) -> float | None:
        """Record a new loss; the smoothed reward, or None for the first loss (nothing to compare with).
        `reference_loss`: compare with it instead of the previous loss (a paired reward, see the module doc)."""
        check_number("RewardTracker.observe", "loss", loss)
        if reference_loss is not None:
            check_number("RewardTracker.observe", "reference_loss", reference_loss)
        previous, self.previous_loss = self.previous_loss, float(loss)
        if reference_loss is not None:
            previous = float(reference_loss)
        if previous is None:
            return None
        return self.smooth(gate_reward(previous, loss, pruned_fraction, self.efficiency_factor))

    def state_dict(self) -> dict[str, Any]:
        return {"previous_loss": self.previous_loss, "ema": self.ema, "last_raw": self.last_raw}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.previous_loss = state["previous_loss"]
        self.ema = state["ema"]
        self.last_raw = state["last_raw"]
