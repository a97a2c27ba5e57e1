"""benchmarks/loss_weighting_noise.py: the grid's seed noise against hand-made cells whose answer is known."""

from __future__ import annotations

import pytest
from benchmark_loader import load_benchmark


@pytest.fixture(scope="module")
def noise():
    yield from load_benchmark("loss_weighting_noise")


def test_expected_max_of_normals_matches_the_known_values(noise):
    assert noise.expected_max_of_normals(1) == pytest.approx(0.0, abs=0.02)
    assert noise.expected_max_of_normals(2) == pytest.approx(1 / 3.141592653589793**0.5, abs=0.02)  # 1/sqrt(pi)
    assert noise.expected_max_of_normals(9) == pytest.approx(1.485, abs=0.02)


def test_cells_far_apart_are_told_apart_and_equal_ones_are_not(noise):
    apart = {"a": [0.50, 0.51], "b": [0.70, 0.71], "c": [0.90, 0.89], "d": [0.60, 0.61]}
    result = noise.grid_noise(apart, permutations=2000)
    assert result["permutation_p"] < 0.05
    assert result["within_cell_sd"] == pytest.approx(0.00707, abs=1e-4)  # every pair differs by 0.01
    assert result["best_minus_mean"] > 5 * result["best_minus_mean_by_chance"]
    # the same values, but each cell holds one low and one high run: the cells are equal up to noise
    mixed = {"a": [0.50, 0.90], "b": [0.51, 0.89], "c": [0.70, 0.71], "d": [0.61, 0.60]}
    result = noise.grid_noise(mixed, permutations=2000)
    assert result["permutation_p"] > 0.5
    assert result["best_minus_mean"] < result["best_minus_mean_by_chance"]


def test_too_few_runs_give_no_answer(noise):
    assert noise.grid_noise({"a": [0.5, 0.6], "b": [0.5]}) is None
    assert noise.grid_noise({"a": [0.5], "b": [0.6]}) is None
    assert noise.grid_noise({"a": [0.5, 0.6]}) is None


def test_analyse_sets_every_other_arm_against_the_best_cell_and_the_mean(noise):
    lw = noise.lw
    runs = {}
    for i, name in enumerate(lw.build_arms(lw.REAL)):
        for seed in lw.SEEDS:
            acc = 0.6 + 0.01 * i + 0.02 * seed
            runs[(name, seed)] = {"method": name, "seed": seed, "metrics": {"avg_acc": acc}, "code_version": "x"}
    others = {("heldout", 0): {"method": "heldout", "seed": 0, "metrics": {"avg_acc": 0.70}}}
    summary = noise.analyse(runs, others)
    assert summary["best_cell"] == "ewc1000_replay1"  # the 9th cell: 0.68 + 0.01
    assert summary["grid_mean"] == pytest.approx(0.65)
    rows = {r["arm"]: r for r in summary["arms"]}
    assert set(rows) == {"uncertainty", "softmax", "heldout"}
    assert rows["heldout"]["vs_best_points"] == pytest.approx(100 * (0.70 - 0.69))
    assert rows["heldout"]["vs_grid_mean_points"] == pytest.approx(5.0)
    assert summary["stale_reference_arms"] == sorted(lw.build_arms(lw.REAL))  # "x" is no current version
    # replay alpha 1 (cells 3, 6, 9: 0.62, 0.65, 0.68 + 0.02 * seed) against alpha 0.1 (cells 1, 4, 7)
    assert summary["margins"]["replay_alpha=1"]["mean"] == pytest.approx(0.66)
    assert summary["margins"]["replay_alpha=0.1"]["mean"] == pytest.approx(0.64)
    assert summary["margins"]["ewc_lambda=10"]["runs"] == 6
    markdown = noise.report_markdown(summary)
    assert "| heldout | [0] | 0.700 | +1.0 | +5.0 |" in markdown
