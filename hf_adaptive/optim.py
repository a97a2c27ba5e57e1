"""Optimizers by name, from `torch.optim` and `pytorch_optimizer` (no optimizer code is copied here).

Names: 'adamw', 'adam', 'sgd' (torch), 'lamb' (pytorch_optimizer), 'lookahead' (pytorch_optimizer's `Lookahead`
around the optimizer named by `inner`, itself any of these names), and any other name `pytorch_optimizer` knows.
`gradient_centralization=True` centralizes the gradients of every matrix parameter before each step with
pytorch_optimizer's `centralize_gradient` (a step pre-hook, so it works with any optimizer, inside Lookahead too).

Two entry points:
* `build_optimizer(name, model_or_params, lr, weight_decay, **kwargs)`: an optimizer instance;
* `optimizer_cls_and_kwargs(name, lr, weight_decay, **kwargs)`: the `(class_or_factory, kwargs)` pair for
  `Trainer(optimizer_cls_and_kwargs=...)`. Plain optimizers are passed as `(class, kwargs)` so the Trainer builds
  its usual decay / no-decay groups (their weight decay is then `TrainingArguments.weight_decay`); wrapped ones
  (lookahead, gradient centralization) as a factory, which the
  Trainer calls as `factory()(model, **kwargs)`.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

TORCH_OPTIMIZERS = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}
WRAPPERS = ("lookahead",)
#: the Trainer's own rule (`Trainer.get_decay_parameter_names`): no weight decay on biases and normalization weights
NO_DECAY_PATTERNS = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]


def _fail(field_name: str, value: Any, allowed: str, owner: str = "build_optimizer") -> None:
    raise ValueError(f"{owner}.{field_name}={value!r} is not allowed: {allowed}")


def available_optimizers() -> list[str]:
    """Our own names first, then every name `pytorch_optimizer` registers."""
    from pytorch_optimizer import get_supported_optimizers

    extra = sorted(set(get_supported_optimizers()) - set(TORCH_OPTIMIZERS) - set(WRAPPERS))
    return [*TORCH_OPTIMIZERS, "lamb", *WRAPPERS, *[n for n in extra if n != "lamb"]]


def optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    """The class behind a (non-wrapper) name; `ValueError` naming the allowed ones otherwise."""
    if not isinstance(name, str) or not name:
        _fail("name", name, "must be a non-empty optimizer name")
    key = name.lower()
    if key in TORCH_OPTIMIZERS:
        return TORCH_OPTIMIZERS[key]
    if key in WRAPPERS:
        _fail("name", name, "'lookahead' wraps another optimizer: pass it as `inner`")
    from pytorch_optimizer import get_supported_optimizers, load_optimizer

    if key not in get_supported_optimizers():
        ours = ["adamw", "adam", "sgd", "lamb", "lookahead"]
        _fail("name", name, f"choose one of {ours} or a pytorch_optimizer name")
    return load_optimizer(key)


def param_groups(model_or_params: nn.Module | Iterable[Any], weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters split like `Trainer.get_decay_parameter_names` does (no decay on biases and norms).

    A plain iterable of parameters becomes one group; a list of group dicts is kept as given.
    """
    if not isinstance(model_or_params, nn.Module):
        params = list(model_or_params)
        if params and isinstance(params[0], dict):
            return params
        return [{"params": [p for p in params if p.requires_grad], "weight_decay": weight_decay}]
    from transformers.trainer_pt_utils import get_parameter_names

    decay_names = set(get_parameter_names(model_or_params, [nn.LayerNorm], NO_DECAY_PATTERNS))
    decay, no_decay = [], []
    for name, p in model_or_params.named_parameters():
        if p.requires_grad:
            (decay if name in decay_names else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def add_gradient_centralization(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Register a step pre-hook subtracting each matrix gradient's per-row mean (pytorch_optimizer's GC)."""
    from pytorch_optimizer.optimizer.gradient_centralization import centralize_gradient

    target = getattr(optimizer, "optimizer", optimizer)  # Lookahead: hook the inner optimizer that applies grads

    def _centralize(opt, args, kwargs) -> None:
        grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None and p.grad.dim() > 1]
        if grads:
            with torch.no_grad():
                for grad in grads:  # one tensor at a time: pytorch_optimizer < 4.1 takes no list
                    centralize_gradient(grad, gc_conv_only=False)

    target.register_step_pre_hook(_centralize)
    optimizer._hf_adaptive_gradient_centralization = True
    return optimizer


def _validate(name: str, lr: float, weight_decay: float, inner: str | None) -> None:
    for key, value in (("lr", lr), ("weight_decay", weight_decay)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value == value or value < 0:
            _fail(key, value, "must be a number >= 0")
    if not isinstance(name, str):
        _fail("name", name, "must be an optimizer name")
    if name.lower() in WRAPPERS:
        try:
            optimizer_class(inner or "adamw")
        except ValueError as err:  # it is `inner` that is wrong, not `name`
            raise ValueError(str(err).replace("build_optimizer.name=", "build_optimizer.inner=", 1)) from None
    else:
        optimizer_class(name)


def build_optimizer(
    name: str,
    model_or_params: nn.Module | Iterable[Any],
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    *,
    inner: str | None = None,
    k: int = 5,
    alpha: float = 0.5,
    pullback_momentum: str = "none",
    gradient_centralization: bool = False,
    **kwargs: Any,
) -> torch.optim.Optimizer:
    """An optimizer by name; `kwargs` go to the (inner) optimizer's constructor."""
    _validate(name, lr, weight_decay, inner)
    groups = param_groups(model_or_params, weight_decay)
    if name.lower() == "lookahead":
        from pytorch_optimizer import Lookahead

        base = optimizer_class(inner or "adamw")(groups, lr=lr, weight_decay=weight_decay, **kwargs)
        optimizer = Lookahead(base, k=k, alpha=alpha, pullback_momentum=pullback_momentum)
    else:
        if inner is not None:
            _fail("inner", inner, "only 'lookahead' wraps an inner optimizer")
        optimizer = optimizer_class(name)(groups, lr=lr, weight_decay=weight_decay, **kwargs)
    if gradient_centralization:
        add_gradient_centralization(optimizer)
    return optimizer


class OptimizerFactory:
    """What `Trainer.create_optimizer` calls for wrapped optimizers: `OptimizerFactory(...)` then `(model, **kw)`.

    A Trainer without optimizer factories (transformers < 5.3) calls it like an optimizer class instead,
    `(param_groups, lr=..., weight_decay=...)`: that call builds the optimizer on its parameter groups directly.
    """

    def __new__(cls, name: str, params: Any = None, **options: Any) -> Any:
        if params is not None:
            return build_optimizer(name, params, **options)
        return super().__new__(cls)

    def __init__(self, name: str, **options: Any) -> None:
        self.name = name
        self.options = options

    def __call__(self, model: nn.Module, **kwargs: Any) -> torch.optim.Optimizer:
        return build_optimizer(self.name, model, **{**self.options, **kwargs})


def optimizer_cls_and_kwargs(
    name: str,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    *,
    inner: str | None = None,
    k: int = 5,
    alpha: float = 0.5,
    pullback_momentum: str = "none",
    gradient_centralization: bool = False,
    **kwargs: Any,
) -> tuple[Any, dict[str, Any]]:
    """The value of `Trainer(optimizer_cls_and_kwargs=...)` for an optimizer by name (validated now, not at train)."""
    _validate(name, lr, weight_decay, inner)
    if name.lower() not in WRAPPERS and not gradient_centralization:
        if inner is not None:
            _fail("inner", inner, "only 'lookahead' wraps an inner optimizer")
        return optimizer_class(name), {"lr": lr, **kwargs}
    options = dict(
        inner=inner,
        k=k,
        alpha=alpha,
        pullback_momentum=pullback_momentum,
        gradient_centralization=gradient_centralization,
    )
    factory = functools.partial(OptimizerFactory, name, **options)
    return factory, {"lr": lr, "weight_decay": weight_decay, **kwargs}


@dataclass
class OptimizerConfig:
    """The optimizer options a `ContinualConfig` / YAML file would carry."""

    optimizer_name: str = field(
        default="adamw", metadata={"help": "adamw, adam, sgd, lamb, lookahead, or a pytorch_optimizer name."}
    )
    lookahead_inner: str = field(default="adamw", metadata={"help": "Optimizer wrapped by 'lookahead'."})
    lookahead_k: int = field(default=5, metadata={"help": "Fast steps between Lookahead's slow-weight updates."})
    lookahead_alpha: float = field(default=0.5, metadata={"help": "Lookahead interpolation factor in [0, 1]."})
    gradient_centralization: bool = field(default=False, metadata={"help": "Centralize matrix gradients."})

    def __post_init__(self) -> None:
        c = type(self).__name__
        # lookahead_inner first and on its own (checked even when optimizer_name is not 'lookahead'), so that its
        # error names it and not optimizer_name
        if not isinstance(self.lookahead_inner, str) or not self.lookahead_inner:
            _fail("lookahead_inner", self.lookahead_inner, "must be a plain optimizer name, e.g. 'adamw'", c)
        if self.lookahead_inner.lower() in WRAPPERS:
            _fail("lookahead_inner", self.lookahead_inner, "must be a plain optimizer, not 'lookahead'", c)
        try:
            optimizer_class(self.lookahead_inner)
        except ValueError as err:
            raise ValueError(str(err).replace("build_optimizer.name", f"{c}.lookahead_inner")) from None
        try:
            _validate(self.optimizer_name, 0.0, 0.0, self.lookahead_inner)
        except ValueError as err:
            raise ValueError(str(err).replace("build_optimizer.name", f"{c}.optimizer_name")) from None
        if isinstance(self.lookahead_k, bool) or not isinstance(self.lookahead_k, int) or self.lookahead_k < 1:
            _fail("lookahead_k", self.lookahead_k, "must be an integer >= 1", c)
        if (
            isinstance(self.lookahead_alpha, bool)
            or not isinstance(self.lookahead_alpha, (int, float))
            or not 0.0 <= self.lookahead_alpha <= 1.0
        ):
            _fail("lookahead_alpha", self.lookahead_alpha, "must be a number in [0, 1]", c)
        if not isinstance(self.gradient_centralization, bool):
            _fail("gradient_centralization", self.gradient_centralization, "must be True or False (a bool)", c)

    def trainer_optimizer(self, lr: float, weight_decay: float = 0.0, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
        """`optimizer_cls_and_kwargs` for these options."""
        wrapped = self.optimizer_name.lower() in WRAPPERS
        return optimizer_cls_and_kwargs(
            self.optimizer_name,
            lr,
            weight_decay,
            inner=self.lookahead_inner if wrapped else None,
            k=self.lookahead_k,
            alpha=self.lookahead_alpha,
            gradient_centralization=self.gradient_centralization,
            **kwargs,
        )
