"""Decision rules: from the ranked candidates (expert, score) of a query, reuse / fork / create.

* `threshold`: reuse if score ≥ `reuse_threshold`, fork if ≥ `fork_threshold`, else create;
* `ucb`: score + λ·(mean reward − ½) + c·√(ln(1+N)/(1+nᵢ)) per candidate, then the thresholds (tries rarely
  reused experts);
* `calibrated`: p(reuse succeeds) = σ(a·score + b) fitted by logistic regression on the outcomes; reuse if
  p ≥ `p_reuse`, fork if p ≥ `p_fork`, else create (threshold rule until `min_outcomes` exist; a fitted learned
  scorer's score is that probability itself);
* `adaptive`: reuse if score ≥ τ, where τ falls after a successful reuse and rises after a failed one (the fork
  band keeps its width below τ);
* `bootstrap` (before any rule): while fewer than `bootstrap_experts` exist, create unless the task is a
  near-duplicate (score ≥ `bootstrap_duplicate`), so the library starts diverse.

A rule is a function `(router, candidates) -> RoutingDecision`, looked up in `DECISION_RULES` by
`RouterConfig.decision`; it reads the router (thresholds, counts, rewards, τ, calibration) and changes nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..config import DECISIONS

ACTIONS = ("reuse", "fork", "create")


@dataclass
class RoutingDecision:
    """What to do with a task: `action` in reuse / fork / create; `expert` the one reused or forked."""

    action: str
    expert: str | None
    score: float
    rule: str
    probability: float | None = None
    candidates: list[tuple[str, float]] = field(default_factory=list)


Candidates = list[tuple[str, float]]
Rule = Callable[[Any, Candidates], RoutingDecision]


def by_thresholds(score: float, reuse: float, fork: float) -> str:
    return "reuse" if score >= reuse else "fork" if score >= fork else "create"


def _decision(
    action: str, expert: str, score: float, rule: str, candidates: Candidates, probability: float | None = None
) -> RoutingDecision:
    return RoutingDecision(
        action, None if action == "create" else expert, score, rule, probability=probability, candidates=candidates
    )


def bootstrap(router: Any, candidates: Candidates) -> RoutingDecision | None:
    """While fewer than `bootstrap_experts` exist: reuse a near-duplicate, else create. None afterwards."""
    cfg = router.config
    if len(router.names) >= cfg.bootstrap_experts:
        return None
    best, best_score = candidates[0]
    action = "reuse" if best_score >= cfg.bootstrap_duplicate else "create"
    return _decision(action, best, best_score, "bootstrap", candidates)


def threshold_rule(router: Any, candidates: Candidates) -> RoutingDecision:
    best, best_score = candidates[0]
    reuse_t, fork_t = router.thresholds()
    return _decision(by_thresholds(best_score, reuse_t, fork_t), best, best_score, "threshold", candidates)


def ucb_rule(router: Any, candidates: Candidates) -> RoutingDecision:
    cfg = router.config
    reuse_t, fork_t = router.thresholds()
    total = sum(router.counts.get(n, 0) for n in router.names)
    values = []
    for n, s in candidates:
        c = router.counts.get(n, 0)
        exploit = cfg.ucb_reward_weight * (router.rewards.get(n, 0.0) / c - 0.5) if c else 0.0
        values.append(s + exploit + cfg.ucb_c * math.sqrt(math.log(1 + total) / (1 + c)))
    i = max(range(len(values)), key=values.__getitem__)
    return _decision(by_thresholds(values[i], reuse_t, fork_t), candidates[i][0], values[i], "ucb", candidates)


def calibrated_rule(router: Any, candidates: Candidates) -> RoutingDecision:
    cfg = router.config
    best, best_score = candidates[0]
    if router.learned_scoring:  # the fitted scorer's score is already p(reuse succeeds)
        action = by_thresholds(best_score, cfg.p_reuse, cfg.p_fork)
        return _decision(action, best, best_score, "calibrated(scorer)", candidates, probability=best_score)
    if router.calibration is None:
        action = by_thresholds(best_score, cfg.reuse_threshold, cfg.fork_threshold)
        return _decision(action, best, best_score, "calibrated(uncalibrated)", candidates)
    p = router.reuse_probability(best_score)
    return _decision(by_thresholds(p, cfg.p_reuse, cfg.p_fork), best, best_score, "calibrated", candidates, p)


def adaptive_rule(router: Any, candidates: Candidates) -> RoutingDecision:
    best, best_score = candidates[0]
    reuse_t, fork_t = router.thresholds()
    band = reuse_t - fork_t
    action = by_thresholds(best_score, router.tau, router.tau - band)
    return _decision(action, best, best_score, "adaptive", candidates)


#: `RouterConfig.decision` -> rule
DECISION_RULES: dict[str, Rule] = {
    "threshold": threshold_rule,
    "ucb": ucb_rule,
    "calibrated": calibrated_rule,
    "adaptive": adaptive_rule,
}
assert tuple(DECISION_RULES) == DECISIONS, "every RouterConfig.decision has a rule"
