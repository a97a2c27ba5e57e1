"""Optimizers by name, from `torch.optim` and `pytorch_optimizer` (no optimizer code is copied here).

Names: 'adamw', 'adam', 'sgd' (torch), 'lamb' (pytorch_optimizer), 'lookahead' (pytorch_optimizer's `Lookahead`
around the optimizer named by `inner`, itself any of these names), and any other name `pytorch_optimizer` knows.
`gradient_centralization=True` centralizes the gradients of every matrix parameter before each step with
pytorch_optimizer's `centralize_gradient` (a step pre-hook, so it works with any optimizer, inside Lookahead too).

One implementation, `build_optimizer(name, model_or_params, lr, weight_decay, **options)` (an optimizer instance),
and two thin views of it with the same options:
* `optimizer_cls_and_kwargs(name, lr, weight_decay, **options)`: the `(class_or_factory, kwargs)` pair for
  `Trainer(optimizer_cls_and_kwargs=...)`. Plain optimizers are passed as `(class, kwargs)` so the Trainer builds
  its usual decay / no-decay groups (their weight decay is then `TrainingArguments.weight_decay`); wrapped ones
  (lookahead, gradient centralization) as a factory that calls `build_optimizer`, which the Trainer calls as
  `factory()(model, **kwargs)`;
* `OptimizerConfig(...).trainer_optimizer(lr, weight_decay)`: the same pair from the option fields a
  `ContinualConfig` / YAML file carries (`optimizer_name`, `lookahead_*`, `gradient_centralization`).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .utils.options import OptionSource
from .utils.validation import OptionError, check_bool, check_number, fail

TORCH_OPTIMIZERS = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}
WRAPPERS = ("lookahead",)
#: the Trainer's own rule (`Trainer.get_decay_parameter_names`): no weight decay on biases and normalization weights
NO_DECAY_PATTERNS = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]


#: the owner named in the errors of `build_optimizer` / `optimizer_cls_and_kwargs`
OWNER = "build_optimizer"


def available_optimizers() -> list[str]:
    """Our own names first, then every name `pytorch_optimizer` registers."""
    from pytorch_optimizer import get_supported_optimizers

    extra = sorted(set(get_supported_optimizers()) - set(TORCH_OPTIMIZERS) - set(WRAPPERS))
    return [*TORCH_OPTIMIZERS, "lamb", *WRAPPERS, *[n for n in extra if n != "lamb"]]


def optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    """The class behind a (non-wrapper) name; `ValueError` naming the allowed ones otherwise."""
    if not isinstance(name, str) or not name:
        fail(OWNER, "name", name, "must be a non-empty optimizer name")
    key = name.lower()
    if key in TORCH_OPTIMIZERS:
        return TORCH_OPTIMIZERS[key]
    if key in WRAPPERS:
        fail(OWNER, "name", name, "'lookahead' wraps another optimizer: pass it as `inner`")
    from pytorch_optimizer import get_supported_optimizers, load_optimizer

    if key not in get_supported_optimizers():
        ours = ["adamw", "adam", "sgd", "lamb", "lookahead"]
        fail(OWNER, "name", name, f"choose one of {ours} or a pytorch_optimizer name")
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
    """The checks of every entry point, done before anything is built (errors name `build_optimizer.<arg>`)."""
    for key, value in (("lr", lr), ("weight_decay", weight_decay)):
        check_number(OWNER, key, value, 0)
    if not isinstance(name, str):
        fail(OWNER, "name", name, "must be an optimizer name")
    if name.lower() in WRAPPERS:
        try:
            optimizer_class(inner or "adamw")
        except OptionError as err:  # it is `inner` that is wrong, not `name`
            raise err.renamed(OWNER, "inner") from None
        return
    optimizer_class(name)
    if inner is not None:
        fail(OWNER, "inner", inner, "only 'lookahead' wraps an inner optimizer")


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
    """An optimizer by name; `kwargs` go to the (inner) optimizer's constructor.

    `inner`, `k`, `alpha`, `pullback_momentum` configure 'lookahead' (`WRAPPING_OPTIONS`, with
    `gradient_centralization`); the other entry points take the same options and end here.
    """
    _validate(name, lr, weight_decay, inner)
    groups = param_groups(model_or_params, weight_decay)
    if name.lower() == "lookahead":
        from pytorch_optimizer import Lookahead

        base = optimizer_class(inner or "adamw")(groups, lr=lr, weight_decay=weight_decay, **kwargs)
        optimizer = Lookahead(base, k=k, alpha=alpha, pullback_momentum=pullback_momentum)
    else:
        optimizer = optimizer_class(name)(groups, lr=lr, weight_decay=weight_decay, **kwargs)
    if gradient_centralization:
        add_gradient_centralization(optimizer)
    return optimizer


#: the keyword-only options of `build_optimizer` that wrap or hook the optimizer (not its constructor's arguments)
WRAPPING_OPTIONS = ("inner", "k", "alpha", "pullback_momentum", "gradient_centralization")


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
    name: str, lr: float = 1e-3, weight_decay: float = 0.0, **options: Any
) -> tuple[Any, dict[str, Any]]:
    """The value of `Trainer(optimizer_cls_and_kwargs=...)` for `build_optimizer(name, ..., **options)`, validated
    now, not at train time."""
    wrapping = {key: options.pop(key) for key in WRAPPING_OPTIONS if key in options}
    _validate(name, lr, weight_decay, wrapping.get("inner"))
    if name.lower() in WRAPPERS or wrapping.get("gradient_centralization"):
        factory = functools.partial(OptimizerFactory, name, **wrapping)
        return factory, {"lr": lr, "weight_decay": weight_decay, **options}
    return optimizer_class(name), {"lr": lr, **options}


@dataclass
class OptimizerConfig:
    """The optimizer options, declared once: `ContinualConfig` / YAML take them under these names
    (`OPTIMIZER_OPTIONS`); `optimizer_name=None` keeps the Trainer's own (`TrainingArguments.optim`)."""

    optimizer_name: str | None = field(
        default=None,
        metadata={
            "help": "Optimizer by name through pytorch_optimizer / torch: adamw, adam, sgd, lamb, lookahead "
            "or any pytorch_optimizer name; None keeps TrainingArguments.optim."
        },
    )
    lookahead_inner: str = field(default="adamw", metadata={"help": "Optimizer wrapped by 'lookahead'."})
    lookahead_k: int = field(default=5, metadata={"help": "Fast steps between Lookahead's slow-weight updates."})
    lookahead_alpha: float = field(default=0.5, metadata={"help": "Lookahead interpolation factor in [0, 1]."})
    gradient_centralization: bool = field(
        default=False, metadata={"help": "Centralize the gradients of matrix parameters (needs optimizer_name)."}
    )

    def __post_init__(self) -> None:
        c = type(self).__name__
        check_bool(c, "gradient_centralization", self.gradient_centralization)
        if self.gradient_centralization and self.optimizer_name is None:
            fail(c, "gradient_centralization", True, "needs optimizer_name (it hooks the named optimizer)")
        if self.optimizer_name is not None and (not isinstance(self.optimizer_name, str) or not self.optimizer_name):
            fail(c, "optimizer_name", self.optimizer_name, "None or an optimizer name (adamw, lamb, lookahead, ...)")
        # lookahead_inner before optimizer_name and on its own (checked even when optimizer_name is not 'lookahead':
        # a typo there should not wait for its use), so that its error names it and not optimizer_name
        if not isinstance(self.lookahead_inner, str) or not self.lookahead_inner:
            fail(c, "lookahead_inner", self.lookahead_inner, "must be a plain optimizer name, e.g. 'adamw'")
        if self.lookahead_inner.lower() in WRAPPERS:
            fail(c, "lookahead_inner", self.lookahead_inner, "must be a plain optimizer, not 'lookahead'")
        try:
            optimizer_class(self.lookahead_inner)
        except OptionError as err:
            raise err.renamed(c, "lookahead_inner") from None
        if self.optimizer_name is not None:
            try:
                _validate(self.optimizer_name, 0.0, 0.0, None)
            except OptionError as err:
                raise err.renamed(c, "optimizer_name") from None
        check_number(c, "lookahead_k", self.lookahead_k, 1, integer=True)
        check_number(c, "lookahead_alpha", self.lookahead_alpha, 0.0, 1.0)

    def trainer_optimizer(
        self, lr: float, weight_decay: float = 0.0, **kwargs: Any
    ) -> tuple[Any, dict[str, Any]] | None:
        """`optimizer_cls_and_kwargs` for these options (None when `optimizer_name` is None: the Trainer's own)."""
        if self.optimizer_name is None:
            return None
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


#: the optimizer options of `ContinualConfig` (field name = option name)
OPTIMIZER_OPTIONS = (OptionSource(OptimizerConfig),)
