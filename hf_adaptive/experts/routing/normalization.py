"""The normalisation signatures are compared after.

Signatures from a pretrained backbone share a large common component (the mean-pooled hidden states of any two
descriptions have cosine ≈ 1.0; measured in docs/results/routing_quality.md), so raw cosine barely separates
tasks. With `normalize="standardize"` (default) every vector is standardised against the population of
signatures the router has seen (profiles added and queries recorded): minus the running mean, divided by the
running per-dimension standard deviation, then re-normalised. The statistics are shrunk towards "no
normalisation" (mean 0, variance 1/dim) with `normalize_prior` pseudo-observations, so a router that has seen one
or two signatures behaves like plain cosine. `"center"` only subtracts the mean; `"none"` compares the raw unit
vectors.
"""

from __future__ import annotations

import torch

from ..config import RouterConfig


def unit_rows(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)


class Standardizer:
    """Running float64 sums of the observed unit vectors, and the transform they define."""

    def __init__(self, config: RouterConfig) -> None:
        self.config = config
        self.reset()

    def reset(self) -> None:
        self.n = 0
        self.sum = torch.zeros(self.config.dim, dtype=torch.float64)
        self.sumsq = torch.zeros(self.config.dim, dtype=torch.float64)
        self._stats: tuple[torch.Tensor, torch.Tensor] | None = None

    def load(self, n: int, total: torch.Tensor, total_sq: torch.Tensor) -> None:
        self.n, self.sum, self.sumsq = int(n), total.double().clone(), total_sq.double().clone()
        self._stats = None

    def observe(self, unit: torch.Tensor) -> None:
        """Add (n, dim) unit vectors to the statistics."""
        unit = unit.double()
        self.n += unit.size(0)
        self.sum += unit.sum(0)
        self.sumsq += (unit * unit).sum(0)
        self._stats = None

    def stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, 1/std): with n observed signatures and k = `normalize_prior`, mean = Σx / (n + k) and
        var = (n·var̂ + k/dim) / (n + k), var̂ the observed per-dimension variance."""
        if self._stats is not None:
            return self._stats
        cfg, d, n, k = self.config, self.config.dim, self.n, float(self.config.normalize_prior)
        mean = self.sum / (n + k)
        if cfg.normalize == "none":
            mean = torch.zeros_like(mean)
        if cfg.normalize != "standardize":
            self._stats = (mean.float(), torch.ones(d))
            return self._stats
        var_hat = (self.sumsq / n - (self.sum / n) ** 2).clamp_min(0.0) if n else torch.zeros_like(mean)
        var = (n * var_hat + k / d) / (n + k)
        self._stats = (mean.float(), var.rsqrt().float())
        return self._stats

    def transform(self, vectors: torch.Tensor) -> torch.Tensor:
        v = torch.as_tensor(vectors, dtype=torch.float32)
        if self.config.normalize == "none":
            return unit_rows(v)
        mean, scale = self.stats()
        return unit_rows((unit_rows(v) - mean) * scale)
