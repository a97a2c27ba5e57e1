"""Optimizers by name: classes, Lookahead around LAMB, gradient centralization, the Trainer hand-off, errors."""

from __future__ import annotations

import pytest
import torch
from pytorch_optimizer import Lamb, Lookahead
from transformers import Trainer, TrainingArguments

from hf_adaptive.optim import (
    OptimizerConfig,
    available_optimizers,
    build_optimizer,
    optimizer_cls_and_kwargs,
    param_groups,
)


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 2))


def _grads(model, seed):
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("adamw", torch.optim.AdamW),
        ("AdamW", torch.optim.AdamW),
        ("sgd", torch.optim.SGD),
        ("lamb", Lamb),
        ("lookahead", Lookahead),
    ],
)
def test_names_build_the_right_class(name, cls):
    opt = build_optimizer(name, _model(), lr=1e-3, weight_decay=0.01)
    assert type(opt) is cls
    assert {"adamw", "lamb", "lookahead", "sgd", "adan"} <= set(available_optimizers())


def test_decay_groups_exclude_biases_and_norms():
    model = _model()
    groups = param_groups(model, 0.1)
    decay, no_decay = groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(model[0].weight), id(model[2].weight)}
    assert len(no_decay["params"]) == 4  # two biases, LayerNorm weight and bias


def test_lookahead_around_lamb_matches_the_slow_fast_reference():
    """After k fast LAMB steps the weights are slow + alpha * (fast - slow); reference built by hand."""
    k, alpha = 3, 0.5
    model, ref = _model(), _model()
    opt = build_optimizer("lookahead", model, lr=1e-2, inner="lamb", k=k, alpha=alpha)
    assert isinstance(opt.optimizer, Lamb)
    ref_opt = Lamb(param_groups(ref, 0.0), lr=1e-2, weight_decay=0.0)
    start = [p.detach().clone() for p in ref.parameters()]
    for step in range(k):
        _grads(model, step)
        _grads(ref, step)
        opt.step()
        ref_opt.step()
        if step < k - 1:  # between synchronizations Lookahead is exactly its inner optimizer
            for p, q in zip(model.parameters(), ref.parameters(), strict=True):
                torch.testing.assert_close(p, q)
    for p, q, s in zip(model.parameters(), ref.parameters(), start, strict=True):
        torch.testing.assert_close(p, s + alpha * (q - s))


def test_gradient_centralization_subtracts_row_means_before_the_step():
    model, ref = _model(), _model()
    opt = build_optimizer("sgd", model, lr=1.0, gradient_centralization=True)
    _grads(model, 0)
    grads = [p.grad.clone() for p in model.parameters()]
    before = [p.detach().clone() for p in ref.parameters()]
    opt.step()
    for p, g, b in zip(model.parameters(), grads, before, strict=True):
        expected = g - g.mean(dim=1, keepdim=True) if g.dim() > 1 else g  # vectors are left alone
        torch.testing.assert_close(p.detach(), b - expected)


def test_gradient_centralization_inside_lookahead_hooks_the_inner_optimizer():
    model = _model()
    opt = build_optimizer("lookahead", model, lr=1e-2, inner="sgd", gradient_centralization=True)
    _grads(model, 1)
    opt.step()
    w = model[0].weight.grad
    assert w.mean(dim=1).abs().max() < 1e-6  # centralized in place by the hook


def _tiny_trainer(tiny_model, tokenizer, small_tasks, tmp_path, pair):
    from hf_adaptive.tasks import CausalLMCollator, tokenize_task

    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=4,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        save_strategy="no",
        weight_decay=0.01,
    )
    return Trainer(
        model=tiny_model,
        args=args,
        train_dataset=tokenize_task(small_tasks[0], tokenizer),
        data_collator=CausalLMCollator(tokenizer),
        optimizer_cls_and_kwargs=pair,
    )


@pytest.mark.parametrize(
    ("name", "extra", "expected"),
    [
        ("lamb", {}, Lamb),
        ("lookahead", {"inner": "lamb"}, Lookahead),
        ("adamw", {"gradient_centralization": True}, torch.optim.AdamW),
    ],
)
def test_trainer_builds_the_named_optimizer(tiny_model, tokenizer, small_tasks, tmp_path, name, extra, expected):
    before = [p.detach().clone() for p in tiny_model.parameters()]
    trainer = _tiny_trainer(
        tiny_model,
        tokenizer,
        small_tasks,
        tmp_path,
        optimizer_cls_and_kwargs(name, lr=1e-3, weight_decay=0.01, **extra),
    )
    trainer.train()
    inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate's wrapper
    assert type(inner) is expected
    if name == "lookahead":
        assert type(inner.optimizer) is Lamb
    assert any(not torch.equal(a, b) for a, b in zip(before, tiny_model.parameters(), strict=True))
    assert all(torch.isfinite(p).all() for p in tiny_model.parameters())


def test_optimizer_config_for_yaml_fields():
    cfg = OptimizerConfig(optimizer_name="lookahead", lookahead_inner="lamb", lookahead_k=4, lookahead_alpha=0.6)
    factory, kwargs = cfg.trainer_optimizer(lr=2e-3, weight_decay=0.0)
    opt = factory()(_model(), **kwargs)
    assert isinstance(opt, Lookahead) and isinstance(opt.optimizer, Lamb) and opt.k == 4 and opt.alpha == 0.6
    cls, kwargs = OptimizerConfig(optimizer_name="adamw").trainer_optimizer(lr=2e-3)
    assert cls is torch.optim.AdamW and kwargs == {"lr": 2e-3}


@pytest.mark.parametrize(
    ("call", "pattern"),
    [
        (lambda: build_optimizer("adamz", _model()), r"build_optimizer\.name='adamz' is not allowed: choose one of"),
        (lambda: build_optimizer("lookahead", _model(), inner="nope"), r"build_optimizer\.inner='nope'"),
        (lambda: build_optimizer("adamw", _model(), inner="lamb"), r"build_optimizer\.inner='lamb'"),
        (lambda: build_optimizer("adamw", _model(), lr=-1.0), r"build_optimizer\.lr=-1\.0"),
        (lambda: optimizer_cls_and_kwargs("adamz"), r"build_optimizer\.name='adamz'"),
        (lambda: OptimizerConfig(optimizer_name="adamz"), r"OptimizerConfig\.optimizer_name='adamz'"),
        (
            lambda: OptimizerConfig(optimizer_name="lookahead", lookahead_inner="lookahead"),
            r"OptimizerConfig\.(optimizer_name|lookahead_inner)='lookahead'",
        ),
        (lambda: OptimizerConfig(lookahead_alpha=2.0), r"OptimizerConfig\.lookahead_alpha=2\.0"),
    ],
)
def test_bad_names_and_values_fail_clearly(call, pattern):
    with pytest.raises(ValueError, match=pattern):
        call()


def test_optimizer_config_defaults_keep_the_trainers_optimizer():
    cfg = OptimizerConfig()
    assert (cfg.optimizer_name, cfg.lookahead_inner, cfg.lookahead_k, cfg.lookahead_alpha) == (None, "adamw", 5, 0.5)
    assert cfg.gradient_centralization is False and cfg.trainer_optimizer(lr=1e-3) is None


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"lookahead_k": 0}, "lookahead_k"),
        ({"lookahead_alpha": 1.5}, "lookahead_alpha"),
        ({"gradient_centralization": "yes", "optimizer_name": "adamw"}, "gradient_centralization"),
        ({"gradient_centralization": True}, "gradient_centralization"),
        ({"optimizer_name": "adamz"}, "optimizer_name"),
        ({"lookahead_inner": "bogus"}, "lookahead_inner"),
    ],
)
def test_optimizer_config_errors_name_the_field_and_are_restated_under_the_option(values, field):
    """`OptimizerConfig.<field>` standalone; `build_config` restates it as the option of a ContinualConfig-like
    owner (the option names are the field names)."""
    from types import SimpleNamespace

    from hf_adaptive.optim import OPTIMIZER_OPTIONS
    from hf_adaptive.utils.options import build_config
    from hf_adaptive.utils.validation import OptionError

    with pytest.raises(OptionError, match=rf"^OptimizerConfig\.{field}="):
        OptimizerConfig(**values)
    (source,) = OPTIMIZER_OPTIONS
    assert source.names() == {f: f for f in OptimizerConfig.__dataclass_fields__}
    options = SimpleNamespace(**{**{f.name: f.default for f in source.fields()}, **values})
    with pytest.raises(OptionError, match=rf"^ContinualConfig\.{field}=") as err:
        build_config(source, options, owner="ContinualConfig")
    assert err.value.field == field


def test_the_three_entry_points_build_the_same_optimizer():
    """`build_optimizer`, `optimizer_cls_and_kwargs` and `OptimizerConfig.trainer_optimizer`: one implementation."""
    options = dict(inner="lamb", k=3, alpha=0.4, gradient_centralization=True)
    built = [
        build_optimizer("lookahead", _model(), lr=1e-2, weight_decay=0.1, **options),
        (lambda pair: pair[0]()(_model(), **pair[1]))(
            optimizer_cls_and_kwargs("lookahead", lr=1e-2, weight_decay=0.1, **options)
        ),
        (lambda pair: pair[0]()(_model(), **pair[1]))(
            OptimizerConfig("lookahead", "lamb", 3, 0.4, True).trainer_optimizer(lr=1e-2, weight_decay=0.1)
        ),
    ]
    for opt in built:
        assert type(opt) is Lookahead and type(opt.optimizer) is Lamb and (opt.k, opt.alpha) == (3, 0.4)
        assert opt._hf_adaptive_gradient_centralization
        assert [g["weight_decay"] for g in opt.param_groups] == [g["weight_decay"] for g in built[0].param_groups]
