"""The router: for a new task's signature, reuse an expert, fork one, or create a new one.

`Router` holds the expert profiles and the learning from outcomes, and is composed of replaceable parts, each
selected through `RouterConfig`:

* **normalisation** (`routing.normalization`): signatures are compared after standardising them against the
  population of signatures seen (`normalize`, `normalize_prior`);
* **search** (`routing.index`): nearest experts by cosine over the normalised unit profiles, exact or faiss
  (`index`, `ann_min_experts`, `hnsw_m`, `hnsw_ef_search`);
* **scorers** (`routing.scorers`): `cosine`, or the learned `linear` / `mlp` (p(reuse succeeds)), refitted by
  `record_outcome` from all outcomes as soon as there are `min_outcomes` of them with both a success and a
  failure; until then (`scorer_fitted` False) the router scores by cosine, since an untrained scorer's output
  means nothing against the thresholds. A fitted scorer re-ranks the `top_k` nearest experts and its score is
  compared with `p_reuse` / `p_fork` instead of the cosine thresholds;
* **decisions** (`routing.decisions`): `threshold`, `ucb`, `calibrated`, `adaptive`, and `bootstrap` before any
  of them, one function each, looked up by `decision`;
* **state** (`routing.state`): safetensors + JSON, versioned, checked on load.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch

from .config import DECISIONS, INDEXES, NORMALIZATIONS, SCORERS, RouterConfig, faiss_available
from .routing.decisions import ACTIONS, DECISION_RULES, RoutingDecision, bootstrap, by_thresholds
from .routing.index import ProfileIndex
from .routing.normalization import Standardizer
from .routing.scorers import LinearScorer, MLPScorer, fit_logistic, initial_scorers, train_scorer
from .routing.state import (
    READABLE_STATE_VERSIONS,
    ROUTER_STATE_VERSION,
    Outcome,
    load_router,
    load_router_state,
    router_state,
    save_router,
)

__all__ = [
    "ACTIONS",
    "DECISIONS",
    "INDEXES",
    "NORMALIZATIONS",
    "READABLE_STATE_VERSIONS",
    "ROUTER_STATE_VERSION",
    "SCORERS",
    "LinearScorer",
    "MLPScorer",
    "Outcome",
    "Router",
    "RouterConfig",
    "RoutingDecision",
    "faiss_available",
    "fit_logistic",
]


class Router:
    """Expert profiles and what was learnt from outcomes, searched, scored and decided on by its parts."""

    def __init__(self, config: RouterConfig) -> None:
        self.config = config
        self.names: list[str] = []
        self._index: dict[str, int] = {}
        self._profiles = torch.zeros(16, config.dim)
        self.counts: dict[str, int] = {}
        self.rewards: dict[str, float] = {}
        self.outcomes: list[Outcome] = []
        self.tau = config.tau_init
        self.calibration: tuple[float, float] | None = None
        self.n_decisions = 0
        self.linear, self.mlp = initial_scorers(config)
        #: True once a learned scorer was trained on outcomes; before that `scores` falls back to cosine
        self.scorer_fitted = False
        self.search_index = ProfileIndex(config)
        self.standardizer = Standardizer(config)
        self._normalized: torch.Tensor | None = None

    def invalidate(self) -> None:
        """Profiles or statistics changed: the normalised profile matrix and the faiss index are rebuilt lazily."""
        self._normalized = None
        self.search_index.invalidate()

    # ------------------------------------------------------------------ normalisation
    @property
    def n_observed(self) -> int:
        """How many signatures the normalisation statistics are made of."""
        return self.standardizer.n

    def observe(self, vectors: torch.Tensor) -> None:
        """Add signatures (one vector or a (n, dim) matrix; unit-normalised here) to the normalisation statistics."""
        v = torch.as_tensor(vectors, dtype=torch.float32)
        v = v.unsqueeze(0) if v.ndim == 1 else v
        if v.ndim != 2 or v.size(1) != self.config.dim:
            raise ValueError(f"signatures of shape {tuple(v.shape)} do not match RouterConfig.dim={self.config.dim}")
        self.standardizer.observe(v / v.norm(dim=1, keepdim=True).clamp_min(1e-12))
        self.invalidate()

    def normalization(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, 1/std) applied before comparisons: the observed statistics shrunk towards (0, 1/dim)."""
        return self.standardizer.stats()

    def transform(self, vectors: torch.Tensor) -> torch.Tensor:
        """Unit vectors normalised as the router compares them (identity for `normalize="none"`)."""
        return self.standardizer.transform(vectors)

    @property
    def normalized_profiles(self) -> torch.Tensor:
        """The (N, dim) profile matrix as compared (cached until profiles or statistics change)."""
        if self.config.normalize == "none":
            return self.profiles
        if self._normalized is None or self._normalized.size(0) != len(self.names):
            self._normalized = self.transform(self.profiles) if len(self.names) else torch.zeros(0, self.config.dim)
        return self._normalized

    # ------------------------------------------------------------------ profiles
    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, name: object) -> bool:
        return name in self._index

    @property
    def profiles(self) -> torch.Tensor:
        """The (N, dim) unit-norm profile matrix (a view of the preallocated buffer)."""
        return self._profiles[: len(self.names)]

    def _check_vector(self, vector: torch.Tensor) -> torch.Tensor:
        vector = torch.as_tensor(vector, dtype=torch.float32).flatten()
        if vector.numel() != self.config.dim:
            raise ValueError(f"signature dimension {vector.numel()} does not match RouterConfig.dim={self.config.dim}")
        return vector / vector.norm().clamp_min(1e-12)

    def clear_profiles(self, capacity: int = 16) -> None:
        """No expert, no count, no reward (room for `capacity` profiles)."""
        self.names, self._index = [], {}
        self._profiles = torch.zeros(max(16, capacity), self.config.dim)
        self.counts, self.rewards = {}, {}
        self.invalidate()

    def add_expert(self, name: str, profile: torch.Tensor) -> None:
        if name in self._index:
            raise ValueError(f"Router.add_expert name={name!r} is not allowed: it has a profile; use update_profile")
        vec = self._check_vector(profile)
        n = len(self.names)
        if n == self._profiles.size(0):
            grown = torch.zeros(2 * n, self.config.dim)
            grown[:n] = self._profiles
            self._profiles = grown
        self._profiles[n] = vec
        self.names.append(name)
        self._index[name] = n
        self.counts.setdefault(name, 0)
        self.rewards.setdefault(name, 0.0)
        self.observe(vec)

    def add_experts(self, names: list[str], profiles: torch.Tensor) -> None:
        """Many profiles at once (used by benchmarks and loading)."""
        profiles = torch.as_tensor(profiles, dtype=torch.float32)
        if profiles.ndim != 2 or profiles.size(1) != self.config.dim:
            raise ValueError(
                f"profiles of shape {tuple(profiles.shape)} do not match RouterConfig.dim={self.config.dim}"
            )
        if len(set(names)) != len(names) or any(n in self._index for n in names):
            raise ValueError("Router.add_experts names must be new and unique")
        n, m = len(self.names), len(names)
        cap = self._profiles.size(0)
        while cap < n + m:
            cap *= 2
        if cap != self._profiles.size(0):
            grown = torch.zeros(cap, self.config.dim)
            grown[:n] = self._profiles[:n]
            self._profiles = grown
        self._profiles[n : n + m] = profiles / profiles.norm(dim=1, keepdim=True).clamp_min(1e-12)
        for i, name in enumerate(names):
            self.names.append(name)
            self._index[name] = n + i
            self.counts.setdefault(name, 0)
            self.rewards.setdefault(name, 0.0)
        if m:
            self.observe(self._profiles[n : n + m])

    def update_profile(self, name: str, profile: torch.Tensor) -> None:
        """Replace an expert's profile (after it trained: its task's signature from validation examples)."""
        if name not in self._index:
            self.add_expert(name, profile)
            return
        self._profiles[self._index[name]] = self._check_vector(profile)
        self.invalidate()

    def remove_expert(self, name: str) -> None:
        i = self._index.pop(name)
        n = len(self.names)
        self._profiles[i : n - 1] = self._profiles[i + 1 : n].clone()
        self.names.pop(i)
        for j, other in enumerate(self.names[i:], start=i):
            self._index[other] = j
        self.counts.pop(name, None)
        self.rewards.pop(name, None)
        self.outcomes = [o for o in self.outcomes if o.expert != name]
        self.invalidate()

    # ------------------------------------------------------------------ search and scores
    def nearest(self, query: torch.Tensor, k: int | None = None) -> tuple[list[str], torch.Tensor]:
        """The `k` experts of highest (normalised) cosine similarity to `query` (names, similarities), best first."""
        return self._nearest_normalized(self.transform(self._check_vector(query)), k)

    def _nearest_normalized(self, q: torch.Tensor, k: int | None) -> tuple[list[str], torch.Tensor]:
        """`nearest` for a query already normalised as the profiles are (`transform`)."""
        n = len(self.names)
        if n == 0:
            return [], torch.zeros(0)
        rows, sims = self.search_index.search(self.normalized_profiles, q, min(k or self.config.top_k, n))
        return [self.names[i] for i in rows], sims

    @property
    def learned_scoring(self) -> bool:
        """Whether scores are a fitted learned scorer's p(reuse succeeds) (else cosine similarities)."""
        return self.config.scorer != "cosine" and self.scorer_fitted

    def _scorer(self) -> torch.nn.Module:
        return self.linear if self.config.scorer == "linear" else self.mlp

    def scores(self, query: torch.Tensor) -> tuple[list[str], torch.Tensor]:
        """Candidates and their scores under the configured scorer (a fitted learned scorer re-ranks the top-k;
        an unfitted one is not used: cosine, so that the cosine thresholds keep their meaning)."""
        q = self.transform(self._check_vector(query))
        names, sims = self._nearest_normalized(q, None)
        if not self.learned_scoring or not names:
            return names, sims
        profiles = self.normalized_profiles[[self._index[n] for n in names]]
        with torch.no_grad():
            s = self._scorer()(q.unsqueeze(0), profiles)
        order = torch.argsort(s, descending=True)
        return [names[int(i)] for i in order], s[order]

    # ------------------------------------------------------------------ decisions
    def _by_thresholds(self, score: float, reuse: float, fork: float) -> str:
        return by_thresholds(score, reuse, fork)

    def thresholds(self) -> tuple[float, float]:
        """(reuse, fork) thresholds on the current score scale: the cosine ones, or `p_reuse` / `p_fork` once a
        learned scorer gives probabilities."""
        cfg = self.config
        return (cfg.p_reuse, cfg.p_fork) if self.learned_scoring else (cfg.reuse_threshold, cfg.fork_threshold)

    def route(self, query: torch.Tensor) -> RoutingDecision:
        """Decide reuse / fork / create for a task with signature `query` (does not change the state)."""
        names, scores = self.scores(query)
        candidates = list(zip(names, [float(s) for s in scores], strict=True))
        if not names:
            return RoutingDecision("create", None, float("-inf"), "empty", candidates=candidates)
        return bootstrap(self, candidates) or DECISION_RULES[self.config.decision](self, candidates)

    def reuse_probability(self, score: float) -> float:
        """Calibrated p(reuse keeps accuracy | score) = σ(a·score + b); needs `calibrate()` first."""
        if self.calibration is None:
            raise RuntimeError(f"Router has no calibration yet: record at least {self.config.min_outcomes} outcomes")
        a, b = self.calibration
        return 1.0 / (1.0 + math.exp(-(a * score + b)))

    # ------------------------------------------------------------------ learning from outcomes
    def record_decision(
        self, decision: RoutingDecision, new_expert: str | None = None, query: torch.Tensor | None = None
    ) -> None:
        """Count a decision (the expert used: the reused one, or the forked/created `new_expert`); the routed
        `query`, when given, joins the normalisation statistics."""
        if query is not None:
            self.observe(self._check_vector(query))
        self.n_decisions += 1
        used = decision.expert if decision.action == "reuse" else new_expert
        if used is not None:
            self.counts[used] = self.counts.get(used, 0) + 1

    def record_outcome(self, query: torch.Tensor, expert: str, score: float, success: bool) -> None:
        """A reuse result: the reward of `expert`, τ, and (once `min_outcomes` exist, with both a success and a
        failure) the calibration and the learned scorer (refitted from all outcomes) are updated."""
        cfg = self.config
        self.outcomes.append(Outcome(self._check_vector(query), expert, float(score), bool(success)))
        self.rewards[expert] = self.rewards.get(expert, 0.0) + float(success)
        if success:
            self.tau = self.tau - cfg.tau_lr * (self.tau - cfg.tau_min)
        else:
            self.tau = self.tau + cfg.tau_lr * (cfg.tau_max - self.tau)
        labels = {o.success for o in self.outcomes}
        if len(self.outcomes) >= cfg.min_outcomes and len(labels) == 2:
            self.calibrate()
            if cfg.scorer != "cosine" and any(o.expert in self._index for o in self.outcomes):
                self.fit_scorer()

    def calibrate(self) -> tuple[float, float]:
        """Fit the logistic calibration p = σ(a·score + b) on the recorded outcomes."""
        if not self.outcomes:
            raise RuntimeError("Router.calibrate needs recorded outcomes")
        x = torch.tensor([o.score for o in self.outcomes])
        y = torch.tensor([float(o.success) for o in self.outcomes])
        self.calibration = fit_logistic(x, y)
        return self.calibration

    def _initial_scorer(self) -> torch.nn.Module:
        """The configured learned scorer as initialised (seeded by `config.seed`, whatever the global RNG)."""
        linear, mlp = initial_scorers(self.config)
        return linear if self.config.scorer == "linear" else mlp

    def fit_scorer(self, epochs: int = 200, lr: float = 0.05) -> float:
        """Train the configured learned scorer (linear or MLP) by BCE on all outcomes whose expert still has a
        profile, from its seeded initialisation (so the weights depend on the outcomes only, not on how often it
        was refitted); afterwards the router scores with it. Returns the final loss."""
        if self.config.scorer == "cosine":
            return 0.0
        usable = [o for o in self.outcomes if o.expert in self._index]
        if not usable:
            raise RuntimeError("Router.fit_scorer needs outcomes of experts that still have a profile")
        q = self.transform(torch.stack([o.query for o in usable]))
        p = self.normalized_profiles[[self._index[o.expert] for o in usable]]
        y = torch.tensor([float(o.success) for o in usable])
        loss = train_scorer(self._scorer(), self._initial_scorer(), q, p, y, epochs=epochs, lr=lr)
        self.scorer_fitted = True
        return loss

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return router_state(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load_router_state(self, state)

    def save(self, directory: str | os.PathLike) -> Path:
        """`directory/tensors.safetensors` + `directory/state.json` (no pickle)."""
        return save_router(self, directory)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Router:
        return load_router(cls, directory)
