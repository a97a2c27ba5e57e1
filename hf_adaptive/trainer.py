"""`ContinualTrainer`: a `Trainer` that adds its plugins' loss terms and runs task sequences.

With no plugins and no loss weighting it *is* `Trainer`: `compute_loss` returns `super().compute_loss(...)`
untouched, so losses, checkpoints, `evaluate()`, `predict()`, resuming and `push_to_hub` are the parent's.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .adapters import activate_adapter, adapter_for_task, is_peft_model, prepare_task_parameters
from .config import ContinualConfig
from .metrics import ContinualResult
from .plugins import ContinualPlugin, LossTerm, is_plugin
from .tasks import CausalLMCollator, Task, TaskStream, task_accuracy, tokenize_task
from .utils.io import atomic_write_json, load_state, save_state

logger = logging.getLogger(__name__)

PLUGIN_STATE_DIR = "continual"
SEQUENCE_STATE_NAME = "sequence_state.json"
SNAPSHOT_PREFIX = "snapshot-after-task-"
TRAINER_STATE_NAME = "trainer_state.json"
LOSS_WEIGHTING_STATE = "loss_weighting"

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


def last_complete_checkpoint(folder: str | os.PathLike) -> str | None:
    """The newest `checkpoint-N` in `folder` whose `trainer_state.json` (written last) exists."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    found = []
    for path in folder.iterdir():
        if path.is_dir() and path.name.startswith(PREFIX_CHECKPOINT_DIR + "-") and (path / TRAINER_STATE_NAME).exists():
            try:
                found.append((int(path.name.rsplit("-", 1)[1]), path))
            except ValueError:
                continue
    return str(max(found)[1]) if found else None


class ContinualTrainer(Trainer):
    """A drop-in `Trainer` whose loss is the task loss plus the weighted loss terms of its plugins.

    Plugins are callbacks implementing `hf_adaptive.plugins.ContinualPlugin`; pass them in `callbacks`.
    `loss_weighting` (optional, e.g. `hf_adaptive.control.loss_weighting.UncertaintyWeighting`) replaces the fixed
    weights by a differentiable controller whose parameters are trained with the model's optimizer.
    """

    def __init__(self, *args: Any, loss_weighting: torch.nn.Module | LossWeighting | None = None, **kwargs: Any):
        optimizers = kwargs.get("optimizers", (None, None))
        self._user_optimizer = optimizers is not None and optimizers[0] is not None
        self._user_collator = kwargs.get("data_collator") is not None
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        name = getattr(training_args, "optimizer_name", None)
        if name is not None and kwargs.get("optimizer_cls_and_kwargs") is None and not self._user_optimizer:
            from .optim import OptimizerConfig

            options = OptimizerConfig(
                name,
                training_args.lookahead_inner,
                training_args.lookahead_k,
                training_args.lookahead_alpha,
                training_args.gradient_centralization,
            )
            kwargs["optimizer_cls_and_kwargs"] = options.trainer_optimizer(
                training_args.learning_rate, training_args.weight_decay
            )
        super().__init__(*args, **kwargs)
        mode = _continual_option(self.args, "loss_weighting")
        if loss_weighting is None and mode != "none":
            from .control.loss_weighting import LossWeightController

            names = [n for p in self.plugins for n in p.term_names]
            if not names:
                raise ValueError(f"ContinualConfig.loss_weighting={mode!r} needs plugins that return loss terms")
            loss_weighting = LossWeightController(names, mode=mode)
        self.loss_weighting = loss_weighting
        if isinstance(loss_weighting, torch.nn.Module):
            loss_weighting.to(self.args.device)
        self._term_sums: dict[str, torch.Tensor] = {}
        self._term_counts: dict[str, int] = {}
        self._weights_last: dict[str, float] = {}
        self.current_task: Task | None = None
        self.current_task_index: int | None = None
        self.tasks: TaskStream | None = None

    # ------------------------------------------------------------------------------------------------- plugins
    @property
    def plugins(self) -> list[ContinualPlugin]:
        return [cb for cb in self.callback_handler.callbacks if is_plugin(cb)]

    def _loss_scaled_for_ga(self, num_items_in_batch: Any) -> bool:
        """Mirror of `Trainer.training_step`'s rule: is the task loss already normalised over the accumulated batch?"""
        if self.loss_is_scaled_for_ga is not None:
            return bool(self.loss_is_scaled_for_ga)
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
        """
        plugins = self.plugins
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
            total, weights = self.loss_weighting(per_batch_task_loss, {t.name: t.value for t in terms}, outputs)
            total = total / steps
        else:
            total = loss
            weights = {}
            for term in terms:
                total = total + term.weight * term.value / steps
                weights[term.name] = term.weight
        self._record_terms(per_batch_task_loss, terms, weights)
        return (total, outputs) if return_outputs else total

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
        """Add `loss_<term>` (mean since the last log, averaged over processes) and `weight_<term>` to training logs."""
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
        return super().train(*args, **kwargs)

    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        # the loss-weighting module lives outside the DDP wrapper: average its gradients across processes here
        if isinstance(self.loss_weighting, torch.nn.Module) and self.accelerator.num_processes > 1:
            for p in self.loss_weighting.parameters():
                if p.grad is not None:
                    p.grad.copy_(self.accelerator.reduce(p.grad, reduction="mean"))
        return loss

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        """The parent's optimizer, plus a parameter group for a differentiable loss-weighting controller."""
        had_optimizer = self.optimizer is not None
        optimizer = super().create_optimizer(model)
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
                plugin.load_state_dict(load_state(root / plugin.name))
            else:
                logger.warning("no saved state for plugin %r in %s", plugin.name, root)
        if isinstance(self.loss_weighting, torch.nn.Module) and (root / LOSS_WEIGHTING_STATE).is_dir():
            state = load_state(root / LOSS_WEIGHTING_STATE, device=self.args.device)
            self.loss_weighting.load_state_dict(state["module"])

    def _save_checkpoint(self, model: torch.nn.Module, trial: Any) -> None:
        # plugin states go in before the parent writes trainer_state.json, the file that marks a checkpoint complete
        folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        self.save_continual_state(folder)
        super()._save_checkpoint(model, trial)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        self.load_continual_state(resume_from_checkpoint)

    # ---------------------------------------------------------------------------------------- task sequences
    @property
    def adapter_strategy(self) -> str:
        return _continual_option(self.args, "adapter_strategy")

    def evaluate_tasks(self, tasks: Sequence[Task], trained: int | None = None) -> list[float]:
        """Rank-classification accuracy on each task's eval split.

        Under a LoRA-per-task strategy (or with a routing plugin that implements `expert_for_task`) task
        j < `trained` is scored with its own expert, later tasks with the newest one (what a user would deploy
        for an unseen task).
        """
        model = self.accelerator.unwrap_model(self.model)
        strategy = self.adapter_strategy
        current = model.active_adapter if is_peft_model(model) else None
        batch_size = _continual_option(self.args, "continual_eval_batch_size")
        limit = _continual_option(self.args, "continual_eval_limit")
        accuracies = []
        try:
            for j, task in enumerate(tasks):
                routed = self._routed_expert(task.name) if trained is not None and j < trained else None
                if routed is not None:
                    activate_adapter(model, routed)
                elif strategy == "lora_per_task" and trained is not None and j < trained:
                    activate_adapter(model, adapter_for_task(strategy, task.name))
                else:
                    activate_adapter(model, current)
                accuracies.append(task_accuracy(model, self.processing_class, task, "eval", batch_size, limit))
        finally:
            activate_adapter(model, current)
        return accuracies

    def _routed_expert(self, task_name: str) -> str | None:
        """The adapter a routing plugin (one with `expert_for_task`) assigned to `task_name`, if any."""
        for plugin in self.plugins:
            lookup = getattr(plugin, "expert_for_task", None)
            if callable(lookup) and (name := lookup(task_name)) is not None:
                return name
        return None

    def _require_tokenizer(self) -> Any:
        if self.processing_class is None:
            raise ValueError("ContinualTrainer.processing_class (the tokenizer) is required to run a task sequence")
        return self.processing_class

    def _prepare_task(self, task: Task, index: int) -> None:
        """Set up the trainable parameters, data, optimizer and output folder of task `index`."""
        model = prepare_task_parameters(self.model, self.adapter_strategy, task.name, self.args)
        if model is not self.model:
            self.model = model.to(self.args.device)
        # a fresh optimizer and scheduler (new trainable parameters) and a fresh DDP wrapper around them
        self.model_wrapped = self.model
        self.optimizer, self.lr_scheduler = None, None
        tokenizer = self._require_tokenizer()
        self.train_dataset = tokenize_task(task, tokenizer, "train")
        self.eval_dataset = tokenize_task(task, tokenizer, "eval") if task.eval_dataset is not None else None
        if not self._user_collator:
            self.data_collator = CausalLMCollator(tokenizer)
        self.current_task, self.current_task_index = task, index

    def _save_snapshot(self, base: Path, index: int, state: dict[str, Any]) -> None:
        """End-of-task snapshot (weights or adapters + plugin states) and the sequence state, each written whole."""
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            final = base / f"{SNAPSHOT_PREFIX}{index:02d}"
            tmp = base / f".{final.name}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            self.save_model(str(tmp), _internal_call=True)
            self.save_continual_state(tmp)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            state["snapshot"] = final.name
            atomic_write_json(base / SEQUENCE_STATE_NAME, state)
            for old in base.glob(f"{SNAPSHOT_PREFIX}*"):
                if old.name != final.name:
                    shutil.rmtree(old, ignore_errors=True)
        self.accelerator.wait_for_everyone()

    def _restore_snapshot(self, base: Path, state: dict[str, Any]) -> None:
        snapshot = base / state["snapshot"]
        logger.info("restoring the end-of-task snapshot %s", snapshot)
        for plugin in self.plugins:  # a plugin that puts adapters on the model (expert routing) rebuilds them first
            rebuild = getattr(plugin, "restore_model", None)
            if callable(rebuild) and (model := rebuild(snapshot)) is not None:
                self.model = self.model_wrapped = model.to(self.args.device)
        Trainer._load_from_checkpoint(self, str(snapshot))
        self.load_continual_state(snapshot)

    def _resume_point(self, base: Path, resume: bool | str | None, names: list[str]) -> dict[str, Any] | None:
        if not resume:
            return None
        path = base / SEQUENCE_STATE_NAME
        if not path.exists():
            if isinstance(resume, str):
                raise ValueError(f"resume_from_checkpoint={resume!r}: no {SEQUENCE_STATE_NAME} in {base}")
            return None
        state = json.loads(path.read_text(encoding="utf-8"))
        if state.get("task_names") != names:
            raise ValueError(
                f"resume_from_checkpoint: the saved sequence {state.get('task_names')} differs from the tasks "
                f"given {names}"
            )
        return state

    def train_sequence(
        self,
        tasks: Sequence[Task],
        resume_from_checkpoint: bool | str | None = None,
        evaluate_baseline: bool = True,
    ) -> ContinualResult:
        """Learn `tasks` one after another and return the accuracy matrix and its metrics.

        Per task: set up the trainable parameters (`adapter_strategy`), rebuild optimizer and scheduler, call the
        plugins' `on_task_begin`, train, call `on_task_end`, evaluate every task (seen and not yet seen), save an
        end-of-task snapshot. `resume_from_checkpoint=True` (or the run's output folder) continues a killed run:
        finished tasks keep their results, the interrupted task resumes from its last complete checkpoint.
        """
        if self._user_optimizer:
            raise ValueError(
                "ContinualTrainer.train_sequence rebuilds the optimizer for every task: pass "
                "`optimizer_cls_and_kwargs=(cls, kwargs)` instead of an optimizer instance in `optimizers`"
            )
        stream = tasks if isinstance(tasks, TaskStream) else TaskStream(list(tasks))
        self.tasks = stream
        names = [t.name for t in stream]
        base = Path(self.args.output_dir)
        if isinstance(resume_from_checkpoint, str) and Path(resume_from_checkpoint).is_dir():
            base = Path(resume_from_checkpoint)
        base.mkdir(parents=True, exist_ok=True)
        state = self._resume_point(base, resume_from_checkpoint, names)
        tokenizer = self._require_tokenizer()  # noqa: F841 - fail before any training when missing
        evaluate_unseen = _continual_option(self.args, "evaluate_unseen_tasks")

        if state is None:
            baseline = self.evaluate_tasks(stream) if evaluate_baseline else None
            state = {
                "task_names": names,
                "completed": 0,
                "matrix": [],
                "baseline": baseline,
                "train_time": [],
                "extra": {"train_loss": [], "steps": []},
            }
        start = state["completed"]
        original_output_dir = self.args.output_dir
        try:
            for index in range(start, len(stream)):
                task = stream[index]
                self._prepare_task(task, index)
                if index == start and start > 0:
                    self._restore_snapshot(base, state)
                task_dir = base / task_directory_name(index, task)
                self.args.output_dir = str(task_dir)
                resume_ckpt = last_complete_checkpoint(task_dir) if resume_from_checkpoint else None
                logger.info("task %d/%d: %s", index + 1, len(stream), task.name)
                if self.is_world_process_zero():
                    print(f"\n=== task {index + 1}/{len(stream)}: {task.name} ===", flush=True)
                for plugin in self.plugins:
                    plugin.on_task_begin(self, task, index)
                started = time.perf_counter()
                output = self.train(resume_from_checkpoint=resume_ckpt)
                elapsed = time.perf_counter() - started
                for plugin in self.plugins:
                    plugin.on_task_end(self, task, index)
                row = self.evaluate_tasks(stream if evaluate_unseen else stream[: index + 1], trained=index + 1)
                row += [float("nan")] * (len(stream) - len(row))
                state["matrix"].append(row)
                state["train_time"].append(elapsed)
                state["extra"]["train_loss"].append(output.training_loss)
                state["extra"]["steps"].append(output.global_step)
                state["completed"] = index + 1
                self._log_task_row(stream, index, row)
                self._save_snapshot(base, index, state)
        finally:
            self.args.output_dir = original_output_dir
            self.current_task = None
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
        tokenizer = self._require_tokenizer()
        self._prepare_task(stream[0], 0)
        self.train_dataset = concatenate_datasets([tokenize_task(t, tokenizer, "train") for t in stream])
        self.eval_dataset = None
        self.current_task = None
        self.train()
        return self.evaluate_tasks(stream)
