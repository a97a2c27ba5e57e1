"""The cubic schedule and the masks, against slow obvious references (loops and sorted Python lists)."""

from __future__ import annotations

import pytest
import torch

from hf_adaptive.compression.schedule import (
    channel_scores,
    cubic_sparsity,
    lowest_masks,
    magnitude_masks,
    prune_count,
    update_index,
)

SCHEDULES = [
    # (s_i, s_f, t0, n, Δt)
    (0.0, 0.8, 3, 4, 5),
    (0.2, 0.9, 0, 3, 1),
    (0.1, 0.6, 7, 1, 4),
    (0.5, 0.5, 2, 2, 3),  # s_i = s_f: a one-shot prune at t0, held after
]


def _reference(step, s_i, s_f, t0, n, dt):
    """Zhu & Gupta written out: the last update point t0 + kΔt <= step (k <= n) found by walking the grid."""
    if step < t0:
        return 0.0
    last = t0
    for k in range(n + 1):
        if t0 + k * dt <= step:
            last = t0 + k * dt
    return s_f + (s_i - s_f) * (1 - (last - t0) / (n * dt)) ** 3


@pytest.mark.parametrize(("s_i", "s_f", "t0", "n", "dt"), SCHEDULES)
def test_the_schedule_equals_the_formula_at_every_step(s_i, s_f, t0, n, dt):
    end = t0 + n * dt
    for step in range(end + 3 * dt + 2):
        assert cubic_sparsity(step, s_i, s_f, t0, n, dt) == pytest.approx(_reference(step, s_i, s_f, t0, n, dt))
    # at the update points the formula itself, read at t
    for k in range(n + 1):
        t = t0 + k * dt
        expected = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt)) ** 3
        assert cubic_sparsity(t, s_i, s_f, t0, n, dt) == pytest.approx(expected)
    if t0:  # nothing scheduled before t0
        assert cubic_sparsity(t0 - 1, s_i, s_f, t0, n, dt) == 0.0
    assert cubic_sparsity(t0, s_i, s_f, t0, n, dt) == pytest.approx(s_i)
    assert cubic_sparsity(end, s_i, s_f, t0, n, dt) == pytest.approx(s_f)
    assert cubic_sparsity(end + 100 * dt + 1, s_i, s_f, t0, n, dt) == pytest.approx(s_f)
    # between two updates the value of the last one holds, and the schedule never decreases from t0 on
    values = [cubic_sparsity(t, s_i, s_f, t0, n, dt) for t in range(t0, end + dt)]
    assert all(a <= b + 1e-12 for a, b in zip(values, values[1:]))
    if dt > 1:
        assert cubic_sparsity(t0 + dt - 1, s_i, s_f, t0, n, dt) == pytest.approx(s_i)


def test_the_schedule_front_loads_the_pruning():
    """Cubic: half of the ramp prunes 7/8 of the way from s_i to s_f."""
    assert cubic_sparsity(2, 0.0, 0.8, 0, 4, 1) == pytest.approx(0.8 * (1 - 0.5**3))


@pytest.mark.parametrize(("t0", "dt"), [(0, 1), (3, 4), (5, 2)])
def test_update_index_marks_the_grid(t0, dt):
    for step in range(40):
        expected = next((k for k in range(40) if t0 + k * dt == step), None)
        assert update_index(step, t0, dt) == expected


def test_prune_count_rounds_halves_up():
    assert [prune_count(0.5, n) for n in (1, 2, 3, 4)] == [1, 1, 2, 2]
    assert prune_count(0.25, 10) == 3  # 2.5 -> 3
    assert prune_count(0.0, 7) == 0 and prune_count(0.99, 10) == 10
    for n in (1, 7, 64, 1000):
        for s in (0.0, 0.1, 0.33, 0.5, 0.9):
            assert abs(prune_count(s, n) / n - s) <= 0.5 / n + 1e-12


def _weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "a": torch.randn(6, 5, generator=g),
        "b": torch.randn(4, 8, generator=g) * 3,
        "c": torch.randn(7, generator=g),
    }


def _sorted_positions(values):
    """Positions of a flat list sorted by value (the slow reference of a ranking; random floats have no ties)."""
    return [i for _, i in sorted((v, i) for i, v in enumerate(values))]


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9])
def test_layer_masks_prune_the_smallest_magnitudes_of_each_tensor(sparsity):
    weights = _weights()
    masks = magnitude_masks(weights, sparsity, "layer")
    for name, w in weights.items():
        flat = w.abs().reshape(-1).tolist()
        pruned = set(_sorted_positions(flat)[: prune_count(sparsity, len(flat))])
        expected = [i not in pruned for i in range(len(flat))]
        assert masks[name].dtype == torch.bool and masks[name].shape == w.shape
        assert masks[name].reshape(-1).tolist() == expected


@pytest.mark.parametrize("sparsity", [0.2, 0.6])
def test_global_masks_rank_all_tensors_together(sparsity):
    weights = _weights()
    masks = magnitude_masks(weights, sparsity, "global")
    entries = [(abs(v), name, i) for name, w in weights.items() for i, v in enumerate(w.reshape(-1).tolist())]
    pruned = {(name, i) for _, name, i in sorted(entries)[: prune_count(sparsity, len(entries))]}
    for name, w in weights.items():
        expected = [(name, i) not in pruned for i in range(w.numel())]
        assert masks[name].reshape(-1).tolist() == expected
    # "b" is three times larger: a global ranking prunes it less than the scheduled fraction, "a" more
    fraction = {n: float((~m).float().mean()) for n, m in masks.items()}
    assert fraction["b"] < sparsity < fraction["a"]


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_current_masks_only_grow(scope):
    """Entries already pruned stay pruned even when they are now the largest; the new ones are the smallest of the
    live entries; fewer than the current count is never pruned."""
    weights = _weights(1)
    old = magnitude_masks(weights, 0.3, scope)
    regrown = {n: torch.where(old[n], w, torch.full_like(w, 100.0)) for n, w in weights.items()}
    new = magnitude_masks(regrown, 0.5, scope, old)
    for name in weights:
        assert not (new[name] & ~old[name]).any()  # nothing pruned comes back
    if scope == "layer":
        for name, w in regrown.items():
            flat = w.abs().reshape(-1).tolist()
            live = [i for i in range(len(flat)) if old[name].reshape(-1)[i]]
            extra = prune_count(0.5, len(flat)) - (len(flat) - len(live))
            chosen = set(sorted(live, key=lambda i: flat[i])[:extra])
            expected = [bool(old[name].reshape(-1)[i]) and i not in chosen for i in range(len(flat))]
            assert new[name].reshape(-1).tolist() == expected
    else:
        total = sum(w.numel() for w in weights.values())
        assert sum(int((~m).sum()) for m in new.values()) == prune_count(0.5, total)
    # a lower target keeps what is pruned; without the current masks (regrowth) the large entries come back
    assert all(torch.equal(a, b) for a, b in zip(magnitude_masks(regrown, 0.1, scope, old).values(), old.values()))
    free = magnitude_masks(regrown, 0.5, scope)
    assert all(bool(free[n][~old[n]].all()) for n in weights)


def test_a_name_the_current_masks_lack_has_nothing_pruned_yet():
    weights = _weights(2)
    old = {"a": magnitude_masks({"a": weights["a"]}, 0.5, "layer")["a"]}
    new = magnitude_masks(weights, 0.2, "layer", old)
    assert torch.equal(new["a"], old["a"])  # already past the target
    assert int((~new["b"]).sum()) == prune_count(0.2, weights["b"].numel())


def test_channel_scores_are_the_joint_l2_norm_of_a_channel():
    g = torch.Generator().manual_seed(0)
    gate, up, bias, down = (
        torch.randn(6, 4, generator=g),
        torch.randn(6, 4, generator=g),
        torch.randn(6, generator=g),
        torch.randn(4, 6, generator=g),
    )
    scores = channel_scores([gate, up, bias], [down])
    for c in range(6):
        total = sum(v * v for v in gate[c].tolist() + up[c].tolist() + [bias[c].item()] + down[:, c].tolist())
        assert scores[c].item() == pytest.approx(total**0.5, rel=1e-6)
    keep = lowest_masks({"mlp": scores}, 0.5, "layer")["mlp"]
    assert keep.tolist() == [c not in set(_sorted_positions(scores.tolist())[:3]) for c in range(6)]


def test_an_unknown_scope_is_refused():
    with pytest.raises(ValueError, match=r"scope='row' is not allowed"):
        lowest_masks({"a": torch.ones(3)}, 0.5, "row")
