"""The adaptive laws on synthetic loss sequences, NaN handling, optimizers, state round trip."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from pytorch_optimizer import Lamb, Lookahead

from hf_adaptive.scheduling import AdaptiveScheduler, AdaptiveSchedulerConfig
from hf_adaptive.utils.io import load_state, save_state


def _sgd(lr=0.1, momentum=0.9):
    p = torch.nn.Parameter(torch.ones(3))
    return torch.optim.SGD([p], lr=lr, momentum=momentum)


def _feed(sched, losses, reward=None):
    return [sched.observe(v, reward=None if reward is None else reward[i]) for i, v in enumerate(losses)]


def test_lr_rises_on_improvement_by_the_damped_factor():
    cfg = AdaptiveSchedulerConfig(warmup=1, variance_damping=10.0, adapt_momentum=False, noise_margin=0.0)
    sched = AdaptiveScheduler(_sgd(lr=0.1), cfg)
    losses = [2.0 * 0.9**i for i in range(30)]
    snaps = _feed(sched, losses)
    assert all(s.event == "improved" for s in snaps[1:])
    for prev, cur in zip(snaps[1:], snaps[2:], strict=False):
        # slow reference: the law 1 + (u - 1) / (1 + lambda v) with v from the recorded snapshot
        assert cur.lr == pytest.approx(prev.lr * (1 + 0.02 / (1 + 10.0 * cur.variance)), rel=1e-9)
    assert snaps[-1].lr > 0.1 * 1.01**25
    assert sched.optimizer.param_groups[0]["lr"] == snaps[-1].lr


def test_noise_damps_the_increase():
    cfg = AdaptiveSchedulerConfig(warmup=1, adapt_momentum=False, noise_margin=0.0)
    clean, noisy = AdaptiveScheduler(_sgd(), cfg), AdaptiveScheduler(_sgd(), cfg)
    down = [2.0 * 0.97**i for i in range(40)]
    _feed(clean, down)
    # same trend, strong step-to-step jitter, still a new best EMA each step
    snaps = _feed(noisy, [v * (1.15 if i % 2 else 0.87) for i, v in enumerate(down)])
    assert sum(s.event == "improved" for s in snaps) > 30
    assert noisy.variance() > 10 * clean.variance()
    assert 0.1 < noisy.lr < clean.lr


def test_noise_margin_rejects_drifts_smaller_than_the_noise():
    """A flat, noisy loss with a tiny downward drift: without the margin every new EMA low counts as improvement."""
    g = torch.Generator().manual_seed(0)
    losses = [1.0 - 1e-3 * i + 0.05 * torch.randn((), generator=g).item() for i in range(60)]
    events = {}
    for margin in (0.0, 1.0):
        sched = AdaptiveScheduler(_sgd(), AdaptiveSchedulerConfig(warmup=1, noise_margin=margin, adapt_momentum=False))
        events[margin] = sum(s.event == "improved" for s in _feed(sched, losses))
    assert events[1.0] < events[0.0] / 2


def test_lr_cut_after_patience_then_cooldown_hold():
    cfg = AdaptiveSchedulerConfig(warmup=1, patience=2, cooldown=4, lr_down=0.8, adapt_momentum=False)
    sched = AdaptiveScheduler(_sgd(lr=0.1), cfg)
    snaps = _feed(sched, [1.0 * 1.1**i for i in range(12)])
    lrs = [s.lr for s in snaps]
    assert all(s.event == "worsened" for s in snaps[1:])
    # observations 2, 3 are tolerated (patience=2), the 3rd worsening (obs 4) cuts by d
    assert lrs[:3] == [0.1, 0.1, 0.1]
    assert lrs[3] == pytest.approx(0.08)
    # cooldown: 4 observations without change, then the next worsening streak must again exceed patience
    assert lrs[4:8] == [pytest.approx(0.08)] * 4
    # then worsenings count again: 2 tolerated (obs 8, 9), the 3rd (obs 10) cuts
    assert lrs[8:10] == [pytest.approx(0.08)] * 2
    assert lrs[10] == pytest.approx(0.064)


def test_stalled_loss_cuts_once_after_patience_then_holds():
    cfg = AdaptiveSchedulerConfig(warmup=1, patience=5, cooldown=5, adapt_momentum=False)
    sched = AdaptiveScheduler(_sgd(lr=0.1), cfg)
    snaps = _feed(sched, [1.0] * 20)
    assert {s.event for s in snaps[1:]} == {"plateau"}
    lrs = [s.lr for s in snaps]
    # observations 2..6 are tolerated, the 6th stalled one (obs 7) cuts, obs 8..12 hold, obs 13..17 tolerated
    assert lrs[:6] == [0.1] * 6
    assert lrs[6:17] == [pytest.approx(0.08)] * 11
    assert lrs[17] == pytest.approx(0.064)


def test_lr_bounds_hold_both_ways():
    up = AdaptiveScheduler(_sgd(lr=0.1), AdaptiveSchedulerConfig(warmup=1, lr_bounds=(0.05, 0.2), cooldown=0))
    _feed(up, [3.0 * 0.9**i for i in range(200)])
    assert up.lr == 0.2
    down = AdaptiveScheduler(
        _sgd(lr=0.1), AdaptiveSchedulerConfig(warmup=1, lr_bounds=(0.05, 0.2), cooldown=0, patience=0)
    )
    _feed(down, [1.0 * 1.1**i for i in range(100)])
    assert down.lr == 0.05
    # a base LR outside the bounds is clipped at construction
    assert AdaptiveScheduler(_sgd(lr=5.0), AdaptiveSchedulerConfig(lr_bounds=(0.05, 0.2))).lr == 0.2


def test_momentum_rises_with_consistent_improvement_and_falls_with_noise_or_reward_drop():
    cfg = AdaptiveSchedulerConfig(warmup=1, consistency=3, momentum_step=0.01, momentum_bounds=(0.5, 0.95))
    sched = AdaptiveScheduler(_sgd(momentum=0.9), cfg)
    _feed(sched, [2.0 * 0.95**i for i in range(40)])
    assert sched.momentum == pytest.approx(0.95)  # risen to its upper bound
    assert sched.optimizer.param_groups[0]["momentum"] == pytest.approx(0.95)

    noisy = AdaptiveScheduler(_sgd(momentum=0.9), cfg)
    _feed(noisy, [1.0 if i % 2 else 2.0 for i in range(30)])
    assert noisy.momentum < 0.9

    rewarded = AdaptiveScheduler(_sgd(momentum=0.9), cfg)
    _feed(rewarded, [1.0] * 60, reward=[1.0 - 0.05 * i for i in range(60)])  # flat loss, falling reward
    assert rewarded.momentum == pytest.approx(0.5)
    rising = AdaptiveScheduler(_sgd(momentum=0.7), cfg)
    _feed(rising, [1.0] * 20, reward=[0.05 * i for i in range(20)])
    assert rising.momentum > 0.7


@pytest.mark.parametrize("kind", ["adamw", "lamb", "lookahead"])
def test_momentum_is_beta1_for_adam_like_optimizers(kind):
    p = torch.nn.Parameter(torch.ones(3))
    opt = {
        "adamw": lambda: torch.optim.AdamW([p], lr=1e-2, betas=(0.8, 0.99)),
        "lamb": lambda: Lamb([p], lr=1e-2, betas=(0.8, 0.99)),
        "lookahead": lambda: Lookahead(Lamb([p], lr=1e-2, betas=(0.8, 0.99)), k=2),
    }[kind]()
    sched = AdaptiveScheduler(opt, AdaptiveSchedulerConfig(warmup=1))
    _feed(sched, [2.0 * 0.95**i for i in range(20)])
    beta1, beta2 = opt.param_groups[0]["betas"]
    assert beta1 > 0.8 and beta2 == 0.99
    assert opt.param_groups[0]["lr"] > 1e-2


def test_sgd_without_momentum_is_left_without_momentum():
    sched = AdaptiveScheduler(_sgd(momentum=0.0), AdaptiveSchedulerConfig(warmup=1))
    _feed(sched, [2.0 * 0.95**i for i in range(20)])
    assert sched.momentum is None and sched.optimizer.param_groups[0]["momentum"] == 0.0


def test_sigma_raised_on_plateau_lowered_when_unstable_and_bounded():
    cfg = AdaptiveSchedulerConfig(warmup=1, dither=True, sigma=1e-3, sigma_bounds=(1e-4, 4e-3), plateau_patience=2)
    sched = AdaptiveScheduler(_sgd(), cfg)
    _feed(sched, [1.0] * 5)
    assert sched.sigma > 1e-3
    _feed(sched, [1.0] * 40)
    assert sched.sigma == 4e-3
    _feed(sched, [1.0 * 1.2**i for i in range(20)])
    assert sched.sigma == 1e-4
    assert AdaptiveScheduler(_sgd(), AdaptiveSchedulerConfig()).sigma == 0.0  # off by default


def _quadratic_step(sched, model, x, y):
    loss = (model(x) - y).pow(2).mean()
    loss.backward()
    snap = sched.step(loss)
    sched.optimizer.zero_grad(set_to_none=True)
    return snap


def test_step_without_dither_equals_a_plain_optimizer_step():
    torch.manual_seed(0)
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    a, b = torch.nn.Linear(4, 1), torch.nn.Linear(4, 1)
    b.load_state_dict(a.state_dict())
    sched = AdaptiveScheduler(
        torch.optim.SGD(a.parameters(), lr=0.05, momentum=0.9),
        AdaptiveSchedulerConfig(adapt_momentum=False, warmup=100),
    )
    ref = torch.optim.SGD(b.parameters(), lr=0.05, momentum=0.9)
    for _ in range(5):
        _quadratic_step(sched, a, x, y)
        (b(x) - y).pow(2).mean().backward()
        ref.step()
        ref.zero_grad()
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb)


def test_dither_adds_noise_of_the_requested_relative_size():
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 64)
    sched = AdaptiveScheduler(
        torch.optim.SGD(model.parameters(), lr=0.0),
        AdaptiveSchedulerConfig(dither=True, sigma=1e-2, sigma_bounds=(1e-3, 1e-1), lr_bounds=(1e-12, 1.0)),
    )
    sched.lr = 0.0
    for g in sched.optimizer.param_groups:
        g["lr"] = 0.0
    before = model.weight.detach().clone()
    model(torch.randn(2, 64)).sum().backward()
    sched.optimizer.step()
    sched.apply_dither()
    delta = model.weight.detach() - before
    rms = before.pow(2).mean().sqrt()
    assert delta.std().item() == pytest.approx(1e-2 * rms.item(), rel=0.1)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "grad"])
def test_nonfinite_step_is_skipped_and_lr_backed_off(bad):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    sched = AdaptiveScheduler(opt, AdaptiveSchedulerConfig(nan_backoff=0.5))
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    for _ in range(3):
        _quadratic_step(sched, model, x, y)
    weights = [p.detach().clone() for p in model.parameters()]
    exp_avg = [opt.state[p]["exp_avg"].clone() for p in model.parameters()]
    loss = (model(x) - y).pow(2).mean()
    if bad == "grad":  # finite loss, infinite gradient
        loss.backward()
        model.weight.grad[0, 0] = float("inf")
        snap = sched.step(loss)
    else:
        (loss * bad).backward()
        snap = sched.step(loss * bad)
    assert snap.skipped and snap.event == "skipped"
    assert snap.lr == pytest.approx(0.005) and opt.param_groups[0]["lr"] == pytest.approx(0.005)
    for p, w, m in zip(model.parameters(), weights, exp_avg, strict=True):
        assert torch.equal(p, w) and torch.isfinite(p).all()
        assert p.grad is None
        assert torch.equal(opt.state[p]["exp_avg"], m)
    assert sched.num_skipped == 1
    # training goes on normally afterwards
    after = _quadratic_step(sched, model, x, y)
    assert not after.skipped and all(torch.isfinite(p).all() for p in model.parameters())


def test_state_round_trip_through_safetensors_and_json(tmp_path):
    torch.manual_seed(0)
    cfg = AdaptiveSchedulerConfig(warmup=1, dither=True, plateau_patience=2)

    def make():
        torch.manual_seed(1)
        m = torch.nn.Linear(4, 1)
        return m, AdaptiveScheduler(torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9), cfg)

    x, y = torch.randn(8, 4), torch.randn(8, 1)
    model_a, a = make()
    for _ in range(7):
        _quadratic_step(a, model_a, x, y)
    save_state(tmp_path / "sched", a.state_dict())
    model_b, b = make()
    model_b.load_state_dict(model_a.state_dict())
    b.optimizer.load_state_dict(copy.deepcopy(a.optimizer.state_dict()))  # load shares tensors otherwise
    b.load_state_dict(load_state(tmp_path / "sched"))
    assert b.optimizer.param_groups[0]["lr"] == a.lr and b.optimizer.param_groups[0]["momentum"] == a.momentum
    for _ in range(6):
        sa, sb = _quadratic_step(a, model_a, x, y), _quadratic_step(b, model_b, x, y)
        assert sa == sb
    for pa, pb in zip(model_a.parameters(), model_b.parameters(), strict=True):
        assert torch.equal(pa, pb)  # the dither generator was restored too


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("lr_up", 0.9),
        ("lr_down", 1.5),
        ("lr_bounds", (0.1, 0.01)),
        ("lr_bounds", (0.0, 1.0)),
        ("patience", -1),
        ("window", 1),
        ("momentum_bounds", (0.5, 1.0)),
        ("sigma_bounds", (0.1,)),
        ("ema_beta", 1.0),
        ("nan_backoff", 0.0),
        ("cooldown", 1.5),
        ("threshold", math.nan),
    ],
)
def test_config_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=rf"AdaptiveSchedulerConfig\.{field}="):
        AdaptiveSchedulerConfig(**{field: value})


def test_rejects_non_optimizers():
    with pytest.raises(ValueError, match="AdaptiveScheduler.optimizer="):
        AdaptiveScheduler(torch.nn.Linear(2, 2))


def test_param_group_added_later_keeps_its_lr_ratio():
    sched = AdaptiveScheduler(_sgd(lr=0.1, momentum=0.9), AdaptiveSchedulerConfig(warmup=1, adapt_momentum=False))
    sched.optimizer.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))], "lr": 0.01})
    _feed(sched, [2.0 * 0.9**i for i in range(10)])
    lr0, lr1 = (g["lr"] for g in sched.optimizer.param_groups)
    assert lr0 > 0.1 and lr1 == pytest.approx(lr0 / 10)


# ----------------------------------------------------------------------------------------------- loss spikes
def _quiet(**kw):
    """Only the rule under test acts: no momentum, no rises, no patience cuts unless asked."""
    base = {"warmup": 1, "adapt_momentum": False, "lr_up": 1.0, "patience": 1000, "cooldown": 3}
    return AdaptiveSchedulerConfig(**{**base, **kw})


def test_a_spike_cuts_at_once_then_holds():
    sched = AdaptiveScheduler(_sgd(lr=0.1), _quiet(spike_ratio=3.0, spike_backoff=0.5))
    snaps = _feed(sched, [1.0, 0.95, 0.9])
    ema = 1.0
    for v in (0.95, 0.9):
        ema = 0.9 * ema + 0.1 * v
    assert all(s.event != "spike" for s in snaps) and sched.lr == 0.1
    spike = sched.observe(3.05 * ema)  # just above 3x the EMA before it
    assert spike.event == "spike" and spike.lr == pytest.approx(0.05) and sched.num_spikes == 1
    assert sched.optimizer.param_groups[0]["lr"] == pytest.approx(0.05)
    assert sched.cooldown_left == 3


def test_below_the_ratio_is_not_a_spike_and_zero_disables_the_rule():
    for ratio, loss, expected in ((3.0, 2.9, "worsened"), (0.0, 50.0, "worsened")):
        sched = AdaptiveScheduler(_sgd(lr=0.1), _quiet(spike_ratio=ratio, warmup=0))
        _feed(sched, [1.0, 1.0])
        assert sched.observe(loss).event == expected and sched.lr == 0.1 and sched.num_spikes == 0


def test_spike_counts_during_warmup_but_not_on_the_first_observation():
    sched = AdaptiveScheduler(_sgd(lr=0.1), _quiet(warmup=5))
    assert sched.observe(100.0).event == "warmup"  # no EMA yet: nothing to compare with
    assert sched.observe(400.0).event == "spike" and sched.lr == pytest.approx(0.05)


def test_a_lasting_level_shift_stops_counting_as_a_spike():
    """The spike enters the EMA: a loss that stays 4x higher cuts a couple of times, not at every observation."""
    sched = AdaptiveScheduler(_sgd(lr=0.1), _quiet())
    snaps = _feed(sched, [1.0] * 5 + [4.0] * 30)
    ema, cuts = 1.0, 0
    for v in [1.0] * 4 + [4.0] * 30:  # slow reference of the EMA and of the rule
        cuts += v > 3.0 * ema
        ema = 0.9 * ema + 0.1 * v
    assert sched.num_spikes == cuts == sum(s.event == "spike" for s in snaps) == 2
    assert sched.lr == pytest.approx(0.1 * 0.5**2)


# ------------------------------------------------------------------------------------------------- annealing
@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_anneal_scales_the_law_lr_by_the_decay_of_the_observation(kind):
    horizon = 10
    sched = AdaptiveScheduler(_sgd(lr=0.2), _quiet(anneal=kind, anneal_steps=horizon, spike_ratio=0.0))
    assert sched.optimizer.param_groups[0]["lr"] == 0.2  # nothing observed yet: factor 1
    for n in range(1, 14):
        snap = sched.observe(1.0)
        p = min(n, horizon) / horizon
        factor = 0.5 * (1 + math.cos(math.pi * p)) if kind == "cosine" else 1 - p
        assert snap.anneal_factor == pytest.approx(factor, abs=1e-12)
        expected = max(0.2 * factor, sched.config.lr_bounds[0])
        assert snap.lr == pytest.approx(expected) and sched.optimizer.param_groups[0]["lr"] == pytest.approx(expected)
        assert sched.lr == 0.2  # the law's own LR is not annealed


def test_the_law_keeps_adapting_under_the_anneal():
    cfg = AdaptiveSchedulerConfig(warmup=1, adapt_momentum=False, noise_margin=0.0, anneal="cosine", anneal_steps=40)
    sched = AdaptiveScheduler(_sgd(lr=0.1), cfg)
    snaps = _feed(sched, [2.0 * 0.9**i for i in range(20)])
    assert sched.lr > 0.1  # rises on improvement as without the anneal
    assert snaps[-1].lr == pytest.approx(sched.lr * 0.5 * (1 + math.cos(math.pi * 20 / 40)))


def test_anneal_needs_a_horizon():
    with pytest.raises(ValueError, match=r"AdaptiveSchedulerConfig\.anneal_steps=None"):
        AdaptiveScheduler(_sgd(), AdaptiveSchedulerConfig(anneal="cosine"))
    assert AdaptiveScheduler(_sgd(), AdaptiveSchedulerConfig(anneal="cosine"), horizon=7).horizon == 7
    assert AdaptiveScheduler(_sgd(), AdaptiveSchedulerConfig(anneal="cosine", anneal_steps=3), horizon=7).horizon == 3


def test_spike_and_anneal_state_round_trip(tmp_path):
    cfg = _quiet(anneal="linear")
    a = AdaptiveScheduler(_sgd(lr=0.1), cfg, horizon=20)
    _feed(a, [1.0, 1.0, 5.0, 1.0])
    save_state(tmp_path / "s", a.state_dict())
    b = AdaptiveScheduler(_sgd(lr=0.1), cfg, horizon=99)
    b.load_state_dict(load_state(tmp_path / "s"))
    assert (b.num_spikes, b.horizon, b.lr, b.num_steps) == (1, 20, a.lr, 4)
    assert b.optimizer.param_groups[0]["lr"] == pytest.approx(a.optimizer.param_groups[0]["lr"])
    assert [b.observe(v).lr for v in (1.0, 0.9)] == [a.observe(v).lr for v in (1.0, 0.9)]


@pytest.mark.parametrize(
    ("field", "value"),
    [("spike_ratio", 0.5), ("spike_ratio", -1.0), ("spike_backoff", 0.0), ("anneal", "step"), ("anneal_steps", 0)],
)
def test_spike_and_anneal_options_are_checked(field, value):
    with pytest.raises(ValueError, match=rf"AdaptiveSchedulerConfig\.{field}="):
        AdaptiveSchedulerConfig(**{field: value})
