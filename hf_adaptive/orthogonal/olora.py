"""`OLoRAPlugin`: O-LoRA (Wang et al. 2023), one LoRA per task in a subspace orthogonal to the earlier tasks'.

Per task (`setup_task`) the plugin asks the trainer to train a fresh LoRA ``olora_<task>`` (shape: the trainer's
`lora_*` options) on a model that keeps every earlier task's LoRA, frozen: the model is the base plus the sum of
all the tasks' LoRA updates, and every task is scored with that whole sum (O-LoRA has no task id at test time).
While a task trains, the loss gets

    olora    = Σ_modules Σ_{i < t} Σ_jk |(A_i A_t^T)_jk|     weight `orth_lambda` (λ1)
    olora_l2 = ‖A_t‖_F + ‖B_t‖_F summed over the modules     weight `l2_lambda`   (λ2, off by default)

where A are the LoRA down-projections (peft's `lora_A`, r x in: their rows span the input subspace a task
writes through) and t is the task training; the earlier A_i are constants, so the loss moves only the new A_t
(the form of the authors' code: the paper's A_i^T A_t in its column convention; λ2's norms are not squared there).

How the sum is formed: when a task starts, the finished tasks' updates B_i A_i · scaling are added into the
frozen base weights ("merged"); their adapters stay on the model, inactive and frozen, for their A_i. Several
active peft adapters would be the other way, but the trainer activates one adapter at a time (peft's
`set_adapter` when it sets a task up and when it scores tasks, and transformers when it loads a checkpoint), which
would drop the earlier ones from the forward; merged, they are in the weights whichever adapter is active.
Caveat: activating an earlier (merged) adapter by hand counts its update twice.

The trainer's own `adapter_strategy` must be ``'full'`` (the plugin chooses the adapter). State (tensors + JSON,
in every checkpoint and end-of-task snapshot): the adapters in task order, which are merged, their LoRA configs
and weights; `restore_model` rebuilds them (and the merged weights) on a fresh backbone before a snapshot loads.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from ..adapters import is_peft_model, lora_config_from_args
from ..plugins import PLUGIN_STATE_DIR, ContinualPlugin, LossTerm, TaskContext, TaskSetup
from ..utils.validation import OptionError, fail
from .config import OLORA_OPTIONS, OLoRAConfig

__all__ = ["OLoRAPlugin", "lora_layers", "merge_into_base", "olora_adapter_name", "orthogonality_loss"]

ADAPTER_PREFIX = "olora_"


def olora_adapter_name(task_name: str) -> str:
    """The adapter of `task_name` (peft adapter names are plain identifiers)."""
    return ADAPTER_PREFIX + "".join(c if c.isalnum() or c == "_" else "_" for c in task_name)


def lora_layers(model: torch.nn.Module) -> list[tuple[str, Any]]:
    """`(name, layer)` of every peft LoRA layer in `model` (through DDP or compile wrappers)."""
    from peft.tuners.lora import LoraLayer

    return [(name, module) for name, module in model.named_modules() if isinstance(module, LoraLayer)]


def orthogonality_loss(model: torch.nn.Module, new: str, old: Iterable[str]) -> torch.Tensor:
    """Σ over the LoRA modules holding `new` of Σ_{i in old} Σ_jk |(A_i A_new^T)_jk| (a scalar in the graph of
    A_new's; the A_i enter as constants). 0 without an old adapter."""
    old = list(old)
    total = torch.zeros((), device=_device(model))
    for _, layer in lora_layers(model):
        if new not in layer.lora_A:
            continue
        a_new = layer.lora_A[new].weight
        for name in old:
            if name in layer.lora_A:
                a_old = layer.lora_A[name].weight.detach().to(a_new.dtype)
                total = total + torch.mm(a_old, a_new.t()).abs().sum().float()
    return total


def _device(model: torch.nn.Module) -> torch.device:
    """Where a term of `model` lives (a 0 term too: the trainer stacks the logged terms on one device)."""
    return next(model.parameters()).device


@torch.no_grad()
def merge_into_base(model: torch.nn.Module, adapter: str) -> None:
    """Add `adapter`'s update (peft's `get_delta_weight`: B A · scaling) into the base weight of every LoRA layer
    holding it, without peft's merged flag (so the active adapter still applies on top)."""
    for _, layer in lora_layers(model):
        if adapter in layer.lora_A:
            base = layer.get_base_layer()
            base.weight.data += layer.get_delta_weight(adapter).to(base.weight.dtype)


def _check_strategy(args: Any) -> None:
    """O-LoRA chooses which adapter trains: the trainer must add none of its own (`adapter_strategy='full'`)."""
    strategy = getattr(args, "adapter_strategy", "full")
    if strategy != "full":
        fail(
            type(args).__name__,
            "adapter_strategy",
            strategy,
            "use 'full' with the olora plugin (it adds one LoRA per task itself)",
        )


def _config_dict(config: Any) -> dict[str, Any]:
    """A peft `LoraConfig` as JSON values (sets as sorted lists; what JSON cannot hold is left out)."""
    values = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.to_dict().items()}
    return {k: v for k, v in values.items() if v is None or isinstance(v, (bool, int, float, str, list, dict))}


@dataclasses.dataclass
class _Lookup:
    """What the loss reads of the model for the task training now."""

    pairs: list[tuple[torch.Tensor, torch.nn.Parameter]]  # (earlier A's stacked, new A) per module
    matrices: list[torch.nn.Parameter]  # the new adapter's A and B matrices
    device: torch.device


class OLoRAPlugin(ContinualPlugin):
    name = "olora"
    options = OLORA_OPTIONS

    def __init__(self, config: OLoRAConfig | None = None, lora_config: Any = None, **overrides: Any) -> None:
        """`config` and/or keyword overrides of its fields (`orth_lambda=`, `l2_lambda=`); `lora_config`: the peft
        `LoraConfig` of the new adapters (None: from the trainer's `lora_*` options)."""
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(OLoRAConfig)})
        if unknown:
            raise TypeError(
                f"OLoRAPlugin got unknown option(s) {unknown}: the options are the fields of OLoRAConfig "
                f"{[f.name for f in dataclasses.fields(OLoRAConfig)]}"
            )
        try:
            self.config = dataclasses.replace(config or OLoRAConfig(), **overrides)
        except OptionError as err:  # a keyword given to this constructor: named as the plugin's
            raise (err.renamed(type(self).__name__, err.field) if err.field in overrides else err) from None
        self.lora_config = lora_config
        #: one adapter per task, in task order: the last one is the one training
        self.adapters: list[str] = []
        #: the adapters whose update is in the base weights (all but the last, once the next task starts)
        self.merged: list[str] = []
        self.task_adapter: dict[str, str] = {}
        #: per adapter, its `LoraConfig` as JSON (to rebuild it on a fresh backbone)
        self.adapter_configs: dict[str, dict[str, Any]] = {}
        self._model: torch.nn.Module | None = None
        self._saved_weights: dict[str, dict[str, torch.Tensor]] = {}
        self._pairs_cache: tuple[tuple[int, tuple[str, ...]], _Lookup] | None = None

    @classmethod
    def from_config(cls, config: Any, model: torch.nn.Module | None = None) -> OLoRAPlugin:
        _check_strategy(config)
        return super().from_config(config, model)

    @property
    def term_names(self) -> tuple[str, ...]:
        names = (self.name,) if self.config.orth_lambda > 0 else ()
        return names + (("olora_l2",) if self.config.l2_lambda > 0 else ())

    # ------------------------------------------------------------------ task boundaries
    def setup_task(self, trainer: Any, context: TaskContext) -> TaskSetup:
        """Merge the finished tasks' adapters into the weights and add a fresh one for this task, which the trainer
        trains (the only active, trainable adapter)."""
        from peft import get_peft_model

        _check_strategy(trainer.args)
        name = olora_adapter_name(context.task.name)
        model = trainer.model
        if is_peft_model(model):
            foreign = sorted(set(model.peft_config) - set(self.adapters))
            if foreign:
                raise ValueError(
                    f"OLoRAPlugin: the model has peft adapters {foreign} that O-LoRA did not add: pass the model "
                    "without adapters"
                )
        elif self.adapters:
            raise ValueError(
                f"OLoRAPlugin: the model has none of the adapters {self.adapters} of the finished tasks: a trainer "
                "resuming a sequence rebuilds them from the snapshot (restore_model)"
            )
        if name in self.adapters:
            if self.adapters[-1] == name and is_peft_model(model):  # set up again (e.g. train_joint after it)
                return TaskSetup(model=model, adapter=name)
            raise ValueError(f"OLoRAPlugin: task {context.task.name!r} has an adapter already ({name})")
        config = self.lora_config if self.lora_config is not None else lora_config_from_args(trainer.args)
        if is_peft_model(model):
            for finished in self.adapters:
                if finished not in self.merged:
                    merge_into_base(model, finished)
                    self.merged.append(finished)
            model.add_adapter(name, config)
            model.set_adapter(name)  # the merged ones must not apply on top of the weights that now hold them
        else:
            model = get_peft_model(model, config, adapter_name=name)
        self.adapters.append(name)
        self.task_adapter[context.task.name] = name
        self.adapter_configs[name] = _config_dict(model.peft_config[name])
        self._model = model
        self._pairs_cache = None
        return TaskSetup(model=model, adapter=name)

    def on_task_begin(self, trainer: Any, context: TaskContext) -> None:
        self._pairs_cache = None

    def on_train_begin(self, args, state, control, **kwargs):  # after a checkpoint's weights loaded
        self._pairs_cache = None

    # ------------------------------------------------------------------ loss
    def _lookup(self, model: torch.nn.Module) -> _Lookup:
        """Per LoRA module holding the new adapter: (the earlier tasks' A stacked, a constant; the new A), and the
        new adapter's A and B matrices; found once per task (and after a checkpoint loads)."""
        key = (id(model), tuple(self.adapters))
        if self._pairs_cache is not None and self._pairs_cache[0] == key:
            return self._pairs_cache[1]
        new, old = self.adapters[-1], self.adapters[:-1]
        pairs, matrices = [], []
        for _, layer in lora_layers(model):
            if new not in layer.lora_A:
                continue
            a_new = layer.lora_A[new].weight
            matrices += [a_new, layer.lora_B[new].weight]
            stacked = [layer.lora_A[o].weight.detach() for o in old if o in layer.lora_A]
            if stacked:
                pairs.append((torch.cat(stacked).to(a_new.dtype), a_new))
        lookup = _Lookup(pairs, matrices, _device(model))
        self._pairs_cache = (key, lookup)
        return lookup

    def orthogonality(self, model: torch.nn.Module) -> torch.Tensor:
        """Σ_modules Σ_{i<t} Σ_jk |(A_i A_t^T)_jk| for the task training now (0 at the first task)."""
        lookup = self._lookup(model)
        values = [torch.mm(old, new.t()).abs().sum().float() for old, new in lookup.pairs]
        return torch.stack(values).sum() if values else torch.zeros((), device=lookup.device)

    def l2(self, model: torch.nn.Module) -> torch.Tensor:
        """Σ over the new adapter's LoRA matrices of their Frobenius norms."""
        lookup = self._lookup(model)
        norms = [matrix.float().norm(2) for matrix in lookup.matrices]
        return torch.stack(norms).sum() if norms else torch.zeros((), device=lookup.device)

    def loss_terms(self, trainer: Any, model: torch.nn.Module, inputs: dict[str, Any], outputs: Any) -> list[LossTerm]:
        if not self.adapters:
            return []
        terms = []
        if self.config.orth_lambda > 0:
            terms.append(LossTerm(self.name, self.orthogonality(model), self.config.orth_lambda))
        if self.config.l2_lambda > 0:
            terms.append(LossTerm("olora_l2", self.l2(model), self.config.l2_lambda))
        return terms

    def adapter_for_task(self, task_name: str) -> str | None:
        """None: every task is scored with the sum of all adapters (the active one on the merged weights)."""
        return None

    def extra_results(self) -> dict[str, Any]:
        return {"olora_adapters": dict(self.task_adapter)} if self.task_adapter else {}

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        from peft import get_peft_model_state_dict

        weights: dict[str, dict[str, torch.Tensor]] = {}
        for name in self.adapters:
            if self._model is not None and name in getattr(self._model, "peft_config", {}):
                found = get_peft_model_state_dict(self._model, adapter_name=name)
                weights[name] = {k: v.detach().cpu().clone() for k, v in found.items()}
            else:  # loaded, not rebuilt yet
                weights[name] = self._saved_weights[name]
        return {
            "adapters": list(self.adapters),
            "merged": list(self.merged),
            "task_adapter": dict(self.task_adapter),
            "configs": {name: dict(self.adapter_configs[name]) for name in self.adapters},
            "weights": weights,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The bookkeeping and the saved adapters (checked); the model is rebuilt from them by `restore_model`."""
        adapters, merged = state["adapters"], state["merged"]
        if (
            not isinstance(adapters, list)
            or not all(isinstance(a, str) for a in adapters)
            or len(set(adapters)) != len(adapters)
        ):
            raise ValueError(f"adapters={adapters!r}: expected a list of unique adapter names")
        if not isinstance(merged, list) or merged != adapters[: len(merged)] or len(merged) < len(adapters) - 1:
            raise ValueError(
                f"merged={merged!r}: expected the first adapters of {adapters} (all but at most the last one)"
            )
        task_adapter, configs, weights = state["task_adapter"], state["configs"], state["weights"]
        if not isinstance(task_adapter, dict) or sorted(task_adapter.values()) != sorted(adapters):
            raise ValueError(f"task_adapter={task_adapter!r}: expected one task per adapter of {adapters}")
        for what, value in (("configs", configs), ("weights", weights)):
            if not isinstance(value, dict) or set(value) != set(adapters):
                raise ValueError(
                    f"{what} has entries for {sorted(value) if isinstance(value, dict) else value!r}, "
                    f"expected one per adapter of {adapters}"
                )
        for name, tensors in weights.items():
            if not isinstance(tensors, dict) or not tensors:
                raise ValueError(f"weights.{name}: expected the adapter's LoRA tensors")
            for key, tensor in tensors.items():
                if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
                    raise ValueError(f"weights.{name}.{key}: expected a floating point tensor")
        self.adapters, self.merged = list(adapters), list(merged)
        self.task_adapter = dict(task_adapter)
        self.adapter_configs = {k: dict(v) for k, v in configs.items()}
        self._saved_weights = {k: dict(v) for k, v in weights.items()}
        self._pairs_cache = None

    def restore_model(self, snapshot: Path, model: torch.nn.Module) -> torch.nn.Module | None:
        """Before the trainer loads an end-of-task snapshot into its fresh backbone `model`: load this plugin's
        state from `snapshot` and rebuild the adapters on `model` (the earlier ones merged into its weights, the
        last one active), returning the model the snapshot's weights load into. None: no state of this plugin."""
        from ..utils.io import load_state_into

        folder = Path(snapshot) / PLUGIN_STATE_DIR / self.name
        if not folder.is_dir():
            return None
        load_state_into(self, folder)  # errors name the folder
        if not self.adapters:
            return None
        return self.rebuild(model)

    def rebuild(self, model: torch.nn.Module) -> torch.nn.Module:
        """The adapters of the loaded state on the backbone `model`: weights set, the merged ones added into the
        base weights in task order (as the live run did), the last one active."""
        from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

        if is_peft_model(model):
            raise ValueError(
                f"OLoRAPlugin: cannot rebuild the adapters {self.adapters} on a model that has peft adapters "
                f"{sorted(model.peft_config)}: give it the backbone"
            )
        known = set(LoraConfig.__dataclass_fields__)
        for i, name in enumerate(self.adapters):
            config = LoraConfig(**{k: v for k, v in self.adapter_configs[name].items() if k in known})
            if i == 0:
                model = get_peft_model(model, config, adapter_name=name)
            else:
                model.add_adapter(name, config)
            result = set_peft_model_state_dict(model, self._saved_weights[name], adapter_name=name)
            missing = [k for k in getattr(result, "missing_keys", []) if f".{name}." in k]
            if missing:
                raise ValueError(f"weights.{name} lacks {len(missing)} LoRA tensors of the model, e.g. {missing[0]}")
        for name in self.merged:
            merge_into_base(model, name)
        model.set_adapter(self.adapters[-1])
        self._model = model
        self._pairs_cache = None
        return model
