"""benchmarks/loss_weighting_real.py: the arms and their exact options, the run plan, the verdicts and the report on
hand-made results (no model), the command line's refusals, and the whole `--quick` study on a tiny model over a
made-up dataset in the CL benchmark layout (the learned weighting must act on the ewc and replay terms)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from benchmark_loader import load_benchmark

GRID = [f"ewc{e}_replay{a}" for e in ("10", "100", "1000") for a in ("0.1", "0.3", "1")]


@pytest.fixture(scope="module")
def lw():
    yield from load_benchmark("loss_weighting_real")


# ------------------------------------------------------------------------------------------------ arms, options
def test_options_are_cl_real_ewc_replay_with_the_task_sized_budgets_halved(lw):
    assert lw.OPTIONS == {
        "ewc_lambda": 100.0,
        "fisher_samples": 32,
        "fisher_normalization": "max",
        "replay_alpha": 1.0,
        "replay_buffer_size": 128,
        "replay_policy": "balanced",
        "replay_batch_size": 4,
    }
    assert lw.SETTINGS["tasks"] == ["SST-2", "WiC", "BoolQA"]
    assert (lw.SETTINGS["n_train"], lw.SETTINGS["n_eval"]) == (128, 100)
    assert lw.SETTINGS["config"] == lw.cl_real.SETTINGS["config"]  # cl_real's recipe, imported


def test_arms_and_their_exact_options(lw):
    arms = lw.build_arms()
    assert list(arms) == [*GRID, "uncertainty", "softmax"]
    base = dict(lw.OPTIONS)
    assert arms["ewc10_replay0.1"].options == {
        **base,
        "ewc_lambda": 10.0,
        "replay_alpha": 0.1,
        "loss_weighting": "none",
    }
    assert arms["ewc1000_replay0.3"].options == {
        "ewc_lambda": 1000.0,
        "fisher_samples": 32,
        "fisher_normalization": "max",
        "replay_alpha": 0.3,
        "replay_buffer_size": 128,
        "replay_policy": "balanced",
        "replay_batch_size": 4,
        "loss_weighting": "none",
    }
    # the learned arms start from cl_real's ewc_replay weights (lambda 100 inside the EWC term, alpha 1)
    assert arms["uncertainty"].options == {**base, "loss_weighting": "uncertainty"}
    assert arms["softmax"].options == {**base, "loss_weighting": "softmax"}
    assert (arms["softmax"].ewc_lambda, arms["softmax"].replay_alpha) == (100.0, 1.0)
    assert [a.weighting for a in arms.values()] == ["none"] * 9 + ["uncertainty", "softmax"]
    assert lw.default_cell() == "ewc100_replay1"
    quick = lw.build_arms(lw.QUICK)
    assert list(quick) == ["ewc100_replay1", "ewc1000_replay1", "uncertainty", "softmax"]
    assert quick["ewc1000_replay1"].options["fisher_samples"] == 8  # cl_real's smoke budgets
    assert quick["ewc1000_replay1"].options["replay_buffer_size"] == 16


def test_every_arm_is_a_valid_continual_config(lw, tmp_path):
    from hf_adaptive.config import ContinualConfig

    for arm in lw.build_arms().values():
        config = ContinualConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], **arm.options)
        assert config.loss_weighting == arm.weighting
        assert (config.ewc_lambda, config.replay_alpha) == (arm.ewc_lambda, arm.replay_alpha)


# -------------------------------------------------------------------------------------------------------- plan
def _record(lw, arm: str, seed: int, version: str, avg: float, weights: dict | None = None) -> dict:
    return {
        "arm": arm,
        "method": arm,
        "seed": seed,
        "code_version": version,
        "task_names": ["A", "B"],
        "matrix": [[avg + 0.05, None], [avg - 0.05, avg + 0.05]],
        "metrics": {"avg_acc": avg, "bwt": -0.1, "forgetting": 0.1, "fwt": None},
        "wall_seconds": 240.0,
        "weights": weights or {},
    }


def _write(folder: Path, record: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{record['arm']}_seed{record['seed']}.json").write_text(json.dumps(record))


def test_plan_runs_seed_0_of_everything_first_and_redoes_missing_or_stale(lw, tmp_path):
    order = ["ewc100_replay1", "uncertainty", "softmax", *(g for g in GRID if g != "ewc100_replay1")]
    assert lw.wanted_runs() == [(a, 0) for a in order] + [(a, 1) for a in order]
    assert len(lw.wanted_runs()) == 22
    assert lw.plan({}, "v1") == [(key, "missing") for key in lw.wanted_runs()]

    runs_dir = tmp_path / "runs"
    _write(runs_dir, _record(lw, "ewc100_replay1", 0, "v1", 0.6))
    _write(runs_dir, _record(lw, "uncertainty", 0, "v0", 0.6))  # older code: stale
    _write(runs_dir, _record(lw, "softmax", 1, "v1", 0.6))
    runs = lw.cl_real.load_results(runs_dir)
    todo = lw.plan(runs, "v1")
    assert todo[:2] == [(("uncertainty", 0), "stale"), (("softmax", 0), "missing")]
    keys = [key for key, _ in todo]
    assert ("ewc100_replay1", 0) not in keys and ("softmax", 1) not in keys
    assert len(todo) == 20 and keys[-1] == ("ewc1000_replay1", 1)


# ------------------------------------------------------------------------------------------------------ verdict
def _rows(lw, means: dict[str, list[float]]) -> list[dict]:
    runs = {(arm, s): _record(lw, arm, s, "v1", v) for arm, values in means.items() for s, v in enumerate(values)}
    return lw.summarize(runs, "v1")


def test_verdict_met_and_missed_with_exact_differences(lw):
    rows = _rows(
        lw,
        {
            "ewc10_replay1": [0.60, 0.60],
            "ewc100_replay1": [0.64, 0.66],  # the best cell: mean 0.65 over its seeds
            "ewc1000_replay1": [0.62, 0.62],  # the median of the three cells
            "uncertainty": [0.64, 0.65],  # 0.645: 0.5 points below the best
            "softmax": [0.63, 0.63],  # 2 points below
        },
    )
    verdict = lw.verdicts(rows)
    assert verdict["best_cell"]["arm"] == "ewc100_replay1"
    assert verdict["best_cell"]["mean_avg_acc"] == pytest.approx(0.65)
    assert verdict["median_cell_avg_acc"] == pytest.approx(0.62)
    assert (verdict["grid_cells_run"], verdict["grid_cells"]) == (3, 9)
    unc, soft = verdict["learned"]["uncertainty"], verdict["learned"]["softmax"]
    assert unc["met"] is True and soft["met"] is False
    assert unc["difference_points"] == pytest.approx(-0.5)
    assert soft["difference_points"] == pytest.approx(-2.0)
    assert unc["vs_median_points"] == pytest.approx(2.5) and soft["vs_median_points"] == pytest.approx(1.0)
    assert unc["line"] == (
        "learned uncertainty within 1 point of the best grid cell: met (difference -0.5 points: 0.645 vs "
        "ewc100_replay1 0.650); against the median grid cell (0.620): +2.5 points"
    )
    assert soft["line"].startswith("learned softmax within 1 point of the best grid cell: missed (difference -2.0")
    assert verdict["goal"] == "met" and verdict["provisional"] is False


def test_verdict_exactly_one_point_below_is_met_and_more_is_missed(lw):
    on_edge = lw.verdicts(_rows(lw, {"ewc10_replay0.1": [0.65], "uncertainty": [0.64], "softmax": [0.6389]}))
    assert on_edge["learned"]["uncertainty"]["met"] is True  # 0.64 - 0.65 is -1.0000000000000009 points
    assert on_edge["learned"]["softmax"]["met"] is False  # -1.11 points
    missed = lw.verdicts(
        _rows(lw, {"ewc10_replay0.1": [0.70], "ewc10_replay1": [0.50], "uncertainty": [0.68], "softmax": [0.55]}),
        todo=[(("softmax", 1), "missing")],
    )
    assert missed["goal"] == "missed" and missed["provisional"] is True
    assert missed["learned"]["uncertainty"]["difference_points"] == pytest.approx(-2.0)
    assert missed["median_cell_avg_acc"] == pytest.approx(0.60)  # the median of an even number of cells
    assert missed["learned"]["softmax"]["vs_median_points"] == pytest.approx(-5.0)
    nothing = lw.verdicts(_rows(lw, {"ewc10_replay0.1": [0.70]}))
    assert nothing["goal"] == "not measured yet"
    assert nothing["learned"]["softmax"]["line"].endswith("not run yet")
    no_grid = lw.verdicts(_rows(lw, {"softmax": [0.70]}))
    assert no_grid["goal"] == "not measured yet" and no_grid["best_cell"] is None


# ------------------------------------------------------------------------------------------------------- report
def test_report_from_fake_results(lw, tmp_path):
    runs_dir, out = tmp_path / "runs", tmp_path / "out"
    for seed, avg in enumerate((0.64, 0.66)):
        _write(runs_dir, _record(lw, "ewc100_replay1", seed, "v1", avg))
    _write(runs_dir, _record(lw, "ewc10_replay0.1", 0, "v0", 0.55))  # stale
    learned = {
        "final": {"ewc": 2.5, "replay": 0.8, "task": 0.9},
        "per_task_mean": [{"task_index": 0, "weights": {"task": 1.0}}, {"task_index": 1, "weights": {"ewc": 2.0}}],
        "controller_bias_shift": {"ewc": -0.05, "replay": 0.01, "task": 0.02},
    }
    _write(runs_dir, _record(lw, "uncertainty", 0, "v1", 0.645, learned))
    markdown = lw.build_report(runs_dir, out, "v1", name="report")
    assert (out / "report.md").read_text().strip() == markdown.strip()
    assert (out / "report_grid.png").stat().st_size > 0
    lines = markdown.splitlines()
    assert "| ewc_lambda \\ replay_alpha | 0.1 | 0.3 | 1 |" in lines
    assert "| 10 | 0.550 (stale) | not run | not run |" in lines
    assert "| 100 | not run | not run | **0.650 [0.640, 0.660]** |" in lines
    assert "| 1000 | not run | not run | not run |" in lines
    assert "**Goal: met (provisional: runs missing or stale).**" in markdown
    assert (
        "- learned uncertainty within 1 point of the best grid cell: met (difference -0.5 points: 0.645 vs "
        "ewc100_replay1 0.650); against the median grid cell (0.600): +4.5 points"
    ) in lines
    assert "- learned softmax within 1 point of the best grid cell: not run yet" in lines
    assert (
        "| uncertainty | 0 | A: task 1; B: ewc 2 | ewc 2.5, replay 0.8, task 0.9 | ewc -0.05, replay 0.01, task 0.02 |"
    ) in lines
    todo = next(line for line in lines if line.startswith("Still to run"))
    assert todo.startswith("Still to run (`--all` order): softmax/seed0 (missing), ewc10_replay0.1/seed0 (stale), ")
    assert "ewc100_replay1/seed0" not in todo and "uncertainty/seed0" not in todo and "uncertainty/seed1" in todo
    summary = json.loads((out / "report.json").read_text())
    assert summary["verdict"]["goal"] == "met" and summary["verdict"]["best_cell"]["arm"] == "ewc100_replay1"
    assert len(summary["todo"]) == 22 - 3 and set(summary["arms"]) == {*GRID, "uncertainty", "softmax"}


# ---------------------------------------------------------------------------------------------- command line
@pytest.mark.parametrize(
    "argv, message",
    [
        (["--arm", "ewc5_replay1"], "argument --arm: invalid choice: 'ewc5_replay1' (choose from"),
        (["--arm", "softmax", "--seed", "5"], "argument --seed: invalid choice: 5 (choose from 0, 1)"),
        (["--all", "--max-runs", "0"], "argument --max-runs: '0' is not allowed: give an integer >= 1"),
        (["--seed", "1"], "--seed 1 is only allowed with --arm"),
        (["--plan", "--max-runs", "2"], "--max-runs 2 is only allowed with --all"),
        (["--plan", "--report"], "argument --report: not allowed with argument --plan"),
        ([], "give one of --arm ARM [--seed K], --all, --plan, --report or --quick"),
    ],
)
def test_bad_command_lines_are_refused_by_name(lw, capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        lw.main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_quick_never_writes_into_docs_results_and_data_must_hold_the_tasks(lw, capsys, tmp_path):
    target = lw.RESULTS / "loss_weighting_quick_should_not_exist"
    with pytest.raises(SystemExit):
        lw.main(["--quick", "--out", str(target)])
    assert f"--out {target} is not allowed with --quick: it is inside" in capsys.readouterr().err
    assert not target.exists()
    with pytest.raises(SystemExit):
        lw.main(["--all", "--data", str(tmp_path)])
    err = capsys.readouterr().err
    assert f"--data {tmp_path} is not allowed: it needs the CL benchmark task folders ['SST-2', 'WiC', 'BoolQA']" in err


# ------------------------------------------------------------------------------------------------ the quick run
_WORDS = ["the film", "this show", "our trip", "the meal", "a song"]
_ADJECTIVES = ["great", "dull", "bright", "slow", "warm"]


def _write_task(root: Path, name: str, labels: list[str], pair: bool) -> None:
    """Made-up rows (no benchmark text), every one different, in O-LoRA's CL_Benchmark layout."""
    folder = root / name
    folder.mkdir(parents=True)
    for file, offset in (("train.json", 0), ("test.json", 1000)):
        rows = []
        for i in range(offset, offset + 20):
            words = f"{_WORDS[i % 5]} was {_ADJECTIVES[(i // 5) % 5]} number {i}"
            sentence = f"word: {_ADJECTIVES[i % 5]}\n{words}\n{_WORDS[(i + 2) % 5]} felt fine" if pair else words
            rows.append({"sentence": sentence, "label": labels[i % 2]})
        (folder / file).write_text(json.dumps(rows))
    (folder / "labels.json").write_text(json.dumps(labels))


def test_quick_study_end_to_end_and_the_learned_weighting_acts(lw, tmp_path):
    data, out = tmp_path / "data", tmp_path / "quick"
    _write_task(data, "SST-2", ["Good", "Bad"], pair=False)
    _write_task(data, "WiC", ["True", "False"], pair=True)
    assert lw.main(["--quick", "--data", str(data), "--out", str(out)]) == 0
    runs = out / "runs"
    arms = ["ewc100_replay1", "ewc1000_replay1", "uncertainty", "softmax"]
    assert sorted(p.name for p in runs.iterdir()) == sorted(f"{a}_seed0.json" for a in arms)
    for name in ("loss_weighting_real.md", "loss_weighting_real.json", "loss_weighting_real_grid.png"):
        assert (out / name).stat().st_size > 0
    records = {a: json.loads((runs / f"{a}_seed0.json").read_text()) for a in arms}
    for arm, record in records.items():
        assert record["task_names"] == ["SST-2", "WiC"] and record["total_steps"] == 8  # 16 rows, batches of 4
        assert record["options"] == lw.build_arms(lw.QUICK)[arm].options
        assert 0.0 <= record["metrics"]["avg_acc"] <= 1.0 and record["wall_seconds"] > 0
        assert "benchmarks/loss_weighting_real.py" in record["code_files"]
    # every run is current for the code that made it: nothing left to run
    version = lw.code_version(lw.QUICK)
    assert lw.plan(lw.cl_real.load_results(runs), version, lw.QUICK) == []

    # the grid cells: fixed weights, exactly as configured (EWC's lambda sits inside its term: weight 1)
    fixed = records["ewc1000_replay1"]["weights"]
    assert fixed["controller_bias_shift"] is None and fixed["start"] is None
    assert {s["task"] for s in fixed["trajectory"]} == {1}  # no term before the second task
    assert all(s["weights"] == {"ewc": 1.0, "replay": 1.0} for s in fixed["trajectory"])

    for mode in ("uncertainty", "softmax"):
        weights = records[mode]["weights"]
        assert "hf_adaptive/control/loss_weighting.py" in records[mode]["code_files"]
        assert weights["start"] == {"task": 1.0, "ewc": 1.0, "replay": 1.0}
        second = [s for s in weights["trajectory"] if s["task"] == 1]
        assert len(second) == 4 and all(set(s["weights"]) == {"task", "ewc", "replay"} for s in second)
        assert any(s["losses"]["ewc"] > 0 for s in second)  # the EWC penalty the weight multiplies is not 0
        # the controller trained on the two terms: their output biases moved (they stay put for an absent term)
        shift = weights["controller_bias_shift"]
        assert abs(shift["ewc"]) > 1e-4 and abs(shift["replay"]) > 1e-4
        assert weights["controller_param_shift"] > 1e-3
        # and the weights it gives them moved away from where it started
        final = weights["final"]
        assert max(abs(final[t] - 1.0) for t in ("ewc", "replay")) > 1e-2
        assert all(math.isfinite(v) and v > 0 for v in final.values())
    markdown = (out / "loss_weighting_real.md").read_text()
    assert "learned uncertainty within 1 point of the best grid cell: " in markdown
    assert "Still to run (`--all` order): none." in markdown
