"""The router's resumable state: profiles, counts, rewards, outcomes, τ, calibration, scorer weights and the
normalisation statistics as safetensors + JSON (versioned; shapes, lengths and finiteness checked before anything
is replaced, so a damaged file fails with its name instead of routing on NaN)."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ...utils.io import StateLoadError, check_tensor, load_state, save_state
from ..config import RouterConfig, faiss_available

ROUTER_STATE_VERSION = 2
#: state versions this version reads (version 1 had no normalisation statistics: it loads with normalize="none")
READABLE_STATE_VERSIONS = (1, 2)


@dataclass
class Outcome:
    """A recorded result: for a task with signature `query`, using `expert` (score `score`) succeeded or not."""

    query: torch.Tensor
    expert: str
    score: float
    success: bool


def _check_version(state: dict[str, Any]) -> int:
    version = state.get("version")
    if version not in READABLE_STATE_VERSIONS:
        raise ValueError(
            f"Router state version={version!r} is not allowed: this version reads {READABLE_STATE_VERSIONS}"
        )
    return version


def router_state(router: Any) -> dict[str, Any]:
    """The state of `router` (tensors and JSON values)."""
    outcomes = router.outcomes
    return {
        "version": ROUTER_STATE_VERSION,
        "config": asdict(router.config),
        "names": list(router.names),
        "profiles": router.profiles.clone(),
        "counts": [router.counts.get(n, 0) for n in router.names],
        "rewards": [router.rewards.get(n, 0.0) for n in router.names],
        "tau": router.tau,
        "calibration": list(router.calibration) if router.calibration is not None else None,
        "n_decisions": router.n_decisions,
        "outcome_queries": torch.stack([o.query for o in outcomes]) if outcomes else torch.zeros(0, router.config.dim),
        "outcome_experts": [o.expert for o in outcomes],
        "outcome_scores": [o.score for o in outcomes],
        "outcome_success": [o.success for o in outcomes],
        "linear": {k: v.detach().clone() for k, v in router.linear.state_dict().items()},
        "mlp": {k: v.detach().clone() for k, v in router.mlp.state_dict().items()},
        "scorer_fitted": router.scorer_fitted,
        "observed": router.standardizer.n,
        "observed_sum": router.standardizer.sum.clone(),
        "observed_sumsq": router.standardizer.sumsq.clone(),
    }


def check_state(state: dict[str, Any], dim: int) -> None:
    """Shapes, finiteness and lengths of a saved state, checked before anything is replaced.

    A NaN profile or query loads silently otherwise and turns every later score into NaN (no expert ever
    reused), far from the file that caused it.
    """
    names = state["names"]
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
        raise StateLoadError(f"Router state names={names!r:.200} is not allowed: expected distinct strings")
    n = len(names)
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


def load_router_state(router: Any, state: dict[str, Any]) -> None:
    """Replace `router`'s state by `state` (checked first)."""
    version = _check_version(state)
    dim = router.config.dim
    if int(state["config"]["dim"]) != dim:
        raise ValueError(f"Router state dim={state['config']['dim']} does not match RouterConfig.dim={dim}")
    check_state(state, dim)
    router.clear_profiles(capacity=len(state["names"]))
    if state["names"]:
        router.add_experts(list(state["names"]), state["profiles"])
    router.counts = {n: int(c) for n, c in zip(router.names, state["counts"], strict=True)}
    router.rewards = {n: float(r) for n, r in zip(router.names, state["rewards"], strict=True)}
    router.tau = float(state["tau"])
    router.calibration = tuple(state["calibration"]) if state["calibration"] is not None else None
    router.n_decisions = int(state["n_decisions"])
    queries = state["outcome_queries"]
    router.outcomes = [
        Outcome(queries[i].float(), e, float(s), bool(ok))
        for i, (e, s, ok) in enumerate(
            zip(state["outcome_experts"], state["outcome_scores"], state["outcome_success"], strict=True)
        )
    ]
    router.linear.load_state_dict(state["linear"])
    router.mlp.load_state_dict(state["mlp"])
    router.scorer_fitted = bool(state.get("scorer_fitted", False))  # older states: never fitted in a run
    if version >= 2:
        router.standardizer.load(state["observed"], state["observed_sum"], state["observed_sumsq"])
    else:  # version 1 kept no statistics
        router.standardizer.reset()
    router.invalidate()


def save_router(router: Any, directory: str | os.PathLike) -> Path:
    """`directory/tensors.safetensors` + `directory/state.json` (no pickle)."""
    save_state(directory, router.state_dict())
    return Path(directory)


def load_router(cls: type, directory: str | os.PathLike) -> Any:
    """A `cls` (Router) rebuilt from its saved config and state; errors name the folder."""
    state = load_state(directory)
    version = _check_version(state)
    config = dict(state["config"])
    if version == 1:  # routed on raw cosine
        config["normalize"] = "none"
    if config.get("index") in ("faiss",) and not faiss_available():
        config["index"] = "exact"
    try:
        router = cls(RouterConfig(**config))
        router.load_state_dict(state)
    except (KeyError, ValueError, TypeError, RuntimeError) as err:  # StateLoadError is a ValueError
        detail = f"missing key {err}" if isinstance(err, KeyError) else f"{type(err).__name__}: {err}"
        raise StateLoadError(f"the router saved in {Path(directory)} cannot be loaded: {detail}") from err
    return router
