"""What trains for each task of a sequence: all weights, one shared LoRA, or one LoRA expert per task (via peft).

All LoRA work is peft's: `get_peft_model` wraps the model the first time an adapter is needed, `add_adapter`
adds the next expert, `set_adapter` makes it the (only) trainable and active one.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

SHARED_ADAPTER = "default"


def expert_name(task_name: str) -> str:
    """Adapter name of a task's expert under `lora_per_task` (peft adapter names are plain identifiers)."""
    return "expert_" + "".join(c if c.isalnum() or c == "_" else "_" for c in task_name)


def is_peft_model(model: Any) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a hard dependency
        return False
    return isinstance(model, PeftModel)


#: the LoRA defaults (`ContinualConfig.lora_*` and `ExpertLibrary` share them)
LORA_DEFAULTS: dict[str, Any] = {"r": 8, "alpha": 16.0, "dropout": 0.0, "target_modules": ("q_proj", "v_proj")}


def lora_config(
    r: int = LORA_DEFAULTS["r"],
    alpha: float = LORA_DEFAULTS["alpha"],
    dropout: float = LORA_DEFAULTS["dropout"],
    target_modules: Iterable[str] | str = LORA_DEFAULTS["target_modules"],
    **kwargs: Any,
):
    """The one LoRA-config factory of the package: a causal-LM `peft.LoraConfig`; `kwargs` go to `LoraConfig`
    (e.g. `init_lora_weights`). A lone string for `target_modules` is one module name (not a peft regex)."""
    if hasattr(r, "lora_r"):  # the former `lora_config(args)`, kept while call sites move to `lora_config_from_args`
        return lora_config_from_args(r, **kwargs)
    from peft import LoraConfig, TaskType

    modules = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    kwargs.setdefault("task_type", TaskType.CAUSAL_LM)
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=modules, **kwargs)


def lora_config_from_args(args: Any, **kwargs: Any):
    """`lora_config` from an object with the `lora_r`, `lora_alpha`, `lora_dropout`, `lora_target_modules` options."""
    return lora_config(args.lora_r, args.lora_alpha, args.lora_dropout, args.lora_target_modules, **kwargs)


def adapter_for_task(strategy: str, task_name: str) -> str | None:
    """The adapter that holds what was learned for `task_name` (None: the model's own weights)."""
    if strategy == "full":
        return None
    if strategy == "shared_lora":
        return SHARED_ADAPTER
    return expert_name(task_name)


def prepare_task_parameters(model: torch.nn.Module, strategy: str, task_name: str, args: Any) -> torch.nn.Module:
    """Make the parameters of `task_name` trainable and return the (possibly newly wrapped) model.

    * ``full``: the model as it is (every parameter that requires grad trains);
    * ``shared_lora``: wrap once in a peft LoRA model (adapter ``default``) and keep training it;
    * ``lora_per_task``: one adapter per task (``expert_<task>``), created on first use and activated.
    """
    adapter = adapter_for_task(strategy, task_name)
    if adapter is None:
        return model
    from peft import get_peft_model

    if not is_peft_model(model):
        return get_peft_model(model, lora_config_from_args(args), adapter_name=adapter)
    if adapter not in model.peft_config:
        model.add_adapter(adapter, lora_config_from_args(args))
    model.set_adapter(adapter)
    return model


def activate_adapter(model: torch.nn.Module, adapter: str | None) -> None:
    """Activate `adapter` for inference (no-op for models without adapters or unknown names)."""
    if adapter is None or not is_peft_model(model) or adapter not in model.peft_config:
        return
    model.set_adapter(adapter)
