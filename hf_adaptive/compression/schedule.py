"""The Zhu & Gupta cubic sparsity schedule and the magnitude masks it prunes to, as pure functions.

Schedule ("To prune, or not to prune", Zhu & Gupta 2017): pruning updates happen at the optimizer steps
t = t0 + kΔt, k = 0..n, and the update at t prunes to

    s_t = s_f + (s_i − s_f)(1 − (t − t0)/(nΔt))³

so the sparsity rises fast while many redundant weights remain and slowly near s_f. Between two updates the
sparsity stays at the last update's value; before t0 nothing is scheduled (0), from t0 + nΔt on s_f holds.
`torch.ao.pruning`'s `CubicSL` implements the same curve on its own sparsifier objects; this is the formula alone,
so the plugin can keep plain masks (see `gradual_pruning`).

Masks are keep-masks (True = kept, the convention of `torch.nn.utils.prune`), chosen by ranking non-negative
scores (|w| for single weights, a channel's L2 norm for whole MLP channels) per tensor ("layer" scope) or over all
tensors together ("global"). Given the current masks, the ranking puts every pruned entry below every live one and
never prunes fewer than now: the masks only grow.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch


def update_index(step: int, begin_step: int, frequency: int) -> int | None:
    """k when `step` = t0 + kΔt for some k >= 0 (a point of the update grid, also past the ramp), else None."""
    if step < begin_step or (step - begin_step) % frequency:
        return None
    return (step - begin_step) // frequency


def cubic_sparsity(step: int, initial: float, final: float, begin_step: int, num_updates: int, frequency: int) -> float:
    """The sparsity scheduled at optimizer step `step`: 0 before t0, else s_t of the last update t0 + kΔt <= step
    (k capped at n, so s_f from t0 + nΔt on)."""
    if step < begin_step:
        return 0.0
    k = min((step - begin_step) // frequency, num_updates)
    return final + (initial - final) * (1.0 - k / num_updates) ** 3


def prune_count(sparsity: float, numel: int) -> int:
    """How many of `numel` entries a sparsity prunes: round(sparsity · numel), halves up (the achieved sparsity is
    within 0.5 / numel of the scheduled one)."""
    return min(numel, int(math.floor(sparsity * numel + 0.5)))


def _ranked(scores: torch.Tensor, keep: torch.Tensor | None) -> tuple[torch.Tensor, int]:
    """Flat float scores with the entries `keep` prunes set to -1 (below every score >= 0), and how many those are."""
    flat = scores.detach().reshape(-1).float()
    if keep is None:
        return flat, 0
    pruned = ~keep.reshape(-1).to(flat.device)
    return flat.masked_fill(pruned, -1.0), int(pruned.sum())


def _keep_all_but(flat: torch.Tensor, count: int) -> torch.Tensor:
    """A flat keep-mask that prunes the `count` lowest entries of `flat`."""
    mask = torch.ones(flat.numel(), dtype=torch.bool, device=flat.device)
    if count:
        mask[torch.topk(flat, count, largest=False, sorted=False).indices] = False
    return mask


def lowest_masks(
    scores: Mapping[str, torch.Tensor],
    sparsity: float,
    scope: str,
    keep: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Keep-masks (shaped like each score tensor) that prune the lowest scores to `sparsity`.

    `scope`: "layer" prunes `prune_count(sparsity, numel)` of every tensor; "global" prunes
    `prune_count(sparsity, total)` of all entries ranked together. `keep`: the current masks (by the same names;
    a name it lacks has nothing pruned): what they prune stays pruned, and no fewer entries are pruned than now.
    """
    if scope not in ("layer", "global"):
        raise ValueError(f"lowest_masks: scope={scope!r} is not allowed: choose one of ['layer', 'global']")
    keep = keep or {}
    if scope == "layer":  # one tensor at a time: a single float copy in memory
        out = {}
        for name, score in scores.items():
            flat, pruned = _ranked(score, keep.get(name))
            count = max(prune_count(sparsity, flat.numel()), pruned)
            out[name] = _keep_all_but(flat, count).reshape(score.shape)
        return out
    ranked = {name: _ranked(s, keep.get(name)) for name, s in scores.items()}
    if not ranked:
        return {}
    names = list(ranked)
    device = ranked[names[0]][0].device
    flat = torch.cat([ranked[n][0].to(device) for n in names])
    count = max(prune_count(sparsity, flat.numel()), sum(ranked[n][1] for n in names))
    parts = _keep_all_but(flat, count).split([ranked[n][0].numel() for n in names])
    return {n: part.reshape(scores[n].shape).to(scores[n].device) for n, part in zip(names, parts)}


def magnitude_masks(
    weights: Mapping[str, torch.Tensor],
    sparsity: float,
    scope: str,
    keep: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Unstructured magnitude pruning: keep-masks that prune the smallest |w| (see `lowest_masks`).

    Memory: "layer" holds one float copy of one weight at a time; "global" ranks one float copy of all of them.
    """
    keep = keep or {}
    if scope == "layer":
        out: dict[str, torch.Tensor] = {}
        for name, w in weights.items():
            current = {name: keep[name]} if name in keep else None
            out.update(lowest_masks({name: w.detach().abs()}, sparsity, scope, current))
        return out
    return lowest_masks({name: w.detach().abs() for name, w in weights.items()}, sparsity, scope, keep)


def channel_scores(rows: Sequence[torch.Tensor], cols: Sequence[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of each intermediate channel c of an MLP: sqrt(Σ_rows ||W[c, :]||² + Σ_cols ||W[:, c]||²),
    `rows` the matrices (or biases) whose rows are channels (gate_proj, up_proj), `cols` those whose columns are
    (down_proj)."""
    squares = [r.detach().float().pow(2).reshape(r.shape[0], -1).sum(dim=1) for r in rows]
    squares += [c.detach().float().pow(2).sum(dim=0) for c in cols]
    device = squares[0].device
    return torch.stack([s.to(device) for s in squares]).sum(dim=0).sqrt()


__all__ = ["channel_scores", "cubic_sparsity", "lowest_masks", "magnitude_masks", "prune_count", "update_index"]
