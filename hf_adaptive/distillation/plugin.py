"""`DistillationPlugin`: distillation from a teacher on the current batch, and Learning without Forgetting.

Loss terms (added to the training loss, logged as ``loss_distillation`` / ``loss_distillation_features``):

* ``distillation`` (weight `distill_lambda`): a divergence between the model's and the teacher's next-token
  distributions at the chosen positions (`losses.distillation_loss`: forward KL, reverse KL or TRL's generalised
  JSD, with a temperature). ``positions="answer"`` takes the positions that predict an answer token; with
  `answer_only_logits` the trainer hands over the logits of the last k columns and labels cut to them, and the
  teacher runs on the very same inputs (`logits_to_keep` included), so both line up and the loss equals the
  full-logit one. ``positions="sequence"`` takes every non-pad position and sets `needs_full_logits`.
* ``distillation_features`` (weight `feature_lambda`, only with `feature_layers`): the MSE between the outputs of
  the chosen decoder layers of the model and of the teacher, at the same positions (`losses.feature_loss`).
  They are read by forward hooks during the trainer's own forward (no second student forward).

The teacher runs once per training batch, on the batch's inputs, in eval mode under `torch.no_grad()`:

* ``teacher="previous_task"`` (LwF, Li & Hoiem 2016): the model as it was at the end of the previous task; no term
  on the first task. `on_task_end` keeps a frozen copy of the weights that can change afterwards, and the
  teacher's forward is the model's own with those tensors swapped in (`torch.func.functional_call`: nothing is
  written into the model, so the student's graph is untouched). On a peft (LoRA) model that is a copy of the
  trainable adapter tensors only (plus the name of the adapter that was active: under ``lora_per_task`` the
  teacher runs with the previous task's expert), a few MB. On a fully fine-tuned model it is a copy of *every*
  weight: the weights' memory doubles (a warning says by how much, once).
* ``teacher="base"``: the model with its LoRA adapters disabled (`PeftModel.disable_adapter`): no memory at all;
  refused for a model without adapters.
* an explicit teacher, `DistillationPlugin(config, teacher=model)`: any model with the student's vocabulary (a
  mismatch is refused naming both sizes); it is frozen (eval, `requires_grad=False`) and moved to the student's
  device; `config.teacher` is then unused. It is not part of the plugin's state (pass it again on resume).

State (`state_dict`): the teacher kind, the number of finished tasks and the snapshot (tensors + the adapter name),
so a resumed run distills from the same teacher; shapes are checked against the model on load (or, when the model
has not got those parameters yet, e.g. before peft wraps it, when the snapshot is first used).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..adapters import is_peft_model
from ..plugins import ContinualPlugin, LossTerm, TaskContext
from ..utils.io import StateLoadError, check_tensor
from ..utils.validation import fail
from .config import DEFAULT_BETA, DISTILLATION_OPTIONS, TEACHERS, DistillationConfig
from .losses import distillation_loss, feature_loss, pad_mask_left, position_mask

logger = logging.getLogger(__name__)

OWNER = "DistillationPlugin"
#: the teacher kinds a state can record (`config.teacher`'s choices, or an explicit teacher model)
EXPLICIT_TEACHER = "model"
#: the kinds of snapshot: the trainable adapter tensors of a peft model, or every weight of a plain model
SNAPSHOT_KINDS = ("adapters", "full")
_LAYER_LIST_NAMES = ("layers", "h", "layer", "blocks")
#: how many recorded forwards the tap keeps (other plugins' extra forwards may come between the trainer's forward
#: and this plugin's `loss_terms`)
_MAX_RECORDS = 4


def _unwrap(trainer: Any, model: nn.Module) -> nn.Module:
    """The model without DDP / compile wrappers, whose parameter names match `trainer.model`'s."""
    accelerator = getattr(trainer, "accelerator", None)
    return accelerator.unwrap_model(model) if accelerator is not None else model


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder layers: the longest `ModuleList` named layers / h / layer / blocks."""
    found = [
        module
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) and name.rpartition(".")[2] in _LAYER_LIST_NAMES
    ]
    if not found:
        raise ValueError(
            f"{OWNER}: feature distillation needs a list of decoder layers (an nn.ModuleList named one of "
            f"{_LAYER_LIST_NAMES}); {type(model).__name__} has none"
        )
    return max(found, key=len)


def vocabulary_size(model: nn.Module) -> int | None:
    """The size of the model's output distribution: its output embedding's rows, else `config.vocab_size`."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return int(weight.shape[0])
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    return int(size) if isinstance(size, int) else None


def check_same_vocabulary(student: int | None, teacher: int | None) -> None:
    if student is not None and teacher is not None and student != teacher:
        raise ValueError(
            f"{OWNER}: the teacher's vocabulary has {teacher} tokens and the model's has {student}: a teacher must "
            "share the model's vocabulary (same tokenizer) for their next-token distributions to be compared"
        )


def _model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """`model.eval()` for the duration; every module's own training flag is restored afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, flag in flags:
            module.training = flag


@contextlib.contextmanager
def _active_adapter(model: nn.Module, adapter: str | None) -> Iterator[None]:
    """Run with peft adapter `adapter` active (the previous task's expert); which parameters train is untouched."""
    if adapter is None or not is_peft_model(model) or model.active_adapter == adapter:
        yield
        return
    if adapter not in model.peft_config:
        raise ValueError(
            f"{OWNER}: the previous-task teacher ran with adapter {adapter!r}, which the model no longer has "
            f"(adapters: {sorted(model.peft_config)})"
        )
    current = model.active_adapter
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.set_adapter(adapter)  # peft also marks it trainable: the flags are put back below
    try:
        yield
    finally:
        model.set_adapter(current)
        for param, flag in flags:
            param.requires_grad_(flag)


class _LayerTap:
    """Forward hooks that record the outputs of chosen decoder layers, one record per forward of the model.

    A forward starts at the input embedding (every forward calls it as a module, whatever wraps the model) and is
    recorded with its `input_ids` when it is the student's training forward (module in training mode, grad on) or
    when `teacher_pass` is set; other forwards (evaluation, generation) record nothing.
    """

    def __init__(self, model: nn.Module, layers: tuple[int, ...]) -> None:
        self.model = model
        stack = decoder_layers(model)
        bad = [i for i in layers if i >= len(stack)]
        if bad:
            fail(
                "DistillationConfig",
                "feature_layers",
                list(layers),
                f"layer indices must be < {len(stack)}, the number of decoder layers of {type(model).__name__}",
            )
        self.teacher_pass = False
        self.records: list[tuple[torch.Tensor | None, dict[int, torch.Tensor]]] = []
        self.teacher_record: dict[int, torch.Tensor] = {}
        self._current: dict[int, torch.Tensor] | None = None
        embedding = model.get_input_embeddings()
        self._handles = [embedding.register_forward_pre_hook(self._start)]
        for i in layers:
            self._handles.append(stack[i].register_forward_hook(self._layer_hook(i)))

    def _start(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        ids = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if self.teacher_pass:
            self.teacher_record.clear()  # one record per teacher pass: its last forward
            self._current = self.teacher_record
        elif module.training and torch.is_grad_enabled():
            self._current = {}
            self.records = [*self.records[-(_MAX_RECORDS - 1) :], (ids, self._current)]
        else:
            self._current = None

    def _layer_hook(self, index: int):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if self._current is not None:
                self._current[index] = output[0] if isinstance(output, (tuple, list)) else output

        return hook

    def pop(self, input_ids: torch.Tensor) -> dict[int, torch.Tensor] | None:
        """The layer outputs of the latest recorded forward of `input_ids`; every record is dropped."""
        found = None
        for ids, layers in reversed(self.records):
            if ids is input_ids or (
                ids is not None and ids.shape == input_ids.shape and torch.equal(ids, input_ids.to(ids.device))
            ):
                found = layers
                break
        self.records, self._current = [], None
        return found

    @contextlib.contextmanager
    def teacher(self) -> Iterator[dict[int, torch.Tensor]]:
        self.teacher_pass, self.teacher_record = True, {}
        try:
            yield self.teacher_record
        finally:
            self.teacher_pass, self._current = False, None

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self.records, self._current = [], [], None


class DistillationPlugin(ContinualPlugin):
    """Distillation from a teacher (previous-task snapshot, adapter-free base, or a given model); see the module.

    Built from a `DistillationConfig` (every field can also be passed as a keyword, e.g.
    `DistillationPlugin(distill_lambda=0.5)`) and an optional explicit `teacher` model (a string `teacher` is the
    option: `DistillationPlugin(teacher="base")`).
    """

    name = "distillation"
    options = DISTILLATION_OPTIONS
    feature_term = "distillation_features"

    def __init__(
        self, config: DistillationConfig | None = None, teacher: nn.Module | None = None, **overrides: Any
    ) -> None:
        if isinstance(teacher, str):  # `DistillationPlugin(teacher="base")`: the option, not a model
            overrides["teacher"], teacher = teacher, None
        self.config = dataclasses.replace(config or DistillationConfig(), **overrides)
        if self.config.divergence != "jsd" and self.config.beta != DEFAULT_BETA:
            logger.warning(
                "%s: beta=%s is ignored with divergence=%r (beta is read by divergence='jsd' only)",
                OWNER,
                self.config.beta,
                self.config.divergence,
            )
        if teacher is not None and not isinstance(teacher, nn.Module):
            fail(
                OWNER,
                "teacher",
                type(teacher).__name__,
                f"a teacher model (torch.nn.Module), one of the teacher options {list(TEACHERS)}, or None",
            )
        self.teacher_model = teacher
        if teacher is not None:
            teacher.eval()
            teacher.requires_grad_(False)
        #: True with positions="sequence": the divergence reads the logits of every position
        self.needs_full_logits = self.config.positions == "sequence"
        #: tasks finished so far (the previous-task teacher exists from the second task on)
        self.tasks_seen = 0
        #: previous-task teacher: parameter name -> frozen tensor, the adapter that was active, what was copied
        self.snapshot: dict[str, torch.Tensor] = {}
        self.snapshot_adapter: str | None = None
        self.snapshot_kind: str | None = None
        self._checked_model: int | None = None  # id of the model the snapshot was last checked against
        self._tap: _LayerTap | None = None
        self._teacher_tap: _LayerTap | None = None
        self._warned_full_copy = False

    # ------------------------------------------------------------------------------------------ properties
    @property
    def teacher_kind(self) -> str:
        """`"model"` with an explicit teacher, else `config.teacher`."""
        return EXPLICIT_TEACHER if self.teacher_model is not None else self.config.teacher

    @property
    def uses_features(self) -> bool:
        return bool(self.config.feature_layers) and self.config.feature_lambda > 0

    @property
    def enabled(self) -> bool:
        return self.config.distill_lambda > 0 or self.uses_features

    @property
    def term_names(self) -> tuple[str, ...]:
        names = (self.name,) if self.config.distill_lambda > 0 else ()
        return names + ((self.feature_term,) if self.uses_features else ())

    def snapshot_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.snapshot.values())

    # -------------------------------------------------------------------------------------------- checks
    def bind(self, trainer: Any) -> None:
        super().bind(trainer)
        model = getattr(trainer, "model", None)
        if self.teacher_model is not None and isinstance(model, nn.Module):
            check_same_vocabulary(vocabulary_size(model), vocabulary_size(self.teacher_model))

    def _check_model(self, model: nn.Module) -> None:
        """What the teacher needs of the model being trained (called at task / train begin)."""
        if not self.enabled:
            return
        if self.teacher_kind == "base" and not is_peft_model(model):
            fail(
                "DistillationConfig",
                "teacher",
                "base",
                f"the model ({type(model).__name__}) has no LoRA adapters to disable: use a LoRA adapter_strategy "
                "('shared_lora' / 'lora_per_task'), teacher='previous_task', or pass a teacher model",
            )
        if self.teacher_model is not None:
            check_same_vocabulary(vocabulary_size(model), vocabulary_size(self.teacher_model))

    def _install_taps(self, model: nn.Module) -> None:
        if not (self.enabled and self.uses_features):
            return
        if self._tap is None or self._tap.model is not model:
            if self._tap is not None:
                self._tap.remove()
            self._tap = _LayerTap(model, self.config.feature_layers)
        if self.teacher_model is not None and self._teacher_tap is None:
            self._teacher_tap = _LayerTap(self.teacher_model, self.config.feature_layers)

    # ------------------------------------------------------------------------------------------- callbacks
    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        """Also for a plain `trainer.train()`: hooks on the model that trains, and its checks."""
        # the callback handler's `model` is the one the trainer was built with, not the peft model of a LoRA strategy
        model = getattr(self.trainer, "model", None) if self.trainer is not None else model
        if isinstance(model, nn.Module):
            model = _unwrap(self.trainer, model)
            self._check_model(model)
            self._install_taps(model)

    def on_task_begin(self, trainer: Any, context: TaskContext) -> None:
        model = _unwrap(trainer, trainer.model)
        self._check_model(model)
        self._install_taps(model)
        if self.snapshot:
            self._complete_snapshot(model)

    def on_task_end(self, trainer: Any, context: TaskContext) -> None:
        """LwF: keep the weights the next task may change, as they are now (the next task's teacher)."""
        self.tasks_seen += 1
        if self.teacher_kind != "previous_task" or not self.enabled:
            return
        self.take_snapshot(_unwrap(trainer, trainer.model))

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._tap is not None:  # forwards recomputed in the backward (gradient checkpointing) are not kept
            self._tap.records, self._tap._current = [], None

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.on_step_end(args, state, control)

    # -------------------------------------------------------------------------------------------- teacher
    def take_snapshot(self, model: nn.Module) -> None:
        """The previous-task teacher from `model` as it is now: its trainable adapter tensors (peft) or every
        weight (a plain model: the weights' memory doubles)."""
        if is_peft_model(model):
            params = {n: p for n, p in model.named_parameters() if p.requires_grad}
            self.snapshot_kind, self.snapshot_adapter = "adapters", model.active_adapter
        else:
            params = dict(model.named_parameters())
            self.snapshot_kind, self.snapshot_adapter = "full", None
        self.snapshot = {n: p.detach().clone() for n, p in params.items()}
        self._checked_model = id(model)
        if self.snapshot_kind == "full" and not self._warned_full_copy:
            self._warned_full_copy = True
            logger.warning(
                "%s: teacher='previous_task' on a model without adapters keeps a frozen copy of all its weights "
                "(%.1f MB more memory); a LoRA adapter_strategy copies only the adapters",
                OWNER,
                self.snapshot_bytes() / 2**20,
            )

    def _complete_snapshot(self, model: nn.Module) -> None:
        """At a task's begin (weights still those of the previous task's end): add what trains now but was not
        copied, so that nothing the task changes leaks into its teacher; then check the snapshot fits."""
        added = {
            n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad and n not in self.snapshot
        }
        if added:
            logger.info("%s: %d parameters that train in this task were added to the teacher", OWNER, len(added))
            self.snapshot.update(added)
        self._check_snapshot(model)

    def _check_snapshot(self, model: nn.Module, strict: bool = True) -> None:
        """Every snapshot tensor names a parameter of `model` of the same shape; moved to its device and dtype.
        `strict=False` (at load, before peft may have wrapped the model) skips names the model lacks."""
        params = dict(model.named_parameters())
        for name, tensor in list(self.snapshot.items()):
            param = params.get(name)
            if param is None:
                if not strict:
                    continue
                raise StateLoadError(
                    f"{OWNER} state snapshot[{name!r}] names no parameter of the model ({type(model).__name__}): "
                    "was it saved from another model or another adapter_strategy?"
                )
            check_tensor(f"{OWNER} state snapshot[{name!r}]", tensor, param.shape)
            if tensor.device != param.device or tensor.dtype != param.dtype:
                self.snapshot[name] = tensor.to(device=param.device, dtype=param.dtype)
        if strict:
            self._checked_model = id(model)

    def has_teacher(self) -> bool:
        if self.teacher_kind == "previous_task":
            return self.tasks_seen > 0 and bool(self.snapshot)
        return True

    @torch.no_grad()
    def teacher_forward(self, model: nn.Module, inputs: dict[str, Any]) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """The teacher's logits on the model's inputs (labels dropped; `logits_to_keep` kept, so that they line
        up with the model's) and the outputs of its `feature_layers`."""
        kwargs = {k: v for k, v in inputs.items() if k != "labels"}
        if self.teacher_model is not None:
            teacher = self.teacher_model
            device = _model_device(model)
            if _model_device(teacher) != device:
                logger.info("%s: moving the teacher model to %s", OWNER, device)
                teacher.to(device)
            tap = self._teacher_tap
            run = lambda: teacher(**kwargs)  # noqa: E731
        else:
            teacher, tap = model, self._tap
            if self.teacher_kind == "base":
                if not is_peft_model(model):
                    self._check_model(model)

                def run():
                    with model.disable_adapter():
                        return model(**kwargs)

            else:
                if self._checked_model != id(model):
                    self._check_snapshot(model)
                snapshot, adapter = self.snapshot, self.snapshot_adapter

                def run():
                    with _active_adapter(model, adapter):
                        return torch.func.functional_call(model, snapshot, args=(), kwargs=kwargs, strict=False)

        capture = tap.teacher() if tap is not None and self.uses_features else contextlib.nullcontext({})
        with _eval_mode(teacher), capture as hidden:
            outputs = run()
        return outputs.logits, dict(hidden)

    # ------------------------------------------------------------------------------------------------ loss
    def loss_terms(self, trainer: Any, model: nn.Module, inputs: dict[str, Any], outputs: Any) -> list[LossTerm]:
        base = _unwrap(trainer, model)
        student_hidden = None
        if self.uses_features:
            if self._tap is None or self._tap.model is not base:
                logger.warning("%s: hooks put on the model now; distillation starts with the next batch", OWNER)
                self._install_taps(base)  # they missed this batch's forward
                return []
            student_hidden = self._tap.pop(inputs["input_ids"])
        if not self.enabled or not self.has_teacher():
            return []
        logits = outputs.logits
        teacher_logits, teacher_hidden = self.teacher_forward(base, inputs)
        check_same_vocabulary(logits.shape[-1], teacher_logits.shape[-1])
        if teacher_logits.shape != logits.shape:
            raise ValueError(
                f"{OWNER}: the teacher's logits {tuple(teacher_logits.shape)} do not line up with the model's "
                f"{tuple(logits.shape)} on the same inputs"
            )
        mask = position_mask(
            self.config.positions,
            logits.shape[1],
            labels=inputs.get("labels"),
            attention_mask=inputs.get("attention_mask"),
            batch_size=logits.shape[0],
        )
        terms = []
        if self.config.distill_lambda > 0:
            value = distillation_loss(logits, teacher_logits, mask, self.config.trl_beta, self.config.temperature)
            terms.append(LossTerm(self.name, value, self.config.distill_lambda))
        if self.uses_features:
            if student_hidden is None:
                raise RuntimeError(
                    f"{OWNER}: the hidden states of this batch's forward were not recorded (the model trained is "
                    "not the one the plugin's hooks are on)"
                )
            values = []
            for layer in self.config.feature_layers:
                student, teacher = student_hidden[layer], teacher_hidden[layer]
                values.append(feature_loss(student, teacher, pad_mask_left(mask, student.shape[1])))
            terms.append(LossTerm(self.feature_term, torch.stack(values).mean(), self.config.feature_lambda))
        return terms

    # ----------------------------------------------------------------------------------------------- state
    def extra_results(self) -> dict[str, Any]:
        return {"distillation_teacher": self.teacher_kind, "distillation_snapshot_bytes": self.snapshot_bytes()}

    def state_dict(self) -> dict[str, Any]:
        return {
            "teacher": self.teacher_kind,
            "tasks_seen": self.tasks_seen,
            "snapshot_kind": self.snapshot_kind,
            "snapshot_adapter": self.snapshot_adapter,
            "snapshot": dict(self.snapshot),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("teacher")
        if saved != self.teacher_kind:
            fail(
                OWNER,
                "teacher",
                self.teacher_kind,
                f"the saved state was written with teacher {saved!r}; resume with the same teacher",
            )
        tasks_seen = state.get("tasks_seen")
        if isinstance(tasks_seen, bool) or not isinstance(tasks_seen, int) or tasks_seen < 0:
            raise StateLoadError(f"{OWNER} state tasks_seen={tasks_seen!r} is not allowed: an integer >= 0")
        kind, adapter = state.get("snapshot_kind"), state.get("snapshot_adapter")
        if kind is not None and kind not in SNAPSHOT_KINDS:
            raise StateLoadError(f"{OWNER} state snapshot_kind={kind!r} is not allowed: one of {SNAPSHOT_KINDS}")
        if adapter is not None and not isinstance(adapter, str):
            raise StateLoadError(f"{OWNER} state snapshot_adapter={adapter!r} is not allowed: a string or None")
        snapshot = state.get("snapshot") or {}
        if not isinstance(snapshot, dict):
            raise StateLoadError(f"{OWNER} state snapshot={type(snapshot).__name__} is not allowed: a dict of tensors")
        for name, tensor in snapshot.items():
            check_tensor(f"{OWNER} state snapshot[{name!r}]", tensor, floating=True)
        if self.teacher_kind == "previous_task" and self.enabled and tasks_seen > 0 and not snapshot:
            raise StateLoadError(
                f"{OWNER} state: {tasks_seen} finished tasks but no teacher snapshot (teacher='previous_task')"
            )
        self.tasks_seen, self.snapshot_kind, self.snapshot_adapter = tasks_seen, kind, adapter
        self.snapshot = dict(snapshot)
        self._checked_model = None
        model = getattr(self.trainer, "model", None)
        if isinstance(model, nn.Module) and self.snapshot:
            # names the model has are checked now; the rest when the snapshot is first used (peft wraps later)
            self._check_snapshot(_unwrap(self.trainer, model), strict=False)
            self._checked_model = None


__all__ = ["DistillationConfig", "DistillationPlugin", "check_same_vocabulary", "decoder_layers", "vocabulary_size"]
