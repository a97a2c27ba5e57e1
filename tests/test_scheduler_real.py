"""benchmarks/scheduler_real.py: the plan, the spread / best / target verdicts and the report on hand-made runs (no
model), the CLI's refusals, the `--all` loop, and one `--quick` run end to end on a tiny fixture dataset."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest
from benchmark_loader import load_benchmark

LRS = (1e-4, 1e-3, 1e-2)

#: held-out losses per schedule, LR and seed (0, 1): adaptive has the smallest spread (0.2 vs 1.2 and 0.85) but its
#: best (0.5) is twice cosine's (0.25)
MISSES = {
    "constant": {1e-4: (0.8, 1.0), 1e-3: (0.3, 0.3), 1e-2: (1.4, 1.6)},
    "cosine": {1e-4: (1.0, 1.2), 1e-3: (0.2, 0.3), 1e-2: (0.8, 0.8)},
    "adaptive": {1e-4: (0.6, 0.6), 1e-3: (0.5, 0.5), 1e-2: (0.7, 0.7)},
}
#: adaptive: spread 0.09 and best 0.26, 1.04x cosine's 0.25: both targets met
MEETS = {**MISSES, "adaptive": {1e-4: (0.3, 0.3), 1e-3: (0.26, 0.26), 1e-2: (0.35, 0.35)}}


@pytest.fixture(scope="module")
def sr():
    yield from load_benchmark("scheduler_real")


def _record(
    schedule: str,
    lr: float,
    seed: int,
    loss: float | None,
    acc: float | None = 0.5,
    version: str = "v1",
    task: str = "SST-2",
    diverged: bool = False,
) -> dict[str, Any]:
    return {
        "task": task,
        "schedule": schedule,
        "base_lr": lr,
        "seed": seed,
        "code_version": version,
        "diverged": diverged,
        "metrics": {
            "eval_loss": None if diverged else loss,
            "accuracy": acc,
            "train_loss": None if loss is None else loss + 0.5,
            "lr_final": lr,
        },
        "steps": 32,
        "wall_seconds": 90.0,
        "load_average": {"start": 1.0, "end": 2.0},
    }


def _runs(losses: dict[str, dict[float, tuple[float, ...]]], acc: float = 0.5) -> dict[tuple, dict]:
    return {
        (s, lr, seed): _record(s, lr, seed, value, acc=acc)
        for s, per_lr in losses.items()
        for lr, values in per_lr.items()
        for seed, value in enumerate(values)
    }


def _write(folder: Path, record: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    name = f"{record['task']}_{record['schedule']}_lr{record['base_lr']:g}_seed{record['seed']}.json"
    (folder / name).write_text(json.dumps(record))


# ------------------------------------------------------------------------------------------------------- the plan
def test_plan_runs_a_complete_seed_0_first_then_seed_1(sr):
    grid = sr.Grid(("constant", "cosine", "adaptive"), (1e-4, 1e-2), (0, 1))
    todo = sr.plan({}, grid, "v1")
    assert [key for key, _ in todo] == [
        ("constant", 1e-4, 0),
        ("cosine", 1e-4, 0),
        ("adaptive", 1e-4, 0),
        ("constant", 1e-2, 0),
        ("cosine", 1e-2, 0),
        ("adaptive", 1e-2, 0),
        ("constant", 1e-4, 1),
        ("cosine", 1e-4, 1),
        ("adaptive", 1e-4, 1),
        ("constant", 1e-2, 1),
        ("cosine", 1e-2, 1),
        ("adaptive", 1e-2, 1),
    ]
    assert {why for _, why in todo} == {"missing"}
    # the default grid: 4 schedules (the law with and without its cosine anneal) x 5 LRs spanning 100x x 2 seeds
    default = sr.Grid()
    assert len(default.keys()) == 40 and max(default.lrs) / min(default.lrs) == pytest.approx(100)
    assert [k[2] for k in default.keys()] == [0] * 20 + [1] * 20


def test_plan_skips_current_runs_and_redoes_stale_ones(sr, tmp_path, capsys):
    grid = sr.Grid(("constant", "adaptive"), (1e-4, 1e-2), (0,))
    _write(tmp_path, _record("constant", 1e-4, 0, 0.5, version="v1"))
    _write(tmp_path, _record("adaptive", 1e-4, 0, 0.4, version="v0"))  # older code
    _write(tmp_path, _record("constant", 1e-2, 0, 0.5, version="v1", task="IMDB"))  # another task: not ours
    _write(tmp_path, _record("cosine", 1e-3, 0, 0.5, version="v1"))  # outside the grid
    (tmp_path / "broken_seed0.json").write_text("{not json")  # skipped with a note, not fatal
    runs = sr.load_results(tmp_path, "SST-2")
    assert set(runs) == {("constant", 1e-4, 0), ("adaptive", 1e-4, 0), ("cosine", 1e-3, 0)}
    assert "broken_seed0.json" in capsys.readouterr().err
    assert sr.run_status(runs, ("constant", 1e-4, 0), "v1") == "current"
    assert sr.run_status(runs, ("adaptive", 1e-4, 0), "v1") == "stale"
    assert sr.run_status(runs, ("constant", 1e-2, 0), "v1") == "missing"
    assert sr.plan(runs, grid, "v1") == [
        (("adaptive", 1e-4, 0), "stale"),
        (("constant", 1e-2, 0), "missing"),
        (("adaptive", 1e-2, 0), "missing"),
    ]
    assert set(sr.load_results(tmp_path, "IMDB")) == {("constant", 1e-2, 0)}


def test_plan_with_a_code_version_stamp(sr, tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "a.py").write_text("x = 1\n")
    script = tmp_path / "script.py"
    script.write_text("# the benchmark\n")
    settings = {"task": "SST-2", "n_train": 8}
    version = sr.CodeVersion(settings, package, [script])
    results = tmp_path / "runs"
    record = {**_record("constant", 1e-3, 0, 0.5), **version.stamp(modules={})}
    assert record["code_version"] != "v1" and "script.py" in record["code_files"]
    _write(results, record)
    grid = sr.Grid(("constant",), (1e-3,), (0,))
    assert sr.plan(sr.load_results(results, "SST-2"), grid, version) == []
    script.write_text("# the benchmark, edited\n")  # a file the run depended on changed: stale
    assert sr.plan(sr.load_results(results, "SST-2"), grid, version) == [(("constant", 1e-3, 0), "stale")]
    script.write_text("# the benchmark\n")
    assert sr.plan(sr.load_results(results, "SST-2"), grid, version) == []
    other = sr.CodeVersion({**settings, "n_train": 16}, package, [script])  # other settings: stale
    assert sr.plan(sr.load_results(results, "SST-2"), grid, other) == [(("constant", 1e-3, 0), "stale")]


# ------------------------------------------------------------------------------------------ spread, best, verdicts
def test_spread_best_and_ratio_to_constant(sr):
    grid = sr.Grid(("constant", "cosine", "adaptive"), LRS, (0, 1))
    loss = sr.summarize_metric(_runs(MISSES), grid, "eval_loss", higher_is_better=False)
    constant, cosine, adaptive = loss["constant"], loss["cosine"], loss["adaptive"]
    assert [c["mean"] for c in constant["per_lr"]] == pytest.approx([0.9, 0.3, 1.5])
    assert [(c["min"], c["max"], c["n"]) for c in constant["per_lr"]] == [(0.8, 1.0, 2), (0.3, 0.3, 2), (1.4, 1.6, 2)]
    assert constant["spread"] == pytest.approx(1.2) and constant["spread_vs_constant"] == pytest.approx(1.0)
    assert (constant["best"], constant["best_lr"]) == (pytest.approx(0.3), 1e-3)
    assert cosine["spread"] == pytest.approx(0.85) and cosine["spread_vs_constant"] == pytest.approx(0.85 / 1.2)
    assert (cosine["best"], cosine["best_lr"]) == (pytest.approx(0.25), 1e-3)
    assert adaptive["spread"] == pytest.approx(0.2) and adaptive["spread_vs_constant"] == pytest.approx(0.2 / 1.2)
    assert (adaptive["best"], adaptive["best_lr"]) == (pytest.approx(0.5), 1e-3)
    assert all(entry["complete"] for entry in loss.values())
    # accuracy: higher is better
    runs = _runs(MISSES)
    runs[("cosine", 1e-2, 0)]["metrics"]["accuracy"] = 0.9
    acc = sr.summarize_metric(runs, grid, "accuracy", higher_is_better=True)
    assert (acc["cosine"]["best"], acc["cosine"]["best_lr"]) == (pytest.approx(0.7), 1e-2)
    assert acc["cosine"]["spread"] == pytest.approx(0.2) and acc["constant"]["spread"] == 0.0
    assert acc["cosine"]["spread_vs_constant"] is None  # constant's spread is 0: no ratio


def test_smallest_spread_but_best_loss_misses_the_5_percent_target(sr):
    grid = sr.Grid(("constant", "cosine", "adaptive"), LRS, (0, 1))
    verdict = sr.summarize(_runs(MISSES), grid)["verdict"]
    assert verdict["spread_smallest"] is True
    assert verdict["within_tolerance"] is False
    assert verdict["ratio"] == pytest.approx(2.0)  # 0.5 / min(0.3, 0.25)
    assert verdict["baselines"] == ["constant", "cosine"] and verdict["why"] is None


def test_both_targets_met(sr):
    grid = sr.Grid(("constant", "cosine", "adaptive"), LRS, (0, 1))
    verdict = sr.summarize(_runs(MEETS), grid)["verdict"]
    assert verdict["spread_smallest"] is True and verdict["within_tolerance"] is True
    assert verdict["ratio"] == pytest.approx(1.04)
    lines = sr.verdict_lines(sr.summarize(_runs(MEETS), grid), grid)
    assert lines[0].startswith("- adaptive spread smallest: **met**")
    assert lines[1].startswith(
        "- adaptive best loss within 5 % of min(best constant, best cosine): **met** (ratio 1.04;"
    )


def test_each_adaptive_arm_is_judged_against_the_baselines_only(sr):
    """adaptive misses, adaptive_cosine meets both: neither arm's spread counts against the other's."""
    losses = {name: dict(per_lr) for name, per_lr in {**MISSES, "adaptive_cosine": MEETS["adaptive"]}.items()}
    grid = sr.Grid(("constant", "cosine", "adaptive", "adaptive_cosine"), LRS, (0, 1))
    summary = sr.summarize(_runs(losses), grid)
    verdicts = summary["verdicts"]
    assert set(verdicts) == {"adaptive", "adaptive_cosine"} and summary["verdict"] == verdicts["adaptive"]
    assert verdicts["adaptive"]["spread_smallest"] is True and verdicts["adaptive"]["within_tolerance"] is False
    cosine_arm = verdicts["adaptive_cosine"]
    assert cosine_arm["spread_smallest"] is True and cosine_arm["within_tolerance"] is True
    assert cosine_arm["ratio"] == pytest.approx(1.04)
    lines = sr.verdict_lines(summary, grid)
    assert lines[0].startswith("- adaptive spread smallest: **met**")
    assert lines[2].startswith("- adaptive_cosine spread smallest: **met** (spread of the seed-mean held-out loss")
    assert lines[3].startswith("- adaptive_cosine best loss within 5 % of min(best constant, best cosine): **met**")
    # an incomplete adaptive arm does not hold back the other's verdict
    del losses["adaptive"][1e-2]
    verdicts = sr.summarize(_runs(losses), grid)["verdicts"]
    assert verdicts["adaptive"]["why"] == "no result yet at some base LR for adaptive"
    assert verdicts["adaptive_cosine"]["within_tolerance"] is True


def test_the_annealed_arm_sets_the_anneal_option_only(sr):
    assert sr.ADAPTIVE == {"adaptive": {}, "adaptive_cosine": {"adaptive_anneal": "cosine"}}
    assert sr.SCHEDULES["adaptive_cosine"] == sr.SCHEDULES["adaptive"] == "constant"


def test_both_targets_missed_and_the_tolerance_edge(sr):
    grid = sr.Grid(("constant", "cosine", "adaptive"), LRS, (0, 1))
    # adaptive as wide as constant, its best 1.06x cosine's: missed, missed
    losses = {**MISSES, "adaptive": {1e-4: (0.265, 0.265), 1e-3: (1.565, 1.565), 1e-2: (0.5, 0.5)}}
    verdict = sr.summarize(_runs(losses), grid)["verdict"]
    assert verdict["spread_smallest"] is False and verdict["within_tolerance"] is False
    assert verdict["ratio"] == pytest.approx(1.06)
    # a tie with another schedule's spread (cosine's values at other LRs) is not "the smallest"
    tie = {**MISSES, "adaptive": {1e-4: (0.2, 0.3), 1e-3: (1.0, 1.2), 1e-2: (0.3, 0.3)}}
    verdict = sr.summarize(_runs(tie), grid)["verdict"]
    assert verdict["spread_smallest"] is False and verdict["within_tolerance"] is True
    assert verdict["ratio"] == pytest.approx(1.0)


def test_diverged_runs_count_as_infinite_loss(sr):
    grid = sr.Grid(("constant", "cosine", "adaptive"), LRS, (0, 1))
    runs = _runs(MISSES)
    runs[("constant", 1e-2, 1)] = _record("constant", 1e-2, 1, None, acc=None, diverged=True)
    summary = sr.summarize(runs, grid)
    cell = summary["eval_loss"]["constant"]["per_lr"][2]
    assert cell["mean"] == math.inf and cell["diverged"] == 1 and cell["n"] == 2
    assert sr._fmt_cell(cell) == "diverged (1/2 seeds)"
    assert summary["eval_loss"]["constant"]["spread"] == math.inf
    assert summary["eval_loss"]["constant"]["best"] == pytest.approx(0.3)  # the best is over finite means
    assert summary["eval_loss"]["adaptive"]["spread_vs_constant"] is None
    assert summary["accuracy"]["constant"]["per_lr"][2]["n"] == 1  # a diverged run has no accuracy
    assert summary["verdict"]["spread_smallest"] is True and summary["verdict"]["ratio"] == pytest.approx(2.0)


def test_verdict_waits_for_every_lr(sr):
    grid = sr.Grid(("constant", "cosine", "adaptive"), LRS, (0, 1))
    runs = _runs(MEETS)
    del runs[("adaptive", 1e-2, 0)], runs[("adaptive", 1e-2, 1)]
    summary = sr.summarize(runs, grid)
    verdict = summary["verdict"]
    assert verdict["spread_smallest"] is None and verdict["within_tolerance"] is None
    assert verdict["why"] == "no result yet at some base LR for adaptive"
    assert summary["eval_loss"]["adaptive"]["complete"] is False
    assert summary["eval_loss"]["adaptive"]["spread"] == pytest.approx(0.04)  # over the LRs it has
    lines = sr.verdict_lines(summary, grid)
    assert "**not judged**" in lines[0] and "**not judged**" in lines[1]
    # one seed so far at every LR: judged on it (seed 0 alone: cosine's best is 0.2, so 0.26 is 1.3x)
    one_seed = {k: v for k, v in _runs(MEETS).items() if k[2] == 0}
    verdict = sr.summarize(one_seed, grid)["verdict"]
    assert verdict["within_tolerance"] is False and verdict["ratio"] == pytest.approx(1.3)


# ------------------------------------------------------------------------------------------------------ the report
def test_report_on_fake_records(sr, tmp_path):
    runs_dir, out = tmp_path / "runs", tmp_path / "out"
    runs = _runs(MISSES, acc=0.75)
    del runs[("adaptive", 1e-2, 1)]  # still to run
    runs[("constant", 1e-4, 1)]["code_version"] = "v0"  # older code: stale
    runs[("adaptive", 1e-3, 0)]["adaptive_events"] = {"improved": 4, "warmup": 3}
    for record in runs.values():
        _write(runs_dir, record)
    grid = sr.Grid(("constant", "cosine", "adaptive"), LRS, (0, 1))
    markdown = sr.build_report(runs_dir, out, grid, "v1", sr.SETTINGS, name="report")
    assert (out / "report.md").read_text().strip() == markdown.strip()
    assert (out / "report.png").stat().st_size > 0
    data = json.loads((out / "report.json").read_text())
    assert data["summary"]["verdict"]["ratio"] == pytest.approx(2.0) and "environment" in data
    assert {t["arm"]: t["why"] for t in data["todo"]} == {
        "constant/lr0.0001/seed1": "stale",
        "adaptive/lr0.01/seed1": "missing",
    }
    assert "- adaptive spread smallest: **met**" in markdown
    assert "- adaptive best loss within 5 % of min(best constant, best cosine): **missed** (ratio 2.00;" in markdown
    loss_table = markdown.split("## Final held-out loss")[1].split("##")[0]
    rows = {line.split(" | ")[0].lstrip("| "): line for line in loss_table.splitlines() if line.startswith("| ")}
    assert rows["schedule"].startswith("| schedule | lr 0.0001 | lr 0.001 | lr 0.01 | spread | spread / constant |")
    assert rows["constant"] == (
        "| constant | 0.900 [0.800, 1.000] | 0.300 [0.300, 0.300] | 1.500 [1.400, 1.600] | 1.200 | 1.00 "
        "| 0.300 (lr 0.001) |"
    )
    assert rows["cosine"] == (
        "| cosine | 1.100 [1.000, 1.200] | 0.250 [0.200, 0.300] | 0.800 [0.800, 0.800] | 0.850 | 0.71 "
        "| 0.250 (lr 0.001) |"
    )
    # adaptive at lr 1e-2 has seed 0 only: its single value
    assert rows["adaptive"] == (
        "| adaptive | 0.600 [0.600, 0.600] | 0.500 [0.500, 0.500] | 0.700 | 0.200 | 0.17 | 0.500 (lr 0.001) |"
    )
    acc_table = markdown.split("## Accuracy")[1].split("##")[0]
    assert "| constant | 0.750 [0.750, 0.750] |" in acc_table and "| 0.000 | n/a | 0.750 (lr 0.0001) |" in acc_table
    lr_table = markdown.split("## LR in force at the last step")[1].split("##")[0]
    assert "| cosine | 1.00e-04 [1.00e-04, 1.00e-04] | 1.00e-03 [1.00e-03, 1.00e-03] |" in lr_table
    assert "adaptive/lr0.001/seed0: improved 4, warmup 3" in markdown
    assert "| constant/lr0.0001/seed1 | 1.000 | 0.750 | 32 | 90 | 1.0-2.0 | v0 (stale) |" in markdown
    assert "Still to run (`--all` order): constant/lr0.0001/seed1 (stale), adaptive/lr0.01/seed1 (missing)." in markdown
    assert "![held-out loss and accuracy vs base LR](report.png)" in markdown


def test_report_with_no_results_lists_every_arm(sr, tmp_path):
    grid = sr.Grid(("constant", "adaptive"), (1e-3, 1e-2), (0,))
    markdown = sr.build_report(tmp_path / "none", tmp_path / "out", grid, "v1", sr.SETTINGS, name="empty")
    assert "**not judged**" in markdown
    assert "constant/lr0.001/seed0 (missing), adaptive/lr0.001/seed0 (missing)" in markdown
    assert not (tmp_path / "out" / "empty.png").exists()


# ---------------------------------------------------------------------------------------------------------- CLI
@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--lrs", "1e-3,0"], ["argument --lrs", "'0'", "finite number > 0"]),
        (["--lrs=-1e-3"], ["argument --lrs", "'-1e-3'", "> 0"]),  # argparse takes "-1e-3" for an option
        (["--lrs", "1e-3,abc"], ["argument --lrs", "'abc'", "> 0"]),
        (["--lrs", "1e-3,0.001"], ["argument --lrs", "'1e-3,0.001'", "given twice"]),
        (["--schedules", "constant,linear"], ["argument --schedules", "'linear'", "constant, cosine, adaptive"]),
        (["--seeds", ""], ["argument --seeds", "''", "at least one seed"]),
        (["--seeds", ","], ["argument --seeds", "','", "at least one seed"]),
        (["--seeds", "0,-1"], ["argument --seeds", "'-1'", "integers >= 0"]),
        (["--run", "warm", "1e-3", "0"], ["argument --run", "'warm'", "constant, cosine, adaptive"]),
        (["--run", "adaptive", "0", "0"], ["argument --run", "'0'", "> 0"]),
        (["--all", "--max-runs", "0"], ["argument --max-runs", "0", ">= 1"]),
        ([], ["give --all, --plan, --report, --quick or --run"]),
    ],
)
def test_bad_cli_input_is_named(sr, capsys, argv, expected):
    with pytest.raises(SystemExit) as exc:
        sr.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    for part in expected:
        assert part in err


def test_quick_never_writes_into_docs_results(sr, capsys):
    target = sr.RESULTS / "scheduler_real_quick_should_not_exist"
    with pytest.raises(SystemExit):
        sr.main(["--quick", "--out", str(target)])
    assert "argument --out" in capsys.readouterr().err and not target.exists()


def test_run_all_starts_each_arm_once_in_its_own_process(sr, tmp_path, monkeypatch):
    grid = sr.Grid(("constant", "adaptive"), (1e-3, 1e-2), (0,))
    settings = {**sr.QUICK_SETTINGS, "task": "SST-2"}
    commands: list[list[str]] = []

    def fake_process(command: list[str]) -> int:
        commands.append(command)
        assert command[:3] == [sys.executable, str(sr.HERE), "--run"]
        schedule, lr, seed = command[3], float(command[4]), int(command[5])
        assert command[6:] == ["--task", "SST-2", "--data", str(tmp_path / "data"), "--results", str(tmp_path)]
        if schedule == "adaptive" and lr == 1e-2:
            return 1  # a crashed arm: reported, not retried in this call
        version = sr.CodeVersion(settings, sr.PACKAGE, sr.SCRIPTS)
        sr.save_run(tmp_path, _record(schedule, lr, seed, 0.5), version)
        return 0

    monkeypatch.setattr(sr, "subprocess_run", fake_process)
    status = sr.run_all(grid, settings, tmp_path / "data", tmp_path, in_process=False)
    assert status == 1
    assert [c[3:6] for c in commands] == [
        ["constant", "0.001", "0"],
        ["adaptive", "0.001", "0"],
        ["constant", "0.01", "0"],
        ["adaptive", "0.01", "0"],
    ]
    version = sr.CodeVersion(settings, sr.PACKAGE, sr.SCRIPTS)
    assert sr.plan(sr.load_results(tmp_path, "SST-2"), grid, version) == [(("adaptive", 1e-2, 0), "missing")]
    commands.clear()
    assert sr.run_all(grid, settings, tmp_path / "data", tmp_path, in_process=False, max_runs=1) == 1
    assert len(commands) == 1


# ------------------------------------------------------------------------------------------------- end to end
def _fixture_dataset(root: Path) -> Path:
    """A tiny SST-2-like task in the CL benchmark layout (made-up sentences)."""
    folder = root / "SST-2"
    folder.mkdir(parents=True)
    good, bad = ["great", "lovely", "superb", "warm"], ["awful", "dull", "boring", "poor"]

    def rows(n: int, offset: int) -> list[dict[str, str]]:
        out = []
        for i in range(n):
            positive = (i + offset) % 2 == 0
            words = good if positive else bad
            out.append(
                {
                    "sentence": f"the film was {words[i % 4]} and {words[(i + 1) % 4]}",
                    "label": "Good" if positive else "Bad",
                }
            )
        return out

    (folder / "labels.json").write_text(json.dumps(["Bad", "Good"]))
    (folder / "train.json").write_text(json.dumps(rows(40, 0)))
    (folder / "test.json").write_text(json.dumps(rows(20, 1)))
    return root


def test_quick_end_to_end(sr, tmp_path, capsys):
    data = _fixture_dataset(tmp_path / "data")
    out = tmp_path / "out"
    argv = ["--quick", "--data", str(data), "--out", str(out), "--schedules", "constant,adaptive"]
    argv += ["--lrs", "1e-3,1e-2", "--seeds", "0"]
    assert sr.main(argv) == 0
    files = sorted(p.name for p in (out / "runs").glob("*.json"))
    assert files == [
        "SST-2_adaptive_lr0.001_seed0.json",
        "SST-2_adaptive_lr0.01_seed0.json",
        "SST-2_constant_lr0.001_seed0.json",
        "SST-2_constant_lr0.01_seed0.json",
    ]
    version = sr.CodeVersion({**sr.QUICK_SETTINGS, "task": "SST-2"}, sr.PACKAGE, sr.SCRIPTS)
    steps = sr.QUICK_SETTINGS["n_train"] // 8 * sr.QUICK_SETTINGS["config"]["num_train_epochs"]
    for name in files:
        record = json.loads((out / "runs" / name).read_text())
        lr = record["base_lr"]
        assert sr.is_current(record, version) and "benchmarks/scheduler_real.py" in record["code_files"]
        assert record["steps"] == steps and len(record["trajectory"]["lr"]) == steps
        assert len(record["trajectory"]["loss"]) == steps
        m = record["metrics"]
        assert m["eval_loss"] > 0 and 0 <= m["accuracy"] <= 1 and m["train_loss"] > 0
        assert m["lr_final"] == record["trajectory"]["lr"][-1]
        assert record["load_average"]["start"] >= 0 and record["wall_seconds"] > 0 and not record["diverged"]
        if record["schedule"] == "constant":  # 2 warm-up steps (0, then half), then the base LR
            assert record["trajectory"]["lr"][:3] == pytest.approx([0.0, lr / 2, lr])
            assert record["lr_scheduler_type"] == "constant_with_warmup" and m["lr_final"] == pytest.approx(lr)
        else:  # the law starts at the base LR and changes it only after its warm-up observations
            assert record["trajectory"]["lr"][:4] == pytest.approx([lr] * 4)
            assert sum(record["adaptive_events"].values()) == steps and record["adaptive_events"]["warmup"] == 3
            assert record["adaptive_config"]["lr_up"] == 1.02 and record["lr_scheduler_type"] == "constant"
    markdown = (out / "scheduler_real.md").read_text()
    assert "- adaptive spread smallest: **" in markdown
    assert "- adaptive best loss within 5 % of min(best constant): **" in markdown
    assert "Still to run (`--all` order): none." in markdown and "](scheduler_real.png)" in markdown
    assert (out / "scheduler_real.png").stat().st_size > 0
    summary = json.loads((out / "scheduler_real.json").read_text())
    assert summary["summary"]["verdict"]["spread_smallest"] in (True, False)
    assert len(summary["runs"]) == 4 and "trajectory" not in summary["runs"][0]
    capsys.readouterr()
    assert sr.main([*argv, "--plan"]) == 0  # everything current: nothing to run
    assert "0 of 4 arm(s) to run" in capsys.readouterr().out


def test_a_run_stopped_by_the_non_finite_guard_is_stored_as_diverged(sr, tmp_path, monkeypatch):
    from hf_adaptive.trainer import ContinualTrainer, NonFiniteTrainingError

    def blow_up(self, tasks, *args, **kwargs):
        raise NonFiniteTrainingError("5 non-finite steps in a row")

    monkeypatch.setattr(ContinualTrainer, "train_sequence", blow_up)
    settings = {**sr.QUICK_SETTINGS, "task": "SST-2"}
    record = sr.run_arm("cosine", 1e-2, 0, settings, _fixture_dataset(tmp_path / "data"))
    assert record["diverged"] is True and "5 non-finite steps in a row" in record["error"]
    assert record["metrics"]["eval_loss"] is None and record["metrics"]["accuracy"] is None
    assert record["nonfinite_steps_skipped"] == 1 and record["lr_scheduler_type"] == "cosine"
    path = sr.save_run(tmp_path / "runs", record, "v1")
    runs = sr.load_results(tmp_path / "runs", "SST-2")
    assert (
        path.name == "SST-2_cosine_lr0.01_seed0.json" and sr._value(runs[("cosine", 1e-2, 0)], "eval_loss") == math.inf
    )


def _simulate(config, losses):
    """The package's law itself, fed `losses`: the LR factor at the end and the observations that cut it."""
    import torch

    from hf_adaptive.scheduling import AdaptiveScheduler, AdaptiveSchedulerConfig

    fields = {k: v for k, v in config.items() if k in AdaptiveSchedulerConfig.__dataclass_fields__}
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-2)
    law = AdaptiveScheduler(optimizer, AdaptiveSchedulerConfig(**fields))
    cuts, previous = [], law.lr
    for i, loss in enumerate(losses, start=1):
        law.observe(loss)
        if law.lr < previous:
            cuts.append(i)
        previous = law.lr
    return law.lr / 1e-2, cuts


@pytest.mark.parametrize("steps", [8, 9, 20, 32, 64])
def test_reachable_range_matches_the_law_fed_the_worst_and_best_losses(sr, steps):
    """The bound against a slow reference: the package's own law fed a loss that only rises (every observation
    non-improving) makes exactly the predicted cuts; fed a loss that only falls it never rises above the bound."""
    from dataclasses import asdict

    from hf_adaptive.scheduling import AdaptiveSchedulerConfig

    config = asdict(AdaptiveSchedulerConfig())
    reach = sr.reachable_range(config, steps)
    low, cuts = _simulate(config, [1.0 + 0.5 * i for i in range(steps)])
    assert cuts == reach["cut_observations"] and len(cuts) == reach["cuts"]
    assert low == pytest.approx(reach["low"], rel=1e-12)
    high, _ = _simulate(config, [2.0 * 0.5**i for i in range(steps)])
    assert high <= reach["high"] * (1 + 1e-12)
    if steps == 32:  # the default gains over one SmolLM2 task: 3 cuts (observations 9, 20, 31), at most x1.02^29
        assert reach["cut_observations"] == [9, 20, 31] and reach["high"] == pytest.approx(1.02**29)


def test_report_explains_the_reachable_window_with_each_runs_cuts(sr):
    grid = sr.Grid(("adaptive",), (1e-4, 1e-2), (0,))
    config = {"warmup": 3, "patience": 5, "cooldown": 5, "lr_down": 0.8, "lr_up": 1.02}
    lrs = [1e-2] * 9 + [8e-3] * 11 + [6.4e-3] * 11 + [5.12e-3]
    runs = {
        ("adaptive", lr, 0): {
            "schedule": "adaptive",
            "base_lr": lr,
            "seed": 0,
            "steps": 32,
            "adaptive_config": config,
            "trajectory": {"lr": [v * lr / 1e-2 for v in lrs], "loss": [1.0] * 3 + [9.3] + [1.0] * 28},
            "metrics": {"eval_loss": 1.0},
        }
        for lr in (1e-4, 1e-2)
    }
    lines = "\n".join(sr.reach_lines(runs, grid))
    assert "at most 3 cuts by 0.8" in lines and "observations 9, 20, 31" in lines
    assert "[0.51, 1.78] x the base LR, a 3.5x window, against the grid's 100x range" in lines
    assert "| adaptive/lr0.01/seed0 | 10, 21, 32 | 0 | 0.51 | 9.30 (4) |" in lines
    # with the spike rule and an anneal: cuts and the final ratio come from the law's own LR, not the annealed one
    config = {**config, "spike_ratio": 3.0, "spike_backoff": 0.5}
    law = [1e-2] * 4 + [5e-3] * 28
    runs[("adaptive_cosine", 1e-2, 0)] = {
        **runs[("adaptive", 1e-2, 0)],
        "schedule": "adaptive_cosine",
        "adaptive_config": config,
        "adaptive_events": {"spike": 1, "warmup": 3},
        "trajectory": {"lr": [v * (1 - i / 32) for i, v in enumerate(law)], "law_lr": law, "loss": [1.0] * 32},
    }
    grid = sr.Grid(("adaptive", "adaptive_cosine"), (1e-4, 1e-2), (0,))
    lines = "\n".join(sr.reach_lines(runs, grid))
    assert "| adaptive_cosine/lr0.01/seed0 | 5 | 1 | 0.50 | 1.00 (32) |" in lines
