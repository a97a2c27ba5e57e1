"""The controller's reward (tanh of relative improvement + efficiency, EMA) and the Pareto archive."""

from __future__ import annotations

import math
import random

import pytest
import torch

from hf_adaptive.control.pareto import ParetoArchive
from hf_adaptive.control.rewards import RewardTracker, gate_reward
from hf_adaptive.utils.io import load_state, save_state


def test_gate_reward_formula():
    assert gate_reward(2.0, 1.5, 0.25, 0.4) == pytest.approx(math.tanh(0.5 / 2.0 + 0.4 * 0.25))
    assert gate_reward(1.0, 1.2, 0.0, 1.0) == pytest.approx(math.tanh(-0.2))
    # relative: the same 10% change gives the same reward at any loss scale
    assert gate_reward(10.0, 9.0, 0.5, 0.2) == pytest.approx(gate_reward(0.1, 0.09, 0.5, 0.2))
    assert -1 < gate_reward(1.0, 3.0, 0.0, 0.0) < 0 < gate_reward(4.0, 2.0, 1.0, 1.0) < 1
    assert gate_reward(1.0, 1e6, 0.0, 0.0) >= -1.0  # bounded even for absurd losses
    with pytest.raises(ValueError, match="pruned_fraction"):
        gate_reward(1.0, 1.0, 1.5, 0.1)
    with pytest.raises(ValueError, match="current_loss"):
        gate_reward(1.0, float("nan"), 0.5, 0.1)


def test_reward_tracker_ema_matches_manual_recurrence():
    tracker = RewardTracker(efficiency_factor=0.3, ema_decay=0.8)
    losses = [3.0, 2.5, 2.7, 2.0, 2.1]
    pruned = [0.0, 0.25, 0.25, 0.5, 0.5]
    assert tracker.observe(losses[0], pruned[0]) is None  # nothing to compare the first loss with
    ema = None
    for i in range(1, len(losses)):
        r = math.tanh((losses[i - 1] - losses[i]) / losses[i - 1] + 0.3 * pruned[i])
        ema = r if ema is None else 0.8 * ema + 0.2 * r
        assert tracker.observe(losses[i], pruned[i]) == pytest.approx(ema)
        assert tracker.last_raw == pytest.approx(r)
    restored = RewardTracker(0.3, 0.8)
    restored.load_state_dict(tracker.state_dict())
    assert restored.observe(1.9, 0.5) == pytest.approx(tracker.observe(1.9, 0.5))
    with pytest.raises(ValueError, match="ema_decay"):
        RewardTracker(ema_decay=1.0)
    with pytest.raises(ValueError, match="loss"):
        tracker.observe(float("inf"), 0.0)


def _brute_front(points: list[tuple[float, int]]) -> set[tuple[float, int]]:
    """Reference: the first occurrence of every point no other point weakly dominates (strict on one axis)."""
    front = set()
    for i, (loss, a) in enumerate(points):
        dominated = any(
            (l2 <= loss and a2 <= a) and ((l2, a2) != (loss, a) or j < i) for j, (l2, a2) in enumerate(points) if j != i
        )
        if not dominated:
            front.add((loss, a))
    return front


def test_a_paired_reward_compares_with_the_reference_loss():
    """With `reference_loss` the reward compares the new loss with it (the same data under the serving gates), not
    with the previous loss; the first loss already gets a reward, and the previous loss is still recorded."""
    tracker = RewardTracker(efficiency_factor=0.2, ema_decay=0.0)
    assert tracker.observe(4.0, 0.5, reference_loss=5.0) == pytest.approx(math.tanh((5.0 - 4.0) / 5.0 + 0.1))
    assert tracker.previous_loss == 4.0
    # a harder batch (9 under the new gates, 10 under the serving ones) is a better action, not a worse one
    assert tracker.observe(9.0, 0.5, reference_loss=10.0) == pytest.approx(math.tanh(0.1 + 0.1))
    assert tracker.observe(8.0, 0.5) == pytest.approx(math.tanh((9.0 - 8.0) / 9.0 + 0.1))  # unpaired again
    with pytest.raises(ValueError, match="reference_loss"):
        tracker.observe(1.0, 0.5, reference_loss=float("nan"))


def test_pareto_archive_matches_brute_force():
    rng = random.Random(0)
    for _ in range(20):
        archive = ParetoArchive(total_heads=8)
        points = [(round(rng.uniform(0, 3), 1), rng.randint(0, 8)) for _ in range(40)]
        for step, (loss, active) in enumerate(points):
            archive.add(loss, active, torch.full((2, 4), float(step)), step)
        assert set(archive.front()) == _brute_front(points)
        assert len(archive) <= 9
        heads = [a for _, a in archive.front()]
        assert heads == sorted(heads)
        # the gates stored are those of the first occurrence of each front point
        for p in archive.points:
            first = points.index((p.loss, p.active_heads))
            assert p.step == first and torch.equal(p.gates, torch.full((2, 4), float(first)))


def test_pareto_pick_by_preference():
    archive = ParetoArchive(total_heads=8)
    archive.add(1.0, 8, torch.ones(8))
    archive.add(1.2, 6, torch.ones(8))
    archive.add(2.0, 2, torch.ones(8))
    assert archive.pick(0.0).active_heads == 8  # lowest loss
    assert archive.pick(100.0).active_heads == 2  # fewest heads
    # preference 1: scores 0+1, 0.2+0.667, 1+0 -> the middle point
    assert archive.pick(1.0).active_heads == 6
    assert not archive.add(1.5, 7, torch.ones(8))  # dominated by (1.2, 6)
    assert archive.add(0.9, 8, torch.ones(8))  # evicts (1.0, 8)
    assert archive.front() == [(2.0, 2), (1.2, 6), (0.9, 8)]
    with pytest.raises(ValueError, match="preference"):
        archive.pick(-1.0)
    with pytest.raises(ValueError, match="active_heads"):
        archive.add(1.0, 9, torch.ones(8))
    with pytest.raises(ValueError, match="empty"):
        ParetoArchive(4).pick(1.0)


def test_pareto_state_round_trip(tmp_path):
    archive = ParetoArchive(total_heads=4)
    archive.add(1.0, 4, torch.tensor([1.0, 1, 1, 1]), 10)
    archive.add(1.5, 2, torch.tensor([1.0, 0, 1, 0]), 20)
    save_state(tmp_path, archive.state_dict())
    restored = ParetoArchive(total_heads=1)
    restored.load_state_dict(load_state(tmp_path))
    assert restored.total_heads == 4 and restored.front() == archive.front()
    assert torch.equal(restored.points[0].gates, archive.points[0].gates) and restored.points[0].step == 20
