"""Quantization-aware training as a `ContinualPlugin`: torchao's `QATConfig` prepare -> train -> convert.

Prepare (`quantize_(model, QATConfig(base, step="prepare"))`) swaps the targeted `nn.Linear` layers for torchao's
`FakeQuantizedLinear`: its forward quantizes and dequantizes the weight (and, for the dynamic schemes, the input per
token) with the scheme's numerics, and the rounding passes gradients straight through, so the weights learn to sit
where quantization hurts the least. The swap keeps the very `Parameter` objects (and the state-dict keys): the
optimizer is untouched, and a checkpoint of a fake-quantized model is an ordinary float checkpoint.
Convert (`QATConfig(base, step="convert")`) swaps them back and applies the base config: real torchao quantized
weights whose forward equals the fake-quantized one, marked like `quantize_model`'s output (saves, reloads and
pushes the same way). The base config is `torchao_config(scheme, qat_compatible=True)`: a post-training
`quantize_model(..., qat_compatible=True)` of the same weights is the baseline QAT is measured against.

When (`tasks`): "last" fake-quantizes while the last task trains, "all" from the first task on (the model stays
fake-quantized across tasks: converted int weights could not train), "recovery" only during the last
`recovery_steps` optimizer steps of the last task. The conversion happens at the end of the last task
(`convert_at_end`; `on_task_end`, after every callback's `on_train_end`, or `on_train_end` of a plain `train()`),
before the trainer scores every task: the last row of the accuracy matrix is the quantized model's.

Resume: fake quantization is a module swap, not weights, so whether the model must be fake-quantized is decided from
the schedule at every `train()` begin (and step begin, for the recovery phase): a resumed run, whose model is
rebuilt in float, is prepared again before it trains. The saved state records what was done (for the report) and
the scheme (a resumed run with another scheme is refused).

Full fine-tuning only: with LoRA the trained adapters sit outside the quantized weights (merge first, or quantize
the base for QLoRA through bitsandbytes). Sharded training (FSDP, DeepSpeed ZeRO-3) is not supported. With
`gradual_pruning` in a plain `train()` (no sequence), list it before `qat`: it makes its zeros permanent at
`on_train_end`, on float weights.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch

from ..plugins import ContinualPlugin
from ..utils.validation import fail
from .config import QAT_OPTIONS, QuantizationAwareTrainingConfig
from .quantization import (
    SCHEME_BITS,
    check_group_size,
    check_quantizable,
    is_quantized_weight,
    linear_targets,
    mark_quantized,
    mark_untied,
    output_embedding,
    require_torchao,
    torchao_config,
)

logger = logging.getLogger(__name__)

OWNER = "QATPlugin"


def _is_fake_quantized(module: torch.nn.Module) -> bool:
    from torchao.quantization.qat import FakeQuantizedLinear

    return isinstance(module, FakeQuantizedLinear)


def fake_quantized_linears(model: torch.nn.Module) -> list[str]:
    """Names of the model's Linear layers that are fake-quantized (torchao `FakeQuantizedLinear`)."""
    if not any(type(m).__name__ == "FakeQuantizedLinear" for m in model.modules()):
        return []
    return [name for name, module in model.named_modules() if _is_fake_quantized(module)]


def _unwrap(trainer: Any, model: torch.nn.Module) -> torch.nn.Module:
    accelerator = getattr(trainer, "accelerator", None)
    return accelerator.unwrap_model(model) if accelerator is not None else model


class QATPlugin(ContinualPlugin):
    """Fake quantization while the chosen tasks train, real quantization at the end (see the module docstring).

    Built from a `QuantizationAwareTrainingConfig` (or its fields as keywords: `QATPlugin(scheme="8da4w")`). Pass it
    in `callbacks` of a `ContinualTrainer` (or bind it to a plain `Trainer`); `extra_results` reports the scheme,
    when fake quantization started, how many optimizer steps trained with it and whether the model was converted.
    """

    name = "qat"
    options = QAT_OPTIONS

    def __init__(self, config: QuantizationAwareTrainingConfig | None = None, **overrides: Any) -> None:
        self.config = dataclasses.replace(config or QuantizationAwareTrainingConfig(), **overrides)
        #: the model was converted to real quantized weights: nothing trains or fake-quantizes after this
        self.converted = False
        #: where fake quantization first started: {"task": index (None in a plain train()), "step": global step}
        self.prepared_at: dict[str, Any] | None = None
        #: optimizer steps trained fake-quantized, over the whole sequence
        self.fake_quant_steps = 0
        #: the Linear layers fake-quantized (then quantized), by name
        self.modules: list[str] = []
        #: the model the plugin fake-quantized last (cleared at every train() begin: the model may be new)
        self._active: int | None = None
        self._warned_short = False

    # ------------------------------------------------------------------------------------------- the model
    def _model(self, model: torch.nn.Module | None = None) -> torch.nn.Module:
        if model is None:
            model = getattr(self.trainer, "model", None)
        if model is None:
            raise ValueError(f"{OWNER}: no model (bind the plugin to a trainer or pass the model)")
        return _unwrap(self.trainer, model)

    @property
    def base_config(self) -> Any:
        """The torchao PTQ config the fake quantization imitates and the conversion applies."""
        return torchao_config(self.config.scheme, self.config.group_size, qat_compatible=True)

    def prepare(self, model: torch.nn.Module | None = None) -> torch.nn.Module:
        """Fake-quantize the targeted Linear layers (the decoder's; the LM head with `include_lm_head`) in place."""
        model = self._model(model)
        if self.converted:
            raise ValueError(f"{OWNER}: the model was already converted to quantized weights; it cannot train again")
        if fake_quantized_linears(model):
            self._active = id(model)
            return model
        require_torchao()
        check_quantizable(model, owner=OWNER)  # no LoRA (QAT needs full fine-tuning), not quantized already
        targets, _ = linear_targets(model, self.config.include_lm_head)
        if self.config.scheme == "8da4w":
            check_group_size(model, targets, self.config.group_size, owner=OWNER)
        from torchao.quantization import quantize_
        from torchao.quantization.qat import QATConfig

        wanted = set(targets)
        quantize_(
            model,
            QATConfig(self.base_config, step="prepare"),
            filter_fn=lambda module, fqn: fqn in wanted and isinstance(module, torch.nn.Linear),
        )
        self.modules = list(targets)
        self._active = id(model)
        if self.prepared_at is None:
            trainer = self.trainer
            state = getattr(trainer, "state", None)
            self.prepared_at = {
                "task": getattr(trainer, "current_task_index", None) if self._in_sequence() else None,
                "step": int(getattr(state, "global_step", 0) or 0),
            }
        logger.info("QAT: %d Linear layers fake-quantized (%s)", len(targets), self.config.scheme)
        return model

    def convert(self, model: torch.nn.Module | None = None) -> torch.nn.Module:
        """Replace the fake-quantized layers by real torchao quantized weights (the scheme's base config) in place,
        marked for `save_pretrained` / `from_pretrained` like a `quantize_model` result."""
        model = self._model(model)
        fake = fake_quantized_linears(model)
        if not fake:
            raise ValueError(f"{OWNER}: nothing to convert: the model has no fake-quantized layer (prepare it first)")
        from torchao.quantization import quantize_
        from torchao.quantization.qat import QATConfig

        base = self.base_config
        quantize_(model, QATConfig(base, step="convert"), filter_fn=lambda module, fqn: _is_fake_quantized(module))
        converted = set(fake)
        skipped = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n not in converted]
        head = output_embedding(model)
        if head is not None and is_quantized_weight(head.weight):
            # a tied head shared the embeddings' weight while training; the conversion gave the head its own quantized
            # weight and left the embeddings float: the config must say they are no longer tied
            mark_untied(model)
        mark_quantized(model, base, self.config, method="qat", skipped=skipped, qat_compatible=True)
        self.modules = fake
        self.converted = True
        self._active = None
        logger.info("QAT: %d Linear layers converted to %s", len(fake), self.config.scheme)
        return model

    # -------------------------------------------------------------------------------------------- schedule
    def _in_sequence(self) -> bool:
        trainer = self.trainer
        return getattr(trainer, "current_task", None) is not None and getattr(trainer, "tasks", None) is not None

    def _last_train(self) -> bool:
        """Whether the `train()` running is the last one: the last task of a sequence, or a plain `train()`."""
        if not self._in_sequence():
            return True
        index = getattr(self.trainer, "current_task_index", None)
        return index is None or index == len(self.trainer.tasks) - 1

    def recovery_start(self, max_steps: int) -> int:
        """The global step (of the last task's `train()`) from which the recovery phase fake-quantizes."""
        return max(0, int(max_steps) - self.config.recovery_steps)

    def _wanted(self, state: Any) -> bool:
        tasks = self.config.tasks
        if tasks == "all":
            return True
        if not self._last_train():
            return False
        return tasks == "last" or state.global_step >= self.recovery_start(state.max_steps)

    # ------------------------------------------------------------------------------------------- callbacks
    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if self.converted:
            raise ValueError(
                f"{OWNER}: the model was converted to quantized weights at the end of the last task and cannot train "
                "again; a new run needs a float model and a new plugin"
            )
        self._active = None  # the model may have been swapped or reloaded since
        model = self._model(model)
        if fake_quantized_linears(model):
            self._active = id(model)
        c = self.config
        short = c.tasks == "recovery" and c.recovery_steps >= state.max_steps
        if short and self._last_train() and not self._warned_short:
            logger.warning(
                "QAT: recovery_steps=%d >= the %d steps of the last task: the whole task trains fake-quantized",
                c.recovery_steps,
                state.max_steps,
            )
            self._warned_short = True
        if self._wanted(state):
            self.prepare(model)

    def on_step_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if self._active is None and not self.converted and self.config.tasks == "recovery" and self._wanted(state):
            self.prepare(model)

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if self._active is not None:
            self.fake_quant_steps += 1

    def on_train_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        # a plain train() converts here; a sequence's last task at on_task_end, once every callback's on_train_end
        # has run (e.g. gradual pruning making its zeros permanent on the float weights)
        if self.config.convert_at_end and self._active is not None and not self._in_sequence():
            self.convert(model)

    def on_task_end(self, trainer: Any, context: Any) -> None:
        if self.config.convert_at_end and self._active is not None and self._last_train():
            self.convert(getattr(trainer, "model", None))

    # --------------------------------------------------------------------------------------------- results
    def report(self) -> dict[str, Any]:
        c = self.config
        weight_bits, activation_bits = SCHEME_BITS[c.scheme]
        return {
            "scheme": c.scheme,
            "weight_bits": weight_bits,
            "activation_bits": activation_bits,
            "group_size": c.group_size if c.scheme == "8da4w" else None,
            "tasks": c.tasks,
            "recovery_steps": c.recovery_steps if c.tasks == "recovery" else None,
            "prepared_at": dict(self.prepared_at) if self.prepared_at is not None else None,
            "fake_quant_steps": self.fake_quant_steps,
            "converted": self.converted,
            "quantized_linears": len(self.modules),
        }

    def extra_results(self) -> dict[str, Any]:
        return {"qat": self.report()}

    # ----------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        c = self.config
        return {
            "scheme": c.scheme,
            "group_size": c.group_size,
            "include_lm_head": c.include_lm_head,
            "converted": self.converted,
            "prepared_at": dict(self.prepared_at) if self.prepared_at is not None else None,
            "fake_quant_steps": self.fake_quant_steps,
            "modules": list(self.modules),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from ..utils.io import StateLoadError

        for key in ("scheme", "group_size", "include_lm_head"):
            if state[key] != getattr(self.config, key):
                fail(
                    OWNER,
                    key,
                    getattr(self.config, key),
                    f"the saved state was trained with {key}={state[key]!r}; use the same to resume",
                )
        steps = state["fake_quant_steps"]
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise StateLoadError(f"{OWNER} state fake_quant_steps={steps!r} is not allowed: an integer >= 0")
        if not isinstance(state["converted"], bool):
            raise StateLoadError(f"{OWNER} state converted={state['converted']!r} is not allowed: a bool")
        at = state["prepared_at"]
        if at is not None and (not isinstance(at, dict) or set(at) != {"task", "step"}):
            raise StateLoadError(f"{OWNER} state prepared_at={at!r} is not allowed: None or {{'task', 'step'}}")
        modules = state["modules"]
        if not isinstance(modules, list) or not all(isinstance(m, str) for m in modules):
            raise StateLoadError(f"{OWNER} state modules={modules!r} is not allowed: a list of module names")
        self.converted = state["converted"]
        self.prepared_at = dict(at) if at is not None else None
        self.fake_quant_steps = steps
        self.modules = list(modules)
        self._active = None


__all__ = ["QATPlugin", "fake_quantized_linears"]
