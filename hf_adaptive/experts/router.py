"""The router: for a new task's signature, reuse an expert, fork one, or create a new one.

Pieces, each replaceable through `RouterConfig`:

* **normalisation**: signatures from a pretrained backbone share a large common component (the mean-pooled
  hidden states of any two descriptions have cosine ≈ 1.0; measured in docs/results/routing_quality.md), so raw
  cosine barely separates tasks. With `normalize="standardize"` (default) every vector is standardised against
  the population of signatures the router has seen (profiles added and queries recorded): minus the running mean,
  divided by the running per-dimension standard deviation, then re-normalised, before any comparison. The
  statistics are shrunk towards "no normalisation" (mean 0, variance 1/dim) with `normalize_prior`
  pseudo-observations, so a router that has seen one or two signatures behaves like plain cosine. `"center"`
  only subtracts the mean; `"none"` compares the raw unit vectors.
* **search**: nearest experts by cosine over the (normalised) unit-norm profiles. Exact search is one matrix-vector
  product over a preallocated profile matrix (O(N·d): < 1 ms at 10 000 experts of d ≈ 200 on one CPU
  thread, see docs/results/router.md). With `index="faiss"` (or `"auto"` when faiss is installed) a faiss
  index is used instead: exact inner product (`IndexFlatIP`) below `ann_min_experts` experts, an HNSW graph
  (approximate, `hnsw_m` links, `hnsw_ef_search` candidates) from there on. The index is rebuilt lazily after
  profiles change.
* **scorers**: `cosine` (the similarity itself), `linear` (σ(w·(q⊙p) + b), starting as a scaled cosine) and
  `mlp` (on [q⊙p, |q−p|]), the last two trained by `fit_scorer` on recorded outcomes (did reusing that
  expert for that task keep accuracy?). `record_outcome` refits them from all outcomes as soon as there are
  `min_outcomes` of them with both a success and a failure; until then (`scorer_fitted` False) the router scores
  by cosine, since an untrained scorer's output means nothing against the thresholds. A fitted learned scorer
  gives p(reuse succeeds) and re-ranks the `top_k` nearest experts; its score is compared with the probability
  thresholds `p_reuse` / `p_fork` instead of the cosine thresholds (rules `threshold`, `ucb`, `adaptive`'s band;
  `calibrated` takes it as the probability itself).
* **decisions**:
  - `threshold`: reuse if score ≥ `reuse_threshold`, fork if ≥ `fork_threshold`, else create;
  - `ucb`: score + λ·(mean reward − ½) + c·√(ln(1+N)/(1+nᵢ)) per candidate, then the thresholds (tries
    rarely reused experts);
  - `calibrated`: p(reuse succeeds) = σ(a·score + b) fitted by logistic regression on the outcomes; reuse if
    p ≥ `p_reuse`, fork if p ≥ `p_fork`, else create (threshold rule until `min_outcomes` exist);
  - `adaptive`: reuse if score ≥ τ, where τ falls after a successful reuse and rises after a failed one;
  - **bootstrap** (any rule): while fewer than `bootstrap_experts` exist, create unless the task is a
    near-duplicate (score ≥ `bootstrap_duplicate`), so the library starts diverse.
* **state**: profiles, counts, rewards, outcomes, τ, calibration and scorer weights as safetensors + JSON
  (versioned, checked on load).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..utils.io import load_state, save_state

ROUTER_STATE_VERSION = 2
#: state versions this version reads (version 1 had no normalisation statistics: it loads with normalize="none")
READABLE_STATE_VERSIONS = (1, 2)
SCORERS = ("cosine", "linear", "mlp")
DECISIONS = ("threshold", "ucb", "calibrated", "adaptive")
INDEXES = ("exact", "faiss", "auto")
ACTIONS = ("reuse", "fork", "create")
NORMALIZATIONS = ("none", "center", "standardize")


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class RouterConfig:
    """Router settings (see the module docstring for what each rule does)."""

    dim: int
    scorer: str = "cosine"
    decision: str = "threshold"
    normalize: str = "standardize"
    normalize_prior: float = 0.5
    # thresholds on the standardised cosine (recurring tasks score ≈ 0.5-0.9, different ones ≈ 0;
    # with normalize="none" raw cosines are much higher: use e.g. 0.9 / 0.75)
    reuse_threshold: float = 0.5
    fork_threshold: float = 0.3
    ucb_c: float = 0.1
    ucb_reward_weight: float = 0.2
    p_reuse: float = 0.5
    p_fork: float = 0.25
    min_outcomes: int = 4
    tau_init: float = 0.5
    tau_lr: float = 0.1
    tau_min: float = 0.2
    tau_max: float = 0.9
    bootstrap_experts: int = 0
    bootstrap_duplicate: float = 0.9
    top_k: int = 8
    index: str = "exact"
    mlp_hidden: int = 32
    ann_min_experts: int = 4096
    hnsw_m: int = 32
    hnsw_ef_search: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        def bad(name: str, allowed: str) -> ValueError:
            return ValueError(f"RouterConfig.{name}={getattr(self, name)!r} is not allowed: {allowed}")

        if not isinstance(self.dim, int) or self.dim < 1:
            raise bad("dim", "an integer >= 1 (the signature dimension)")
        if self.scorer not in SCORERS:
            raise bad("scorer", f"one of {SCORERS}")
        if self.decision not in DECISIONS:
            raise bad("decision", f"one of {DECISIONS}")
        if self.normalize not in NORMALIZATIONS:
            raise bad("normalize", f"one of {NORMALIZATIONS}")
        if not (isinstance(self.normalize_prior, (int, float)) and self.normalize_prior > 0):
            raise bad("normalize_prior", "a number > 0 (pseudo-observations of the no-normalisation prior)")
        if self.index not in INDEXES:
            raise bad("index", f"one of {INDEXES}")
        if self.index == "faiss" and not faiss_available():
            raise bad("index", "'faiss' needs faiss installed (pip install faiss-cpu); use 'exact' or 'auto'")
        if not -1.0 <= self.reuse_threshold <= 1.0:
            raise bad("reuse_threshold", "in [-1, 1] (a cosine similarity)")
        if not -1.0 <= self.fork_threshold <= self.reuse_threshold <= 1.0:
            raise bad("fork_threshold", f"-1 <= fork_threshold <= reuse_threshold ({self.reuse_threshold}) <= 1")
        if not 0.0 <= self.p_fork <= self.p_reuse <= 1.0:
            raise bad("p_fork", f"0 <= p_fork <= p_reuse ({self.p_reuse}) <= 1")
        if not self.tau_min <= self.tau_init <= self.tau_max:
            raise bad("tau_init", f"in [tau_min, tau_max] = [{self.tau_min}, {self.tau_max}]")
        if not 0.0 < self.tau_lr <= 1.0:
            raise bad("tau_lr", "in (0, 1]")
        if self.ucb_c < 0:
            raise bad("ucb_c", ">= 0")
        if not isinstance(self.bootstrap_experts, int) or self.bootstrap_experts < 0:
            raise bad("bootstrap_experts", "an integer >= 0")
        if not isinstance(self.top_k, int) or self.top_k < 1:
            raise bad("top_k", "an integer >= 1")
        if not isinstance(self.min_outcomes, int) or self.min_outcomes < 1:
            raise bad("min_outcomes", "an integer >= 1")
        if not isinstance(self.mlp_hidden, int) or self.mlp_hidden < 1:
            raise bad("mlp_hidden", "an integer >= 1")
        for name in ("ann_min_experts", "hnsw_m", "hnsw_ef_search"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise bad(name, "an integer >= 1")


@dataclass
class RoutingDecision:
    """What to do with a task: `action` in reuse / fork / create; `expert` the one reused or forked."""

    action: str
    expert: str | None
    score: float
    rule: str
    probability: float | None = None
    candidates: list[tuple[str, float]] = field(default_factory=list)


@dataclass
class Outcome:
    """A recorded result: for a task with signature `query`, using `expert` (score `score`) succeeded or not."""

    query: torch.Tensor
    expert: str
    score: float
    success: bool


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


class Router:
    """Expert profiles, nearest-expert search, scorers and decision rules, with resumable state."""

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
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.linear = LinearScorer(config.dim, init_threshold=config.reuse_threshold)
            self.mlp = MLPScorer(config.dim, config.mlp_hidden)
        #: True once a learned scorer was trained on outcomes; before that `scores` falls back to cosine
        self.scorer_fitted = False
        self._faiss = None
        self._faiss_dirty = True
        # population statistics for the normalisation (float64 running sums of observed unit vectors)
        self._obs_n = 0
        self._obs_sum = torch.zeros(config.dim, dtype=torch.float64)
        self._obs_sumsq = torch.zeros(config.dim, dtype=torch.float64)
        self._normalized: torch.Tensor | None = None
        self._stats: tuple[torch.Tensor, torch.Tensor] | None = None

    def _invalidate(self) -> None:
        """Profiles or statistics changed: the normalised profile matrix and the faiss index are rebuilt lazily."""
        self._normalized = None
        self._stats = None
        self._faiss_dirty = True

    # ------------------------------------------------------------------ normalisation
    @property
    def n_observed(self) -> int:
        """How many signatures the normalisation statistics are made of."""
        return self._obs_n

    def observe(self, vectors: torch.Tensor) -> None:
        """Add signatures (one vector or a (n, dim) matrix; unit-normalised here) to the normalisation statistics."""
        v = torch.as_tensor(vectors, dtype=torch.float32)
        v = v.unsqueeze(0) if v.ndim == 1 else v
        if v.ndim != 2 or v.size(1) != self.config.dim:
            raise ValueError(f"signatures of shape {tuple(v.shape)} do not match RouterConfig.dim={self.config.dim}")
        v = (v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)).double()
        self._obs_n += v.size(0)
        self._obs_sum += v.sum(0)
        self._obs_sumsq += (v * v).sum(0)
        self._invalidate()

    def normalization(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, 1/std) applied before comparisons: the observed statistics shrunk towards (0, 1/dim).

        With n observed signatures and k = `normalize_prior`: mean = Σx / (n + k) and
        var = (n·var̂ + k/dim) / (n + k), var̂ the observed per-dimension variance.
        """
        if self._stats is not None:
            return self._stats
        cfg, d, n, k = self.config, self.config.dim, self._obs_n, float(self.config.normalize_prior)
        mean = self._obs_sum / (n + k)
        if cfg.normalize == "none":
            mean = torch.zeros_like(mean)
        if cfg.normalize != "standardize":
            self._stats = (mean.float(), torch.ones(d))
            return self._stats
        var_hat = (self._obs_sumsq / n - (self._obs_sum / n) ** 2).clamp_min(0.0) if n else torch.zeros_like(mean)
        var = (n * var_hat + k / d) / (n + k)
        self._stats = (mean.float(), var.rsqrt().float())
        return self._stats

    def transform(self, vectors: torch.Tensor) -> torch.Tensor:
        """Unit vectors normalised as the router compares them (identity for `normalize="none"`)."""
        v = torch.as_tensor(vectors, dtype=torch.float32)
        if self.config.normalize == "none":
            return v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        mean, scale = self.normalization()
        z = (v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12) - mean) * scale
        return z / z.norm(dim=-1, keepdim=True).clamp_min(1e-12)

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
        self._invalidate()

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
        self._invalidate()

    # ------------------------------------------------------------------ search and scores
    def _use_faiss(self) -> bool:
        return self.config.index == "faiss" or (self.config.index == "auto" and faiss_available())

    def nearest(self, query: torch.Tensor, k: int | None = None) -> tuple[list[str], torch.Tensor]:
        """The `k` experts of highest (normalised) cosine similarity to `query` (names, similarities), best first."""
        return self._nearest_normalized(self.transform(self._check_vector(query)), k)

    def _nearest_normalized(self, q: torch.Tensor, k: int | None) -> tuple[list[str], torch.Tensor]:
        """`nearest` for a query already normalised as the profiles are (`transform`)."""
        n = len(self.names)
        if n == 0:
            return [], torch.zeros(0)
        k = min(k or self.config.top_k, n)
        if self._use_faiss():
            import faiss

            if self._faiss is None or self._faiss_dirty:
                if n >= self.config.ann_min_experts:
                    index = faiss.IndexHNSWFlat(self.config.dim, self.config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
                    index.hnsw.efSearch = max(self.config.hnsw_ef_search, k)
                else:
                    index = faiss.IndexFlatIP(self.config.dim)
                index.add(self.normalized_profiles.contiguous().numpy())
                self._faiss, self._faiss_dirty = index, False
            sims, idx = self._faiss.search(q.numpy()[None, :], k)
            return [self.names[int(i)] for i in idx[0]], torch.from_numpy(sims[0]).float()
        sims = self.normalized_profiles @ q
        top = torch.topk(sims, k)
        return [self.names[int(i)] for i in top.indices], top.values

    @property
    def learned_scoring(self) -> bool:
        """Whether scores are a fitted learned scorer's p(reuse succeeds) (else cosine similarities)."""
        return self.config.scorer != "cosine" and self.scorer_fitted

    def scores(self, query: torch.Tensor) -> tuple[list[str], torch.Tensor]:
        """Candidates and their scores under the configured scorer (a fitted learned scorer re-ranks the top-k;
        an unfitted one is not used: cosine, so that the cosine thresholds keep their meaning)."""
        q = self.transform(self._check_vector(query))
        names, sims = self._nearest_normalized(q, None)
        if not self.learned_scoring or not names:
            return names, sims
        profiles = self.normalized_profiles[[self._index[n] for n in names]]
        with torch.no_grad():
            scorer = self.linear if self.config.scorer == "linear" else self.mlp
            s = scorer(q.unsqueeze(0), profiles)
        order = torch.argsort(s, descending=True)
        return [names[int(i)] for i in order], s[order]

    # ------------------------------------------------------------------ decisions
    def _by_thresholds(self, score: float, reuse: float, fork: float) -> str:
        return "reuse" if score >= reuse else "fork" if score >= fork else "create"

    def thresholds(self) -> tuple[float, float]:
        """(reuse, fork) thresholds on the current score scale: the cosine ones, or `p_reuse` / `p_fork` once a
        learned scorer gives probabilities."""
        cfg = self.config
        return (cfg.p_reuse, cfg.p_fork) if self.learned_scoring else (cfg.reuse_threshold, cfg.fork_threshold)

    def route(self, query: torch.Tensor) -> RoutingDecision:
        """Decide reuse / fork / create for a task with signature `query` (does not change the state)."""
        cfg = self.config
        reuse_t, fork_t = self.thresholds()
        names, scores = self.scores(query)
        candidates = list(zip(names, [float(s) for s in scores], strict=True))
        if not names:
            return RoutingDecision("create", None, float("-inf"), "empty", candidates=candidates)
        best, best_score = names[0], float(scores[0])
        if len(self.names) < cfg.bootstrap_experts:
            action = "reuse" if best_score >= cfg.bootstrap_duplicate else "create"
            return RoutingDecision(
                action, best if action == "reuse" else None, best_score, "bootstrap", candidates=candidates
            )
        if cfg.decision == "threshold":
            action = self._by_thresholds(best_score, reuse_t, fork_t)
            return RoutingDecision(
                action, None if action == "create" else best, best_score, "threshold", candidates=candidates
            )
        if cfg.decision == "ucb":
            total = sum(self.counts.get(n, 0) for n in self.names)
            values = []
            for n, s in candidates:
                c = self.counts.get(n, 0)
                exploit = cfg.ucb_reward_weight * (self.rewards.get(n, 0.0) / c - 0.5) if c else 0.0
                values.append(s + exploit + cfg.ucb_c * math.sqrt(math.log(1 + total) / (1 + c)))
            i = max(range(len(values)), key=values.__getitem__)
            action = self._by_thresholds(values[i], reuse_t, fork_t)
            return RoutingDecision(
                action, None if action == "create" else names[i], values[i], "ucb", candidates=candidates
            )
        if cfg.decision == "calibrated":
            if self.learned_scoring:  # the fitted scorer's score is already p(reuse succeeds)
                action = self._by_thresholds(best_score, cfg.p_reuse, cfg.p_fork)
                return RoutingDecision(
                    action,
                    None if action == "create" else best,
                    best_score,
                    "calibrated(scorer)",
                    probability=best_score,
                    candidates=candidates,
                )
            if self.calibration is None:
                action = self._by_thresholds(best_score, cfg.reuse_threshold, cfg.fork_threshold)
                return RoutingDecision(
                    action,
                    None if action == "create" else best,
                    best_score,
                    "calibrated(uncalibrated)",
                    candidates=candidates,
                )
            p = self.reuse_probability(best_score)
            action = self._by_thresholds(p, cfg.p_reuse, cfg.p_fork)
            return RoutingDecision(
                action,
                None if action == "create" else best,
                best_score,
                "calibrated",
                probability=p,
                candidates=candidates,
            )
        # adaptive threshold: the fork band keeps its width below τ
        band = reuse_t - fork_t
        action = self._by_thresholds(best_score, self.tau, self.tau - band)
        return RoutingDecision(
            action, None if action == "create" else best, best_score, "adaptive", candidates=candidates
        )

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
        cfg = self.config
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            linear = LinearScorer(cfg.dim, init_threshold=cfg.reuse_threshold)
            mlp = MLPScorer(cfg.dim, cfg.mlp_hidden)
        return linear if cfg.scorer == "linear" else mlp

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
        scorer = self.linear if self.config.scorer == "linear" else self.mlp
        scorer.load_state_dict(self._initial_scorer().state_dict())
        opt = torch.optim.Adam(scorer.parameters(), lr=lr)
        loss = torch.tensor(0.0)
        with torch.enable_grad():
            for _ in range(epochs):
                opt.zero_grad()
                loss = torch.nn.functional.binary_cross_entropy(scorer(q, p).clamp(1e-6, 1 - 1e-6), y)
                loss.backward()
                opt.step()
        self.scorer_fitted = True
        return float(loss.detach())

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        outcomes = self.outcomes
        return {
            "version": ROUTER_STATE_VERSION,
            "config": asdict(self.config),
            "names": list(self.names),
            "profiles": self.profiles.clone(),
            "counts": [self.counts.get(n, 0) for n in self.names],
            "rewards": [self.rewards.get(n, 0.0) for n in self.names],
            "tau": self.tau,
            "calibration": list(self.calibration) if self.calibration is not None else None,
            "n_decisions": self.n_decisions,
            "outcome_queries": torch.stack([o.query for o in outcomes])
            if outcomes
            else torch.zeros(0, self.config.dim),
            "outcome_experts": [o.expert for o in outcomes],
            "outcome_scores": [o.score for o in outcomes],
            "outcome_success": [o.success for o in outcomes],
            "linear": {k: v.detach().clone() for k, v in self.linear.state_dict().items()},
            "mlp": {k: v.detach().clone() for k, v in self.mlp.state_dict().items()},
            "scorer_fitted": self.scorer_fitted,
            "observed": self._obs_n,
            "observed_sum": self._obs_sum.clone(),
            "observed_sumsq": self._obs_sumsq.clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        version = state.get("version")
        if version not in READABLE_STATE_VERSIONS:
            raise ValueError(
                f"Router state version={version!r} is not allowed: this version reads {READABLE_STATE_VERSIONS}"
            )
        if int(state["config"]["dim"]) != self.config.dim:
            raise ValueError(
                f"Router state dim={state['config']['dim']} does not match RouterConfig.dim={self.config.dim}"
            )
        self._check_state(state)
        self.names, self._index = [], {}
        self._profiles = torch.zeros(max(16, len(state["names"])), self.config.dim)
        self.counts, self.rewards = {}, {}
        if state["names"]:
            self.add_experts(list(state["names"]), state["profiles"])
        self.counts = {n: int(c) for n, c in zip(self.names, state["counts"], strict=True)}
        self.rewards = {n: float(r) for n, r in zip(self.names, state["rewards"], strict=True)}
        self.tau = float(state["tau"])
        self.calibration = tuple(state["calibration"]) if state["calibration"] is not None else None
        self.n_decisions = int(state["n_decisions"])
        queries = state["outcome_queries"]
        self.outcomes = [
            Outcome(queries[i].float(), e, float(s), bool(ok))
            for i, (e, s, ok) in enumerate(
                zip(state["outcome_experts"], state["outcome_scores"], state["outcome_success"], strict=True)
            )
        ]
        self.linear.load_state_dict(state["linear"])
        self.mlp.load_state_dict(state["mlp"])
        self.scorer_fitted = bool(state.get("scorer_fitted", False))  # older states: never fitted in a run
        if version >= 2:
            self._obs_n = int(state["observed"])
            self._obs_sum = state["observed_sum"].double().clone()
            self._obs_sumsq = state["observed_sumsq"].double().clone()
        else:  # version 1 kept no statistics
            self._obs_n = 0
            self._obs_sum = torch.zeros(self.config.dim, dtype=torch.float64)
            self._obs_sumsq = torch.zeros(self.config.dim, dtype=torch.float64)
        self._invalidate()

    def _check_state(self, state: dict[str, Any]) -> None:
        """Shapes, finiteness and lengths of a saved state, checked before anything is replaced.

        A NaN profile or query loads silently otherwise and turns every later score into NaN (no expert ever
        reused), far from the file that caused it.
        """
        from ..utils.io import StateLoadError, check_tensor

        names = state["names"]
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
            raise StateLoadError(f"Router state names={names!r:.200} is not allowed: expected distinct strings")
        n, dim = len(names), self.config.dim
        check_tensor("Router state profiles", state["profiles"], (n, dim))
        for key in ("counts", "rewards"):
            if len(state[key]) != n:
                raise StateLoadError(
                    f"Router state {key} has {len(state[key])} entries, which is not allowed: one per expert ({n})"
                )
        if not math.isfinite(float(state["tau"])):
            raise StateLoadError(f"Router state tau={state['tau']!r} is not allowed: expected a finite number")
        n_out = len(state["outcome_experts"])
        check_tensor("Router state outcome_queries", state["outcome_queries"], (n_out, dim))
        if not all(math.isfinite(float(x)) for x in state["outcome_scores"]):
            raise StateLoadError("Router state outcome_scores holds NaN/inf, which is not allowed: expected finite")
        for part in ("linear", "mlp"):
            for key, tensor in state[part].items():
                check_tensor(f"Router state {part}.{key}", tensor)
        if state.get("version", 1) >= 2:
            for key in ("observed_sum", "observed_sumsq"):
                check_tensor(f"Router state {key}", state[key], (dim,))

    def save(self, directory: str | os.PathLike) -> Path:
        """`directory/tensors.safetensors` + `directory/state.json` (no pickle)."""
        save_state(directory, self.state_dict())
        return Path(directory)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Router:
        state = load_state(directory)
        version = state.get("version")
        if version not in READABLE_STATE_VERSIONS:
            raise ValueError(
                f"Router state version={version!r} is not allowed: this version reads {READABLE_STATE_VERSIONS}"
            )
        config = dict(state["config"])
        if version == 1:  # routed on raw cosine
            config["normalize"] = "none"
        if config.get("index") in ("faiss",) and not faiss_available():
            config["index"] = "exact"
        from ..utils.io import StateLoadError

        try:
            router = cls(RouterConfig(**config))
            router.load_state_dict(state)
        except (KeyError, ValueError, TypeError, RuntimeError) as err:  # StateLoadError is a ValueError
            detail = f"missing key {err}" if isinstance(err, KeyError) else f"{type(err).__name__}: {err}"
            raise StateLoadError(f"the router saved in {Path(directory)} cannot be loaded: {detail}") from err
        return router
