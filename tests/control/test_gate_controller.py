"""The RL gate controller: budget through the action space, exact log-probs, learning, resume."""

from __future__ import annotations

import math

import pytest
import torch

from hf_adaptive.control.gate_controller import (
    KEEP,
    PRUNE,
    REGROW,
    GateController,
    GateControllerConfig,
    _masked_logp,
)

L, H = 2, 8
TARGET = torch.zeros(L, H)
TARGET[:, :4] = 1  # the synthetic task: keep the first half of every layer


def _match(g: torch.Tensor) -> float:
    return float(1 - (g - TARGET).abs().mean())


def _run(ctrl: GateController, steps: int, prev: float | None = None) -> list[float]:
    """Synthetic reward shaped like the real one: tanh of the improvement the action brought."""
    prev = _match(ctrl.gates) if prev is None else prev
    matches = []
    stats = torch.Generator().manual_seed(123)
    for _ in range(steps):
        g = ctrl.act(torch.rand(L, H, generator=stats), None)
        m = _match(g)
        ctrl.observe(math.tanh(4 * (m - prev)))
        prev = m
        matches.append(m)
    return matches


@pytest.mark.parametrize(
    "field,value",
    [
        ("algorithm", "dqn"),
        ("gamma", 1.5),
        ("rollout_steps", 0),
        ("max_changes", 0),
        ("clip_eps", 0.0),
        ("reward_ema", 1.0),
    ],
)
def test_config_validation(field, value):
    with pytest.raises(ValueError, match=f"GateControllerConfig.{field}"):
        GateControllerConfig(**{field: value})
    with pytest.raises(ValueError, match="min_active_fraction"):
        GateControllerConfig(min_active_fraction=0.8, max_active_fraction=0.5)


def test_budget_is_enforced_through_the_action_space():
    cfg = GateControllerConfig(min_active_fraction=0.25, max_active_fraction=0.5, max_changes=3, keep_bias=-1.0, seed=1)
    ctrl = GateController(L, H, cfg)
    g = ctrl.act()
    ctrl.observe(0.0)
    assert 4 <= g.sum() <= 8  # from 16 active, forced down to the budget in one step (more than max_changes)
    prev = g
    for _ in range(60):
        g = ctrl.act(torch.rand(L, H))
        ctrl.observe(float(torch.rand(())))
        assert 4 <= int(g.sum()) <= 8
        assert int((g != prev).sum()) <= 3
        prev = g
        assert set(g.unique().tolist()) <= {0.0, 1.0}


def test_log_prob_is_the_exact_sequential_masked_probability():
    ctrl = GateController(L, H, GateControllerConfig(max_active_fraction=0.75, keep_bias=0.0, seed=3))
    ctrl.act()
    tr = ctrl.pending
    with torch.no_grad():
        logits, _ = ctrl.policy(tr["head_x"], tr["glob"])
    # slow reference: walk the decisions in order, renormalising each head's softmax over its allowed actions
    ref = 0.0
    gates = torch.ones(L * H)
    for t, j in enumerate(tr["order"].tolist()):
        p = torch.softmax(logits[j], -1) * tr["masks"][t]
        a = int(tr["actions"][t])
        ref += math.log(float(p[a] / p.sum()))
        assert tr["masks"][t, a]
        assert not tr["masks"][t, REGROW if gates[j] else PRUNE]  # prune only active heads, regrow only pruned
        gates[j] = 0.0 if a == PRUNE else (1.0 if a == REGROW else gates[j])
    assert float(tr["logp"]) == pytest.approx(ref, abs=1e-5)
    assert torch.equal(gates.view(L, H), ctrl.gates)
    logp, ent = _masked_logp(logits, tr["order"], tr["masks"], tr["actions"])
    assert float(logp) == pytest.approx(ref, abs=1e-5) and float(ent) > 0
    assert int(tr["per_head"][tr["order"][0]]) == int(tr["actions"][0])
    assert KEEP == 1


@pytest.mark.parametrize("algorithm", ["reinforce", "a2c", "ppo"])
@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_an_update_moves_the_taken_action_with_the_sign_of_its_advantage(algorithm, sign, seed):
    """The policy-gradient mechanism itself, on any trajectory: a reward above the critic's value makes the action
    that earned it more likely, one below makes it less likely (value and entropy terms off, so only the policy term
    moves the weights; a small step, so the first-order effect decides)."""
    cfg = GateControllerConfig(
        algorithm=algorithm, max_active_fraction=0.75, value_coef=0.0, entropy_coef=0.0, lr=1e-3, seed=seed
    )
    ctrl = GateController(L, H, cfg)
    ctrl.act(torch.rand(L, H, generator=torch.Generator().manual_seed(seed)), None)
    transition = ctrl.pending
    ctrl.observe(float(transition["value"]) + sign)  # advantage = reward - value = sign (no bootstrap below)
    with torch.no_grad():
        before = ctrl._evaluate(transition)[0].sum()
    ctrl._update()  # no next state: the return is the reward itself
    with torch.no_grad():
        after = ctrl._evaluate(transition)[0].sum()
    assert ctrl.updates == 1
    assert sign * (after - before) > 0, (float(before), float(after))


def test_untrained_policy_does_not_improve(monkeypatch):
    """With learning switched off the synthetic loop does not improve (the loop itself rewards nothing by chance)."""
    gains = []
    for seed in range(3):
        ctrl = GateController(L, H, GateControllerConfig(algorithm="ppo", max_active_fraction=0.75, seed=seed))
        monkeypatch.setattr(ctrl, "_update", lambda *a, **k: {})
        matches = _run(ctrl, 200)
        gains.append(sum(matches[-40:]) / 40 - sum(matches[:20]) / 20)
    assert sum(gains) / len(gains) < 0.1, gains


@pytest.mark.parametrize("algorithm", ["reinforce", "ppo"])
def test_save_and_resume_continue_identically(tmp_path, algorithm):
    cfg = GateControllerConfig(algorithm=algorithm, max_active_fraction=0.75, rollout_steps=3, seed=4)
    ctrl = GateController(L, H, cfg)
    _run(ctrl, 7)
    for loss in (2.0, 1.9, 1.95):
        ctrl.feedback(loss, step=1)
        ctrl.act()
    ctrl.save(str(tmp_path))
    resumed = GateController.load(str(tmp_path))
    assert resumed.config == ctrl.config and resumed.archive.front() == ctrl.archive.front()
    assert resumed.pending is not None and len(resumed.buffer) == len(ctrl.buffer)
    ctrl.observe(0.1)
    resumed.observe(0.1)
    a = _run(ctrl, 6)
    b = _run(resumed, 6)
    assert a == b
    assert torch.equal(ctrl.gates, resumed.gates)
    for p, q in zip(ctrl.policy.parameters(), resumed.policy.parameters(), strict=True):
        assert torch.equal(p, q)
    assert ctrl.optimizer.state_dict()["state"][0]["step"] == resumed.optimizer.state_dict()["state"][0]["step"]
    assert ctrl.log == resumed.log


def test_feedback_records_pareto_and_rewards():
    ctrl = GateController(L, H, GateControllerConfig(efficiency_factor=0.5, seed=0))
    assert ctrl.feedback(2.0, step=0) is None
    g = ctrl.act()
    r = ctrl.feedback(1.8, step=50)
    pruned = 1 - float(g.mean())
    assert r == pytest.approx(math.tanh(0.2 / 2.0 + 0.5 * pruned))
    assert ctrl.buffer[-1]["reward"] == pytest.approx(r)
    assert len(ctrl.archive) >= 1 and ctrl.log[-1]["step"] == 50
    torch.testing.assert_close(ctrl.pick(0.0), ctrl.archive.pick(0.0).gates.view(L, H))


def test_protocol_errors():
    ctrl = GateController(L, H)
    with pytest.raises(RuntimeError, match="observe"):
        ctrl.observe(1.0)
    ctrl.act()
    with pytest.raises(RuntimeError, match="act"):
        ctrl.act()
    with pytest.raises(ValueError, match="reward"):
        ctrl.observe(float("nan"))
    with pytest.raises(ValueError, match="statistics"):
        ctrl.observe(0.0)
        ctrl.act(torch.ones(3))
    with pytest.raises(ValueError, match="max_active_fraction"):
        GateController(1, 2, GateControllerConfig(max_active_fraction=0.1))


# ------------------------------------------------------------------------------- integer budgets, warm start
def _reference_budget(n: int, cfg: GateControllerConfig) -> tuple[int, int]:
    """The head counts a config admits, by checking every count 0..n (a count set overrides its fraction)."""
    admitted = [
        c
        for c in range(n + 1)
        if (c >= cfg.min_active_heads if cfg.min_active_heads is not None else c >= cfg.min_active_fraction * n)
        and (c <= cfg.max_active_heads if cfg.max_active_heads is not None else c <= cfg.max_active_fraction * n)
    ]
    return min(admitted), max(admitted)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"min_active_fraction": 0.25, "max_active_fraction": 0.5},
        {"min_active_heads": 5, "max_active_heads": 5},  # 5 / 16: a fraction would need to hit 0.3125 exactly
        {"min_active_heads": 3, "max_active_fraction": 0.5},
        {"min_active_fraction": 0.5, "max_active_heads": 11},
        {"min_active_fraction": 0.9, "max_active_fraction": 0.9, "min_active_heads": 0, "max_active_heads": 16},
        {"min_active_heads": 0, "max_active_heads": 1},
    ],
)
def test_head_budget_against_every_count(kwargs):
    cfg = GateControllerConfig(**kwargs)
    ctrl = GateController(L, H, cfg)
    assert (ctrl.min_active, ctrl.max_active) == _reference_budget(L * H, cfg)


def test_integer_budget_holds_exactly_where_no_fraction_can():
    """0.3 of 16 heads is 4.8: no count fits the fraction pair, while min = max = 5 heads keeps exactly 5."""
    with pytest.raises(ValueError, match=r"max_active_fraction=0\.3 is not allowed: it leaves 4 of 16 heads"):
        GateController(L, H, GateControllerConfig(min_active_fraction=0.3, max_active_fraction=0.3))
    cfg = GateControllerConfig(min_active_heads=5, max_active_heads=5, max_changes=2, seed=2)
    ctrl = GateController(L, H, cfg)
    for _ in range(12):
        g = ctrl.act(torch.rand(L, H, generator=torch.Generator().manual_seed(ctrl.steps)))
        ctrl.observe(0.0)
        assert int(g.sum()) == 5


def test_integer_budget_refusals_name_the_field_and_the_head_count():
    with pytest.raises(ValueError, match=r"GateControllerConfig\.max_active_heads=17 is not allowed: .* 16 heads"):
        GateController(L, H, GateControllerConfig(max_active_heads=17))
    with pytest.raises(ValueError, match=r"GateControllerConfig\.min_active_heads=20 is not allowed: .*at most 16"):
        GateController(L, H, GateControllerConfig(min_active_heads=20))
    with pytest.raises(ValueError, match=r"max_active_fraction=0\.5 is not allowed: .*min_active_heads=10"):
        GateController(L, H, GateControllerConfig(min_active_heads=10, max_active_fraction=0.5))


def test_set_gates_is_the_start_of_the_first_action():
    start = torch.zeros(L, H)
    start[0, [1, 4, 6]] = 1
    start[1, [0, 7]] = 1
    cfg = GateControllerConfig(min_active_heads=5, max_active_heads=5, max_changes=2, seed=5)
    ctrl = GateController(L, H, cfg)
    ctrl.set_gates(start)
    assert torch.equal(ctrl.gates, start)
    g = ctrl.act()
    assert torch.equal(ctrl.pending["head_x"][:, 0], start.flatten())  # the state saw the warm start
    assert int(g.sum()) == 5 and int((g != start).sum()) <= 2  # at most max_changes flips away from it
    ctrl.observe(0.0)
    flat = GateController(L, H, cfg)
    flat.set_gates(start.flatten().tolist())  # flat and list forms
    assert torch.equal(flat.gates, start)


def test_set_gates_refusals():
    ctrl = GateController(L, H, GateControllerConfig(min_active_heads=4, max_active_heads=8))
    with pytest.raises(ValueError, match=r"shape \(3, 8\) is not allowed: \(2, 8\) .* or \(16,\)"):
        ctrl.set_gates(torch.ones(3, 8))
    for bad in (0.5, float("nan"), 2.0):
        g = torch.zeros(L, H)
        g[0, :4] = 1
        g[1, 0] = bad
        with pytest.raises(ValueError, match="only 0 and 1"):
            ctrl.set_gates(g)
    with pytest.raises(ValueError, match=r"9 active heads is not allowed: .*\[4, 8\] of 16 heads"):
        ctrl.set_gates(torch.ones(16).index_fill(0, torch.arange(7), 0))
    with pytest.raises(ValueError, match=r"3 active heads is not allowed"):
        ctrl.set_gates(torch.zeros(16).index_fill(0, torch.arange(3), 1))
    ctrl.set_gates(torch.zeros(16).index_fill(0, torch.arange(4), 1))
    assert torch.equal(ctrl.gates.flatten()[:5], torch.tensor([1.0, 1, 1, 1, 0]))  # refusals changed nothing
    ctrl.act()
    with pytest.raises(RuntimeError, match="observe"):
        ctrl.set_gates(torch.zeros(16).index_fill(0, torch.arange(4), 1))


def test_warm_start_survives_save_and_load(tmp_path):
    cfg = GateControllerConfig(min_active_heads=6, max_active_heads=6, max_changes=2, seed=7)
    ctrl = GateController(L, H, cfg)
    start = torch.zeros(L, H)
    start[:, :3] = 1
    ctrl.set_gates(start)
    ctrl.save(str(tmp_path))
    resumed = GateController.load(str(tmp_path))
    assert torch.equal(resumed.gates, start) and (resumed.min_active, resumed.max_active) == (6, 6)
    assert resumed.config == ctrl.config
    stats = torch.rand(L, H, generator=torch.Generator().manual_seed(0))
    assert torch.equal(ctrl.act(stats), resumed.act(stats))


def test_load_state_dict_takes_the_saved_budget():
    saved = GateController(L, H, GateControllerConfig(min_active_heads=3, max_active_heads=5))
    other = GateController(L, H)
    other.load_state_dict(saved.state_dict())
    assert (other.min_active, other.max_active) == (3, 5)


def test_feedback_with_a_reference_loss_gives_the_paired_reward():
    """`feedback(loss, reference_loss=)`: the reward of the last action compares `loss` with the reference (the
    serving gates on the same data), whatever the previous feedback's loss was."""
    cfg = GateControllerConfig(efficiency_factor=0.0, reward_ema=0.0, min_active_heads=4, max_active_heads=4, seed=0)
    ctrl = GateController(2, 4, cfg)
    assert ctrl.feedback(100.0, step=0) is None  # a loss from another batch: not the baseline of the next reward
    ctrl.act()
    reward = ctrl.feedback(3.0, step=1, reference_loss=4.0)
    assert reward == pytest.approx(math.tanh((4.0 - 3.0) / 4.0))
    assert ctrl.buffer[-1]["reward"] == pytest.approx(reward) and ctrl.log[-1]["reward"] == pytest.approx(reward)
