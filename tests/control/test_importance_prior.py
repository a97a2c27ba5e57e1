"""The gate controller's importance prior: swap margins against a slow reference, the prior in the policy's logits
(and so in PPO's log-probabilities), the greedy swap it starts from, learning on top of it, validation and resume."""

from __future__ import annotations

import math

import pytest
import torch

from hf_adaptive.control.gate_controller import PRUNE, REGROW, GateController, GateControllerConfig, _masked_logp
from hf_adaptive.control.importance_prior import (
    ImportancePriorConfig,
    PriorGateController,
    PriorGatePolicy,
    prior_logits,
    swap_margins,
)
from hf_adaptive.utils.io import StateLoadError

L, H = 2, 8


def _half_on(ctrl: GateController) -> GateController:
    """`ctrl` started from the first half of every layer's heads (8 of 16: inside the tests' exact budget)."""
    start = torch.zeros(L, H)
    start[:, : H // 2] = 1
    ctrl.set_gates(start)
    return ctrl


def _reference_margins(imp: list[float], gates: list[int]) -> list[float]:
    """Slow reference: the cut of k active heads is the midpoint of the k-th and (k+1)-th largest importances."""
    k = sum(gates)
    if k in (0, len(imp)):
        return [0.0] * len(imp)
    ranked = sorted(imp, reverse=True)
    cut = (ranked[k - 1] + ranked[k]) / 2
    return [v - cut for v in imp]


@pytest.mark.parametrize("seed", range(5))
def test_swap_margins_against_a_slow_reference(seed):
    g = torch.Generator().manual_seed(seed)
    imp = torch.rand(L * H, generator=g)
    gates = (torch.rand(L * H, generator=g) > 0.5).float()
    expected = _reference_margins(imp.tolist(), [int(x) for x in gates.tolist()])
    assert swap_margins(imp.view(L, H), gates.view(L, H)).tolist() == pytest.approx(expected, abs=1e-6)
    for full in (torch.ones(L * H), torch.zeros(L * H)):  # no cut, no swap to judge
        assert torch.equal(swap_margins(imp, full), torch.zeros(L * H))
    with pytest.raises(ValueError, match="16 importances for 3 gates is not allowed"):
        swap_margins(imp, torch.ones(3))


def test_prior_logits_push_heads_across_the_cut_and_hold_the_rest():
    imp = torch.tensor([0.9, 0.1, 0.6, 0.2, 0.95, 0.3])
    gates = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0])  # k = 3; top 3 = {4, 0, 2}: cut (0.6 + 0.3) / 2 = 0.45
    out = prior_logits(imp, gates, 10.0)
    m = [v - 0.45 for v in imp.tolist()]
    assert out[:, PRUNE].tolist() == pytest.approx([-10 * m[0], -10 * m[1], -10 * m[2], 0, 0, 0])
    assert out[:, REGROW].tolist() == pytest.approx([0, 0, 0, 10 * m[3], 10 * m[4], 10 * m[5]])
    assert torch.equal(out[:, 1], torch.zeros(6))  # keep untouched
    assert out[1, PRUNE] > 0 and out[4, REGROW] > 0  # head 1 should go, head 4 should come back
    assert out[0, PRUNE] < 0 and out[3, REGROW] < 0


def test_strength_zero_is_the_plain_controller():
    cfg = GateControllerConfig(min_active_heads=8, max_active_heads=8, max_changes=4, seed=2)
    plain = _half_on(GateController(L, H, cfg))
    prior = _half_on(PriorGateController(L, H, cfg, ImportancePriorConfig(strength=0.0)))
    stats = torch.Generator().manual_seed(0)
    for step in range(6):
        imp = torch.rand(L, H, generator=stats)
        assert torch.equal(plain.act(imp), prior.act(imp)), step
        for ctrl in (plain, prior):
            ctrl.observe(0.1 * (step % 3 - 1))


def test_a_strong_prior_makes_the_greedy_swap():
    """Head 1 (active, importance 0.05) is the only active head below the cut and head 12 (pruned, 0.99) the only
    pruned head above it: with two flips per step the first action swaps exactly these two, for any sampling seed."""
    imp = torch.full((L * H,), 0.1)
    imp[:8] = 0.8
    imp[1], imp[12] = 0.05, 0.99
    start = torch.zeros(L * H)
    start[:8] = 1
    for seed in range(5):
        cfg = GateControllerConfig(min_active_heads=8, max_active_heads=8, max_changes=2, seed=seed)
        ctrl = PriorGateController(L, H, cfg, ImportancePriorConfig(strength=200.0))
        ctrl.set_gates(start.view(L, H))
        new = ctrl.act(imp.view(L, H)).flatten()
        expected = start.clone()
        expected[1], expected[12] = 0, 1
        assert torch.equal(new, expected), seed


def test_the_prior_is_inside_the_stored_log_probability():
    """PPO's ratio needs the log-probability recomputed from the stored state to equal the one the action was
    sampled with: it does, and it differs from the plain policy's, so the prior is really part of it."""
    cfg = GateControllerConfig(min_active_heads=8, max_active_heads=8, max_changes=4, seed=1)
    ctrl = _half_on(PriorGateController(L, H, cfg, ImportancePriorConfig(strength=20.0)))
    ctrl.act(torch.rand(L, H, generator=torch.Generator().manual_seed(3)))
    tr = ctrl.pending
    with torch.no_grad():
        logp, _, _ = ctrl._evaluate(tr)
        base_logits, _ = super(type(ctrl.policy), ctrl.policy).forward(tr["head_x"], tr["glob"])
        plain_logp, _ = _masked_logp(base_logits, tr["order"], tr["masks"], tr["actions"])
    assert float(logp) == pytest.approx(float(tr["logp"]), abs=1e-5)
    assert not math.isclose(float(plain_logp), float(logp), abs_tol=1e-3)


def test_learning_still_moves_the_taken_action_with_its_advantage():
    cfg = GateControllerConfig(
        algorithm="ppo", min_active_heads=8, max_active_heads=8, max_changes=4, value_coef=0.0, entropy_coef=0.0,
        lr=1e-3, seed=0,
    )  # fmt: skip
    for sign in (1.0, -1.0):
        ctrl = _half_on(PriorGateController(L, H, cfg, ImportancePriorConfig(strength=5.0)))
        ctrl.act(torch.rand(L, H, generator=torch.Generator().manual_seed(0)))
        tr = ctrl.pending
        ctrl.observe(float(tr["value"]) + sign)
        with torch.no_grad():
            before = ctrl._evaluate(tr)[0]
        ctrl._update()
        with torch.no_grad():
            after = ctrl._evaluate(tr)[0]
        assert sign * float(after - before) > 0


@pytest.mark.parametrize("value", [-1.0, float("nan"), float("inf"), "strong", True])
def test_strength_is_validated(value):
    with pytest.raises(ValueError, match=f"ImportancePriorConfig.strength={value!r} is not allowed"):
        ImportancePriorConfig(strength=value)


def test_save_and_load_keep_the_prior_and_continue_identically(tmp_path):
    cfg = GateControllerConfig(min_active_heads=8, max_active_heads=8, max_changes=4, rollout_steps=2, seed=5)
    ctrl = PriorGateController(L, H, cfg, ImportancePriorConfig(strength=30.0))
    start = torch.zeros(L, H)
    start[:, ::2] = 1
    ctrl.set_gates(start)
    stats = torch.Generator().manual_seed(1)
    for _ in range(5):
        ctrl.act(torch.rand(L, H, generator=stats))
        ctrl.observe(0.2)
    ctrl.save(str(tmp_path))
    resumed = PriorGateController.load(str(tmp_path))
    assert resumed.prior == ctrl.prior and resumed.policy.strength == 30.0
    for _ in range(4):
        imp = torch.rand(L, H, generator=stats)
        assert torch.equal(ctrl.act(imp), resumed.act(imp))
        ctrl.observe(-0.1)
        resumed.observe(-0.1)
    for p, q in zip(ctrl.policy.parameters(), resumed.policy.parameters(), strict=True):
        assert torch.equal(p, q)


def test_in_memory_resume_restores_the_prior():
    """`load_state_dict` into a controller built with another prior takes the saved one (a Trainer resume)."""
    cfg = GateControllerConfig(min_active_heads=8, max_active_heads=8, max_changes=4, seed=3)
    ctrl = _half_on(PriorGateController(L, H, cfg, ImportancePriorConfig(strength=40.0)))
    stats = torch.Generator().manual_seed(2)
    ctrl.act(torch.rand(L, H, generator=stats))
    ctrl.observe(0.3)
    other = PriorGateController(L, H, cfg, ImportancePriorConfig(strength=1.0))
    other.load_state_dict(ctrl.state_dict())
    assert other.prior.strength == other.policy.strength == 40.0
    for _ in range(3):
        imp = torch.rand(L, H, generator=stats)
        assert torch.equal(ctrl.act(imp), other.act(imp))
        ctrl.observe(0.1)
        other.observe(0.1)


def test_the_prior_controller_starts_from_the_plain_controllers_weights_and_checks_its_prior():
    cfg = GateControllerConfig(seed=4)
    plain, prior = GateController(L, H, cfg), PriorGateController(L, H, cfg)
    assert isinstance(prior.policy, PriorGatePolicy) and prior.prior == ImportancePriorConfig()
    for p, q in zip(plain.policy.parameters(), prior.policy.parameters(), strict=True):
        assert torch.equal(p, q)
    assert [g["params"] for g in prior.optimizer.param_groups][0] == list(prior.policy.parameters())
    with pytest.raises(TypeError, match="prior=50"):
        PriorGateController(L, H, cfg, 50)


def test_a_plain_controllers_state_is_refused_with_the_folder_named(tmp_path):
    GateController(L, H, GateControllerConfig(seed=0)).save(str(tmp_path))
    with pytest.raises(StateLoadError, match=f"saved in {tmp_path}.*importance prior cannot be loaded"):
        PriorGateController.load(str(tmp_path))
    with pytest.raises(StateLoadError, match="importance prior cannot be loaded: no 'prior' entry"):
        PriorGateController(L, H).load_state_dict(GateController(L, H).state_dict())


def test_feedback_callback_drives_the_prior_controller_in_a_trainer(tmp_path, tiny_model, tokenizer, small_tasks):
    """Reachable from a Trainer: `FeedbackCallback(controller=PriorGateController(...))` hands it the head importance
    it measures each round (the prior's input), and applies its gates."""
    from transformers import Trainer, TrainingArguments

    from hf_adaptive.control.feedback import FeedbackCallback, FeedbackConfig
    from hf_adaptive.models.gates import gate_model
    from hf_adaptive.tasks import CausalLMCollator, tokenize_task

    rows = tokenize_task(small_tasks[0], tokenizer)
    gated = gate_model(tiny_model)
    cfg = GateControllerConfig(min_active_heads=4, max_active_heads=4, max_changes=2, rollout_steps=1, seed=0)
    ctrl = PriorGateController(2, 4, cfg, ImportancePriorConfig(strength=30.0))
    seen: list[torch.Tensor | None] = []
    act = ctrl.act

    def recording_act(importance=None, entropy=None):
        seen.append(importance)
        return act(importance, entropy)

    ctrl.act = recording_act
    cb = FeedbackCallback(
        FeedbackConfig(eval_every=2, eval_size=16, eval_batch_size=8, statistics=("importance",)),
        controller=ctrl,
        eval_dataset=rows,
        data_collator=CausalLMCollator(tokenizer),
    )
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=8, learning_rate=1e-3, report_to=[],
        save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0,
    )  # fmt: skip
    trainer = Trainer(
        model=tiny_model, args=args, train_dataset=rows, data_collator=CausalLMCollator(tokenizer), callbacks=[cb]
    )
    cb.bind(trainer)
    trainer.train()
    assert len(seen) == 3 and all(x is not None and x.shape == (2, 4) for x in seen)  # after each round
    assert [e["step"] for e in ctrl.log] == [0, 2, 4] and ctrl.updates >= 1
    assert int(ctrl.gates.sum()) == 4 and torch.equal(gated.fixed_gates, ctrl.gates)
