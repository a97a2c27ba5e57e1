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
    stored["gates_real.json"] = {
        "meta": {"settings": {"tasks": ["A", "B"]}},
        "results": [
            {"strategy": "dense", "fraction": 1.0, "test_loss": 3.0},
            {"strategy": "random", "fraction": 0.5, "test_loss": 7.0, "test_loss_seeds": [6.0, 8.0]},
            {"strategy": "michel", "fraction": 0.5, "test_loss": 4.0},
        ],
    }
    for name, data in stored.items():
        (tmp_path / name).write_text(json.dumps(data))
    parts = tmp_path / "gates_real_followup"
    parts.mkdir()
    lora = {
        "lora_dense_100": ("dense", 1.0, 0.7, 0.65),
        "lora_random_50": ("random", 0.5, 0.55, 0.42),
        "lora_michel_50": ("michel", 0.5, 0.5, 0.5),
        "lora_controller_a2c_best_50": ("controller_a2c_best", 0.5, 0.6, 0.58),
    }
    for name, (strategy, fraction, acc, bal) in lora.items():
        record = {"kind": "lora", "strategy": strategy, "fraction": fraction, "accuracy": acc, "balanced": bal,
                  "per_task": [acc, acc]}  # fmt: skip
        (parts / f"{name}.json").write_text(json.dumps(record))
    controller = {"kind": "controller", "row": {"strategy": "controller_a2c_best", "fraction": 0.5, "test_loss": 3.5}}
    (parts / "controller_a2c_best_50.json").write_text(json.dumps(controller))
    data = tmp_path / "data"
    for task, labels in (("A", ["x", "y"]), ("B", ["x", "y", "z", "w"])):
        (data / task).mkdir(parents=True)
        (data / task / "labels.json").write_text(json.dumps(labels))
    return tmp_path


def test_both_figures_are_written_whole_from_the_stored_results(figs, results, tmp_path):
    out = tmp_path / "figures"
    assert figs.main(["--results", str(results), "--out", str(out), "--data", str(results / "data")]) == 0
    tables = [f"{figs.GATES_TABLE}.json", f"{figs.GATES_TABLE}.md"]
    assert sorted(p.name for p in out.iterdir()) == sorted([*figs.INPUTS, *tables])  # no temporary file left behind
    assert all((out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for name in figs.INPUTS)
    assert "| controller_a2c_best | 3.500 | 0.600 | 0.580 | 0.60, 0.60 |" in (out / tables[1]).read_text()


def test_the_figures_draw_what_the_results_hold(figs, results, tmp_path):
    load = lambda name: json.loads((results / name).read_text())  # noqa: E731
    drawn = figs.freezing_figure(load("freezing_real_speed.json"), load("freezing_real.json"), tmp_path / "f.png")
    assert drawn["speedup"] == {"full_half": 1.9, "lora_half": 1.4}  # the unfrozen baseline is not a bar
    assert drawn["frozen_layers"][("half_late", 1)] == [0, 15, 15]
    drawn = figs.routing_figure(load("routing_real.json"), load("routing_reuse_cost.json"), tmp_path / "r.png")
    assert drawn["wrong"] == [("B", "expert_A")]
    assert drawn["vs_create_points"] == {("b_after_a", "reuse"): [-1.0, 0.5]}  # seeds in order; no runs: no bar


def test_the_lora_table_ranks_by_balanced_accuracy_with_each_strategys_own_loss(figs, results, tmp_path):
    chance = figs.chance_balanced(["A", "B"], results / "data")
    assert chance == pytest.approx((1 / 2 + 1 / 4) / 2)
    base = json.loads((results / "gates_real.json").read_text())
    records = figs.load(results, "gates_real_followup/")
    table = figs.gates_lora_figure(base, records, tmp_path / "g.png", chance)
    assert table["chance_balanced"] == chance and table["dense"]["balanced"] == 0.65
    (budget,) = table["budgets"]
    assert [(r["strategy"], r["test_loss"]) for r in budget["rows"]] == [
        ("controller_a2c_best", 3.5),  # a controller's loss comes from its own part
        ("michel", 4.0),
        ("random", 6.0),  # the first seed's loss: its heads are the ones the LoRA part used
    ]
    with pytest.raises(FileNotFoundError, match=r"C/labels\.json is missing: --data="):
        figs.chance_balanced(["A", "C"], results / "data")


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
