"""benchmarks/routing_reuse_cost.py: the forced decisions, the seed-paired cost, and the smoke run end to end."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import routing_reuse_cost as rc  # noqa: E402
from test_routing_real import _LABELS, _write_task  # noqa: E402  (made-up rows in the CL benchmark layout)


def test_each_arm_changes_only_the_routers_thresholds_and_check_of_cl_reals_routed_method():
    import cl_real

    base = cl_real.METHODS["expert_routing"]
    for arm, options in rc.ARMS.items():
        m = rc.method(arm)
        assert m.plugins == base.plugins and m.kind == base.kind
        assert {k: v for k, v in m.options.items() if k not in options} == base.options
        assert set(options) <= {"router_reuse_threshold", "router_fork_threshold", "router_verify_reuse"}
    # create can never reuse or fork: a cosine is at most 1, and reuse needs >= the threshold of 1 ... of a
    # *different* task's signature (equal signatures are the only way to reach it)
    assert rc.ARMS["create"]["router_reuse_threshold"] == rc.ARMS["create"]["router_fork_threshold"] == 1.0


def test_the_run_settings_are_cl_reals_with_the_cases_two_tasks():
    import cl_real

    settings = rc.settings_for("cb_after_mnli")
    assert settings["tasks"] == ["MNLI", "CB"]
    assert {k: v for k, v in settings.items() if k != "tasks"} == {
        k: v for k, v in cl_real.SETTINGS.items() if k != "tasks"
    }


def _record(case: str, arm: str, seed: int, matrix: list[list[float]], action: str, **decision) -> dict:
    names = list(rc.CASES[case])
    return {
        "method": rc.run_name(case, arm),
        "seed": seed,
        "task_names": names,
        "matrix": matrix,
        "metrics": {"avg_acc": sum(matrix[-1]) / len(matrix[-1]), "bwt": matrix[-1][0] - matrix[0][0]},
        "extra": {
            "routing_decisions": [
                {"task": names[0], "action": "create"},
                {"task": names[1], "action": action, **decision},
            ],
            "task_experts": {names[0]: "e0", names[1]: "e0" if action == "reuse" else "e1"},
        },
        "wall_seconds": 60.0,
    }


def test_summary_pairs_each_arm_with_create_by_seed_and_calls_a_cost_only_beyond_one_point():
    case = "cb_after_mnli"
    runs = {}
    for seed, (create_b, reuse_b) in enumerate([(0.60, 0.59), (0.50, 0.45)]):
        runs[(rc.run_name(case, "create"), seed)] = _record(case, "create", seed, [[0.5, 0], [0.5, create_b]], "create")
        runs[(rc.run_name(case, "reuse"), seed)] = _record(
            case, "reuse", seed, [[0.5, 0], [0.5, reuse_b]], "reuse", success=True, rolled_back=False,
            old_task_accuracy={"MNLI": {"before": 0.5, "after": 0.49}},
        )  # fmt: skip
    summary = rc.summarize(runs)
    reuse = summary["cases"][case]["arms"]["reuse"]
    # averages: create 0.55 / 0.50, reuse 0.545 / 0.475 -> -0.5 and -2.5 points, mean -1.5: a cost
    assert reuse["vs_create_points"] == pytest.approx({0: -0.5, 1: -2.5})
    assert reuse["vs_create_mean_points"] == pytest.approx(-1.5)
    assert reuse["costs_accuracy"] is True and reuse["all_seeds"] is True
    row = reuse["runs"][0]
    assert row["decision"] == "reuse" and row["kept"] is True and row["experts"] == 1
    assert summary["cases"][case]["arms"]["fork"]["vs_create_mean_points"] is None  # not run: no verdict
    todo = {(t["arm"], t["why"]) for t in summary["todo"] if t["case"] == case}  # made-up runs carry no stamp
    assert todo == {("create", "stale"), ("reuse", "stale"), ("reuse_unchecked", "missing"), ("fork", "missing")}
    text = rc.report_markdown(summary)
    assert "**costs accuracy** (-1.5 points vs create; seed 0: -0.5, seed 1: -2.5)" in text
    assert "fork: not measured yet." in text
    # seed 0 alone: -0.5, within a point, is no cost, and the verdict says it is provisional
    del runs[(rc.run_name(case, "reuse"), 1)]
    reuse = rc.summarize(runs)["cases"][case]["arms"]["reuse"]
    assert reuse["costs_accuracy"] is False and reuse["all_seeds"] is False


def test_main_refuses_a_case_without_an_arm_and_max_runs_without_all(capsys):
    with pytest.raises(SystemExit):
        rc.main(["--case", "cb_after_mnli"])
    assert "--case and --arm go together" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        rc.main(["--report", "--max-runs", "2"])
    assert "--max-runs 2" in capsys.readouterr().err


def test_smoke_forces_each_decision_and_writes_the_report(tmp_path):
    for name in _LABELS:
        _write_task(tmp_path / "data", name, 16, 16)
    assert rc.main(["--smoke", "--out", str(tmp_path / "out"), "--data", str(tmp_path / "data")]) == 0
    result = json.loads((tmp_path / "out" / f"{rc.NAME}.json").read_text())
    assert result["todo"] == []
    for case, entry in result["cases"].items():
        assert entry["tasks"] == list(rc.SMOKE_CASES[case])
        decisions = {arm: a["runs"][0]["decision"] for arm, a in entry["arms"].items()}
        assert decisions == {"create": "create", "reuse": "reuse", "reuse_unchecked": "reuse", "fork": "fork"}
        assert entry["arms"]["create"]["runs"][0]["experts"] == 2
        assert entry["arms"]["reuse_unchecked"]["runs"][0]["experts"] == 1  # nothing undoes an unchecked reuse
        assert not any(a["stale"][0] for a in entry["arms"].values())
    assert "## RTE after MNLI" in (tmp_path / "out" / f"{rc.NAME}.md").read_text()
