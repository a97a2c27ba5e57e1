"""`ContinualTrainer`: a `Trainer` that adds its plugins' loss terms and runs task sequences.

With no plugins and no loss weighting it *is* `Trainer`: `compute_loss` returns `super().compute_loss(...)`
untouched, so losses, checkpoints, `evaluate()`, `predict()`, resuming and `push_to_hub` are the parent's.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import logging
import os
import shutil
import struct
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging as hf_logging

from .adapters import activate_adapter, adapter_for_task, is_peft_model, prepare_task_parameters
from .config import ContinualConfig
from .metrics import ContinualResult
from .plugins import NONFINITE_SKIP_ATTR, PLUGIN_STATE_DIR, ContinualPlugin, LossTerm, TaskContext, TaskSetup, is_plugin
from .tasks import CausalLMCollator, Task, TaskStream, task_accuracy, tokenize_task
from .tasks.losses import IGNORE_INDEX
from .tasks.prompting import row_options, scoring_options
from .utils.io import atomic_write_json, load_state, load_state_into, save_state
from .utils.validation import check_bool

logger = logging.getLogger(__name__)

SEQUENCE_STATE_NAME = "sequence_state.json"
SNAPSHOT_PREFIX = "snapshot-after-task-"
TRAINER_STATE_NAME = "trainer_state.json"
LOSS_WEIGHTING_STATE = "loss_weighting"
#: the trainer's own per-checkpoint bookkeeping (loss sum and skipped steps before the checkpoint), for resuming
TRAINER_BOOKKEEPING_NAME = "continual_trainer_state.json"

#: per model class: does its forward take `logits_to_keep` (`ContinualTrainer._accepts_logits_to_keep`)
_ACCEPTS_LOGITS_TO_KEEP: dict[type, bool] = {}

# `Trainer.create_optimizer` takes the model to optimise only from transformers 5.3 on
_PARENT_CREATE_OPTIMIZER_TAKES_MODEL = "model" in inspect.signature(Trainer.create_optimizer).parameters


class NonFiniteTrainingError(FloatingPointError):
    """Too many consecutive training steps had a non-finite loss or gradient (`nonfinite_patience`)."""


#: `loss_weighting(task_loss, terms, outputs) -> (total_loss, weights)`: the task loss and the terms are per-batch
#: means; it returns the total loss of the batch and the weight it gave each term (for logging).
LossWeighting = Callable[[torch.Tensor, dict[str, torch.Tensor], Any], tuple[torch.Tensor, dict[str, Any]]]


def _continual_option(args: Any, name: str) -> Any:
    """Continual options of a plain `TrainingArguments` fall back to `ContinualConfig`'s defaults (drop-in use)."""
    if hasattr(args, name):
        return getattr(args, name)
    return ContinualConfig.__dataclass_fields__[name].default


def task_directory_name(index: int, task: Task) -> str:
    return f"task-{index:02d}-{task.name}"


def _file_problem(path: Path) -> str | None:
    """Why `path` cannot be read back (truncated or garbled), or None. Cheap: headers and sizes, not the data."""
    try:
        if path.suffix == ".json":
            json.loads(path.read_text(encoding="utf-8"))
        elif path.suffix == ".safetensors":
            with path.open("rb") as f:
                raw = f.read(8)
                if len(raw) < 8:
                    return f"{path}: truncated safetensors file ({len(raw)} bytes)"
                (n,) = struct.unpack("<Q", raw)
                header = json.loads(f.read(n).decode("utf-8"))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            size = path.stat().st_size
            if size < 8 + n + end:
                return f"{path}: truncated safetensors file ({size} bytes, its header needs {8 + n + end})"
        elif path.suffix in (".pt", ".pth", ".bin"):
            with zipfile.ZipFile(path) as archive:  # torch.save's format; a cut file loses its central directory
                archive.namelist()
    except (OSError, ValueError, KeyError, TypeError, IndexError, struct.error, zipfile.BadZipFile) as exc:
        return f"{path}: {type(exc).__name__}: {exc}"
    return None


def folder_problem(folder: str | os.PathLike, required: Sequence[str] = ()) -> str | None:
    """The first unreadable (or missing `required`) file of a checkpoint or snapshot folder, as a message; or None."""
    folder = Path(folder)
    for name in required:
        if not (folder / name).is_file():
            return f"{folder / name}: missing"
    for path in sorted(folder.rglob("*")):
        if path.is_file() and (problem := _file_problem(path)) is not None:
            return problem
    return None


def _numbered(folder: Path, prefix: str) -> list[tuple[int, Path]]:
    """`prefix<N>` sub-folders of `folder`, newest (highest N) first."""
    found = []
    if folder.is_dir():
        for path in folder.iterdir():
            if path.is_dir() and path.name.startswith(prefix):
                try:
                    found.append((int(path.name[len(prefix) :]), path))
                except ValueError:
                    continue
    return sorted(found, reverse=True)


def last_complete_checkpoint(folder: str | os.PathLike) -> str | None:
    """The newest `checkpoint-N` in `folder` that is complete and readable.

    `trainer_state.json` is written last, so a checkpoint without it was interrupted; a checkpoint whose files are
    cut or garbled (a full disk, a copy that stopped) is skipped with a warning naming the bad file, and the next
    older one is used.
    """
    for _, path in _numbered(Path(folder), PREFIX_CHECKPOINT_DIR + "-"):
        if not (path / TRAINER_STATE_NAME).exists():
            continue
        problem = folder_problem(path, required=(TRAINER_STATE_NAME,))
        if problem is None:
            return str(path)
        logger.warning("skipping the damaged checkpoint %s (%s); trying an older one", path, problem)
    return None


def _all_finite(param: torch.Tensor) -> bool:
    """Whether every value of `param` is finite. A quantized weight (a torchao tensor subclass, which implements no
    `isfinite`) is checked on its dequantized values."""
    values = param.detach()
    if type(values) not in (torch.Tensor, torch.nn.Parameter) and hasattr(values, "dequantize"):
        values = values.dequantize()
    return bool(torch.isfinite(values).all())


def _is_save_disabled(args: Any) -> bool:
    return str(getattr(args.save_strategy, "value", args.save_strategy)) == "no"


class _CombinedGradient(torch.autograd.Function):
    """Value: the summed loss (what is logged and what the non-finite guard reads). Gradient: the one a
    gradient-aggregating plugin combined from the objectives, times the incoming gradient (the Trainer's division
    by the accumulation steps, a grad scaler's factor), so the Trainer's own `backward` puts it into `.grad`."""

    @staticmethod
    def forward(ctx: Any, total: torch.Tensor, grads: tuple[torch.Tensor | None, ...], *params: torch.Tensor):
        ctx.grads = grads
        return total.clone()

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor):
        grads = tuple(None if g is None else g * grad_output.to(g.dtype) for g in ctx.grads)
        ctx.grads = None
        return (None, None, *grads)


class _NonFiniteGuard(TrainerCallback):
    """First callback of a `ContinualTrainer`: decides before every optimizer step whether it is skipped."""

    def __init__(self, trainer: ContinualTrainer) -> None:
        self.trainer = trainer

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        self.trainer._install_step_guard(optimizer)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.trainer._guard_step()


class ContinualTrainer(Trainer):
    """A drop-in `Trainer` whose loss is the task loss plus the weighted loss terms of its plugins.

    Plugins are callbacks implementing `hf_adaptive.plugins.ContinualPlugin`; pass them in `callbacks`.
    `loss_weighting` (optional, e.g. `hf_adaptive.control.loss_weighting.LossWeightController`) adds a differentiable
    controller whose parameters are trained with the model's optimizer: it sees each term already multiplied by its
    fixed weight (the plugin's own lambda / alpha) and its learned weights multiply those, so it starts from the
    configured weighting; the logged `weight_<term>` is the product.
    """

    def __init__(self, *args: Any, loss_weighting: torch.nn.Module | LossWeighting | None = None, **kwargs: Any):
        optimizers = kwargs.get("optimizers", (None, None))
        self._user_optimizer = optimizers is not None and optimizers[0] is not None
        self._user_collator = kwargs.get("data_collator") is not None
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        name = getattr(training_args, "optimizer_name", None)
        if name is not None and kwargs.get("optimizer_cls_and_kwargs") is None and not self._user_optimizer:
            from .optim import OPTIMIZER_OPTIONS
            from .utils.options import build_config

            options = build_config(OPTIMIZER_OPTIONS[0], training_args, owner=type(training_args).__name__)
            kwargs["optimizer_cls_and_kwargs"] = options.trainer_optimizer(
                training_args.learning_rate, training_args.weight_decay
            )
        super().__init__(*args, **kwargs)
        mode = _continual_option(self.args, "loss_weighting")
        if loss_weighting is None and mode != "none":
            from .registry import loss_weighting_class

            names = [n for p in self.plugins for n in p.term_names]
            if not names:
                raise ValueError(f"ContinualConfig.loss_weighting={mode!r} needs plugins that return loss terms")
            loss_weighting = loss_weighting_class(mode)(names, mode=mode)
        self.loss_weighting = loss_weighting
        if isinstance(loss_weighting, torch.nn.Module):
            loss_weighting.to(self.args.device)
        self._term_sums: dict[str, torch.Tensor] = {}
        self._term_counts: dict[str, int] = {}
        self._weights_last: dict[str, float] = {}
        self.current_task: Task | None = None
        self.current_task_index: int | None = None
        #: the task being learned, tokenized once (`TaskContext`): what every plugin hook receives
        self.task_context: TaskContext | None = None
        self.tasks: TaskStream | None = None
        # non-finite guard (always on): see `_guard_step`
        self._nonfinite_loss: torch.Tensor | None = None
        self._nonfinite_skipped = 0
        self._nonfinite_in_a_row = 0
        self._skip_this_step = False
        # loss sum of the steps before the checkpoint a `train()` resumed from (so a task's loss covers all its steps)
        self._resumed_loss_sum = 0.0
        self.callback_handler.callbacks.insert(0, _NonFiniteGuard(self))
        for plugin in self.plugins:
            plugin.bind(self)
        self._gradient_aggregator()  # at most one, and not with a loss weighting: refused before any training

    # ------------------------------------------------------------------------------------------------- plugins
    @property
    def plugins(self) -> list[ContinualPlugin]:
        return [cb for cb in self.callback_handler.callbacks if is_plugin(cb)]

    def _gradient_aggregator(self, plugins: Sequence[ContinualPlugin] | None = None) -> ContinualPlugin | None:
        """The one plugin that combines the objectives' gradients itself (`aggregates_gradients`), or None."""
        found = [p for p in (self.plugins if plugins is None else plugins) if p.aggregates_gradients]
        if len(found) > 1:
            raise ValueError(
                f"plugins {[p.name for p in found]} each combine the gradients of the objectives "
                "(aggregates_gradients): at most one may"
            )
        if found and self.loss_weighting is not None:
            raise ValueError(
                f"ContinualConfig.loss_weighting={_continual_option(self.args, 'loss_weighting')!r} (or a "
                f"loss_weighting passed to ContinualTrainer) cannot be combined with plugin {found[0].name!r}: both "
                "decide how the task loss and the loss terms are combined; use one of them"
            )
        return found[0] if found else None

    def _combined_loss(
        self,
        plugin: ContinualPlugin,
        model: torch.nn.Module,
        loss: torch.Tensor,
        terms: Sequence[LossTerm],
        steps: int,
        total: torch.Tensor,
    ) -> torch.Tensor:
        """`total` as value, with as gradient the one `plugin` combines from the objectives (`combine_gradients`):
        the task loss and each weighted term, scaled for accumulation exactly as in `total` (their sum)."""
        objectives = {"task": loss, **{t.name: t.weight * t.value / steps for t in terms}}
        params = [p for p in model.parameters() if p.requires_grad]
        grads = list(plugin.combine_gradients(self, model, objectives, params))
        if len(grads) != len(params):
            raise ValueError(
                f"plugin {plugin.name!r}: combine_gradients returned {len(grads)} gradients for {len(params)} "
                "trainable parameters (one per parameter, None for no gradient)"
            )
        return _CombinedGradient.apply(total.detach(), tuple(grads), *params)  # detached: no way back

    def _loss_scaled_for_ga(self, num_items_in_batch: Any) -> bool:
        """Mirror of `Trainer.training_step`'s rule: is the task loss already normalised over the accumulated batch?"""
        scaled = getattr(self, "loss_is_scaled_for_ga", None)  # set by newer transformers only (absent in 5.0)
        if scaled is not None:
            return bool(scaled)
        return bool(
            (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None
        )

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ):
        """Task loss + Σ weight_k · term_k over the plugins' terms (training only; evaluation is `Trainer`'s).

        Terms are per-batch means. When the task loss is normalised over the whole accumulated batch
        (`num_items_in_batch`), each micro-batch adds term / accumulation_steps so that an optimizer step sees
        the mean term; otherwise the Trainer divides the whole loss by the accumulation steps itself.

        In a task sequence with `answer_only_logits`, the model computes logits at the answer positions only
        (`_answer_only_inputs`); the plugins then see those logits and the labels cut to the same columns.

        With a plugin that `aggregates_gradients` (and at least one term), the returned loss has the same value but
        its gradient is the one that plugin combines from the task loss and the weighted terms (`_combined_loss`).
        """
        plugins = self.plugins
        inputs = self._answer_only_inputs(model, inputs) or inputs
        if not model.training or (not plugins and self.loss_weighting is None):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        terms: list[LossTerm] = []
        for plugin in plugins:
            terms.extend(plugin.loss_terms(self, model, inputs, outputs))
        if not terms and self.loss_weighting is None:
            return (loss, outputs) if return_outputs else loss
        names = [t.name for t in terms]
        if len(set(names)) != len(names):
            raise ValueError(f"plugins returned duplicate loss term names {names}; every term needs its own name")

        steps = 1
        if self._loss_scaled_for_ga(num_items_in_batch):
            steps = getattr(self, "current_gradient_accumulation_steps", None) or self.args.gradient_accumulation_steps
        per_batch_task_loss = loss * steps
        if self.loss_weighting is not None:
            # the controller weighs each term as its plugin weighs it (replay's alpha, distillation's lambda...):
            # its weights multiply the fixed ones, so it starts from the configured weighting instead of ignoring it
            fixed = {t.name: t.weight for t in terms}
            total, learned = self.loss_weighting(
                per_batch_task_loss, {t.name: t.weight * t.value for t in terms}, outputs
            )
            total = total / steps
            weights = {name: w * fixed[name] if name in fixed else w for name, w in learned.items()}
        else:
            total = loss
            weights = {}
            for term in terms:
                total = total + term.weight * term.value / steps
                weights[term.name] = term.weight
        self._record_terms(per_batch_task_loss, terms, weights)
        aggregator = self._gradient_aggregator(plugins)
        if aggregator is not None:
            total = self._combined_loss(aggregator, model, loss, terms, steps, total)
        return (total, outputs) if return_outputs else total

    def _accepts_logits_to_keep(self, model: torch.nn.Module) -> bool:
        """Whether the model under any wrapper (DDP, peft) takes `logits_to_keep` (read once per model class)."""
        base = self.accelerator.unwrap_model(model)
        if is_peft_model(base):  # peft's forward passes unknown keywords on to the base model
            base = base.get_base_model()
        cls = type(base)
        if cls not in _ACCEPTS_LOGITS_TO_KEEP:
            _ACCEPTS_LOGITS_TO_KEEP[cls] = "logits_to_keep" in inspect.signature(cls.forward).parameters
        return _ACCEPTS_LOGITS_TO_KEEP[cls]

    def _answer_only_wanted(self, model: torch.nn.Module) -> bool:
        """`answer_only_logits` applies: option on, the trainer's own collator, no compute_loss_func, a model that
        takes `logits_to_keep` and no plugin that reads the logits of the whole input."""
        return (
            _continual_option(self.args, "answer_only_logits")
            and not self._user_collator
            and self.compute_loss_func is None
            and not any(p.needs_full_logits for p in self.plugins)
            and self._accepts_logits_to_keep(model)
        )

    def _answer_only_inputs(self, model: torch.nn.Module, inputs: dict[str, Any]) -> dict[str, Any] | None:
        """The training batch cut for answer-only logits, or None (then the full-logit path, exactly `Trainer`'s).

        Only for batches of a task sequence: `_task_context` left-pads them, so every row's answer ends in the
        last column and the answers fill the last columns. With `first` the first column holding any label and
        k = T - first + 1, the logits at the last k positions (`logits_to_keep=k`) predict every labelled token and
        `labels[:, -k:]` are their targets: the model's own loss (shift inside, `num_items_in_batch` counted from
        the full labels) is the full path's loss, and so are the gradients, without the LM head over the prompts.
        (Transformers 5.0 takes only an int `logits_to_keep`: hence the left padding.)
        """
        collator = self.data_collator
        labels = inputs.get("labels")
        if (
            not model.training
            or not isinstance(collator, CausalLMCollator)
            or collator.padding_side != "left"
            or not torch.is_tensor(labels)
            or labels.dim() != 2
            or not self._answer_only_wanted(model)
        ):
            return None
        labelled = (labels != IGNORE_INDEX).any(dim=0)
        if not bool(labelled.any()):
            return None
        k = labels.shape[1] - int(labelled.int().argmax()) + 1
        if k >= labels.shape[1]:
            return None  # an answer at column 0 or 1: nothing to skip
        return {**inputs, "labels": labels[:, -k:], "logits_to_keep": k}

    def _record_terms(self, task_loss: torch.Tensor, terms: Sequence[LossTerm], weights: dict[str, Any]) -> None:
        values = {"task": task_loss, **{t.name: t.value for t in terms}}
        for name, value in values.items():
            value = value.detach().float().reshape(())
            self._term_sums[name] = self._term_sums[name] + value if name in self._term_sums else value
            self._term_counts[name] = self._term_counts.get(name, 0) + 1
        for name, weight in weights.items():
            self._weights_last[name] = (
                float(weight.detach().float().mean()) if torch.is_tensor(weight) else float(weight)
            )

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add `loss_<term>` (mean since the last log, averaged over processes) and `weight_<term>` to training logs.

        Also `nonfinite_steps_skipped` (steps of this task skipped by the non-finite guard) once there is one.
        """
        if "loss" in logs and self._nonfinite_skipped:
            logs["nonfinite_steps_skipped"] = self._nonfinite_skipped
        if "loss" in logs and self._term_sums:
            names = sorted(self._term_sums)
            means = torch.stack([self._term_sums[n] / self._term_counts[n] for n in names]).to(self.args.device)
            if self.accelerator.num_processes > 1:
                means = self.accelerator.reduce(means, reduction="mean")
            for name, value in zip(names, means.tolist()):
                logs[f"loss_{name}"] = value
            for name, weight in self._weights_last.items():
                logs[f"weight_{name}"] = weight
            self._term_sums.clear()
            self._term_counts.clear()
        super().log(logs, start_time)

    def train(self, *args: Any, **kwargs: Any):
        self._term_sums.clear()
        self._term_counts.clear()
        self._nonfinite_loss = None
        self._nonfinite_skipped = self._nonfinite_in_a_row = 0
        self._skip_this_step = False
        self._resumed_loss_sum = 0.0
        return super().train(*args, **kwargs)

    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        # remembered on the device (no sync here); the guard reads it once per optimizer step
        bad = ~torch.isfinite(loss.detach()).all()
        self._nonfinite_loss = bad if self._nonfinite_loss is None else self._nonfinite_loss | bad
        # the loss-weighting module lives outside the DDP wrapper: average its gradients across processes here
        if isinstance(self.loss_weighting, torch.nn.Module) and self.accelerator.num_processes > 1:
            for p in self.loss_weighting.parameters():
                if p.grad is not None:
                    p.grad.copy_(self.accelerator.reduce(p.grad, reduction="mean"))
        return loss

    # --------------------------------------------------------------------------------------- non-finite guard
    def _install_step_guard(self, optimizer: Any) -> None:
        """Make `optimizer.step()` a real no-op on a skipped step (no momentum, no weight decay, no LR step).

        On an accelerate optimizer the skip is also reported through `step_was_skipped`, the flag the Trainer reads
        before stepping its LR scheduler (as for an fp16 overflow).
        """
        if optimizer is None or getattr(optimizer, "_hf_adaptive_guarded", False) or self.is_deepspeed_enabled:
            return
        original = optimizer.step
        trainer = self

        @functools.wraps(original)  # keeps the marks torch's LR scheduler put on `step` (no spurious warning)
        def step(*args: Any, **kwargs: Any) -> Any:
            if trainer._skip_this_step:
                if hasattr(optimizer, "_is_overflow"):
                    optimizer._is_overflow = True
                return None
            if hasattr(optimizer, "_is_overflow") and getattr(optimizer, "scaler", None) is None:
                optimizer._is_overflow = False
            return original(*args, **kwargs)

        optimizer.step = step
        optimizer._hf_adaptive_guarded = True

    @torch.no_grad()
    def _guard_step(self) -> None:
        """Before each optimizer step: skip it when a micro-batch loss or a gradient of the update is NaN/inf.

        One bad micro-batch skips the whole accumulated update. Under DDP the flag is summed over processes, so
        every process skips the same steps. With an fp16 grad scaler, overflowing gradients are the scaler's job
        (it skips and rescales), so only the loss is checked. `nonfinite_patience` skips in a row fail the task.
        """
        optimizer = self.optimizer
        flag = torch.zeros((), device=self.args.device)
        if self._nonfinite_loss is not None:
            flag = flag + self._nonfinite_loss.to(flag.device).float()
        self._nonfinite_loss = None
        params = [p for g in optimizer.param_groups for p in g["params"]] if optimizer is not None else []
        grads = [p.grad for p in params if p.grad is not None]
        if grads and getattr(self.accelerator, "scaler", None) is None:
            norms = torch.stack([n.float() for n in torch._foreach_norm(grads)])
            flag = flag + (~torch.isfinite(norms)).any().float().to(flag.device)
        if self.accelerator.num_processes > 1:
            flag = self.accelerator.reduce(flag, reduction="sum")
        skip = bool(flag.item() > 0)
        self._skip_this_step = skip
        if optimizer is not None:
            setattr(optimizer, NONFINITE_SKIP_ATTR, skip)
        if not skip:
            self._nonfinite_in_a_row = 0
            return
        for p in params:
            p.grad = None
        self._nonfinite_skipped += 1
        self._nonfinite_in_a_row += 1
        patience = _continual_option(self.args, "nonfinite_patience")
        where = f"task {self.current_task.name!r}, " if self.current_task is not None else ""
        logger.warning(
            "%sstep %d: non-finite loss or gradient, optimizer step skipped (%d in a row, %d in all; patience %d)",
            where,
            self.state.global_step + 1,
            self._nonfinite_in_a_row,
            self._nonfinite_skipped,
            patience,
        )
        if self._nonfinite_in_a_row >= patience:
            raise NonFiniteTrainingError(
                f"{where}step {self.state.global_step + 1}: {self._nonfinite_in_a_row} consecutive training steps "
                f"had a non-finite loss or gradient (ContinualConfig.nonfinite_patience={patience}); the weights "
                "are those before the first of them. Lower the learning rate, enable gradient clipping, or check "
                "the plugins' loss weights (e.g. ewc_lambda) and the data"
            )

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        """The parent's optimizer, plus a parameter group for a differentiable loss-weighting controller."""
        had_optimizer = self.optimizer is not None
        if _PARENT_CREATE_OPTIMIZER_TAKES_MODEL:
            optimizer = super().create_optimizer(model)
        else:  # transformers < 5.3: the parent always optimises self.model
            optimizer = super().create_optimizer()
        if not had_optimizer and isinstance(self.loss_weighting, torch.nn.Module):
            params = [p for p in self.loss_weighting.parameters() if p.requires_grad]
            if params:
                optimizer.add_param_group({"params": params, "weight_decay": 0.0})
        return optimizer

    # --------------------------------------------------------------------------------------------- checkpoints
    def save_continual_state(self, directory: str | os.PathLike) -> None:
        """Write every plugin's state (and the loss-weighting controller's) into `directory/continual/`."""
        if not self.args.should_save:
            return
        root = Path(directory) / PLUGIN_STATE_DIR
        for plugin in self.plugins:
            save_state(root / plugin.name, plugin.state_dict())
        if isinstance(self.loss_weighting, torch.nn.Module):
            save_state(root / LOSS_WEIGHTING_STATE, {"module": dict(self.loss_weighting.state_dict())})

    def load_continual_state(self, directory: str | os.PathLike) -> None:
        root = Path(directory) / PLUGIN_STATE_DIR
        if not root.is_dir():
            return
        for plugin in self.plugins:
            if (root / plugin.name).is_dir():
                load_state_into(plugin, root / plugin.name)  # errors name the folder
            else:
                logger.warning("no saved state for plugin %r in %s", plugin.name, root)
        if isinstance(self.loss_weighting, torch.nn.Module) and (root / LOSS_WEIGHTING_STATE).is_dir():
            state = load_state(root / LOSS_WEIGHTING_STATE, device=self.args.device)
            self.loss_weighting.load_state_dict(state["module"])

    def _loss_sum_so_far(self) -> float:
        """Sum of the per-step training losses of this task up to now (before a resume included), all processes."""
        pending = getattr(self, "_tr_loss", None)
        value = 0.0
        if torch.is_tensor(pending):
            pending = pending.detach().clone().float()
            if self.accelerator.num_processes > 1:
                pending = self.accelerator.reduce(pending, reduction="mean")
            value = float(pending.item())
        return self._resumed_loss_sum + float(getattr(self, "_total_loss_scalar", 0.0)) + value

    def _save_checkpoint(self, model: torch.nn.Module, trial: Any) -> None:
        # plugin states go in before the parent writes trainer_state.json, the file that marks a checkpoint complete
        folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        loss_sum = self._loss_sum_so_far()  # collective under DDP: every process saves
        self.save_continual_state(folder)
        if self.args.should_save:
            bookkeeping = {
                "global_step": self.state.global_step,
                "loss_sum": loss_sum,
                "nonfinite_steps_skipped": self._nonfinite_skipped,
            }
            atomic_write_json(Path(folder) / TRAINER_BOOKKEEPING_NAME, bookkeeping)
        super()._save_checkpoint(model, trial)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        self.load_continual_state(resume_from_checkpoint)
        path = Path(resume_from_checkpoint) / TRAINER_BOOKKEEPING_NAME
        if path.is_file():
            try:
                saved = json.loads(path.read_text(encoding="utf-8"))
                self._resumed_loss_sum = float(saved["loss_sum"])
                self._nonfinite_skipped = int(saved["nonfinite_steps_skipped"])
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{path} is damaged ({type(exc).__name__}: {exc}); delete the checkpoint") from exc

    def task_training_loss(self) -> float:
        """Mean training loss over all the optimizer steps of the last `train()`, steps before a resume included.

        (`TrainOutput.training_loss` of a resumed `train()` only averages the steps run in that call.)
        """
        return (self._resumed_loss_sum + float(getattr(self, "_total_loss_scalar", 0.0))) / max(
            self.state.global_step, 1
        )

    @contextlib.contextmanager
    def _quiet(self) -> Iterator[None]:
        """With `disable_tqdm`, silence transformers' own bars (e.g. 'Writing model shards') for the duration."""
        silence = self.args.disable_tqdm and hf_logging.is_progress_bar_enabled()
        if silence:
            hf_logging.disable_progress_bar()
        try:
            yield
        finally:
            if silence:
                hf_logging.enable_progress_bar()

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The parent's `save_model`, without its progress bars when `disable_tqdm` is set."""
        with self._quiet():
            super().save_model(output_dir, _internal_call)

    # ---------------------------------------------------------------------------------------- task sequences
    @property
    def adapter_strategy(self) -> str:
        return _continual_option(self.args, "adapter_strategy")

    def evaluate_tasks(self, tasks: Sequence[Task], trained: int | None = None) -> list[float]:
        """Rank-classification accuracy on each task's eval split.

        Under a LoRA-per-task strategy (or with a plugin whose `adapter_for_task` names an adapter) task
        j < `trained` is scored with its own expert, later tasks with the newest one (what a user would deploy
        for an unseen task). A model with non-finite weights is not scored (an argmax over NaN scores would look
        like chance accuracy): every entry is NaN, with a warning. One progress bar (off with `disable_tqdm`).
        """
        from tqdm.auto import tqdm

        model = self.accelerator.unwrap_model(self.model)
        bad = [name for name, p in model.named_parameters() if not _all_finite(p)]
        if bad:
            logger.warning(
                "the model has non-finite weights (%d tensors, e.g. %s): its accuracies are reported as NaN",
                len(bad),
                bad[0],
            )
            return [float("nan")] * len(tasks)
        strategy = self.adapter_strategy
        current = model.active_adapter if is_peft_model(model) else None
        batch_size = _continual_option(self.args, "continual_eval_batch_size")
        limit = _continual_option(self.args, "continual_eval_limit")
        accuracies = []
        bar = tqdm(
            total=len(tasks),
            desc="evaluating",
            disable=bool(self.args.disable_tqdm) or not self.is_world_process_zero(),
            leave=False,
        )
        try:
            for j, task in enumerate(tasks):
                routed = self._routed_expert(task.name) if trained is not None and j < trained else None
                if routed is not None:
                    activate_adapter(model, routed)
                elif strategy == "lora_per_task" and trained is not None and j < trained:
                    activate_adapter(model, adapter_for_task(strategy, task.name))
                else:
                    activate_adapter(model, current)
                accuracies.append(
                    task_accuracy(
                        model, self.processing_class, task, "eval", batch_size, limit, **scoring_options(self.args)
                    )
                )
                bar.update(1)
        finally:
            bar.close()
            activate_adapter(model, current)
        return accuracies

    def _routed_expert(self, task_name: str) -> str | None:
        """The adapter a plugin (e.g. expert routing) assigned to `task_name`, if any (`adapter_for_task`)."""
        for plugin in self.plugins:
            if (name := plugin.adapter_for_task(task_name)) is not None:
                return name
        return None

    def _require_tokenizer(self) -> Any:
        if self.processing_class is None:
            raise ValueError("ContinualTrainer.processing_class (the tokenizer) is required to run a task sequence")
        return self.processing_class

    def _task_context(self, task: Task, index: int) -> TaskContext:
        """The task tokenized once, with the tokenizer and a collator for the plugins' own batches: what every plugin
        uses. The trainer's own collator left-pads its training batches when `answer_only_logits` applies."""
        tokenizer = self._require_tokenizer()
        collator = self.data_collator
        if not self._user_collator:
            # left padding lines up the answers in the last columns, for `answer_only_logits` (`compute_loss`)
            side = "left" if self._answer_only_wanted(self.model) else "right"
            self.data_collator = CausalLMCollator(tokenizer, padding_side=side)
            collator = CausalLMCollator(tokenizer)  # plugins' own forwards pass no position_ids: right padding
        evaluation = self._tokenize(task, "eval") if task.eval_dataset is not None else None
        return TaskContext(task, index, self._tokenize(task, "train"), evaluation, tokenizer, collator)

    def _task_setup(self, context: TaskContext) -> TaskSetup | None:
        """The one plugin request (if any) for the model / adapter that trains this task."""
        requests = [(p.name, r) for p in self.plugins if (r := p.setup_task(self, context)) is not None]
        if len(requests) > 1:
            names = [name for name, _ in requests]
            raise ValueError(f"plugins {names} each asked to set up task {context.task.name!r}: at most one may")
        return requests[0][1] if requests else None

    def _prepare_task(self, task: Task, index: int) -> None:
        """Set up the data, the trainable parameters, optimizer and output folder of task `index`.

        The trainer alone swaps the model and the trained adapter: a plugin asks for it through `setup_task`;
        otherwise `adapter_strategy` decides.
        """
        context = self._task_context(task, index)
        setup = self._task_setup(context)
        if setup is not None:
            model = setup.model if setup.model is not None else self.model
            activate_adapter(model, setup.adapter)  # peft's set_adapter: the active adapter is the trainable one
        else:
            model = prepare_task_parameters(self.model, self.adapter_strategy, task.name, self.args)
        if model is not self.model:
            self.model = model.to(self.args.device)
        # a fresh optimizer and scheduler (new trainable parameters) and a fresh DDP wrapper around them
        self.model_wrapped = self.model
        self.optimizer, self.lr_scheduler = None, None
        self.train_dataset, self.eval_dataset = context.train_dataset, context.eval_dataset
        self.current_task, self.current_task_index = task, index
        self.task_context = context

    def _tokenize(self, task: Task, split: str) -> Any:
        return tokenize_task(task, self._require_tokenizer(), split, **row_options(self.args))

    def _save_snapshot(self, base: Path, index: int, state: dict[str, Any]) -> None:
        """End-of-task snapshot (weights or adapters + plugin states + a copy of the sequence state), then the
        sequence state, each written whole.

        The snapshot follows the save settings: with `save_strategy="no"` none is written (the sequence state still
        is), so a killed run cannot continue after its finished tasks. Its size in bytes is logged and kept in
        `extra["snapshot_bytes"]`.
        """
        self.accelerator.wait_for_everyone()
        write = not _is_save_disabled(self.args)
        if write:
            final = base / f"{SNAPSHOT_PREFIX}{index:02d}"
            tmp = base / f".{final.name}.tmp"
            if self.args.should_save:
                shutil.rmtree(tmp, ignore_errors=True)
            self.save_model(str(tmp), _internal_call=True)  # every process: sharded / FSDP models gather here
            if self.args.should_save:
                self.save_continual_state(tmp)
                size = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file())
                state["snapshot"] = final.name
                state["extra"].setdefault("snapshot_bytes", []).append(size)
                atomic_write_json(tmp / SEQUENCE_STATE_NAME, state)
                shutil.rmtree(final, ignore_errors=True)
                os.replace(tmp, final)
                logger.info("end-of-task snapshot %s written: %d bytes", final, size)
        if self.args.should_save:
            if not write:
                state["snapshot"] = None
                state["extra"].setdefault("snapshot_bytes", []).append(0)
            atomic_write_json(base / SEQUENCE_STATE_NAME, state)
            if write:
                for _, old in _numbered(base, SNAPSHOT_PREFIX)[1:]:  # one snapshot on disk: the newest
                    shutil.rmtree(old, ignore_errors=True)
        self.accelerator.wait_for_everyone()

    def _restore_plugins(self, base: Path, state: dict[str, Any]) -> None:
        """First half of restoring an end-of-task snapshot, before the next task is set up: what plugins put on the
        model (expert routing rebuilds its experts) and their states, so that `setup_task` decides as it would
        have in the uninterrupted run."""
        snapshot = base / state["snapshot"]
        logger.info("restoring the end-of-task snapshot %s", snapshot)
        for plugin in self.plugins:
            if (model := plugin.restore_model(snapshot, self.model)) is not None:
                self.model = self.model_wrapped = model.to(self.args.device)
        self.load_continual_state(snapshot)

    def _restore_weights(self, base: Path, state: dict[str, Any]) -> None:
        """Second half, once the task's parameters are set up: the snapshot's weights (or adapters)."""
        Trainer._load_from_checkpoint(self, str(base / state["snapshot"]))

    @staticmethod
    def _read_sequence_state(path: Path) -> dict[str, Any]:
        """A sequence state file, checked for the keys resuming needs (ValueError naming the file otherwise)."""
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
            for key, kind in (("task_names", list), ("completed", int), ("matrix", list), ("extra", dict)):
                if not isinstance(state[key], kind):
                    raise TypeError(f"{key!r} is a {type(state[key]).__name__}, not a {kind.__name__}")
            if len(state["matrix"]) != state["completed"]:
                raise ValueError(f"{len(state['matrix'])} matrix rows for {state['completed']} completed tasks")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path} is damaged and cannot be resumed from ({type(exc).__name__}: {exc})") from exc
        return state

    def _intact_snapshot_state(self, base: Path, state: dict[str, Any], names: list[str]) -> dict[str, Any] | None:
        """The newest state whose end-of-task snapshot is readable: `state`'s own, else an older snapshot's copy.

        None when there is none (the sequence then restarts from its first task, each task from its newest intact
        checkpoint). Only the newest snapshot is kept, so an older one exists only when its removal was cut short.
        """
        name = state.get("snapshot")
        if name is None:
            logger.warning(
                "resume: %s records %d finished tasks but no end-of-task snapshot (save_strategy='no' writes none): "
                "their weights are lost, so the sequence restarts from its first task",
                base / SEQUENCE_STATE_NAME,
                state["completed"],
            )
            return None
        problem = folder_problem(base / name)
        if problem is None:
            return state
        logger.warning("resume: the end-of-task snapshot %s is damaged (%s)", base / name, problem)
        for index, folder in _numbered(base, SNAPSHOT_PREFIX):
            if index + 1 >= state["completed"] or folder_problem(folder) is not None:
                continue
            try:
                older = self._read_sequence_state(folder / SEQUENCE_STATE_NAME)
            except ValueError:
                continue
            if older["task_names"] == names and older.get("snapshot") == folder.name:
                logger.warning("resume: falling back to the older snapshot %s (tasks after it are redone)", folder)
                return older
        logger.warning("resume: no intact snapshot; the sequence restarts from its first task")
        return None

    def _resume_point(self, base: Path, resume: bool | str | None, stream: TaskStream) -> dict[str, Any] | None:
        """The saved sequence state to continue from, or None to start at the first task.

        Starting at the first task still resumes it from its own newest intact checkpoint (a run killed during
        its first task), so None is also the answer when only checkpoints exist.
        """
        if not resume:
            return None
        names = [t.name for t in stream]
        path = base / SEQUENCE_STATE_NAME
        if not path.exists():
            first = base / task_directory_name(0, stream[0])
            if last_complete_checkpoint(first) is not None:
                logger.warning("resume: no %s in %s, resuming the first task from %s", SEQUENCE_STATE_NAME, base, first)
            elif isinstance(resume, str):
                raise ValueError(
                    f"resume_from_checkpoint={resume!r} is not allowed: {base} holds no {SEQUENCE_STATE_NAME} and "
                    f"no complete checkpoint of the first task in {first}, so there is nothing to resume"
                )
            return None
        try:
            state = self._read_sequence_state(path)
        except ValueError as exc:
            # written atomically, so a damaged file is disk corruption: use the copy in the newest intact snapshot
            copies = [
                folder / SEQUENCE_STATE_NAME
                for _, folder in _numbered(base, SNAPSHOT_PREFIX)
                if (folder / SEQUENCE_STATE_NAME).is_file() and folder_problem(folder) is None
            ]
            if not copies:
                raise ValueError(
                    f"{exc}; no intact end-of-task snapshot holds a copy. Delete {path} to restart the sequence "
                    "from its first task"
                ) from exc
            logger.warning("resume: %s; using the copy in %s", exc, copies[0])
            state = self._read_sequence_state(copies[0])
        if state["task_names"] != names:
            raise ValueError(
                f"resume_from_checkpoint: the saved sequence {state['task_names']} differs from the tasks given {names}"
            )
        if state["completed"] == 0:
            return state
        return self._intact_snapshot_state(base, state, names)

    def train_sequence(
        self,
        tasks: Sequence[Task],
        resume_from_checkpoint: bool | str | None = None,
        evaluate_baseline: bool | None = None,
    ) -> ContinualResult:
        """Learn `tasks` one after another and return the accuracy matrix and its metrics.

        Per task: set up the trainable parameters (`adapter_strategy`), rebuild optimizer and scheduler, call the
        plugins' `on_task_begin`, train, call `on_task_end`, evaluate every task (seen and not yet seen), save an
        end-of-task snapshot. `resume_from_checkpoint=True` (or the run's output folder) continues a killed run:
        finished tasks keep their results, the interrupted task resumes from its newest intact checkpoint (a
        damaged one is skipped with a warning naming the bad file), also when the run died in its first task.

        Disk: the end-of-task snapshot is what lets a resumed run skip finished tasks. It follows the save
        settings: with `save_strategy="no"` none is written; otherwise only the newest is kept, the size of the
        saved model (full weights, or only the adapters under a LoRA strategy) plus the plugins' states; its size
        in bytes is logged and recorded in `extra["snapshot_bytes"]`. A damaged snapshot is skipped with a warning
        and the finished tasks are redone from their own newest intact checkpoints.

        Training steps with a non-finite loss or gradient are skipped (weights, optimizer and LR schedule
        untouched), counted in `extra["nonfinite_steps_skipped"]`, and `nonfinite_patience` of them in a row raise
        `NonFiniteTrainingError`. Every task needs an eval split (`Task.eval_dataset`). `evaluate_baseline`
        (None: the `evaluate_baseline` option) scores every task before the first one (with `evaluate_unseen_tasks`).
        """
        if self._user_optimizer:
            raise ValueError(
                "ContinualTrainer.train_sequence rebuilds the optimizer for every task: pass "
                "`optimizer_cls_and_kwargs=(cls, kwargs)` instead of an optimizer instance in `optimizers`"
            )
        stream = tasks if isinstance(tasks, TaskStream) else TaskStream(list(tasks))
        for task in stream:
            if task.eval_dataset is None:
                raise ValueError(
                    f"Task.eval_dataset=None is not allowed for task {task.name!r} in train_sequence: every task "
                    "needs an eval split (the accuracy matrix scores each task on it)"
                )
        self.tasks = stream
        names = [t.name for t in stream]
        base = Path(self.args.output_dir)
        if isinstance(resume_from_checkpoint, str) and Path(resume_from_checkpoint).is_dir():
            base = Path(resume_from_checkpoint)
        base.mkdir(parents=True, exist_ok=True)
        state = self._resume_point(base, resume_from_checkpoint, stream)
        tokenizer = self._require_tokenizer()  # noqa: F841 - fail before any training when missing
        evaluate_unseen = _continual_option(self.args, "evaluate_unseen_tasks")
        if evaluate_baseline is None:
            evaluate_baseline = _continual_option(self.args, "evaluate_baseline")
        check_bool("ContinualTrainer.train_sequence", "evaluate_baseline", evaluate_baseline)

        if state is None:
            # the baseline scores every task before training: only meaningful when unseen tasks are evaluated
            baseline = self.evaluate_tasks(stream) if evaluate_baseline and evaluate_unseen else None
            state = {
                "task_names": names,
                "completed": 0,
                "matrix": [],
                "baseline": baseline,
                "train_time": [],
                "extra": {"train_loss": [], "steps": [], "nonfinite_steps_skipped": []},
                "snapshot": None,
            }
            if self.args.should_save:  # so that a run killed in its first task resumes with this baseline
                atomic_write_json(base / SEQUENCE_STATE_NAME, state)
        state["extra"].setdefault("nonfinite_steps_skipped", [0] * state["completed"])
        start = state["completed"]
        original_output_dir = self.args.output_dir
        try:
            for index in range(start, len(stream)):
                task = stream[index]
                resuming = index == start and start > 0
                if resuming:
                    self._restore_plugins(base, state)
                self._prepare_task(task, index)
                if resuming:
                    self._restore_weights(base, state)
                task_dir = base / task_directory_name(index, task)
                self.args.output_dir = str(task_dir)
                resume_ckpt = last_complete_checkpoint(task_dir) if resume_from_checkpoint else None
                logger.info("task %d/%d: %s", index + 1, len(stream), task.name)
                if self.is_world_process_zero():
                    print(f"\n=== task {index + 1}/{len(stream)}: {task.name} ===", flush=True)
                for plugin in self.plugins:
                    plugin.on_task_begin(self, self.task_context)
                started = time.perf_counter()
                output = self.train(resume_from_checkpoint=resume_ckpt)
                elapsed = time.perf_counter() - started
                for plugin in self.plugins:
                    plugin.on_task_end(self, self.task_context)
                row = self.evaluate_tasks(stream if evaluate_unseen else stream[: index + 1], trained=index + 1)
                row += [float("nan")] * (len(stream) - len(row))
                state["matrix"].append(row)
                state["train_time"].append(elapsed)
                state["extra"]["train_loss"].append(self.task_training_loss())
                state["extra"]["steps"].append(output.global_step)
                state["extra"]["nonfinite_steps_skipped"].append(self._nonfinite_skipped)
                state["completed"] = index + 1
                self._log_task_row(stream, index, row)
                self._save_snapshot(base, index, state)
        finally:
            self.args.output_dir = original_output_dir
            self.current_task = None
            self.task_context = None
        for plugin in self.plugins:
            state["extra"].update(plugin.extra_results())
        result = ContinualResult(
            task_names=names,
            matrix=state["matrix"],
            baseline=state["baseline"],
            train_time=state["train_time"],
            extra=state["extra"],
        )
        self._finish_sequence(base, result)
        return result

    def _log_task_row(self, stream: Sequence[Task], index: int, row: list[float]) -> None:
        logs = {f"cl/acc/{t.name}": row[j] for j, t in enumerate(stream) if row[j] == row[j]}
        seen = row[: index + 1]
        logs["cl/avg_acc_seen"] = sum(seen) / len(seen)
        logs["cl/task_index"] = index
        self.log(logs)

    def _finish_sequence(self, base: Path, result: ContinualResult) -> None:
        metrics = {k: v for k, v in result.metrics(_continual_option(self.args, "continual_metrics")).items()}
        self.log({f"cl/{k}": v for k, v in metrics.items() if v is not None})
        if self.args.should_save:
            result.save(base, plot=_continual_option(self.args, "save_results_plot"))
        if self.is_world_process_zero():
            print("\n" + result.format_table(), flush=True)

    def train_joint(self, tasks: Sequence[Task]) -> list[float]:
        """The multi-task upper bound: train once on the union of all tasks, return the accuracy on each."""
        from datasets import concatenate_datasets

        stream = tasks if isinstance(tasks, TaskStream) else TaskStream(list(tasks))
        self._require_tokenizer()
        self._prepare_task(stream[0], 0)
        self.train_dataset = concatenate_datasets([self._tokenize(t, "train") for t in stream])
        self.eval_dataset = None
        self.current_task = self.task_context = None
        self.train()
        return self.evaluate_tasks(stream)
