"""benchmarks/gates_real_seeds.py: one second-seed LoRA part per distinct head set, the second LoRA seed really is
another seed, equal heads share a measurement only with the same LoRA seed, resuming, and the 2-seed verdicts."""

from __future__ import annotations

import json
import math

import pytest
from benchmark_loader import load_benchmark


@pytest.fixture(scope="module")
def grs():
    yield from load_benchmark("gates_real_seeds")


@pytest.fixture(scope="module")
def runs(grs, tmp_path_factory):
    """Quick gates_real (one budget), its follow-up, then this script on both: (base, follow-up records, summary,
    markdown, this script's parts folder, base path, follow-up folder)."""
    root = tmp_path_factory.mktemp("gates_real_seeds")
    args = ["--quick", "--out", str(root / "base"), "--budgets", "0.5", "--seeds", "0,1"]
    assert grs.gr.main([*args, "--controller-prior", "none,importance"]) == 0
    path = root / "base" / "gates_real.json"
    assert grs.fu.main(["--quick", "--base", str(path), "--out", str(root / "fu")]) == 0
    followup_dir = root / "fu" / grs.fu.NAME
    out = root / "seeds"
    assert grs.main(["--quick", "--base", str(path), "--followup", str(followup_dir), "--out", str(out)]) == 0
    base = json.loads(path.read_text())
    summary = json.loads((out / f"{grs.NAME}.json").read_text())
    md = (out / f"{grs.NAME}.md").read_text()
    return base, grs.fu.load_records(followup_dir), summary, md, out / grs.NAME, path, followup_dir


def test_parts_check_first_then_one_lora_per_distinct_head_set_then_the_new_controllers(grs, runs):
    base, followup, *_ = runs
    names = [p["name"] for p in grs.parts(base, followup)]
    assert names[0] == grs.CHECK == "check_lora_dense_100_seed0"
    sets = grs.head_sets(grs.measured_heads(base, followup))
    assert sum(len(h) for h in sets.values()) == len(base["results"]) + 3  # the follow-up's three controllers
    lora = names[1 : 1 + len(sets)]
    assert lora == [grs.lora_name(h[0], f, 1) for (f, _), h in sets.items()]
    assert names[1 + len(sets) :] == [
        "controller_reinforce_best_seed1_50",
        "lora_controller_reinforce_best_seed1_50_seed0",
        "lora_controller_reinforce_best_seed1_50_seed1",
        "controller_a2c_best_seed1_50",
        "lora_controller_a2c_best_seed1_50_seed0",
        "lora_controller_a2c_best_seed1_50_seed1",
    ]
    assert len(set(names)) == len(names)


def test_head_sets_group_strategies_that_kept_the_same_heads_in_any_order(grs):
    rows = [
        {"strategy": "l0", "fraction": 0.5, "kept": [2, 0]},
        {"strategy": "controller_ppo_best", "fraction": 0.5, "kept": [0, 2]},
        {"strategy": "michel", "fraction": 0.5, "kept": [0, 1]},
        {"strategy": "l0", "fraction": 0.25, "kept": [0]},
    ]
    assert grs.head_sets(rows) == {
        (0.5, (0, 2)): ["l0", "controller_ppo_best"],
        (0.5, (0, 1)): ["michel"],
        (0.25, (0,)): ["l0"],
    }


def test_the_run_stores_every_part_and_a_second_run_has_nothing_left(grs, runs):
    base, followup, summary, _, results_dir, *_ = runs
    assert summary["todo"] == []
    assert sorted(p.stem for p in results_dir.glob("*.json")) == sorted(p["name"] for p in grs.parts(base, followup))
    assert grs.run_parts(base, followup, grs.compression.DEFAULT_DATA, results_dir, None) == 0


def test_the_check_reruns_the_dense_seed0_lora_and_compares_it_with_the_stored_one(grs, runs):
    _, followup, summary, md, results_dir, *_ = runs
    check = json.loads((results_dir / f"{grs.CHECK}.json").read_text())
    assert "same_heads_as" not in check and check["lora_seed"] == 0  # measured, never copied
    stored = followup["lora_dense_100"]
    assert summary["check"]["stored"]["accuracy"] == stored["accuracy"]
    assert summary["check"]["equal"] == (check["accuracy"] == stored["accuracy"])
    assert "Check: the dense model's seed-0 LoRA again gives" in md


def test_the_second_lora_seed_is_gates_reals_lora_with_the_seed_plus_one(grs, runs, monkeypatch):
    base, *_ = runs
    bench = grs.fu.build_bench(base, grs.compression.DEFAULT_DATA)
    seen = []

    def fake(model, gated, gates, tokenizer, train_rows, test_tasks, s):
        seen.append((s["seed"], {k: v for k, v in s.items() if k != "seed"}, grs.gr.kept_ids(gates)))
        return {"accuracy": 0.5, "balanced": 0.5, "per_task": {}}

    monkeypatch.setattr(grs.gr, "lora_accuracy", fake)
    kept = next(r["kept"] for r in base["results"] if r["strategy"] == "michel")
    assert grs.run_lora(bench, kept, 1)["lora_seed"] == base["meta"]["settings"]["seed"] + 1
    assert grs.run_lora(bench, kept, 0)["lora_seed"] == base["meta"]["settings"]["seed"]
    (s1, rest1, k1), (s0, rest0, k0) = seen
    assert (s1, s0) == (1, 0) and rest1 == rest0 == {k: v for k, v in bench.s.items() if k != "seed"}
    assert k1 == k0 == sorted(kept)


def test_equal_heads_share_a_measurement_only_with_the_same_lora_seed(grs, runs):
    base, followup, _, _, results_dir, *_ = runs
    records = grs.fu.load_records(results_dir)
    michel = next(r for r in base["results"] if r["strategy"] == "michel")
    name, rec = grs.known_accuracy(list(reversed(michel["kept"])), 0.5, 0, base, followup, records)
    assert name == "lora_michel_50" and rec is followup["lora_michel_50"]
    name, rec = grs.known_accuracy(michel["kept"], 0.5, 1, base, followup, records)
    assert name == "lora_michel_50_seed1" and rec is records["lora_michel_50_seed1"]
    assert grs.known_accuracy(michel["kept"], 0.5, 1, base, followup, {}) is None  # seed 1 not measured yet
    assert grs.known_accuracy(michel["kept"][:-1], 0.5, 0, base, followup, records) is None
    for spec in grs.CONTROLLERS:  # a new controller's LoRA parts: measured, or the same heads' record with its seed
        for offset in (0, 1):
            part = records[grs.lora_name(spec.name, 0.5, offset)]
            if "same_heads_as" in part:
                assert part["same_heads_as"].endswith("_50" if offset == 0 else "_50_seed1")
            else:
                assert part["lora_seed"] == offset


def _synthetic(grs):
    """A base with two static strategies and the follow-up's seed-0 controllers at one budget, on 100 test rows."""
    base = {
        "meta": {"code_version": "v", "test_rows": 100, "settings": {"budgets": [0.5], "controller_steps": 4,
                                                                     "seed": 0}},
        "results": [
            {"strategy": "dense", "fraction": 1.0, "test_loss": 1.0, "kept": [0, 1, 2, 3]},
            {"strategy": "michel", "fraction": 0.5, "test_loss": 1.2, "kept": [0, 1]},
            {"strategy": "l0", "fraction": 0.5, "test_loss": 1.3, "kept": [1, 2]},
        ],
        "verdicts": [{"fraction": 0.5, "heads": 2, "best_static": "michel", "best_static_test_loss": 1.2,
                      "random_std": 0.05}],
    }  # fmt: skip

    def controller(name, kept, loss):
        return {"kind": "controller", "row": {"strategy": name, "fraction": 0.5, "kept": kept, "test_loss": loss},
                "run": {"strategy": name}}  # fmt: skip

    def lora(strategy, fraction, balanced):
        return {"kind": "lora", "strategy": strategy, "fraction": fraction, "balanced": balanced, "accuracy": balanced}

    followup = {
        "controller_a2c_best_50": controller("controller_a2c_best", [0, 1], 1.2),  # stayed at michel's heads
        "lora_dense_100": lora("dense", 1.0, 0.6),
        "lora_michel_50": lora("michel", 0.5, 0.6),
        "lora_l0_50": lora("l0", 0.5, 0.5),
        "lora_controller_a2c_best_50": lora("controller_a2c_best", 0.5, 0.6),
    }
    records = {
        "lora_dense_100_seed1": lora("dense", 1.0, 0.6),
        "lora_michel_50_seed1": lora("michel", 0.5, 0.5),
        "lora_l0_50_seed1": lora("l0", 0.5, 0.5),
        "controller_a2c_best_seed1_50": controller("controller_a2c_best_seed1", [2, 3], 1.0),
        "lora_controller_a2c_best_seed1_50_seed0": lora("controller_a2c_best_seed1", 0.5, 0.8),
        "lora_controller_a2c_best_seed1_50_seed1": lora("controller_a2c_best_seed1", 0.5, 0.7),
    }
    return base, followup, records


def test_a_controller_is_judged_on_every_seed_it_has_against_the_best_static_two_seed_mean(grs):
    base, followup, records = _synthetic(grs)
    (budget,) = grs.summarize(base, followup, records)["budgets"]
    rows = {e["strategy"]: e for e in budget["rows"]}
    # a2c's seed 0 kept michel's heads: its LoRA seed 1 is michel's, through the shared head set
    assert rows["controller_a2c_best"]["balanced"] == [0.6, 0.5]
    assert rows["michel"]["mean_balanced"] == pytest.approx(0.55) and rows["l0"]["mean_balanced"] == 0.5
    se = math.sqrt(0.55 * 0.45 / 100)
    assert budget["best_static"] == {"strategy": "michel", "mean_balanced": pytest.approx(0.55),
                                     "standard_error": pytest.approx(se)}  # fmt: skip
    (group,) = budget["controllers"]
    assert group["members"] == ["controller_a2c_best", "controller_a2c_best_seed1"]
    assert group["balanced"] == [0.6, 0.5, 0.8, 0.7] and group["mean_balanced"] == pytest.approx(0.65)
    assert group["accuracy_verdict"] == "beats"  # 0.65 > 0.55 + 0.050
    assert group["test_loss"] == [1.2, 1.0] and group["mean_test_loss"] == pytest.approx(1.1)
    assert group["loss_verdict"] == "beats"  # 1.1 < 1.2 - 0.05
    records["lora_controller_a2c_best_seed1_50_seed0"]["balanced"] = 0.6
    records["lora_controller_a2c_best_seed1_50_seed1"]["balanced"] = 0.5
    (group,) = grs.summarize(base, followup, records)["budgets"][0]["controllers"]
    assert group["mean_balanced"] == pytest.approx(0.55) and group["accuracy_verdict"] == "matches"


def test_a_missing_second_seed_leaves_the_mean_unset_and_says_what_is_left(grs):
    base, followup, records = _synthetic(grs)
    del records["lora_michel_50_seed1"]
    summary = grs.summarize(base, followup, records)
    rows = {e["strategy"]: e for e in summary["budgets"][0]["rows"]}
    assert rows["michel"]["balanced"] == [0.6, None] and rows["michel"]["mean_balanced"] is None
    assert summary["budgets"][0]["best_static"]["strategy"] == "l0"  # the only static strategy with both seeds


def test_main_refuses_quick_without_its_inputs_or_into_the_results(grs, runs, tmp_path, capsys):
    *_, path, followup_dir = runs
    with pytest.raises(SystemExit):
        grs.main(["--quick", "--base", str(path), "--out", str(tmp_path)])
    assert "--quick needs --base, --followup" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        grs.main(["--quick", "--base", str(path), "--followup", str(followup_dir), "--out", str(grs.RESULTS)])
    assert "is not allowed with --quick" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        grs.main(["--quick", "--base", str(path), "--followup", str(tmp_path / "none"), "--out", str(tmp_path)])
    assert "no parts there" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        grs.main(["--max-parts", "0"])
    assert "--max-parts=0 is not allowed" in capsys.readouterr().err
