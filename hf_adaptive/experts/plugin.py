"""`ExpertRoutingPlugin`: the router chooses, for every task of a sequence, which LoRA expert trains on it.

At `on_task_begin` the task's signature (from its training examples, backbone only) is routed: reuse the best
expert, fork it into a new one, or create a new one; the chosen expert becomes the active, trainable adapter
of the trainer's `PeftModel` (the library's model). At `on_task_end` the expert's profile is recomputed from
the task's validation examples (the mean of the signatures of the tasks it serves), its accuracy is recorded,
and for a reuse the outcome (did the tasks it served before keep their accuracy within `tolerance`?) goes
back to the router (rewards, τ, calibration, and the learned scorer, refitted from all outcomes).

A reuse is checked before it is committed (`verify_reuse`, default on): the task trains a fork of the chosen
expert (a copy under the task's own expert name), and at task end the tasks the original expert served are
evaluated with the fork. If any of them loses more than `tolerance`, the original stays untouched and the fork
stays as the task's own expert (a failed reuse, rolled back); otherwise the fork's weights replace the original's
and the fork is deleted (a successful reuse: one expert). Without the check a wrong reuse trains over the old
tasks' expert and cannot be undone.

Use it with `adapter_strategy="full"` and the library's `PeftModel` (or the backbone it wraps) as the trainer's
model: the trainer then leaves the parameters alone and this plugin decides which adapter trains. By name
(`plugins: [expert_routing]` in a YAML config) it is built by `from_config` from the `router_*`, `signature_*`
and `lora_*` options of `ContinualConfig`; its decisions go into `results.json` (`extra_results`).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..plugins import ContinualPlugin
from .library import ExpertInfo, ExpertLibrary
from .router import Router, RoutingDecision
from .signature import SignatureConfig, TaskSignature

if TYPE_CHECKING:  # pragma: no cover
    from ..tasks import Task


def check_tolerance(tolerance: float) -> None:
    """The accuracy drop of earlier tasks a reuse may cost and still count as a success: a number in [0, 1]."""
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0.0 <= tolerance <= 1.0:
        raise ValueError(f"ExpertRoutingPlugin.tolerance={tolerance!r} is not allowed: a number in [0, 1]")


def check_verify_reuse(verify_reuse: bool) -> None:
    """Whether reuses train a fork that is checked against the old tasks before it replaces the expert: a bool."""
    if not isinstance(verify_reuse, bool):
        raise ValueError(f"ExpertRoutingPlugin.verify_reuse={verify_reuse!r} is not allowed: True or False")


def signature_dim(model: torch.nn.Module, config: SignatureConfig) -> int:
    """Size of the signatures `config` gives on `model`, found without a tokenizer (the text part is `text_dim`,
    else the sentence encoder's or the backbone's hidden size); also checks `config.layers` against the model."""
    return TaskSignature(model, None, config).dim


class ExpertRoutingPlugin(ContinualPlugin):
    name = "expert_routing"

    def __init__(
        self,
        library: ExpertLibrary,
        router: Router,
        signature_config: SignatureConfig | None = None,
        tolerance: float = 0.05,
        eval_limit: int | None = 64,
        verify_reuse: bool = True,
    ) -> None:
        check_tolerance(tolerance)
        check_verify_reuse(verify_reuse)
        self.verify_reuse = verify_reuse
        self.library = library
        self.router = router
        self.library.router = router
        self.signature_config = signature_config or SignatureConfig()
        self.tolerance = tolerance
        self.eval_limit = eval_limit
        self.task_expert: dict[str, str] = {}
        self.task_accuracy: dict[str, float] = {}
        self.task_signatures: dict[str, torch.Tensor] = {}
        self.decisions: list[dict[str, Any]] = []
        self._pending: tuple[RoutingDecision, torch.Tensor] | None = None
        #: during a checked reuse: (the reused expert, the fork that trains instead)
        self._trial: tuple[str, str] | None = None

    @classmethod
    def from_config(cls, config: Any, model: torch.nn.Module | None = None) -> ExpertRoutingPlugin:
        """Library, signature and router from a `ContinualConfig`: LoRA experts from `lora_*`, signatures from
        `signature_*`, the router from `router_*` sized by the signature (computed on `model`), `router_tolerance`.

        The library wraps `model` with the first expert; the trainer may be given `model` itself.
        """
        if model is None:
            raise ValueError(
                "ExpertRoutingPlugin.from_config: model=None is not allowed: the experts are LoRA adapters on the model"
            )
        strategy = getattr(config, "adapter_strategy", "full")
        if strategy != "full":
            raise ValueError(
                f"ContinualConfig.adapter_strategy={strategy!r} is not allowed with the expert_routing plugin: "
                "use 'full' (the router chooses which LoRA expert trains for each task)"
            )
        from ..adapters import lora_config
        from ..config import config_error

        signature_config = config.expert_signature_config()
        try:
            dim = signature_dim(model, signature_config)
        except ValueError as err:  # e.g. a signature_layers entry that names nothing in the model
            raise config_error(err, config, "SignatureConfig", "signature_") from None
        router = Router(config.expert_router_config(dim))
        library = ExpertLibrary(model, lora_config=lora_config(config), experiment_id=config.run_name or "")
        return cls(
            library,
            router,
            signature_config=signature_config,
            tolerance=config.router_tolerance,
            eval_limit=config.router_eval_limit,
            verify_reuse=getattr(config, "router_verify_reuse", True),
        )

    # ------------------------------------------------------------------ helpers
    def _signer(self, trainer: Any) -> TaskSignature:
        signer = TaskSignature(self.library.model, trainer.processing_class, self.signature_config)
        if signer.dim != self.router.config.dim:
            raise ValueError(
                f"signature dimension {signer.dim} ({signer.part_dims}) does not match RouterConfig.dim="
                f"{self.router.config.dim}"
            )
        return signer

    def _new_name(self, task: Task) -> str:
        base = "expert_" + "".join(c if c.isalnum() or c == "_" else "_" for c in task.name)
        name, i = base, 1
        while name in self.library:
            i += 1
            name = f"{base}_{i}"
        return name

    def _accuracy(self, trainer: Any, task: Task, expert: str) -> float:
        from ..tasks import task_accuracy

        self.library.model.set_adapter(expert)
        return task_accuracy(self.library.model, trainer.processing_class, task, "eval", limit=self.eval_limit)

    @staticmethod
    def _from_main_process(trainer: Any, tensor: torch.Tensor) -> torch.Tensor:
        """The main process's `tensor` on every process (torch.distributed broadcast; a no-op in one process).

        Every process computes signatures and accuracies itself, but the router must see the same numbers
        everywhere, or processes could take different decisions and train different adapters under DDP."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return tensor
        buffer = tensor.detach().to(device=trainer.args.device, dtype=torch.float32).contiguous()
        dist.broadcast(buffer, src=0)
        return buffer.cpu()

    def _synced_accuracy(self, trainer: Any, task: Task, expert: str) -> float:
        acc = torch.tensor([self._accuracy(trainer, task, expert)])
        return float(self._from_main_process(trainer, acc)[0])

    def _tasks_by_name(self, trainer: Any) -> dict[str, Task]:
        return {t.name: t for t in (getattr(trainer, "tasks", None) or [])}

    # ------------------------------------------------------------------ task boundaries
    def on_task_begin(self, trainer: Any, task: Task, task_index: int) -> None:
        owned = (self.library.model, self.library.base_model())  # the backbone: a trainer restored from a snapshot
        if len(self.library) and not any(trainer.model is m for m in owned):
            raise ValueError("ExpertRoutingPlugin: the trainer's model must be the library's model (library.model)")
        query = self._from_main_process(trainer, self._signer(trainer).compute(task, split="train").vector)
        decision = self.router.route(query)
        self._trial = None
        if decision.action == "reuse" and decision.expert is not None:
            new = None
            if self.verify_reuse and self._checked_tasks(trainer, decision.expert, task.name):
                expert = self._new_name(task)  # train a copy; the original is kept until the check at task end
                self.library.fork(decision.expert, expert, task_id=task.name)
                self._trial = (decision.expert, expert)
            else:
                expert = decision.expert
                self.library.activate(expert)
        else:
            expert = self._new_name(task)
            if decision.action == "fork" and decision.expert is not None:
                self.library.fork(decision.expert, expert, task_id=task.name)
            else:
                self.library.create(expert, task_id=task.name, description=task.description)
            new = expert
        self.router.record_decision(decision, new_expert=new, query=query)
        if trainer.model is not self.library.model:  # the first expert (or a restored library) wrapped the backbone
            trainer.model = self.library.model.to(trainer.args.device)
            trainer.model_wrapped = trainer.model
        trainer.optimizer, trainer.lr_scheduler = None, None
        self.task_expert[task.name] = expert  # a checked reuse: the fork until the check at task end
        self._pending = (decision, query)
        self.decisions.append(
            {
                "task": task.name,
                "action": decision.action,
                "expert": expert if self._trial is None else self._trial[0],
                "source": decision.expert,
                "score": decision.score,
                "rule": decision.rule,
            }
        )

    def _checked_tasks(self, trainer: Any, expert: str, current: str) -> list[str]:
        """The earlier tasks `expert` serves whose accuracy can be re-measured (known task, accuracy recorded)."""
        known = self._tasks_by_name(trainer)
        return [
            t
            for t, e in self.task_expert.items()
            if e == expert and t != current and t in known and t in self.task_accuracy
        ]

    def _commit_trial(self, trainer: Any, task: Task) -> tuple[str, bool, dict[str, float]]:
        """End of a checked reuse: the old tasks of the reused expert measured with the fork that trained; within
        `tolerance` the fork's weights replace the original's (fork deleted), else the original stays untouched and
        the fork becomes the task's own expert. Returns (the task's expert, success, the old tasks' accuracies)."""
        from peft import get_peft_model_state_dict, set_peft_model_state_dict

        original, fork = self._trial  # type: ignore[misc]
        known = self._tasks_by_name(trainer)
        measured = {}
        for other in self._checked_tasks(trainer, original, task.name):
            measured[other] = self._synced_accuracy(trainer, known[other], fork)
        kept = all(measured[t] >= self.task_accuracy[t] - self.tolerance for t in measured)
        if kept:
            weights = get_peft_model_state_dict(self.library.model, adapter_name=fork)
            set_peft_model_state_dict(
                self.library.model, {k: v.detach().clone() for k, v in weights.items()}, adapter_name=original
            )
            self.library.activate(original)
            self.library.delete(fork)
            self.library.set_metrics(original, **{f"accuracy/{t}": a for t, a in measured.items()})
            return original, True, measured
        # rolled back: the fork is a new expert (the router counts it, not the reused one)
        self.router.counts[original] = max(0, self.router.counts.get(original, 0) - 1)
        self.router.counts[fork] = self.router.counts.get(fork, 0) + 1
        return fork, False, measured

    def on_task_end(self, trainer: Any, task: Task, task_index: int) -> None:
        decision, query = self._pending or (None, None)
        trial, outcome, measured = self._trial, None, {}
        if trial is not None:
            expert, outcome, measured = self._commit_trial(trainer, task)
            self.task_expert[task.name] = expert
            self._trial = None
        expert = self.task_expert[task.name]
        signer = self._signer(trainer)
        self.task_signatures[task.name] = self._from_main_process(trainer, signer.compute(task, split="eval").vector)
        served = [t for t, e in self.task_expert.items() if e == expert and t in self.task_signatures]
        profile = torch.stack([self.task_signatures[t] for t in served]).mean(0)
        self.router.update_profile(expert, profile)
        known = self._tasks_by_name(trainer)
        acc = self._synced_accuracy(trainer, task, expert)
        self.task_accuracy[task.name] = acc
        self.library.set_metrics(expert, **{f"accuracy/{task.name}": acc})
        if decision is not None and decision.action == "reuse":
            if outcome is None:  # unchecked reuse: measured after the fact, nothing can be undone
                outcome = True
                for other in served:
                    if other == task.name or other not in known or other not in self.task_accuracy:
                        continue
                    now = self._synced_accuracy(trainer, known[other], expert)
                    measured[other] = now
                    outcome = outcome and now >= self.task_accuracy[other] - self.tolerance
                    self.library.set_metrics(expert, **{f"accuracy/{other}": now})
            self.router.record_outcome(query, decision.expert, decision.score, outcome)
            self.decisions[-1]["success"] = outcome
            self.decisions[-1]["checked"] = trial is not None
            self.decisions[-1]["rolled_back"] = trial is not None and not outcome
            self.decisions[-1]["trained_expert"] = expert
            self.decisions[-1]["old_task_accuracy"] = {
                t: {"before": self.task_accuracy[t], "after": a} for t, a in measured.items()
            }
        self.library.model.set_adapter(expert)
        self._pending = None

    def expert_for_task(self, task_name: str) -> str | None:
        """The expert that learned `task_name` (for evaluating each task with its own expert)."""
        return self.task_expert.get(task_name)

    def extra_results(self) -> dict[str, Any]:
        """What `hf-adaptive run` adds to `results.json` and its summary: every routing decision (action, expert,
        source, score, rule, reuse outcome) and the expert of each task (nothing before the first decision)."""
        if not self.decisions:
            return {}
        decisions = [
            {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}
            for d in self.decisions
        ]
        return {"routing_decisions": decisions, "task_experts": dict(self.task_expert)}

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        from peft import get_peft_model_state_dict

        adapters: dict[str, Any] = {}
        for name in self.library.names:
            config = self.library.model.peft_config[name].to_dict()
            config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
            adapters[name] = {
                "config": {
                    k: v for k, v in config.items() if v is None or isinstance(v, (bool, int, float, str, list, dict))
                },
                "weights": {
                    k: v.detach().cpu().clone()
                    for k, v in get_peft_model_state_dict(self.library.model, adapter_name=name).items()
                },
            }
        return {
            "router": self.router.state_dict(),
            "library": self.library.manifest(),
            "adapters": adapters,
            "task_expert": dict(self.task_expert),
            "task_accuracy": dict(self.task_accuracy),
            "task_signatures": dict(self.task_signatures),
            "decisions": list(self.decisions),
        }

    def restore_model(self, directory: str | os.PathLike) -> torch.nn.Module | None:
        """Called by `ContinualTrainer` before it loads an end-of-task snapshot into its model: load this plugin's
        state saved in `directory` (experts, weights, router) and return the library's model, which has the
        adapters that the snapshot's weights load into (the trainer's fresh backbone has none). None: no state."""
        from ..trainer import PLUGIN_STATE_DIR
        from ..utils.io import load_state_into

        folder = Path(directory) / PLUGIN_STATE_DIR / self.name
        if not folder.is_dir():
            return None
        load_state_into(self, folder)  # errors name the folder
        return self.library.model

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from peft import LoraConfig, set_peft_model_state_dict

        self.router.load_state_dict(state["router"])
        infos = [ExpertInfo.from_dict(d) for d in state["library"]["experts"]]
        for info in infos:
            if info.name not in self.library:
                entry = state["adapters"][info.name]
                known = set(LoraConfig.__dataclass_fields__)
                config = LoraConfig(**{k: v for k, v in entry["config"].items() if k in known})
                self.library.create(info.name, lora_config=config, activate=False)
            set_peft_model_state_dict(
                self.library.model, state["adapters"][info.name]["weights"], adapter_name=info.name
            )
            self.library.experts[info.name] = info
        self.task_expert = dict(state["task_expert"])
        self.task_accuracy = {k: float(v) for k, v in state["task_accuracy"].items()}
        self.task_signatures = {k: v.float() for k, v in state["task_signatures"].items()}
        self.decisions = list(state["decisions"])
