"""benchmarks/gates_real.py: one `--quick` run end to end (files, every strategy at every budget with exactly its
heads, the Pareto front, the controllers' curves and warm start, physical pruning with save / reload and latency),
the command-line validation, and the numeric helpers against slow obvious references."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from benchmark_loader import load_benchmark

BUDGETS = (0.75, 0.5, 0.25)
#: every controller run of the quick fixture: PPO, plain and with the prior, from each start
CONTROLLERS = [f"controller_ppo{p}{i}" for p in ("", "_prior") for i in ("", "_warm", "_best")]


@pytest.fixture(scope="module")
def gr():
    yield from load_benchmark("gates_real")


@pytest.fixture(scope="module")
def quick(gr, tmp_path_factory):
    """One quick run with every controller start (3 budgets, 3 seeds, PPO with and without the prior, cold + warm +
    best): (result JSON, markdown, dir)."""
    out = tmp_path_factory.mktemp("gates_real")
    assert gr.main(["--quick", "--out", str(out), "--controller-init", "cold,michel,best"]) == 0
    return json.loads((out / "gates_real.json").read_text()), (out / "gates_real.md").read_text(), out


def _rows(result, strategy):
    return [r for r in result["results"] if r["strategy"] == strategy]


# ---------------------------------------------------------------------------------------------- the quick run
def test_quick_run_writes_its_files(quick):
    result, md, out = quick
    assert (out / "gates_real_pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![test loss vs heads kept" in md and "(gates_real_pareto.png)" in md
    assert result["meta"]["quick"] is True and result["meta"]["code_version"]
    assert result["environment"]["threads"] == 1
    est = result["meta"]["estimated_real_seconds"]  # what the same options would cost on SmolLM2
    assert est["total"] == pytest.approx(sum(v for k, v in est.items() if k != "total"), abs=0.5)


def test_every_strategy_keeps_exactly_its_budget(gr, quick):
    result, _, _ = quick
    s = result["meta"]["settings"]
    n = s["layers"] * s["heads"]
    strategies = ["random", "magnitude", "michel", "l0", "michel_iterated", *CONTROLLERS]
    for frac in BUDGETS:
        k = gr.budget_heads(frac, n)
        at = {r["strategy"]: r for r in result["results"] if r["fraction"] == frac}
        assert set(strategies) <= set(at), f"missing at {frac}: {set(strategies) - set(at)}"
        for name in strategies:
            r = at[name]
            assert r["heads"] == k and len(r["kept"]) == k and len(set(r["kept"])) == k, (name, frac)
            assert all(0 <= i < n for i in r["kept"]) and math.isfinite(r["test_loss"])
        assert len(at["random"]["test_loss_seeds"]) == 3
        assert at["random"]["test_loss"] == pytest.approx(sum(at["random"]["test_loss_seeds"]) / 3)
    assert _rows(result, "dense")[0]["heads"] == n
    # the static rankings are the top-k of their scores
    michel = torch.tensor(result["statistics"]["michel"])
    for r in _rows(result, "michel"):
        assert sorted(r["kept"]) == sorted(michel.argsort(descending=True)[: r["heads"]].tolist())


def test_kv_group_row_keeps_whole_groups(quick):
    result, _, _ = quick
    s = result["meta"]["settings"]
    (row,) = _rows(result, "michel_kv_groups")
    group = s["heads"] // s["kv_heads"]
    groups = {(i // s["heads"], (i % s["heads"]) // group) for i in row["kept"]}
    assert row["heads"] == len(row["kept"]) == s["layers"] * s["heads"] // 2
    assert len(groups) * group == len(row["kept"])  # every kept group complete
    # and the groups are the best half by summed importance
    michel = torch.tensor(result["statistics"]["michel"]).view(s["layers"], s["kv_heads"], group).sum(-1)
    best = set(michel.flatten().argsort(descending=True)[: len(groups)].tolist())
    assert {layer * s["kv_heads"] + g for layer, g in groups} == best


def test_pareto_front_is_the_non_dominated_points(quick):
    result, _, _ = quick
    rows = result["results"]
    front = result["pareto_front"]
    assert front
    points = {(r["heads"], r["test_loss"]) for r in rows}
    for p in front:
        assert (p["heads"], p["test_loss"]) in points
        assert not any(
            h <= p["heads"] and x <= p["test_loss"] and (h, x) != (p["heads"], p["test_loss"]) for h, x in points
        )
    for h, x in points - {(p["heads"], p["test_loss"]) for p in front}:  # every other point is dominated
        assert any(p["heads"] <= h and p["test_loss"] <= x for p in front)


def test_verdicts_follow_the_rows(gr, quick):
    result, md, _ = quick
    for v in result["verdicts"]:
        at = [r for r in result["results"] if r["fraction"] == v["fraction"]]
        static = [r for r in at if r["strategy"] in gr.STATIC]
        best = min(static, key=lambda r: r["test_loss"])
        issue = min((r for r in static if r["strategy"] != "michel_iterated"), key=lambda r: r["test_loss"])
        assert v["best_static"] == best["strategy"] and v["best_issue_static"] == issue["strategy"]
        assert v["winner"] == min(at, key=lambda r: r["test_loss"])["strategy"]
        assert sorted(v["controllers"]) == sorted(v["controllers_vs_issue_static"]) == sorted(CONTROLLERS)
        for r in at:
            if r["strategy"].startswith("controller"):
                name, loss, std = r["strategy"], r["test_loss"], v["random_std"]
                assert v["controllers"][name] == gr.verdict(loss, best["test_loss"], std)
                assert v["controllers_vs_issue_static"][name] == gr.verdict(loss, issue["test_loss"], std)
        assert f"winner **{v['winner']}**" in md


def test_controllers_curves_warm_start_and_best_validated_gates(gr, quick):
    result, md, _ = quick
    s = result["meta"]["settings"]
    n = s["layers"] * s["heads"]
    michel = {r["fraction"]: r for r in _rows(result, "michel")}
    assert len(result["controllers"]) == len(BUDGETS) * len(CONTROLLERS)
    for c in result["controllers"]:
        assert c["prior"] == ("importance" if "_prior" in c["strategy"] else "none")
        k = gr.budget_heads(c["fraction"], n)
        curve = c["curve"]
        assert [r["step"] for r in curve] == list(range(s["controller_steps"] + 1))
        assert all(r["active_heads"] == k for r in curve[1:])  # min = max = the budget after the first action
        assert curve[0]["reward"] is None and all(r["reward"] is not None for r in curve[1:])
        at_k = [r["loss"] for r in curve if r["active_heads"] == k]
        assert c["best_val_loss"] == min(at_k)
        (row,) = [r for r in result["results"] if r["strategy"] == c["strategy"] and r["fraction"] == c["fraction"]]
        assert row["val_loss"] == min(at_k)  # the best validated gates are the ones reported
        if c["init"] == "michel":  # the warm start is Michel's top-k: same heads, same validation loss
            assert curve[0]["active_heads"] == k
            assert curve[0]["loss"] == pytest.approx(michel[c["fraction"]]["val_loss"], abs=1e-6)
            assert row["val_loss"] <= michel[c["fraction"]]["val_loss"] + 1e-6
        elif c["init"] == "best":  # the static ranking with the lowest validation loss at the budget
            statics = [r for r in result["results"] if r["fraction"] == c["fraction"] and r["strategy"] in gr.RANKINGS]
            start = min(statics, key=lambda r: r["val_loss"])
            assert c["start"] == start["strategy"] and curve[0]["active_heads"] == k
            assert curve[0]["loss"] == pytest.approx(start["val_loss"], abs=1e-6)
            assert row["val_loss"] <= start["val_loss"] + 1e-6  # the best validated gates only improve on it
        else:
            assert curve[0]["active_heads"] == n
    assert "## Controller reward curves" in md


def test_best_static_picks_the_lowest_validation_loss_ranking(gr):
    rows = [
        {"strategy": "random", "test_loss": 1.0},  # no validation loss: never a start
        {"strategy": "magnitude", "val_loss": 9.0},
        {"strategy": "michel", "val_loss": 4.1},
        {"strategy": "l0", "val_loss": 3.8},
        {"strategy": "controller_ppo", "val_loss": 0.1},  # not a static ranking
    ]
    assert gr.best_static(rows) == "l0"
    assert gr.best_static([r for r in rows if r["strategy"] != "l0"]) == "michel"


def test_the_default_run_is_the_best_start_with_and_without_the_prior(gr, tmp_path):
    s = gr.resolve_settings(gr.parse_args(["--data", str(tmp_path)]))
    assert s["inits"] == ["best"] and s["priors"] == ["none", "importance"] and s["prior_strength"] > 0


def test_michel_iterated_rounds(gr, quick):
    """Round 0 is Michel's top-k (same validation loss); the row keeps the best validated round."""
    result, md, _ = quick
    s = result["meta"]["settings"]
    michel = {r["fraction"]: r for r in _rows(result, "michel")}
    for r in _rows(result, "michel_iterated"):
        losses = r["round_val_losses"]
        assert len(losses) == s["iterated"]["rounds"] + 1
        assert losses[0] == pytest.approx(michel[r["fraction"]]["val_loss"], abs=1e-6)
        assert r["val_loss"] == min(losses) == losses[r["best_round"]]
        assert r["best_round"] == losses.index(min(losses))  # the first of equal rounds
    assert "michel_iterated, validation loss per round" in md


def _tiny_gated(gr, tasks: int):
    """The quick settings, an untrained tiny GQA Llama with fixed gates, and one batch of `tasks` built-in tasks."""
    from hf_adaptive.models import build_tokenizer, gate_model
    from hf_adaptive.tasks import CausalLMCollator, builtin_suite

    s = gr.resolve_settings(gr.parse_args(["--quick"]))
    tokenizer = build_tokenizer()
    model = gr.build_tiny_llama(tokenizer, 0, s).eval()
    data = builtin_suite(s["tasks"][:tasks], n_train=8, n_eval=8, seed=0)
    batches = [CausalLMCollator(tokenizer)(gr.text_rows(data, tokenizer, s, "eval", whole_text=True))]
    return s, model, gate_model(model), batches


def test_iterate_importance_against_a_hand_loop(gr):
    """Each round: importance under the gates of the round before, averaged, top-k; the best validated round wins."""
    from hf_adaptive.control.feedback import validation_loss
    from hf_adaptive.models import head_importance

    s, model, gated, batches = _tiny_gated(gr, tasks=2)
    n, k, decay = s["layers"] * s["heads"], 9, 0.25
    start = head_importance(model, batches)
    out = gr.iterate_importance(model, gated, batches, start, k, {"rounds": 3, "decay": decay})
    average, gates, rounds = start.clone(), None, []
    for _ in range(4):  # round 0, then 3 rounds
        if gates is not None:
            gated.set_gates(gates)
            average = decay * average + (1 - decay) * head_importance(model, batches)
        order = sorted(range(n), key=lambda i: -float(average.flatten()[i]))
        gates = torch.zeros(n)
        gates[order[:k]] = 1
        gates = gates.view(s["layers"], s["heads"])
        gated.set_gates(gates)
        rounds.append((validation_loss(model, batches), gates))
    assert out["round_val_losses"] == pytest.approx([loss for loss, _ in rounds], abs=1e-6)
    best = min(range(4), key=lambda i: rounds[i][0])
    assert out["best_round"] == best and torch.equal(out["gates"], rounds[best][1])
    assert int(out["gates"].sum()) == k
    with pytest.raises(ValueError, match="decay=1.0"):
        gr.iterate_importance(model, gated, batches, start, k, {"rounds": 1, "decay": 1.0})


def test_the_prior_arm_runs_the_prior_controller(gr):
    """`prior_strength` > 0 builds a `PriorGateController` with that strength; 0 the plain `GateController`."""
    from hf_adaptive.control.config import GateControllerConfig
    from hf_adaptive.control.importance_prior import PriorGateController

    s, model, gated, batches = _tiny_gated(gr, tasks=1)
    cfg = GateControllerConfig(min_active_heads=12, max_active_heads=12, max_changes=2)
    start = gr.random_gates(s["layers"], s["heads"], 12, 0)
    prior = gr.run_controller(model, gated, batches, batches, cfg, 2, start, prior_strength=7.0)
    plain = gr.run_controller(model, gated, batches, batches, cfg, 2, start)
    assert isinstance(prior, PriorGateController) and prior.prior.strength == 7.0 and prior.policy.strength == 7.0
    assert not isinstance(plain, PriorGateController)
    assert len(prior.log) == len(plain.log) == 3 and prior.log[0]["loss"] == pytest.approx(plain.log[0]["loss"])


def test_pruned_models_match_the_gated_ones_and_reload(quick):
    result, md, _ = quick
    p = result["pruning"]
    s = result["meta"]["settings"]
    kv_row = _rows(result, "michel_kv_groups")[0]
    michel_half = next(r for r in _rows(result, "michel") if r["fraction"] == 0.5)
    for name, row in (("query_heads", michel_half), ("kv_groups", kv_row)):
        v = p[name]
        assert v["max_abs_diff_vs_gated"] <= 1e-4, name
        assert v["test_loss"] == pytest.approx(row["test_loss"], abs=1e-4), name
        assert v["reload_equal"] is True and v["max_abs_diff_reloaded"] <= 1e-5 and v["reload_has_gates"] is False
        assert v["parameters"] < p["dense"]["parameters"] and v["saved_bytes"] > 0
    # whole groups: the k/v projections keep one slot per kept group (one for a layer left without heads)
    group = s["heads"] // s["kv_heads"]
    per_layer = [
        {(i % s["heads"]) // group for i in kv_row["kept"] if i // s["heads"] == layer} for layer in range(s["layers"])
    ]
    assert p["kv_groups"]["kv_slots_per_layer"] == [max(1, len(g)) for g in per_layer]
    assert p["kv_groups"]["padding_slots"] == 0
    assert p["dense"]["kv_slots"] == s["layers"] * s["kv_heads"]
    # query heads: never more kv slots than the dense model, one per kept group in every padded layer
    q = p["query_heads"]
    assert q["kv_groups_kept"] <= q["kv_slots"] <= p["dense"]["kv_slots"]
    assert q["query_heads"] == michel_half["heads"] + q["zeroed_layers"]  # a zeroed layer keeps one (silent) head
    assert (q["padding_slots"] > 0) == (q["padded_layers"] > 0)
    assert "## Package APIs this run relies on" in md and "lacks" not in md
    for pair in ("query_heads_vs_dense", "kv_groups_vs_dense", "kv_groups_vs_query_heads"):
        lat = p["latency"][pair]
        for key in ("prefill_ms", "decode_ms", "reference_prefill_ms", "reference_decode_ms"):
            assert lat[key] > 0
        assert lat["prefill_ratio"] > 0 and lat["decode_ratio"] > 0 and lat["reps"] == s["latency"]["reps"]
        assert f"| {pair} |" in md
    assert "save / reload without the wrapper with equal logits: yes" in md


# ------------------------------------------------------------------------------------------------- options
@pytest.mark.parametrize(
    ("argv", "option"),
    [
        (["--budgets", "0.5,1.5"], "--budgets"),
        (["--budgets", "half"], "--budgets"),
        (["--budgets", "0.01"], "--budgets"),  # 0 of the quick model's 24 heads
        (["--budgets", "0.5,0.51"], "--budgets"),  # both keep 12 heads
        (["--seeds", "-1"], "--seeds"),
        (["--seeds", "1,1"], "--seeds"),
        (["--algorithm", "dqn"], "--algorithm"),
        (["--algorithm", "ppo,ppo"], "--algorithm"),
        (["--controller-init", "warm"], "--controller-init"),
        (["--controller-prior", "greedy"], "--controller-prior"),
        (["--controller-prior", "none,none"], "--controller-prior"),
        (["--controller-steps", "0"], "--controller-steps"),
        (["--l0-steps", "x"], "--l0-steps"),
        (["--rows-per-task", "1"], "--rows-per-task"),
        (["--lora-steps", "-3"], "--lora-steps"),
    ],
)
def test_bad_options_name_the_option_and_value(gr, capsys, argv, option):
    with pytest.raises(SystemExit) as err:
        gr.parse_args(["--quick", *argv])
    assert err.value.code == 2
    message = capsys.readouterr().err
    assert f"{option}={argv[1]!r} is not allowed" in message


def test_real_mode_needs_the_data_folder(gr, capsys, tmp_path):
    with pytest.raises(SystemExit):
        gr.parse_args(["--data", str(tmp_path / "nowhere")])
    assert "--data=" in capsys.readouterr().err
    args = gr.parse_args(["--data", str(tmp_path), "--algorithm", "reinforce,a2c,ppo", "--budgets", "0.75,0.25"])
    s = gr.resolve_settings(args)
    assert s["algorithms"] == ["reinforce", "a2c", "ppo"] and s["budgets"] == [0.75, 0.25]
    assert s["model"] == "smollm2-135m" and s["controller_steps"] == 40 and s["lora_accuracy"] is False


def test_real_mode_estimate_fits_the_hour(gr, tmp_path):
    """The docstring's figures come from `estimated_seconds`: the defaults fit in an hour, the controller dominates."""
    s = gr.resolve_settings(gr.parse_args(["--data", str(tmp_path)]))
    est = gr.estimated_seconds(s)
    assert est["total"] <= 3600 and est["controller"] > est["total"] / 2
    plain = gr.estimated_seconds({**s, "priors": ["none"]})
    assert plain["controller"] == pytest.approx(est["controller"] / 2, rel=1e-3)
    assert 0 < est["michel_iterated"] < est["controller"]
    assert "lora" in gr.estimated_seconds({**s, "lora_accuracy": True})


# ------------------------------------------------------------------------------------------------- helpers
@pytest.mark.parametrize(("layers", "heads", "kv", "keep"), [(4, 6, 2, 4), (3, 9, 3, 4), (2, 8, 4, 3)])
def test_kv_group_gates_against_brute_force(gr, layers, heads, kv, keep):
    imp = torch.rand(layers, heads, generator=torch.Generator().manual_seed(layers * heads + keep))
    gates = gr.kv_group_gates(imp, kv, keep)
    group = heads // kv
    sums = {
        (layer, g): sum(float(imp[layer, g * group + j]) for j in range(group))
        for layer in range(layers)
        for g in range(kv)
    }
    best = max(itertools.combinations(sums, keep), key=lambda c: sum(sums[x] for x in c))
    want = torch.zeros(layers, heads)
    for layer, g in best:
        for j in range(group):
            want[layer, g * group + j] = 1
    assert torch.equal(gates, want)


def test_kv_group_gates_refuses_a_kv_count_that_does_not_divide(gr):
    with pytest.raises(ValueError, match="kv_heads=4"):
        gr.kv_group_gates(torch.rand(2, 6), 4, 1)


def test_l0_ranks_by_the_packages_expected_gates(gr):
    """The L0 strategy's scores are `GatedModel.expected_gates()` of the trained log_alpha (the benchmark keeps no
    quadrature of its own), and the gates it trained are removed again."""
    from hf_adaptive.models import build_tokenizer, gate_model
    from hf_adaptive.tasks import CausalLMCollator, builtin_suite

    assert not hasattr(gr, "expected_gate")
    s = gr.resolve_settings(gr.parse_args(["--quick"]))
    tokenizer = build_tokenizer()
    model = gr.build_tiny_llama(tokenizer, 0, s).eval()
    tasks = builtin_suite(s["tasks"][:1], n_train=8, n_eval=8, seed=0)
    batches = [CausalLMCollator(tokenizer)(gr.text_rows(tasks, tokenizer, s, "eval", whole_text=True))]
    l0 = gr.train_l0(model, batches, s["l0"] | {"steps": 2}, seed=0)
    assert not any(type(m).__name__ == "GatedModel" for m in model.modules())
    gated = gate_model(model, mode="hard_concrete")
    with torch.no_grad():
        gated.log_alpha.copy_(l0["log_alpha"])
    assert torch.equal(l0["expected"], gated.expected_gates()) and l0["expected"].shape == (s["layers"], s["heads"])
    assert len(l0["curve"]) == 2


def test_budget_heads_and_an_exact_controller_budget(gr):
    """Half-up rounding, and a controller given min_active_heads = max_active_heads = k keeps exactly k heads
    (75 % of 270 = 202.5 as a fraction would leave no integer budget)."""
    from hf_adaptive.control.gate_controller import GateController, GateControllerConfig

    assert [gr.budget_heads(f, 270) for f in BUDGETS] == [203, 135, 68]
    assert [gr.budget_heads(f, 24) for f in BUDGETS] == [18, 12, 6]
    with pytest.raises(ValueError, match="max_active_fraction=0.75"):
        GateController(30, 9, GateControllerConfig(min_active_fraction=0.75, max_active_fraction=0.75))
    for k in (203, 68):
        cfg = GateControllerConfig(min_active_heads=k, max_active_heads=k, max_changes=4)
        ctrl = GateController(30, 9, cfg)
        assert int(ctrl.act().sum()) == k


def test_random_gates_are_seeded_subsets(gr):
    a, b, c = (gr.random_gates(4, 6, 9, seed) for seed in (0, 0, 1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert int(a.sum()) == 9 and set(a.unique().tolist()) <= {0.0, 1.0}


def test_verdict_and_curve_summary(gr):
    assert gr.verdict(1.0, 1.2, 0.1) == "beats"
    assert gr.verdict(1.25, 1.2, 0.1) == "matches" and gr.verdict(1.15, 1.2, 0.1) == "matches"
    assert gr.verdict(1.31, 1.2, 0.1) == "loses" and gr.verdict(1.2, 1.2, 0.0) == "matches"
    log = [
        {"step": 0, "loss": 1.0, "reward": None, "active_heads": 8},  # cold start: all heads, not at the budget
        {"step": 1, "loss": 2.0, "reward": -0.5, "active_heads": 4},
        {"step": 2, "loss": 1.5, "reward": 0.2, "active_heads": 4},
        {"step": 3, "loss": 1.7, "reward": -0.1, "active_heads": 4},
        {"step": 4, "loss": 1.4, "reward": 0.2, "active_heads": 4},
    ]
    c = gr.curve_summary(log, 4)
    assert c["best_val_loss"] == 1.4 and c["best_step"] == 4
    assert c["running_best_val_loss"] == [[1, 2.0], [2, 1.5], [3, 1.5], [4, 1.4]]
    assert c["first_quarter_reward"] == -0.5 and c["last_quarter_reward"] == 0.2
    assert c["start_val_loss"] == 1.0 and c["first_action_val_loss"] == 2.0


def test_lora_accuracy_leaves_the_gated_base_model_as_it_was(gr):
    """The optional LoRA arm trains an adapter under fixed gates and removes it: the base weights, the module tree
    and the gates' effect are those of before."""
    from hf_adaptive.control.feedback import validation_loss
    from hf_adaptive.models import build_tokenizer, gate_model
    from hf_adaptive.tasks import CausalLMCollator, builtin_suite

    s = gr.resolve_settings(gr.parse_args(["--quick", "--lora-steps", "2"]))
    tokenizer = build_tokenizer()
    model = gr.build_tiny_llama(tokenizer, 0, s).eval()
    tasks = builtin_suite(s["tasks"][:2], n_train=16, n_eval=8, seed=0)
    gated = gate_model(model)
    gates = gr.random_gates(s["layers"], s["heads"], 12, 0)
    batches = [CausalLMCollator(tokenizer)(gr.text_rows(tasks, tokenizer, s, "eval", whole_text=True))]
    gated.set_gates(gates)
    before_loss = validation_loss(model, batches)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    names = [n for n, _ in model.named_modules()]
    train_rows = gr.text_rows(tasks, tokenizer, s, "train", whole_text=False)
    out = gr.lora_accuracy(model, gated, gates, tokenizer, train_rows, tasks, s)
    assert 0.0 <= out["accuracy"] <= 1.0 and len(out["per_task"]) == 2
    assert [n for n, _ in model.named_modules()] == names  # no LoRA layer left
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert validation_loss(model, batches) == pytest.approx(before_loss, abs=1e-6)


def test_real_tasks_split_into_two_disjoint_halves(gr):
    """Real mode's data (when the cl_benchmark folder is there): every task has both halves, and they differ."""
    if not gr.compression.DEFAULT_DATA.is_dir():
        pytest.skip("no cl_benchmark data folder")
    s = gr.resolve_settings(gr.parse_args([]))
    tasks = gr.load_tasks(s, gr.compression.DEFAULT_DATA)
    val, test = gr.split_halves(tasks, s["rows_per_task"])
    assert [t.name for t in tasks] == ["SST-2", "BoolQA", "MNLI"]
    for v, t in zip(val, test):
        assert len(v.eval_dataset) == len(t.eval_dataset) == s["rows_per_task"]
        assert not set(v.eval_dataset["text"]) & set(t.eval_dataset["text"])
