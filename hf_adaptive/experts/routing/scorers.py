"""Learned scorers of (query, profile) pairs and their fitting on recorded reuse outcomes.

`linear` is σ(w·(q⊙p) + b), starting as a scaled cosine; `mlp` works on [q⊙p, |q−p|]. Both give p(reusing p for
q keeps accuracy), trained by BCE from a seeded initialisation; `fit_logistic` calibrates a score into that
probability (two parameters, Newton's method).
"""

from __future__ import annotations

import torch

from ..config import RouterConfig


class LinearScorer(torch.nn.Module):
    """σ(w·(q⊙p) + b); with w = k·1, b = −k·t it is a sigmoid of (cosine − t)."""

    def __init__(self, dim: int, init_scale: float = 10.0, init_threshold: float = 0.5) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.full((dim,), init_scale))
        self.b = torch.nn.Parameter(torch.tensor(-init_scale * init_threshold))

    def forward(self, q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid((q * p) @ self.w + self.b)

    def all_scores(self, q: torch.Tensor, profiles: torch.Tensor) -> torch.Tensor:
        """Scores of every profile in one matrix-vector product (the scorer is linear in p)."""
        return torch.sigmoid(profiles @ (q * self.w) + self.b)


class MLPScorer(torch.nn.Module):
    """A small MLP on [q⊙p, |q−p|] giving the probability that reusing p for q succeeds."""

    def __init__(self, dim: int, hidden: int = 32) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(2 * dim, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 1))

    def forward(self, q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        q = q.expand_as(p)
        return torch.sigmoid(self.net(torch.cat([q * p, (q - p).abs()], dim=-1)).squeeze(-1))


def initial_scorers(config: RouterConfig) -> tuple[LinearScorer, MLPScorer]:
    """Both learned scorers as initialised (seeded by `config.seed`, whatever the global RNG)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        linear = LinearScorer(config.dim, init_threshold=config.reuse_threshold)
        mlp = MLPScorer(config.dim, config.mlp_hidden)
    return linear, mlp


def train_scorer(
    scorer: torch.nn.Module,
    initial: torch.nn.Module,
    q: torch.Tensor,
    p: torch.Tensor,
    y: torch.Tensor,
    epochs: int = 200,
    lr: float = 0.05,
) -> float:
    """Train `scorer` by BCE on pairs (q, p) with labels y, from `initial`'s weights; returns the final loss."""
    scorer.load_state_dict(initial.state_dict())
    opt = torch.optim.Adam(scorer.parameters(), lr=lr)
    loss = torch.tensor(0.0)
    with torch.enable_grad():
        for _ in range(epochs):
            opt.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy(scorer(q, p).clamp(1e-6, 1 - 1e-6), y)
            loss.backward()
            opt.step()
    return float(loss.detach())


def fit_logistic(x: torch.Tensor, y: torch.Tensor, l2: float = 1e-3, iters: int = 50) -> tuple[float, float]:
    """(a, b) of p = σ(a·x + b) by Newton's method on the L2-regularised log-likelihood (IRLS, 2 parameters)."""
    x = x.double().flatten()
    y = y.double().flatten()
    X = torch.stack([x, torch.ones_like(x)], dim=1)
    theta = torch.zeros(2, dtype=torch.float64)
    reg = torch.diag(torch.tensor([l2, 0.0], dtype=torch.float64))
    for _ in range(iters):
        p = torch.sigmoid(X @ theta)
        grad = X.T @ (p - y) + reg @ theta
        hess = X.T @ (X * (p * (1 - p)).unsqueeze(1)) + reg + 1e-9 * torch.eye(2, dtype=torch.float64)
        step = torch.linalg.solve(hess, grad)
        theta = theta - step
        if step.abs().max() < 1e-10:
            break
    return float(theta[0]), float(theta[1])
