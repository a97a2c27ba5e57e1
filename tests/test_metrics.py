"""Continual metrics against slow, literal implementations of their textbook definitions."""

from __future__ import annotations

import json
import random

import pytest

from hf_adaptive.metrics import (
    ContinualResult,
    average_accuracy,
    backward_transfer,
    forgetting,
    forward_transfer,
)


def _random_matrix(t, seed):
    rng = random.Random(seed)
    return [[round(rng.random(), 3) for _ in range(t)] for _ in range(t)]


def slow_bwt(r):
    t = len(r)
    total = 0.0
    for i in range(t - 1):
        total += r[t - 1][i] - r[i][i]
    return total / (t - 1)


def slow_fwt(r, b):
    t = len(r)
    total = 0.0
    for i in range(1, t):
        total += r[i - 1][i] - b[i]
    return total / (t - 1)


def slow_forgetting(r):
    t = len(r)
    values = []
    for j in range(t - 1):
        best = -1.0
        for k in range(j, t - 1):  # once task j was learned
            best = max(best, r[k][j])
        values.append(best - r[t - 1][j])
    return sum(values) / len(values)


@pytest.mark.parametrize("t", [2, 3, 5, 8])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_match_definitions(t, seed):
    r = _random_matrix(t, seed)
    b = [round(random.Random(seed + 100).random(), 3) for _ in range(t)]
    assert average_accuracy(r) == pytest.approx(sum(r[-1]) / t)
    assert backward_transfer(r) == pytest.approx(slow_bwt(r))
    assert forward_transfer(r, b) == pytest.approx(slow_fwt(r, b))
    assert forgetting(r) == pytest.approx(slow_forgetting(r))


def test_hand_computed_example():
    r = [[0.9, 0.2, 0.1], [0.5, 0.8, 0.3], [0.4, 0.6, 0.7]]
    assert backward_transfer(r) == pytest.approx(((0.4 - 0.9) + (0.6 - 0.8)) / 2)
    assert forward_transfer(r, [0.1, 0.1, 0.1]) == pytest.approx(((0.2 - 0.1) + (0.3 - 0.1)) / 2)
    assert forgetting(r) == pytest.approx(((0.9 - 0.4) + (0.8 - 0.6)) / 2)
    assert average_accuracy(r) == pytest.approx(1.7 / 3)


def test_single_task_and_bad_shapes():
    assert backward_transfer([[0.7]]) is None and forgetting([[0.7]]) is None
    with pytest.raises(ValueError):
        average_accuracy([[0.1], [0.2, 0.3]])
    assert forward_transfer([[0.5, 0.5], [0.5, 0.5]], None) is None


def test_result_save_load_roundtrip(tmp_path):
    result = ContinualResult(["a", "b"], [[0.9, 0.4], [0.5, 0.8]], baseline=[0.5, 0.5], train_time=[1.0, 2.0])
    paths = result.save(tmp_path)
    data = json.loads(paths["json"].read_text())
    assert data["metrics"]["bwt"] == pytest.approx(-0.4)
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"
    again = ContinualResult.load(tmp_path)
    assert again.matrix == result.matrix and again.fwt == pytest.approx(result.fwt)
    assert "| a | 0.900 | 0.400 |" in result.format_table()
    assert not list(tmp_path.glob("*.tmp*"))


def test_evaluate_module_loads_from_local_path():
    import evaluate

    from hf_adaptive.metrics_module import CONTINUAL_METRICS_PATH

    metric = evaluate.load(CONTINUAL_METRICS_PATH)
    r = _random_matrix(4, 7)
    b = [0.5, 0.4, 0.3, 0.2]
    out = metric.compute(predictions=r, references=[b] * 4)
    assert out["bwt"] == pytest.approx(slow_bwt(r)) and out["fwt"] == pytest.approx(slow_fwt(r, b))
    assert out["avg_acc"] == pytest.approx(sum(r[-1]) / 4) and out["forgetting"] == pytest.approx(slow_forgetting(r))
    assert metric.compute(predictions=r, references=[[]] * 4)["fwt"] is None


def test_metrics_are_finite_when_unseen_tasks_are_not_evaluated():
    """Issue 13: with evaluate_unseen_tasks=False the upper triangle is NaN; no metric may read it."""
    from hf_adaptive.metrics import ContinualResult

    nan = float("nan")
    matrix = [[0.9, nan, nan], [0.5, 0.8, nan], [0.4, 0.7, 0.9]]
    metrics = ContinualResult(["a", "b", "c"], matrix, None, [1.0] * 3, {}).metrics()
    assert metrics["forgetting"] == pytest.approx(((0.9 - 0.4) + (0.8 - 0.7)) / 2)
    assert metrics["bwt"] == pytest.approx(((0.4 - 0.9) + (0.7 - 0.8)) / 2)
    assert metrics["avg_acc"] == pytest.approx((0.4 + 0.7 + 0.9) / 3)
    assert metrics["fwt"] is None
