"""benchmarks/issue14_figures.py: both figures from small stored results, what they draw, and bad inputs named."""

from __future__ import annotations

import json

import pytest
from benchmark_loader import load_benchmark


@pytest.fixture(scope="module")
def figs():
    yield from load_benchmark("issue14_figures")


def _speed(speedup: float) -> dict:
    return {"median_step_s": 1.0 / speedup, "speedup": speedup, "step_s": [1.0], "trainable_params": 1}


def _freezing_run(arm: str, seed: int, frozen: list[int]) -> dict:
    return {"arm": arm, "seed": seed, "accuracy": 0.8, "train_s": 10.0 + seed, "frozen_layers_per_step": frozen}


def _decision(task: str, truth: str, action: str, score: float | None, correct: bool, best: str | None) -> dict:
    return {"task": task, "truth": truth, "action": action, "best_score": score, "correct": correct, "best": best}


@pytest.fixture()
def results(tmp_path):
    """The four stored results the figures read, small and made up."""
    stored = {
        "freezing_real_speed.json": {
            "speed": {"lora": _speed(1.0), "lora_half": _speed(1.4), "full_half": _speed(1.9)}
        },
        "freezing_real.json": {
            "runs": [_freezing_run("unfrozen", 0, [0, 0, 0]), _freezing_run("half_late", 1, [0, 15, 15])]
        },
        "routing_real.json": {
            "meta": {"settings": {"reuse_threshold": 0.5, "fork_threshold": 0.3}},
            "decisions": [
                _decision("A", "new", "create", None, True, None),
                _decision("B", "new", "reuse", 0.6, False, "expert_A"),
                _decision("A", "reuse", "reuse", 0.95, True, "expert_A"),
            ],
        },
        "routing_reuse_cost.json": {
            "cost_points": 1.0,
            "cases": {
                "b_after_a": {
                    "arms": {
                        "create": {"runs": [{"avg_acc": 0.5}, {"avg_acc": 0.6}]},
                        "reuse": {"runs": [{"avg_acc": 0.49}], "vs_create_points": {"1": 0.5, "0": -1.0}},
                        "fork": {"runs": [], "vs_create_points": {}},
                    }
                }
            },
        },
    }
    for name, data in stored.items():
        (tmp_path / name).write_text(json.dumps(data))
    return tmp_path


def test_both_figures_are_written_whole_from_the_stored_results(figs, results, tmp_path):
    out = tmp_path / "figures"
    assert figs.main(["--results", str(results), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(figs.INPUTS)  # no temporary file left behind
    assert all((out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for name in figs.INPUTS)


def test_the_figures_draw_what_the_results_hold(figs, results, tmp_path):
    load = lambda name: json.loads((results / name).read_text())  # noqa: E731
    drawn = figs.freezing_figure(load("freezing_real_speed.json"), load("freezing_real.json"), tmp_path / "f.png")
    assert drawn["speedup"] == {"full_half": 1.9, "lora_half": 1.4}  # the unfrozen baseline is not a bar
    assert drawn["frozen_layers"][("half_late", 1)] == [0, 15, 15]
    drawn = figs.routing_figure(load("routing_real.json"), load("routing_reuse_cost.json"), tmp_path / "r.png")
    assert drawn["wrong"] == [("B", "expert_A")]
    assert drawn["vs_create_points"] == {("b_after_a", "reuse"): [-1.0, 0.5]}  # seeds in order; no runs: no bar


def test_a_missing_or_foreign_result_is_refused_by_name(figs, results, tmp_path):
    (results / "routing_real.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"routing_real\.json is missing"):
        figs.main(["--results", str(results), "--out", str(tmp_path / "o")])
    (results / "routing_real.json").write_text(json.dumps({"meta": {}}))
    with pytest.raises(KeyError, match=r"routing_real\.json has no 'decisions' entry"):
        figs.main(["--results", str(results), "--out", str(tmp_path / "o")])
    (results / "freezing_real.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"freezing_real\.json is not valid JSON"):
        figs.main(["--results", str(results), "--out", str(tmp_path / "o")])
