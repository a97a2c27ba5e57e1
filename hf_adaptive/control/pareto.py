"""A Pareto archive of (validation loss, active heads): the gate configurations no other one beats on both.

Both objectives are minimised. A point is kept unless another point is at least as good on both objectives
(an exact tie keeps the point seen first), so with integer head counts the archive never holds more than
`total_heads + 1` points. `pick(preference)` turns the front into one configuration:

    score = loss_norm + preference * active_norm

where both objectives are min-max normalised over the current front (0 = best point on that axis, 1 = worst),
so `preference = 0` picks the lowest loss, a large preference the fewest heads, and 1 weighs a front's whole
loss range against its whole head range equally.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class ParetoPoint:
    loss: float
    active_heads: int
    gates: torch.Tensor
    step: int = -1

    def weakly_dominates(self, other: ParetoPoint) -> bool:
        """At least as good on both objectives."""
        return self.loss <= other.loss and self.active_heads <= other.active_heads


class ParetoArchive:
    """Non-dominated (loss, active heads) points with the gates that produced them."""

    def __init__(self, total_heads: int) -> None:
        if total_heads < 1:
            raise ValueError(f"ParetoArchive.total_heads={total_heads!r} is not allowed: an integer >= 1")
        self.total_heads = int(total_heads)
        self.points: list[ParetoPoint] = []

    def __len__(self) -> int:
        return len(self.points)

    def add(self, loss: float, active_heads: int, gates: torch.Tensor, step: int = -1) -> bool:
        """Insert a point; True if it joined the front (and evicted every point it dominates)."""
        if not math.isfinite(loss):
            raise ValueError(f"ParetoArchive.add: loss={loss!r} is not allowed: a finite number")
        if not (0 <= active_heads <= self.total_heads):
            raise ValueError(
                f"ParetoArchive.add: active_heads={active_heads!r} is not allowed: "
                f"an integer in [0, {self.total_heads}]"
            )
        point = ParetoPoint(float(loss), int(active_heads), gates.detach().float().cpu().clone(), int(step))
        if any(p.weakly_dominates(point) for p in self.points):
            return False
        self.points = [p for p in self.points if not point.weakly_dominates(p)]
        self.points.append(point)
        self.points.sort(key=lambda p: (p.active_heads, p.loss))
        return True

    def front(self) -> list[tuple[float, int]]:
        """(loss, active heads) of the front, fewest heads first."""
        return [(p.loss, p.active_heads) for p in self.points]

    def pick(self, preference: float) -> ParetoPoint:
        """The point minimising `loss_norm + preference * active_norm` (ties: lower loss)."""
        if not self.points:
            raise ValueError("the Pareto archive is empty: add points before pick()")
        if not (preference >= 0.0) or not math.isfinite(preference):
            raise ValueError(f"ParetoArchive.pick: preference={preference!r} is not allowed: a finite number >= 0")
        losses = [p.loss for p in self.points]
        heads = [p.active_heads for p in self.points]

        def norm(v: float, lo: float, hi: float) -> float:
            return 0.0 if hi == lo else (v - lo) / (hi - lo)

        def score(p: ParetoPoint) -> tuple[float, float]:
            s = norm(p.loss, min(losses), max(losses)) + preference * norm(p.active_heads, min(heads), max(heads))
            return (s, p.loss)

        return min(self.points, key=score)

    def state_dict(self) -> dict[str, Any]:
        return {
            "total_heads": self.total_heads,
            "points": [
                {"loss": p.loss, "active_heads": p.active_heads, "gates": p.gates, "step": p.step} for p in self.points
            ],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.total_heads = int(state["total_heads"])
        self.points = [
            ParetoPoint(float(p["loss"]), int(p["active_heads"]), p["gates"].clone(), int(p["step"]))
            for p in state["points"]
        ]
