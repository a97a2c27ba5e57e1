"""Selective freezing: quiet units freeze (backward really skips them), probes thaw revived ones, state resumes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hf_adaptive.scheduling import AdaptiveScheduler, AdaptiveSchedulerConfig, Freezer, FreezingConfig
from hf_adaptive.utils.io import load_state, save_state


class TwoBranch(nn.Module):
    """y = a(x) + gate * b(x): with gate = 0 the branch `b` gets exactly zero gradient."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(8, 4)
        self.b = nn.Linear(8, 4)
        self.gate = 0.0

    def forward(self, x):
        return self.a(x) + self.gate * self.b(x)


def _train(model, freezer, opt, steps, x, y):
    for _ in range(steps):
        (model(x) - y).pow(2).mean().backward()
        freezer.update()
        opt.step()
        opt.zero_grad(set_to_none=True)


def test_quiet_parameters_freeze_and_backward_skips_them():
    model = TwoBranch()
    freezer = Freezer(model, FreezingConfig(threshold=1e-6, warmup_steps=3, probe_every=0))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(16, 8), torch.randn(16, 4)
    b_before = model.b.weight.detach().clone()
    _train(model, freezer, opt, 5, x, y)
    assert sorted(freezer.frozen_names()) == ["b.bias", "b.weight"]
    assert not model.b.weight.requires_grad and model.a.weight.requires_grad
    expected = sum(p.numel() for p in model.b.parameters()) / sum(p.numel() for p in model.parameters())
    assert freezer.frozen_fraction() == pytest.approx(expected)
    # the backward pass no longer produces gradients for the frozen branch, even when it would be non-zero
    model.gate = 1.0
    (model(x) - y).pow(2).mean().backward()
    assert model.b.weight.grad is None and model.b.bias.grad is None
    assert model.a.weight.grad is not None
    assert torch.equal(model.b.weight, b_before)


def test_module_granularity_freezes_whole_modules():
    model = TwoBranch()
    freezer = Freezer(model, FreezingConfig(threshold=1e-6, warmup_steps=2, probe_every=0, granularity="module"))
    assert [u.name for u in freezer.units] == ["a", "b"]
    _train(model, freezer, torch.optim.SGD(model.parameters(), lr=0.1), 4, torch.randn(16, 8), torch.randn(16, 4))
    assert freezer.frozen_names() == ["b"]


def test_probe_unfreezes_when_the_signal_returns_and_refreezes_otherwise():
    model = TwoBranch()
    freezer = Freezer(model, FreezingConfig(threshold=1e-6, warmup_steps=2, probe_every=5))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(16, 8), torch.randn(16, 4)
    _train(model, freezer, opt, 4, x, y)
    assert freezer.frozen_names() == ["b.weight", "b.bias"]
    # step 5 arms a probe: still no signal, so the probe step refreezes b without moving it
    _train(model, freezer, opt, 1, x, y)
    assert model.b.weight.requires_grad  # thawed for the probe
    b_before = model.b.weight.detach().clone()
    _train(model, freezer, opt, 1, x, y)
    assert freezer.frozen_names() == ["b.weight", "b.bias"] and torch.equal(model.b.weight, b_before)
    # the signal comes back: the next probe (step 10) thaws b and it trains again
    model.gate = 1.0
    _train(model, freezer, opt, 5, x, y)
    assert freezer.frozen_names() == []
    _train(model, freezer, opt, 1, x, y)
    assert freezer.frozen_names() == [] and not torch.equal(model.b.weight, b_before)


def test_relative_threshold_and_cap_on_frozen_fraction():
    model = TwoBranch()
    model.gate = 1e-4  # tiny but non-zero gradient for b
    cfg = FreezingConfig(threshold=0.01, threshold_mode="relative", warmup_steps=2, probe_every=0)
    freezer = Freezer(model, cfg)
    _train(model, freezer, torch.optim.SGD(model.parameters(), lr=0.1), 4, torch.randn(16, 8), torch.randn(16, 4))
    assert set(freezer.frozen_names()) == {"b.weight", "b.bias"}

    capped = TwoBranch()
    freezer = Freezer(capped, FreezingConfig(threshold=1e9, warmup_steps=0, probe_every=0, max_frozen_fraction=0.5))
    _train(capped, freezer, torch.optim.SGD(capped.parameters(), lr=0.1), 3, torch.randn(16, 8), torch.randn(16, 4))
    assert 0 < freezer.frozen_fraction() <= 0.5
    assert any(p.requires_grad for p in capped.parameters())


def test_release_and_state_round_trip(tmp_path):
    model = TwoBranch()
    cfg = FreezingConfig(threshold=1e-6, warmup_steps=2, probe_every=0)
    freezer = Freezer(model, cfg)
    _train(model, freezer, torch.optim.SGD(model.parameters(), lr=0.1), 4, torch.randn(16, 8), torch.randn(16, 4))
    save_state(tmp_path / "freezer", freezer.state_dict())
    fresh = TwoBranch()
    restored = Freezer(fresh, cfg)
    restored.load_state_dict(load_state(tmp_path / "freezer"))
    assert restored.frozen_names() == freezer.frozen_names() and restored.steps == freezer.steps
    assert not fresh.b.weight.requires_grad
    assert [u.ema for u in restored.units] == [u.ema for u in freezer.units]
    restored.release()
    assert all(p.requires_grad for p in fresh.parameters()) and restored.frozen_fraction() == 0.0


def test_scheduler_drives_the_freezer_and_reports_the_fraction():
    model = TwoBranch()
    freezer = Freezer(model, FreezingConfig(threshold=1e-6, warmup_steps=2, probe_every=0))
    sched = AdaptiveScheduler(torch.optim.SGD(model.parameters(), lr=0.1), AdaptiveSchedulerConfig(), freezer=freezer)
    x, y = torch.randn(16, 8), torch.randn(16, 4)
    for _ in range(4):
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        snap = sched.step(loss)
        sched.optimizer.zero_grad(set_to_none=True)
    assert snap.frozen_fraction == pytest.approx(freezer.frozen_fraction()) and snap.frozen_fraction > 0
    assert "freezer" in sched.state_dict()


def test_parameters_frozen_from_the_start_are_not_managed():
    model = TwoBranch()
    model.a.requires_grad_(False)
    freezer = Freezer(model)
    assert [u.name for u in freezer.units] == ["b.weight", "b.bias"]
    with pytest.raises(ValueError, match="Freezer.model"):
        Freezer(nn.Linear(2, 2).requires_grad_(False))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("threshold", -1.0),
        ("granularity", "block"),
        ("threshold_mode", "median"),
        ("probe_every", -1),
        ("max_frozen_fraction", 1.0),
    ],
)
def test_config_errors(field, value):
    with pytest.raises(ValueError, match=rf"FreezingConfig\.{field}="):
        FreezingConfig(**{field: value})
