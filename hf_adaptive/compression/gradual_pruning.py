"""Gradual magnitude pruning during fine-tuning, as a `ContinualPlugin` (Zhu & Gupta 2017, cubic schedule).

At the update steps of the schedule (`schedule.cubic_sparsity`: t0, t0 + Δt, ..., t0 + nΔt) the keep-masks of the
targeted Linear weights are recomputed by magnitude to the scheduled sparsity; between updates they are enforced:
the gradient of a pruned weight is zeroed before every optimizer step (`on_pre_optimizer_step`, so no new
optimizer moments accumulate for it) and the weight is multiplied by its mask after every step (`on_step_end`),
because AdamW's stale moments and weight decay would otherwise move it off zero.

Why a dict of boolean masks and `weight.mul_(mask)` rather than `torch.nn.utils.prune`: its reparametrization
replaces `weight` by `weight_orig` + a forward pre-hook, which renames the weights in `state_dict`, breaks
`save_pretrained` / `from_pretrained` and peft, and costs a float mask per weight. Here the model stays an ordinary
model at every moment (its zeros are plain values), the masks live in the plugin's state (one bool per targeted
weight, in every checkpoint: a resumed run continues with the same masks and schedule position), and making the
pruning permanent only drops them (`make_permanent`).

Across tasks (`allow_regrowth=False`, the default) the masks only grow: an update ranks only the weights still
alive, so a weight pruned while learning task 1 stays zero in task 2. With `allow_regrowth=True` every task after
the first starts with the masks released (the zeros may train again) and its next update ranks all weights anew.
The schedule runs over the optimizer steps of the whole sequence (counted by the plugin: the Trainer's
`global_step` restarts with every task) unless `schedule_per_task`, where each task restarts it at its own step 0
from max(initial_sparsity, the sparsity reached so far).

`structured="mlp_channels"` prunes whole intermediate channels of the MLPs (the gate/up rows and the down column of
a channel together, ranked by their joint L2 norm; the sparsity is the fraction of channels). Attention heads are
not pruned here: the head gates (`head_l0`) and `models.prune_heads` do that.

Only weights that train can be pruned gradually: with LoRA (the base weights frozen, only adapters train) the
plugin refuses, naming the weights; pruning a frozen base once is a different operation, out of scope here.
Sharded parameters (FSDP, DeepSpeed ZeRO-3) are not supported: the masks are computed on whole weights.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..plugins import ContinualPlugin, TaskContext
from ..utils.validation import fail
from .config import GRADUAL_PRUNING_OPTIONS, GradualPruningConfig
from .schedule import channel_scores, cubic_sparsity, lowest_masks, magnitude_masks, update_index

logger = logging.getLogger(__name__)

OWNER = "GradualPruningPlugin"
_PEFT_BASE = ".base_layer"


@dataclass(frozen=True)
class MLPGroup:
    """One MLP's channels: the parameters whose rows are channels (gate/up weights and biases) and those whose
    columns are (the down weight), by parameter name."""

    name: str
    rows: tuple[str, ...]
    cols: tuple[str, ...]


def _module_name(param_name: str) -> str:
    return param_name[: -len(".weight")] if param_name.endswith(".weight") else param_name


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(name == p or name.endswith("." + p) for p in patterns)


def _linears(model: torch.nn.Module) -> list[tuple[str, str, torch.nn.Linear]]:
    """(name as the user names it, module path, module) of every Linear; a peft-wrapped layer's `base_layer` is
    named after its wrapper (`...q_proj`), its LoRA factors are not Linear layers anyone targets by name."""
    out = []
    for path, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            name = path[: -len(_PEFT_BASE)] if path.endswith(_PEFT_BASE) else path
            out.append((name, path, module))
    return out


def _embedding_ids(model: torch.nn.Module) -> set[int]:
    ids = set()
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        try:
            module = getattr(model, getter)()
        except (AttributeError, NotImplementedError):
            continue
        weight = getattr(module, "weight", None)
        if weight is not None:
            ids.add(id(weight))
    return ids


def target_weights(model: torch.nn.Module, patterns: Sequence[str]) -> dict[str, torch.nn.Parameter]:
    """The weights of the Linear layers `patterns` names (full names or suffixes), by parameter name.

    Refuses a pattern set that matches nothing, and any match that is the input or output embedding (tied or not).
    """
    embeddings = _embedding_ids(model)
    found: dict[str, torch.nn.Parameter] = {}
    linears = _linears(model)
    for name, path, module in linears:
        if not _matches(name, patterns):
            continue
        if id(module.weight) in embeddings:
            fail(OWNER, "target_modules", list(patterns), f"{name!r} is an embedding or the LM head: never pruned")
        found[f"{path}.weight"] = module.weight
    if not found:
        examples = [name for name, _, _ in linears[:8]]
        fail(OWNER, "target_modules", list(patterns), f"they match no Linear layer of the model (e.g. {examples})")
    return found


def _linear(module: Any) -> torch.nn.Linear | None:
    module = getattr(module, "base_layer", module)
    return module if isinstance(module, torch.nn.Linear) else None


def mlp_groups(model: torch.nn.Module, patterns: Sequence[str]) -> list[MLPGroup]:
    """The MLPs (modules with `up_proj` and `down_proj` Linear layers, `gate_proj` optional: Llama / Gemma /
    Mistral) whose `up_proj` and `down_proj` `patterns` names."""
    names = {id(m): path for _, path, m in _linears(model)}
    groups = []
    for path, module in model.named_modules():
        up, down = _linear(getattr(module, "up_proj", None)), _linear(getattr(module, "down_proj", None))
        if up is None or down is None:
            continue
        if not (_matches(f"{path}.up_proj", patterns) and _matches(f"{path}.down_proj", patterns)):
            continue
        gate = _linear(getattr(module, "gate_proj", None))
        row_layers = [layer for layer in (gate, up) if layer is not None]
        if any(layer.out_features != down.in_features for layer in row_layers):
            fail(OWNER, "structured", "mlp_channels", f"the MLP {path!r} has gate/up rows that differ from down's")
        rows = [f"{names[id(layer)]}.weight" for layer in row_layers]
        rows += [f"{names[id(layer)]}.bias" for layer in row_layers if layer.bias is not None]
        groups.append(MLPGroup(path, tuple(rows), (f"{names[id(down)]}.weight",)))
    if not groups:
        fail(
            OWNER,
            "structured",
            "mlp_channels",
            f"target_modules={list(patterns)} name no MLP with up_proj and down_proj layers",
        )
    return groups


def _unwrap(trainer: Any, model: torch.nn.Module) -> torch.nn.Module:
    accelerator = getattr(trainer, "accelerator", None)
    return accelerator.unwrap_model(model) if accelerator is not None else model


class GradualPruningPlugin(ContinualPlugin):
    """Unstructured (or MLP-channel) magnitude pruning on the cubic schedule, masks kept across tasks.

    Built from a `GradualPruningConfig` (or its fields as keywords: `GradualPruningPlugin(final_sparsity=0.8)`).
    Pass it in `callbacks` of a `ContinualTrainer` (or bind it to a plain `Trainer`); `extra_results` reports
    the sparsity reached per module and overall, and the updates made.
    """

    name = "gradual_pruning"
    options = GRADUAL_PRUNING_OPTIONS

    def __init__(self, config: GradualPruningConfig | None = None, **overrides: Any) -> None:
        self.config = dataclasses.replace(config or GradualPruningConfig(), **overrides)
        #: keep-masks (True = kept) by parameter name: the whole pruning state of the model
        self.masks: dict[str, torch.Tensor] = {}
        #: optimizer steps seen over the whole sequence, and in the current task
        self.step = 0
        self.task_step = 0
        #: s_i of the running schedule (`initial_sparsity`, or the restart value of a per-task schedule)
        self.task_initial = self.config.initial_sparsity
        #: the schedule step (of the running clock) whose update was made last
        self.last_update: int | None = None
        #: masks released for regrowth, not recomputed yet
        self.released = False
        #: the masks were dropped by `make_permanent`: nothing is pruned any more
        self.permanent = False
        #: one record per update: step, task_step, scheduled and reached sparsity
        self.history: list[dict[str, Any]] = []
        self.final_report: dict[str, Any] | None = None
        self._bound: tuple[int, dict[str, torch.nn.Parameter], list[str], list[MLPGroup]] | None = None

    # ------------------------------------------------------------------------------------------- the model
    def _model(self, model: torch.nn.Module | None = None) -> torch.nn.Module:
        if model is None:
            model = getattr(self.trainer, "model", None)
        if model is None:
            raise ValueError(f"{OWNER}: no model (bind the plugin to a trainer or pass the model)")
        return _unwrap(self.trainer, model)

    def _resolve(self, model: torch.nn.Module) -> tuple[dict[str, torch.nn.Parameter], list[str], list[MLPGroup]]:
        """The model's parameters, the targeted ones (names) and the MLP groups, checked once per model."""
        if self._bound is not None and self._bound[0] == id(model):
            return self._bound[1:]
        params = dict(model.named_parameters())
        patterns = self.config.target_modules
        if self.config.structured == "mlp_channels":
            groups = mlp_groups(model, patterns)
            targets = [n for g in groups for n in (*g.rows, *g.cols)]
        else:
            groups = []
            targets = list(target_weights(model, patterns))
        missing = [n for n in targets if n not in params]
        if missing:
            raise ValueError(f"{OWNER}: the targeted weights {missing[:3]} are not parameters of the model")
        if not any(params[n].requires_grad for n in targets):
            fail(
                OWNER,
                "target_modules",
                list(patterns),
                f"none of the targeted weights trains (e.g. {_module_name(targets[0])!r} has requires_grad=False): "
                "gradual pruning prunes weights while they are fine-tuned, so it needs full fine-tuning "
                "(adapter_strategy='full'); with LoRA only the adapters train",
            )
        self._check_masks(params)
        self._bound = (id(model), params, targets, groups)
        return params, targets, groups

    def _check_masks(self, params: Mapping[str, torch.Tensor]) -> None:
        """Every mask names a parameter of the model and has its shape (a mask of another model must not load)."""
        from ..utils.io import StateLoadError

        for name, mask in self.masks.items():
            module = _module_name(name)
            if name not in params:
                raise StateLoadError(
                    f"{OWNER} masks[{name!r}]: the model has no parameter {name!r} (module {module!r}); the masks "
                    "were made for another model"
                )
            if tuple(mask.shape) != tuple(params[name].shape):
                raise StateLoadError(
                    f"{OWNER} masks[{name!r}].shape={tuple(mask.shape)} is not allowed: module {module!r} has a "
                    f"weight of shape {tuple(params[name].shape)}"
                )

    @torch.no_grad()
    def apply_masks(self, model: torch.nn.Module | None = None) -> None:
        """Zero the pruned weights (`weight.mul_(mask)`), moving masks to their weights' devices once."""
        params, _, _ = self._resolve(self._model(model))
        for name, mask in self.masks.items():
            weight = params[name]
            if mask.device != weight.device:
                self.masks[name] = mask = mask.to(weight.device)
            weight.mul_(mask)

    # -------------------------------------------------------------------------------------------- schedule
    @property
    def clock(self) -> int:
        """The step the schedule reads: the task's steps when it restarts per task, else the sequence's."""
        return self.task_step if self.config.schedule_per_task else self.step

    def scheduled_sparsity(self, step: int | None = None) -> float:
        """The sparsity the schedule prunes to by `step` (default: now)."""
        c = self.config
        step = self.clock if step is None else step
        return cubic_sparsity(step, self.task_initial, c.final_sparsity, c.begin_step, c.num_updates, c.frequency)

    def _update_due(self) -> bool:
        k = update_index(self.clock, self.config.begin_step, self.config.frequency)
        if k is None or self.clock == self.last_update:
            return False
        return k <= self.config.num_updates or self.released

    def _channel_keep(self, group: MLPGroup) -> torch.Tensor | None:
        mask = self.masks.get(group.rows[0])
        return None if mask is None else mask.reshape(mask.shape[0], -1).any(dim=1)

    def update_masks(self, model: torch.nn.Module | None = None, sparsity: float | None = None) -> None:
        """Recompute the masks by magnitude to `sparsity` (default: the scheduled one) and apply them."""
        model = self._model(model)
        params, targets, groups = self._resolve(model)
        c = self.config
        target = self.scheduled_sparsity() if sparsity is None else sparsity
        regrow = c.allow_regrowth
        if groups:
            scores = {g.name: channel_scores([params[n] for n in g.rows], [params[n] for n in g.cols]) for g in groups}
            current = {} if regrow else {g.name: k for g in groups if (k := self._channel_keep(g)) is not None}
            channels = lowest_masks(scores, target, c.scope, current)
            new: dict[str, torch.Tensor] = {}
            for g in groups:
                keep = channels[g.name]
                for n in g.rows:
                    shape = params[n].shape
                    new[n] = (keep.reshape(-1, *([1] * (len(shape) - 1))).expand(shape)).contiguous()
                for n in g.cols:
                    new[n] = keep.reshape(1, -1).expand(params[n].shape).contiguous()
        else:
            new = magnitude_masks({n: params[n] for n in targets}, target, c.scope, None if regrow else self.masks)
        self.masks = {**self.masks, **new}
        self.released = False
        self.last_update = self.clock
        self.apply_masks(model)
        reached = self.sparsity()
        self.history.append({"step": self.step, "task_step": self.task_step, "scheduled": target, "sparsity": reached})
        logger.info("gradual pruning: step %d, sparsity %.4f (scheduled %.4f)", self.step, reached, target)

    def sparsity(self) -> float:
        """The fraction of the masked weights that is pruned (for MLP channels: the fraction of channels, when
        every channel has as many weights as the others, as in every standard MLP)."""
        total = sum(m.numel() for m in self.masks.values())
        return sum(int((~m).sum()) for m in self.masks.values()) / total if total else 0.0

    # ------------------------------------------------------------------------------------------- callbacks
    def on_task_begin(self, trainer: Any, context: TaskContext) -> None:
        if self.permanent:
            return
        self._resolve(self._model(getattr(trainer, "model", None)))  # refuse a LoRA setup before training
        reached = self.sparsity()
        if self.config.allow_regrowth and context.index > 0 and self.masks:
            self.masks = {}
            self.released = True
        if self.config.schedule_per_task:
            self.task_step = 0
            self.last_update = None
            self.task_initial = max(self.config.initial_sparsity, reached)

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if self.permanent:
            return
        self._bound = None  # the model may have been swapped or reloaded since
        model = self._model(model)
        self.apply_masks(model)
        if self._update_due():  # e.g. begin_step = 0: the first update comes before any training step
            self.update_masks(model)

    @torch.no_grad()
    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if self.permanent or not self.masks:
            return
        params, _, _ = self._resolve(self._model(model))
        for name, mask in self.masks.items():
            grad = params[name].grad
            if grad is not None:
                grad.mul_(mask.to(grad.device))

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if self.permanent:
            return
        self.step += 1
        self.task_step += 1
        model = self._model(model)
        self.apply_masks(model)
        if self._update_due():
            self.update_masks(model)

    def on_train_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if self.config.permanent_at_end and not self.permanent and self._sequence_ends():
            self.make_permanent(model)

    def _sequence_ends(self) -> bool:
        """Whether the `train()` that ends is the last one: the last task of a sequence, or a plain `train()`."""
        trainer = self.trainer
        tasks, index = getattr(trainer, "tasks", None), getattr(trainer, "current_task_index", None)
        if getattr(trainer, "current_task", None) is None or tasks is None or index is None:
            return True
        return index == len(tasks) - 1

    def make_permanent(self, model: torch.nn.Module | None = None) -> torch.nn.Module:
        """Zero the pruned weights a last time and drop the masks: the model is an ordinary model whose
        `save_pretrained` writes the zeros as plain weights; the plugin prunes nothing after this."""
        model = self._model(model)
        if self.released:  # masks released for regrowth and not recomputed yet: prune to the schedule first
            self.update_masks(model, max(self.scheduled_sparsity(), self.task_initial))
        self.apply_masks(model)
        self.final_report = self.report()
        self.masks = {}
        self.permanent = True
        self.final_report["permanent"] = True
        logger.info("gradual pruning made permanent at sparsity %.4f", self.final_report["sparsity"])
        return model

    # --------------------------------------------------------------------------------------------- results
    def report(self) -> dict[str, Any]:
        """Sparsity overall and per pruned module (fraction of its weights pruned), the step and the updates."""
        if self.permanent and self.final_report is not None:
            return self.final_report
        modules = {_module_name(n): float(int((~m).sum()) / m.numel()) for n, m in self.masks.items()}
        return {
            "sparsity": self.sparsity(),
            "modules": modules,
            "step": self.step,
            "permanent": self.permanent,
            "updates": [dict(h) for h in self.history],
        }

    def extra_results(self) -> dict[str, Any]:
        return {"gradual_pruning": self.report()}

    # ----------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {
            "structured": self.config.structured,
            "step": self.step,
            "task_step": self.task_step,
            "task_initial": self.task_initial,
            "last_update": self.last_update,
            "released": self.released,
            "permanent": self.permanent,
            "masks": dict(self.masks),
            "history": [dict(h) for h in self.history],
            "final_report": self.final_report,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from ..utils.io import StateLoadError

        if state["structured"] != self.config.structured:
            fail(
                OWNER,
                "structured",
                self.config.structured,
                f"the saved masks were made with structured={state['structured']!r}; use the same",
            )
        masks = dict(state["masks"])
        for name, mask in masks.items():
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
                kind = getattr(mask, "dtype", type(mask).__name__)
                raise StateLoadError(f"{OWNER} masks[{name!r}]={kind} is not allowed: expected a bool tensor")
        for key in ("step", "task_step"):
            if isinstance(state[key], bool) or not isinstance(state[key], int) or state[key] < 0:
                raise StateLoadError(f"{OWNER} state {key}={state[key]!r} is not allowed: an integer >= 0")
        self.masks = masks
        self.step, self.task_step = state["step"], state["task_step"]
        self.task_initial = float(state["task_initial"])
        self.last_update = state["last_update"]
        self.released, self.permanent = bool(state["released"]), bool(state["permanent"])
        self.history = [dict(h) for h in state["history"]]
        self.final_report = state["final_report"]
        self._bound = None
        model = getattr(self.trainer, "model", None)
        if model is not None:  # bound to a trainer: check the masks against its model now, naming the module
            self._check_masks(dict(self._model(model).named_parameters()))


__all__ = ["GradualPruningPlugin", "MLPGroup", "mlp_groups", "target_weights"]
