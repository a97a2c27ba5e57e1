"""The differentiable loss-weight controller: formula, gradient flow, non-collapse, bounded controls, in a trainer."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers.modeling_outputs import CausalLMOutput

from hf_adaptive.control.loss_weighting import (
    ControlledScalar,
    LossWeightController,
    SoftmaxWeighting,
    UncertaintyWeighting,
    predictive_entropy,
)


def _stats():
    task = torch.tensor(2.0, requires_grad=True)
    terms = {"ewc": torch.tensor(0.5, requires_grad=True), "replay": torch.tensor(1.5, requires_grad=True)}
    outputs = CausalLMOutput(logits=torch.randn(2, 5, 11))
    return task, terms, outputs


def test_uncertainty_total_matches_the_formula_and_starts_unweighted():
    torch.manual_seed(0)
    ctl = UncertaintyWeighting(["ewc", "replay"])
    task, terms, outputs = _stats()
    total, weights = ctl(task, terms, outputs)
    # slow reference: recompute s from the raw network output by hand
    raw = ctl.net(ctl.features(task, terms, outputs))
    lo, hi = ctl.log_var_bounds
    s = (hi + lo) / 2 + (hi - lo) / 2 * torch.tanh(raw)
    values = [task, terms["ewc"], terms["replay"]]
    expected = sum(0.5 * torch.exp(-s[i]) * v + 0.5 * s[i] for i, v in enumerate(values))
    torch.testing.assert_close(total, expected)
    assert list(weights) == ["task", "ewc", "replay"]
    for w in weights.values():
        assert w.item() == pytest.approx(1.0, abs=0.02)  # output bias starts at s = log(1/2)


def test_gradients_reach_every_controller_parameter():
    torch.manual_seed(0)
    for ctl in (UncertaintyWeighting(["ewc", "replay"]), SoftmaxWeighting(["ewc", "replay"])):
        task, terms, outputs = _stats()
        total, _ = ctl(task, terms, outputs)
        grads = torch.autograd.grad(total, list(ctl.net.parameters()), allow_unused=True)
        assert all(g is not None for g in grads)
        assert grads[-1].abs().sum() > 0 and grads[-2].abs().sum() > 0  # last layer bias and weight
        # the loss terms themselves still get gradients, scaled by their weights
        g_task, g_ewc = torch.autograd.grad(ctl(task, terms, outputs)[0], [task, terms["ewc"]])
        _, w = ctl(task, terms, outputs)
        assert g_task.item() == pytest.approx(w["task"].item(), rel=1e-5)
        assert g_ewc.item() == pytest.approx(w["ewc"].item(), rel=1e-5)


def test_statistics_are_read_but_not_pushed():
    """The features are detached: the controller's input path adds no gradient to the losses."""
    ctl = UncertaintyWeighting(["ewc"])
    task, terms, outputs = _stats()
    assert not ctl.features(task, terms, outputs).requires_grad


def test_softmax_weights_sum_to_the_total():
    ctl = SoftmaxWeighting(["ewc", "replay"], total_weight=3.0)
    task, terms, outputs = _stats()
    _, weights = ctl(task, terms, outputs)
    assert sum(w.item() for w in weights.values()) == pytest.approx(3.0)
    assert all(w.item() == pytest.approx(1.0, abs=0.01) for w in weights.values())  # uniform start


def _train(ctl, losses, steps=300, lr=0.05):
    opt = torch.optim.Adam(ctl.parameters(), lr=lr)
    history = []
    for _ in range(steps):
        task = torch.tensor(losses["task"])
        terms = {k: torch.tensor(v) for k, v in losses.items() if k != "task"}
        total, weights = ctl(task, terms)
        opt.zero_grad()
        total.backward()
        opt.step()
        history.append({k: w.item() for k, w in weights.items()})
    return history


def test_naive_free_weights_collapse_which_is_what_the_controller_avoids():
    raw = torch.zeros(2, requires_grad=True)
    opt = torch.optim.Adam([raw], lr=0.05)
    for _ in range(300):
        w = F.softplus(raw)
        loss = w[0] * 2.0 + w[1] * 0.5
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert F.softplus(raw).max().item() < 0.05  # sum_i w_i L_i drives every weight towards 0


def test_uncertainty_weights_do_not_collapse_and_reach_the_analytic_optimum():
    torch.manual_seed(0)
    losses = {"task": 2.0, "ewc": 0.5, "replay": 1.0}
    history = _train(UncertaintyWeighting(["ewc", "replay"]), losses)
    assert min(min(h.values()) for h in history) > 0.05  # Adam overshoots a little on the way, never to 0
    for name, value in losses.items():  # optimum of 1/2 e^{-s} L + 1/2 s is weight 1 / (2 L)
        assert history[-1][name] == pytest.approx(1 / (2 * value), rel=0.05)


def test_uncertainty_weight_of_a_zero_term_stays_bounded():
    ctl = UncertaintyWeighting(["ewc"], log_var_bounds=(-3.0, 5.0))
    history = _train(ctl, {"task": 1.0, "ewc": 0.0}, steps=200)
    assert max(h["ewc"] for h in history) <= 0.5 * math.exp(3.0) + 1e-6
    assert all(math.isfinite(v) for h in history for v in h.values())


def test_softmax_weights_do_not_collapse_and_follow_the_boltzmann_optimum():
    torch.manual_seed(0)
    losses = {"task": 2.0, "ewc": 0.5, "replay": 1.0}
    ctl = SoftmaxWeighting(["ewc", "replay"], entropy_tau=1.0, total_weight=3.0)
    history = _train(ctl, losses)
    final = history[-1]
    assert min(min(h.values()) for h in history) > 0.05
    z = sum(math.exp(-v) for v in losses.values())
    for name, value in losses.items():  # optimum: w_i = total * exp(-L_i / tau) / Z
        assert final[name] == pytest.approx(3.0 * math.exp(-value) / z, rel=0.05)


def test_non_collapse_while_a_real_model_trains_jointly():
    """A linear model and the controller share one optimizer for 300 steps; both loss terms shrink over time."""
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 3)
    ctl = UncertaintyWeighting(["aux"])
    opt = torch.optim.Adam([*model.parameters(), *ctl.parameters()], lr=0.02)
    x = torch.randn(64, 6)
    y_task, y_aux = torch.randn(64, 3), torch.randn(64, 3) * 0.1
    weights_seen = []
    for _ in range(300):
        out = model(x)
        task = (out - y_task).pow(2).mean()
        aux = (out - y_aux).pow(2).mean()
        total, w = ctl(task, {"aux": aux}, {"logits": out})
        opt.zero_grad()
        total.backward()
        opt.step()
        weights_seen.append({k: v.item() for k, v in w.items()})
    assert min(min(h.values()) for h in weights_seen) > 0.05
    assert all(torch.isfinite(p).all() for p in [*model.parameters(), *ctl.parameters()])


def test_missing_terms_are_skipped_and_unknown_terms_rejected():
    ctl = UncertaintyWeighting(["ewc", "replay"])
    task, terms, _ = _stats()
    _, weights = ctl(task, {"ewc": terms["ewc"]})
    assert set(weights) == {"task", "ewc"}
    with pytest.raises(ValueError, match=r"UncertaintyWeighting\.terms="):
        ctl(task, {"other": terms["ewc"]})


def test_weight_task_false_keeps_the_task_loss_unweighted():
    ctl = UncertaintyWeighting(["ewc"], weight_task=False)
    task, terms, _ = _stats()
    total, weights = ctl(task, {"ewc": terms["ewc"]})
    assert set(weights) == {"ewc"}
    (g,) = torch.autograd.grad(total, [task])
    assert g.item() == pytest.approx(1.0)


def test_predictive_entropy_reference():
    logits = torch.zeros(2, 3, 7)
    assert predictive_entropy(CausalLMOutput(logits=logits)).item() == pytest.approx(math.log(7))
    assert predictive_entropy(None) is None


def test_controlled_temperature_is_bounded_and_learns():
    torch.manual_seed(0)
    ctl = UncertaintyWeighting(["distill"])
    ctl.add_control("temperature", low=0.5, high=4.0, init=2.0)
    temp = ctl.control("temperature")
    assert temp.item() == pytest.approx(2.0)
    student, teacher = torch.randn(4, 10), torch.randn(4, 10) * 3
    opt = torch.optim.Adam(ctl.parameters(), lr=0.1)
    for _ in range(100):
        t = ctl.control("temperature")
        kl = F.kl_div(F.log_softmax(student / t, -1), F.softmax(teacher / t, -1), reduction="batchmean")
        (g,) = torch.autograd.grad(kl, [ctl.controls["temperature"].theta], retain_graph=True)
        assert g.abs().item() > 0
        opt.zero_grad()
        kl.backward()
        opt.step()
    final = ctl.control("temperature").item()
    assert 0.5 < final < 4.0 and final > 2.0  # KL shrinks as both distributions flatten: pushed up, kept inside


def test_conditioned_mixing_coefficient_reads_the_statistics():
    ctl = UncertaintyWeighting(["replay"])
    ctl.add_control("rho", low=0.0, high=0.5, init=0.25, conditioned=True)
    task, terms, outputs = _stats()
    rho = ctl.control("rho", task, {"replay": terms["replay"]}, outputs)
    assert 0.0 < rho.item() < 0.5
    grads = torch.autograd.grad(rho, [ctl.controls["rho"].theta, ctl.controls["rho"].proj.weight])
    assert grads[1].abs().sum() > 0
    with pytest.raises(ValueError, match="control name"):
        ctl.control("missing")


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"term_names": ["a"], "mode": "median"}, "mode"),
        ({"term_names": ["task"]}, "term_names"),
        ({"term_names": ["a", "a"]}, "term_names"),
        ({"term_names": ["a"], "log_var_bounds": (1.0, 2.0)}, "log_var_bounds"),
        ({"term_names": [], "weight_task": False}, "term_names"),
        ({"term_names": ["a"], "entropy_tau": 0.0}, "entropy_tau"),
    ],
)
def test_controller_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"LossWeightController\.{field}="):
        LossWeightController(**kwargs)
    with pytest.raises(ValueError, match="ControlledScalar.init="):
        ControlledScalar(0.0, 1.0, 1.0)


def test_inside_the_continual_trainer(tiny_model, tokenizer, small_tasks, tmp_path, make_args):
    """The trainer adds the controller's parameters to its optimizer; they move and the weights are logged."""
    from hf_adaptive.plugins import ContinualPlugin, LossTerm
    from hf_adaptive.tasks import CausalLMCollator, tokenize_task
    from hf_adaptive.trainer import ContinualTrainer

    class Anchor(ContinualPlugin):
        name = "anchor"

        def __init__(self, model):
            self.ref = [p.detach().clone() for p in model.parameters()]

        def loss_terms(self, trainer, model, inputs, outputs):
            value = sum((p - r).pow(2).sum() for p, r in zip(model.parameters(), self.ref, strict=True)) + 1e-3
            return [LossTerm("anchor", value, 1.0)]

    ctl = UncertaintyWeighting(["anchor"])
    before = [p.detach().clone() for p in ctl.parameters()]
    args = make_args(tmp_path, max_steps=4, learning_rate=1e-2)
    trainer = ContinualTrainer(
        model=tiny_model,
        args=args,
        train_dataset=tokenize_task(small_tasks[0], tokenizer),
        data_collator=CausalLMCollator(tokenizer),
        callbacks=[Anchor(tiny_model)],
        loss_weighting=ctl,
    )
    trainer.train()
    assert any(not torch.equal(a, b) for a, b in zip(before, ctl.parameters(), strict=True))
    logged = [h for h in trainer.state.log_history if "weight_anchor" in h]
    assert len(logged) == 4 and all(h["weight_anchor"] > 0 for h in logged)
