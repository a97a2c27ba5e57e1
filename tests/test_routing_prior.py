"""benchmarks/routing_prior.py: its counting helpers, the synthetic counter-case, and the smoke run end to end."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import routing_prior  # noqa: E402
from test_routing_real import _LABELS, _write_task  # noqa: E402  (made-up rows in the CL benchmark layout)


def step(truth: str, action: str, correct: bool, in_family: bool = False) -> dict:
    return {"truth": truth, "action": action, "correct": correct, "wrong_reuse_in_family": in_family}


def test_family_correct_accepts_only_a_same_family_reuse_on_a_first_appearance():
    assert routing_prior.family_correct(step("new", "create", True))
    assert routing_prior.family_correct(step("new", "reuse", False, in_family=True))
    assert not routing_prior.family_correct(step("new", "reuse", False, in_family=False))
    assert not routing_prior.family_correct(step("reuse", "reuse", False, in_family=True))  # recurrence, wrong one
    assert not routing_prior.family_correct(step("reuse", "create", False))


def test_experts_made_counts_every_decision_but_a_reuse():
    steps = [{"action": a} for a in ("create", "reuse", "fork", "create", "reuse")]
    assert routing_prior.experts_made(steps) == 3


def test_synthetic_counter_case_reuses_more_unrelated_experts_as_the_prior_grows():
    rows = routing_prior.synthetic_sweep((0.5, 3.0))
    small, large = rows
    assert small["correct"] >= 0.9
    assert large["wrong_reuses"] > small["wrong_reuses"] + 2


def test_the_synthetic_signatures_share_a_dominant_component():
    sigs = routing_prior.synthetic_signatures()
    assert float(sigs[0][0] @ sigs[1][0]) > 0.95


def test_smoke_run_writes_the_sweep_and_reuses_its_signature_cache(tmp_path):
    for name in _LABELS:
        _write_task(tmp_path / "data", name, 20, 20)
    data = tmp_path / "data"
    args = ["--smoke", "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache"), "--data", str(data)]
    assert routing_prior.main(args) == 0
    result = json.loads((tmp_path / "out" / "routing_prior.json").read_text())
    assert [r["prior"] for r in result["real"]] == list(routing_prior.PRIORS)
    assert result["meta"]["signature_seconds"] > 0
    assert all(len(r["decisions"]) == len(routing_prior.SMOKE_STREAM) for r in result["real"])
    assert routing_prior.main(args) == 0  # second run: signatures from the cache
    again = json.loads((tmp_path / "out" / "routing_prior.json").read_text())
    assert again["meta"]["signature_seconds"] == 0.0
    assert again["real"] == result["real"]


def test_live_run_registers_cl_reals_routed_method_with_the_prior_and_keeps_a_current_record(tmp_path, monkeypatch):
    """The live run is cl_real's `expert_routing` with only the router's prior changed; a stored current record is
    reused, not run again."""
    import cl_real

    name, live = routing_prior.live_method(2.0)
    base = cl_real.METHODS["expert_routing"]
    assert live.plugins == base.plugins
    assert live.options == {**base.options, "router_normalize_prior": 2.0}
    known_before = dict(cl_real.METHODS)
    calls = []

    def fake_run_one(method, seed, settings, data, smoke=False):
        assert cl_real.METHODS[method] == live  # registered while it runs
        calls.append(method)
        return {"method": method, "seed": seed, "metrics": {"avg_acc": 0.5}, "matrix": [[0.5]], "task_names": ["A"]}

    monkeypatch.setattr(cl_real, "run_one", fake_run_one)
    record, ran = routing_prior.live_run(2.0, 0, tmp_path / "data", tmp_path / "runs", smoke=True)
    assert ran and calls == [name] and (tmp_path / "runs" / f"{name}_seed0.json").exists()
    assert cl_real.METHODS == known_before  # and only then
    record, ran = routing_prior.live_run(2.0, 0, tmp_path / "data", tmp_path / "runs", smoke=True)
    assert not ran and calls == [name]


def test_summarize_routed_reads_the_checked_reuse():
    record = {
        "method": "m",
        "seed": 0,
        "metrics": {"avg_acc": 0.6, "bwt": -0.01},
        "matrix": [[0.8, 0.0], [0.79, 0.7]],
        "task_names": ["SST-2", "IMDB"],
        "wall_seconds": 60.0,
        "extra": {
            "task_experts": {"SST-2": "expert_SST_2", "IMDB": "expert_SST_2"},
            "routing_decisions": [
                {"task": "SST-2", "action": "create", "score": None},
                {
                    "task": "IMDB",
                    "action": "reuse",
                    "source": "expert_SST_2",
                    "score": 0.68,
                    "success": True,
                    "rolled_back": False,
                    "old_task_accuracy": {"SST-2": {"before": 0.8, "after": 0.79}},
                },
            ],
        },
    }
    summary = routing_prior.summarize_routed(record)
    assert summary["experts"] == 1 and summary["final_row"] == [0.79, 0.7] and summary["wall_minutes"] == 1.0
    assert summary["decisions"][1]["success"] is True
    assert summary["decisions"][1]["old_task_accuracy"]["SST-2"]["after"] == 0.79
