"""benchmarks/gates_stream.py: one `--quick` run end to end (files, every arm at its budget at every step, phases in
order, the summary read back from the log), the stream's data against hand-built rows, the trackers and the
controller's paired reward against slow references, and the command-line validation."""

from __future__ import annotations

import json
import math
import statistics

import pytest
import torch
from benchmark_loader import load_benchmark


@pytest.fixture(scope="module")
def gs():
    yield from load_benchmark("gates_stream")


@pytest.fixture(scope="module")
def quick(gs, tmp_path_factory):
    out = tmp_path_factory.mktemp("gates_stream")
    assert gs.main(["--quick", "--out", str(out)]) == 0
    return json.loads((out / "gates_stream.json").read_text()), (out / "gates_stream.md").read_text(), out


# ---------------------------------------------------------------------------------------------- the quick run
def test_quick_run_writes_its_files_and_says_it_is_quick(quick):
    result, md, out = quick
    assert (out / "gates_stream_tracking.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "(gates_stream_tracking.png)" in md and "Quick mode: a pipeline check" in md
    assert result["meta"]["quick"] is True and result["meta"]["code_version"]


def test_every_arm_serves_every_step_at_its_budget(gs, quick):
    result, _, _ = quick
    s, k = result["meta"]["settings"], result["meta"]["heads_kept"]
    n = s["layers"] * s["heads"]
    assert k == int(s["budget"] * n + 0.5)
    log = result["log"]
    assert [r["step"] for r in log] == list(range(len(s["phases"]) * s["phase_steps"]))
    assert [r["phase"] for r in log] == [p for p in s["phases"] for _ in range(s["phase_steps"])]
    for r in log:
        assert r["kept"] == {
            "dense": n,
            "static": k,
            "oracle": k,
            "michel_online": k,
            "controller": k,
            "controller_prior": k,
        }
        assert all(math.isfinite(v) for v in r["online"].values())
        assert set(r["reward"]) == set(gs.CONTROLLERS)
        assert all(v is not None and -1 < v < 1 for v in r["reward"].values())  # paired from the first step on
    # static never changes; the oracle is the static set on natural text (both are Michel's natural top-k)
    for r in log:
        assert r["overlap"]["static"] == (
            1.0 if r["phase"] == "natural" else pytest.approx(result["shift"]["top_k_overlap"])
        )
        if r["phase"] == "natural":
            assert r["online"]["oracle"] == r["online"]["static"]
    assert all(log[0]["overlap"][a] == 1.0 for a in gs.TRACKERS)  # warm starts from the static gates
    assert result["controller_updates"] == dict.fromkeys(
        gs.CONTROLLERS, (len(log) - 1) // s["controller"]["rollout_steps"]
    )


def test_phase_summary_is_read_from_the_log(gs, quick):
    result, md, _ = quick
    s = result["meta"]["settings"]
    assert [p["phase"] for p in result["phases"]] == s["phases"]
    assert result["phases"] == gs._json_safe(
        gs.summarize(result["log"], s, {p["index"]: p["heldout_loss"] for p in result["phases"]})
    )
    for p in result["phases"]:
        assert set(p["heldout_loss"]) == set(gs.ARMS)
        assert f"| {p['index']} {p['phase']} |" in md
        # the fixed arms' gates never change: their held-out losses are the shift table's, measured before the stream
        fixed = result["shift"]["heldout_loss"][f"{p['phase']}_text"]
        assert p["heldout_loss"]["dense"] == fixed["dense"]
        assert p["heldout_loss"]["static"] == fixed["natural_top_k"]
        assert p["heldout_loss"]["oracle"] == fixed[f"{p['phase']}_top_k"]


# --------------------------------------------------------------------------------------------- data
def test_repeated_row_repeats_the_unpadded_prefix(gs):
    row = {"input_ids": [5, 6, 7, 8, 0, 0], "attention_mask": [1, 1, 1, 1, 0, 0], "labels": [5, 6, 7, 8, -100, -100]}
    assert gs.repeated_row(row, 3) == {
        "input_ids": [5, 6, 7, 5, 6, 7],
        "attention_mask": [1] * 6,
        "labels": [5, 6, 7, 5, 6, 7],
    }
    assert gs.repeated_row(row, 10)["input_ids"] == [5, 6, 7, 8, 5, 6, 7, 8]  # shorter rows repeat whole


def test_split_rows_is_disjoint_per_task_and_refuses_short_tasks(gs):
    s = {"heldout_rows_per_task": 1, "validation_rows_per_task": 2, "stream_rows_per_task": 2}
    tasks = [[{"id": (t, i)} for i in range(6)] for t in range(2)]
    out = gs.split_rows(tasks, s)
    assert out["heldout"] == [{"id": (0, 0)}, {"id": (1, 0)}]
    assert out["validation"] == [{"id": (0, 1)}, {"id": (0, 2)}, {"id": (1, 1)}, {"id": (1, 2)}]
    assert out["stream"] == [{"id": (0, 3)}, {"id": (0, 4)}, {"id": (1, 3)}, {"id": (1, 4)}]
    with pytest.raises(ValueError, match="has 4 eval rows; the settings need 5"):
        gs.split_rows([[{}] * 4], s)


def test_stream_batches_follow_the_phases(gs):
    pool = [{"input_ids": [10 + i, 20 + i], "attention_mask": [1, 1], "labels": [10 + i, 20 + i]} for i in range(5)]
    s = {
        "phases": ["natural", "repeated", "natural"],
        "phase_steps": 2,
        "batch_size": 2,
        "data_seed": 0,
        "repeat_tokens": 1,
    }

    def collate(rows):
        return rows

    stream = gs.stream_batches(pool, s, collate)
    assert [p for p, _ in stream] == ["natural"] * 2 + ["repeated"] * 2 + ["natural"] * 2
    seen = [r["input_ids"][0] for _, b in stream for r in b]
    assert sorted(seen[:5]) == [10, 11, 12, 13, 14]  # the first phase draws a permutation of the pool
    assert seen[5:] == seen[: len(seen) - 5]  # then the pool cycles in the same order
    for phase, batch in stream:
        for r in batch:
            assert (len(r["input_ids"]) == 2) and (phase == "natural" or r["input_ids"][0] == r["input_ids"][1])
    with pytest.raises(ValueError, match="phase='mixed' is not allowed"):
        gs.phase_rows(pool, "mixed", s)


# ---------------------------------------------------------------------------------------------- measurement
def test_overlap_and_mean_se(gs):
    ref = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 0.0]])
    assert gs.overlap(torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]), ref) == pytest.approx(2 / 3)
    assert gs.overlap(ref, ref) == 1.0
    m, se = gs.mean_se([1.0, 2.0, 4.0])
    assert m == pytest.approx(7 / 3) and se == pytest.approx(statistics.stdev([1, 2, 4]) / math.sqrt(3))
    assert gs.mean_se([3.0]) == (3.0, 0.0)


def test_michel_tracker_is_top_k_of_an_exponential_average(gs):
    torch.manual_seed(0)
    start = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    tracker = gs.MichelTracker(start, k=2, decay=0.5)
    seen = [torch.rand(1, 4) for _ in range(4)]
    for i, x in enumerate(seen):
        gates = tracker.update(x)
        avg = seen[0].clone()  # slow reference: the average written out
        for y in seen[1 : i + 1]:
            avg = 0.5 * avg + 0.5 * y
        top = set(avg.flatten().argsort(descending=True)[:2].tolist())
        assert set(torch.nonzero(gates.flatten()).flatten().tolist()) == top
    for decay in (-0.1, 1.0):
        with pytest.raises(ValueError, match=f"decay={decay!r} is not allowed"):
            gs.MichelTracker(start, 2, decay)


def test_controller_reward_is_paired_on_the_served_batch(gs):
    """The reward of an action is tanh((served - new) / served) on the same batch (efficiency 0), whatever the
    controller's previous loss was."""
    from hf_adaptive.control.config import GateControllerConfig
    from hf_adaptive.control.gate_controller import GateController
    from hf_adaptive.models import build_tokenizer, gate_model
    from hf_adaptive.tasks import CausalLMCollator, builtin_suite

    s = gs.QUICK_SETTINGS
    tokenizer = build_tokenizer()
    model = gs.gates_real.build_tiny_llama(tokenizer, 0, s).eval()
    tasks = builtin_suite(s["tasks"][:1], n_train=4, n_eval=4, seed=0)
    batch = CausalLMCollator(tokenizer)(gs.gates_real.text_rows(tasks, tokenizer, s, "eval", whole_text=True))
    gated = gate_model(model)
    n = s["layers"] * s["heads"]
    cfg = GateControllerConfig(min_active_heads=n // 2, max_active_heads=n // 2, max_changes=4, efficiency_factor=0.0)
    ctrl = GateController(s["layers"], s["heads"], cfg)
    ctrl.set_gates(
        gs.gate_control.top_k_gates(torch.arange(n, dtype=torch.float).view(s["layers"], s["heads"]), n // 2)
    )
    ctrl.tracker.previous_loss = 123.0  # a stale loss from another batch must not enter the reward
    for step, served in enumerate((2.0, 5.0)):
        new = gs.controller_step(ctrl, model, gated, batch, served, step)
        new_loss = gs.loss_under(model, gated, new, [batch])
        assert ctrl.log[-1]["loss"] == pytest.approx(new_loss)
        assert ctrl.log[-1]["reward"] == pytest.approx(math.tanh((served - new_loss) / served))
        assert int(new.sum()) == n // 2


def test_summarize_against_hand_computation(gs):
    s = {"phases": ["natural", "repeated"], "phase_steps": 4}
    arms = gs.ARMS

    def entry(step, phase, static, oracle, michel, ctrl):
        online = dict(zip(arms, (0.0, static, oracle, michel, ctrl, static + 1.0), strict=True))
        return {
            "step": step,
            "phase": phase,
            "online": online,
            "overlap": {"michel_online": 0.5, "controller": step / 10, "controller_prior": 0.9, "static": 1.0},
        }

    log = [entry(i, "natural", 2.0, 2.0, 2.0, 2.0) for i in range(4)]
    log += [entry(4, "repeated", 5, 3, 5, 5), entry(5, "repeated", 5, 3, 5, 5)]
    log += [entry(6, "repeated", 5.0, 3.0, 4.0, 4.5), entry(7, "repeated", 6.0, 4.0, 5.0, 5.3)]  # the second half
    held = {0: dict.fromkeys(arms, 1.0), 1: dict.fromkeys(arms, 2.0)}
    natural, repeated = gs.summarize(log, s, held)
    assert natural["static_oracle_gap"] == 0 and natural["gap_closed"] == dict.fromkeys(gs.TRACKERS)
    assert natural["verdicts"] == {"controller": "no better than static", "controller_prior": "worse"}
    assert repeated["online_loss"]["static"] == 5.5 and repeated["online_loss"]["oracle"] == 3.5
    assert repeated["gap_closed"]["michel_online"] == pytest.approx(1.0 / 2.0)
    assert repeated["gap_closed"]["controller"] == pytest.approx((5.5 - 4.9) / 2.0)
    d = repeated["vs_static"]["controller"]
    assert d["mean"] == pytest.approx(-0.6) and d["se"] == pytest.approx(statistics.stdev([-0.5, -0.7]) / math.sqrt(2))
    assert repeated["verdicts"]["controller"] == "tracks"  # -0.6 < -2 x 0.1
    assert repeated["overlap_with_oracle"]["controller"] == {"first": 0.4, "last": 0.7}
    assert repeated["heldout_loss"] == held[1]


# ---------------------------------------------------------------------------------------------- the CLI
@pytest.mark.parametrize(
    ("argv", "option"),
    [(["--quick", "--phase-steps", "1"], "--phase-steps 1"), (["--data", "/nonexistent/cl"], "--data /nonexistent/cl")],
)
def test_bad_options_name_the_option_and_value(gs, capsys, argv, option):
    with pytest.raises(SystemExit):
        gs.parse_args(argv)
    assert f"{option} is not allowed" in capsys.readouterr().err


def test_quick_numbers_never_go_into_docs_results(gs, capsys):
    with pytest.raises(SystemExit):
        gs.parse_args(["--quick", "--out", str(gs.RESULTS)])
    assert "is not allowed with --quick" in capsys.readouterr().err


def test_arms_serving_the_same_gates_share_one_forward(gs, monkeypatch):
    calls = []
    monkeypatch.setattr(gs, "loss_under", lambda model, gated, g, batches: calls.append(g.clone()) or float(g.sum()))
    a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    out = gs.online_losses(None, None, {"static": a, "oracle": a.clone(), "controller": b}, {})
    assert out == {"static": 1.0, "oracle": 1.0, "controller": 1.0} and len(calls) == 2
