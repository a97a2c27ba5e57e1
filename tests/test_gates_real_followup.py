"""benchmarks/gates_real_followup.py: its parts, the bench check against the base run, resuming, and the verdicts."""

from __future__ import annotations

import copy
import json
import math

import pytest
from benchmark_loader import load_benchmark


@pytest.fixture(scope="module")
def fu():
    yield from load_benchmark("gates_real_followup")


@pytest.fixture(scope="module")
def base(fu, tmp_path_factory):
    """A small `gates_real.py --quick` run (one budget, PPO with and without the prior from the best static start):
    (result, its path)."""
    out = tmp_path_factory.mktemp("gates_real_base")
    args = ["--quick", "--out", str(out), "--budgets", "0.5", "--seeds", "0,1", "--controller-prior", "none,importance"]
    assert fu.gr.main(args) == 0
    path = out / "gates_real.json"
    return json.loads(path.read_text()), path


@pytest.fixture(scope="module")
def followed(fu, base, tmp_path_factory):
    """The follow-up run on that base: (summary JSON, markdown, its results folder, the base path)."""
    result, path = base
    out = tmp_path_factory.mktemp("gates_real_followup")
    assert fu.main(["--quick", "--base", str(path), "--out", str(out)]) == 0
    summary = json.loads((out / f"{fu.NAME}.json").read_text())
    return summary, (out / f"{fu.NAME}.md").read_text(), out / fu.NAME, path


def test_parts_cover_every_stored_strategy_then_each_new_controller_and_its_lora(fu, base):
    result, _ = base
    names = [p["name"] for p in fu.parts(result)]
    stored = [fu.lora_part(r["strategy"], r["fraction"]) for r in result["results"]]
    assert names[: len(stored)] == stored and names[0] == "lora_dense_100"
    assert names[len(stored) :] == [
        "controller_reinforce_best_50",
        "lora_controller_reinforce_best_50",
        "controller_a2c_best_50",
        "lora_controller_a2c_best_50",
        "controller_ppo_prior_best_seed1_50",
        "lora_controller_ppo_prior_best_seed1_50",
    ]
    assert len(set(names)) == len(names)


def test_the_run_stores_every_part_and_a_second_run_has_nothing_left(fu, followed):
    summary, md, results_dir, path = followed
    base = json.loads(path.read_text())
    assert summary["todo"] == [] and summary["stale_parts"] == []
    assert sorted(p.stem for p in results_dir.glob("*.json")) == sorted(p["name"] for p in fu.parts(base))
    assert fu.plan(base, fu.load_records(results_dir)) == []
    assert fu.run_parts(base, fu.compression.DEFAULT_DATA, results_dir, None) == 0  # resumes: nothing to run


def test_the_report_plots_every_method_with_the_new_controllers_and_the_lora_accuracies(fu, followed):
    summary, md, results_dir, path = followed
    base = json.loads(path.read_text())
    for png in (f"{fu.NAME}_pareto.png", f"{fu.NAME}_accuracy.png"):
        assert (results_dir.parent / png).stat().st_size > 0 and f"]({png})" in md
    merged = fu.merged_result(base, fu.load_records(results_dir))
    assert merged["results"][: len(base["results"])] == base["results"]
    added = {r["strategy"] for r in merged["results"][len(base["results"]) :]}
    assert added == {c.name for c in fu.CONTROLLERS}
    assert [c["strategy"] for c in merged["controllers"][len(base["controllers"]) :]] == [
        "controller_a2c_best",  # records in name order
        "controller_ppo_prior_best_seed1",
        "controller_reinforce_best",
    ]
    assert all(c["running_best_val_loss"] for c in merged["controllers"])


def test_new_controllers_keep_exactly_the_budget_and_start_from_the_best_static_ranking(fu, followed):
    summary, md, results_dir, path = followed
    base = json.loads(path.read_text())
    (budget,) = summary["budgets"]
    start = fu.gr.best_static(fu.rows_at(base, 0.5))
    seed = base["meta"]["settings"]["seed"]
    for spec in fu.CONTROLLERS:
        record = json.loads((results_dir / f"{fu.controller_part(spec, 0.5)}.json").read_text())
        row, run = record["row"], record["run"]
        assert len(row["kept"]) == row["heads"] == budget["heads"]
        assert run["algorithm"] == spec.algorithm and run["start"] == start
        assert run["prior"] == spec.prior and run["seed"] == seed + spec.seed_offset
        assert run["curve"][0]["loss"] == pytest.approx(
            next(r["val_loss"] for r in base["results"] if r["strategy"] == start)
        )
        assert row["val_loss"] <= run["curve"][0]["loss"] + 1e-9  # the best validated gates: never worse than the start
        assert f"- {fu.controller_name(spec)}, test loss: " in md
    strategies = {r["strategy"] for r in budget["rows"]}
    assert {c.name for c in fu.CONTROLLERS} | {"controller_ppo_best", "michel_kv_groups"} <= strategies
    assert all(0.0 <= r["lora_accuracy"] <= 1.0 for r in budget["rows"])
    assert 0.0 <= summary["dense_lora_accuracy"] <= 1.0


def test_a_controller_part_on_the_bases_seed_reproduces_the_bases_controller(fu, base):
    """run_controller_part is gates_real's own controller run: PPO on the base's seed gives the base's stored row."""
    result, _ = base
    bench = fu.build_bench(result, fu.compression.DEFAULT_DATA)
    out = fu.run_controller_part(bench, result, fu.ControllerSpec("ppo"), 0.5)
    stored = next(r for r in result["results"] if r["strategy"] == "controller_ppo_best")
    assert out["row"]["strategy"] == "controller_ppo_best" and out["run"]["replicates"] is None
    assert out["row"]["kept"] == stored["kept"]
    assert out["row"]["test_loss"] == pytest.approx(stored["test_loss"], rel=1e-5)


def test_ppo_with_a_second_seed_is_judged_on_the_mean_of_both_seeds(fu, followed):
    summary, md, _, path = followed
    base = json.loads(path.read_text())
    (budget,) = summary["budgets"]
    rows = {r["strategy"]: r for r in budget["rows"]}
    (mean,) = budget["seed_means"]  # only PPO with the prior has a second seed
    first, second = rows["controller_ppo_prior_best"], rows["controller_ppo_prior_best_seed1"]
    seed = base["meta"]["settings"]["seed"]
    assert mean["strategy"] == "controller_ppo_prior_best" and mean["seeds"] == [seed, seed + 1]
    assert mean["test_loss"] == [first["test_loss"], second["test_loss"]]
    loss = (first["test_loss"] + second["test_loss"]) / 2
    assert mean["mean_test_loss"] == pytest.approx(loss)
    assert mean["vs_best_static"] == fu.gr.verdict(loss, budget["best_static_test_loss"], budget["random_std"])
    assert mean["mean_lora_accuracy"] == pytest.approx((first["lora_accuracy"] + second["lora_accuracy"]) / 2)
    assert f"- controller_ppo_prior_best over seeds [{seed}, {seed + 1}]: test loss {loss:.4f}" in md


def test_a_lora_part_is_gates_reals_lora_accuracy_with_the_stored_heads(fu, followed):
    _, _, results_dir, path = followed
    base = json.loads(path.read_text())
    row = next(r for r in base["results"] if r["strategy"] == "michel")
    record = json.loads((results_dir / f"{fu.lora_part('michel', row['fraction'])}.json").read_text())
    bench = fu.build_bench(base, fu.compression.DEFAULT_DATA)
    train_rows = fu.gr.text_rows(bench.tasks, bench.tokenizer, bench.s, "train", whole_text=False)
    gates = fu.gates_from(row["kept"], bench.shape)
    assert fu.gr.kept_ids(gates) == row["kept"]
    direct = fu.gr.lora_accuracy(
        bench.model, bench.gated, gates, bench.tokenizer, train_rows, bench.test_tasks, bench.s
    )
    assert record["accuracy"] == pytest.approx(direct["accuracy"]) and record["heads"] == len(row["kept"])


def test_a_bench_that_differs_from_the_base_is_refused_by_name(fu, base):
    result, _ = base
    changed = copy.deepcopy(result)
    changed["dense"]["test_loss"] += 0.01
    with pytest.raises(RuntimeError, match=r"dense test_loss .* stored"):
        fu.build_bench(changed, fu.compression.DEFAULT_DATA)


def test_accuracy_verdicts_use_the_best_static_accuracy_and_its_standard_error(fu):
    base = {
        "meta": {"code_version": "v", "test_rows": 100,
                 "settings": {"budgets": [0.5], "controller_steps": 4, "seed": 0}},
        "dense": {"val_loss": 1.0, "test_loss": 1.0},
        "results": [
            {"strategy": "dense", "fraction": 1.0, "heads": 4, "test_loss": 1.0, "kept": [0, 1, 2, 3]},
            {"strategy": "michel", "fraction": 0.5, "heads": 2, "test_loss": 1.2, "val_loss": 1.2, "kept": [0, 1]},
            {"strategy": "l0", "fraction": 0.5, "heads": 2, "test_loss": 1.3, "val_loss": 1.3, "kept": [1, 2]},
        ],
        "verdicts": [
            {"fraction": 0.5, "heads": 2, "best_static": "michel", "best_static_test_loss": 1.2,
             "best_issue_static_test_loss": 1.2, "random_std": 0.05}
        ],
    }  # fmt: skip
    records = {
        "lora_michel_50": {"kind": "lora", "strategy": "michel", "fraction": 0.5, "accuracy": 0.6},
        "lora_l0_50": {"kind": "lora", "strategy": "l0", "fraction": 0.5, "accuracy": 0.5},
        "controller_a2c_best_50": {
            "kind": "controller",
            "row": {"strategy": "controller_a2c_best", "fraction": 0.5, "heads": 2, "test_loss": 1.1, "val_loss": 1.1},
            "run": {"strategy": "controller_a2c_best", "start": "michel", "start_val_loss": 1.2,
                    "first_action_val_loss": 1.15, "best_val_loss": 1.1, "best_step": 3,
                    "first_quarter_reward": 0.1, "last_quarter_reward": 0.0, "seconds": 60.0},
        },
        "lora_controller_a2c_best_50": {"kind": "lora", "strategy": "controller_a2c_best", "fraction": 0.5,
                                        "accuracy": 0.7},
    }  # fmt: skip
    (budget,) = fu.summarize(base, records)["budgets"]
    se = math.sqrt(0.6 * 0.4 / 100)  # 0.049: 0.7 is more than one standard error above 0.6
    assert budget["best_static_accuracy"] == {
        "strategy": "michel",
        "accuracy": 0.6,
        "standard_error": pytest.approx(se),
    }
    assert budget["accuracy_verdicts"] == {"controller_a2c_best": "beats"}
    assert budget["loss_verdicts"]["controller_a2c_best"] == {"vs_best_static": "beats", "vs_issue_static": "beats"}
    records["lora_controller_a2c_best_50"]["accuracy"] = 0.56
    assert fu.summarize(base, records)["budgets"][0]["accuracy_verdicts"] == {"controller_a2c_best": "matches"}


def test_main_refuses_a_quick_run_without_its_base_or_into_the_results(fu, base, tmp_path, capsys):
    _, path = base
    with pytest.raises(SystemExit):
        fu.main(["--quick", "--out", str(tmp_path)])
    assert "--quick needs --base" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        fu.main(["--quick", "--base", str(path), "--out", str(fu.RESULTS / "x")])
    assert "is not allowed with --quick" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        fu.main(["--base", str(path), "--plan"])  # a quick base without --quick
    assert "(with --quick only)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        fu.main(["--quick", "--base", str(path), "--out", str(tmp_path), "--max-parts", "0"])
    assert "--max-parts=0" in capsys.readouterr().err
