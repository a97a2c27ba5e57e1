"""`ExpertRoutingPlugin`: the router chooses, for every task of a sequence, which LoRA expert trains on it.

Before each task (`setup_task`) the task's signature (from its tokenized training rows, backbone only) is routed:
reuse the best expert, fork it into a new one, or create a new one; the plugin asks the trainer to train the
library's `PeftModel` with the chosen expert as the active, trainable adapter (a `TaskSetup`: the trainer alone
swaps the model, activates the adapter and rebuilds optimizer and scheduler). At `on_task_end` the expert's
profile is recomputed from the task's validation rows (the mean of the signatures of the tasks it serves), its
accuracy is recorded, and for a reuse the outcome (did the tasks it served before keep their accuracy within
`tolerance`?) goes back to the router (rewards, τ, calibration, and the learned scorer, refitted from all
outcomes). Each finished task is scored with its own expert (`adapter_for_task`).

A reuse is checked before it is committed (`verify_reuse`, default on): the task trains a fork of the chosen
expert (a copy under the task's own expert name), and at task end the tasks the original expert served are
evaluated with the fork. If any of them loses more than `tolerance`, the original stays untouched and the fork
stays as the task's own expert (a failed reuse, rolled back); otherwise the fork's weights replace the original's
and the fork is deleted (a successful reuse: one expert). Without the check a wrong reuse trains over the old
tasks' expert and cannot be undone.

A created expert starts from peft's fresh LoRA (`meta_init_method='fresh'`, the default) or from an initialisation
meta-learned over the earlier tasks (Reptile, Reptile over the stored experts, first-order MAML:
`hf_adaptive.experts.meta_init`): at task end the plugin keeps a seeded sample of the task's training rows, and at
the next creation it trains the kept phi further over them and writes it into the new expert (both LoRA factors).
Forks and reuses are unchanged.

The router decides which adapter trains, so the trainer's own `adapter_strategy` must be `'full'` (the only
strategy that adds no adapter of its own); any other is refused, naming the option. By name
(`plugins: [expert_routing]` in a YAML config) it is built by `from_config` from the `router_*`, `signature_*` and
`meta_init_*` options (`EXPERT_ROUTING_OPTIONS`), with the experts' LoRA shape from the trainer's `lora_*` options;
its decisions go into `results.json` (`extra_results`).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import torch

from ..adapters import expert_name, lora_config_from_args
from ..plugins import PLUGIN_STATE_DIR, ContinualPlugin, TaskContext, TaskSetup
from ..tasks import Task
from ..utils.io import StateLoadError
from ..utils.options import build_config
from ..utils.validation import OptionError, check_number, fail
from .config import EXPERT_ROUTING_OPTIONS, ExpertRoutingConfig, MetaInitConfig, SignatureConfig
from .library import ExpertInfo, ExpertLibrary
from .meta_init import MetaInitializer
from .router import Router, RoutingDecision
from .signature import TaskSignature

__all__ = ["ExpertRoutingPlugin", "check_tolerance", "signature_dim"]


def check_tolerance(tolerance: float) -> None:
    """The accuracy drop of earlier tasks a reuse may cost and still count as a success: a number in [0, 1]."""
    check_number("ExpertRoutingPlugin", "tolerance", tolerance, 0.0, 1.0)


def signature_dim(model: torch.nn.Module, config: SignatureConfig) -> int:
    """Size of the signatures `config` gives on `model`, found without a tokenizer (the text part is `text_dim`,
    else the sentence encoder's or the backbone's hidden size); also checks `config.layers` against the model."""
    return TaskSignature(model, None, config).dim


def _check_strategy(args: Any) -> None:
    """Routing decides which adapter trains: the trainer must add none of its own (`adapter_strategy='full'`)."""
    strategy = getattr(args, "adapter_strategy", "full")
    if strategy != "full":
        fail(
            type(args).__name__,
            "adapter_strategy",
            strategy,
            "use 'full' with the expert_routing plugin (the router chooses which LoRA expert trains for each task)",
        )


class ExpertRoutingPlugin(ContinualPlugin):
    name = "expert_routing"
    options = EXPERT_ROUTING_OPTIONS
    needs_model = True

    def __init__(
        self,
        library: ExpertLibrary,
        router: Router,
        signature_config: SignatureConfig | None = None,
        config: ExpertRoutingConfig | None = None,
        meta_init: MetaInitConfig | None = None,
        **overrides: Any,
    ) -> None:
        """`library` and `router` (objects), the signatures' settings, the plugin's own settings (`config` and/or
        keyword overrides of its fields: `tolerance=`, `eval_limit=`, `verify_reuse=`) and how a created expert is
        initialised (`meta_init`; None: fresh)."""
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(ExpertRoutingConfig)})
        if unknown:
            raise TypeError(
                f"ExpertRoutingPlugin got unknown option(s) {unknown}: the options are the fields of "
                f"ExpertRoutingConfig {[f.name for f in dataclasses.fields(ExpertRoutingConfig)]}"
            )
        try:
            self.config = dataclasses.replace(config or ExpertRoutingConfig(), **overrides)
        except OptionError as err:  # a keyword the caller gave this constructor: named as the plugin's
            raise (err.renamed(type(self).__name__, err.field) if err.field in overrides else err) from None
        self.library = library
        self.router = router
        self.library.router = router
        self.signature_config = signature_config or SignatureConfig()
        if meta_init is not None and not isinstance(meta_init, MetaInitConfig):
            raise TypeError(
                f"ExpertRoutingPlugin.meta_init={meta_init!r} is not allowed: a MetaInitConfig (or None: fresh experts)"
            )
        #: the initialisation of created experts (meta-learned phi and the rows it learns from)
        self.meta_init = MetaInitializer(meta_init)
        #: whether the experts' LoRA shape follows the trainer's `lora_*` options (a plugin built by name)
        self.lora_from_trainer = False
        self.task_expert: dict[str, str] = {}
        self.task_accuracy: dict[str, float] = {}
        self.task_signatures: dict[str, torch.Tensor] = {}
        self.decisions: list[dict[str, Any]] = []
        self._pending: tuple[RoutingDecision, torch.Tensor] | None = None
        #: during a checked reuse: (the reused expert, the fork that trains instead)
        self._trial: tuple[str, str] | None = None

    # the plugin's own settings, read (and set) as attributes
    def _set(self, **value: Any) -> None:
        self.config = dataclasses.replace(self.config, **value)

    tolerance = property(lambda self: self.config.tolerance, lambda self, v: self._set(tolerance=v))
    eval_limit = property(lambda self: self.config.eval_limit, lambda self, v: self._set(eval_limit=v))
    verify_reuse = property(lambda self: self.config.verify_reuse, lambda self, v: self._set(verify_reuse=v))

    @classmethod
    def from_config(cls, config: Any, model: torch.nn.Module | None = None) -> ExpertRoutingPlugin:
        """Library, signature and router from the options on `config` (a `ContinualConfig`): signatures from
        `signature_*`, the router from `router_*` sized by the signature (computed on `model`), the plugin's own
        `router_tolerance` / `router_eval_limit` / `router_verify_reuse`; the experts' LoRA shape from `lora_*`.

        The library wraps `model` with the first expert; the trainer may be given `model` itself.
        """
        if model is None:
            raise ValueError(
                "ExpertRoutingPlugin.from_config: model=None is not allowed: the experts are LoRA adapters on the model"
            )
        _check_strategy(config)
        owner = type(config).__name__
        router_options, signature_options, plugin_options, meta_options = cls.options
        signature_config = build_config(signature_options, config, owner=owner)
        try:
            dim = signature_dim(model, signature_config)
        except OptionError as err:  # e.g. a signature_layers entry that names nothing in the model
            names = signature_options.names()
            if err.owner != "SignatureConfig" or err.field not in names:
                raise
            raise err.renamed(owner, names[err.field]) from None
        router = Router(build_config(router_options, config, owner=owner, dim=dim))
        library = ExpertLibrary(model, experiment_id=getattr(config, "run_name", None) or "")
        if hasattr(config, "lora_r"):
            library.lora_config = lora_config_from_args(config)
        plugin = cls(
            library,
            router,
            signature_config,
            build_config(plugin_options, config, owner=owner),
            meta_init=build_config(meta_options, config, owner=owner),
        )
        plugin.lora_from_trainer = True
        return plugin

    # ------------------------------------------------------------------ helpers
    def _signer(self, tokenizer: Any) -> TaskSignature:
        signer = TaskSignature(self.library.model, tokenizer, self.signature_config)
        if signer.dim != self.router.config.dim:
            raise ValueError(
                f"signature dimension {signer.dim} ({signer.part_dims}) does not match RouterConfig.dim="
                f"{self.router.config.dim}"
            )
        return signer

    def _new_name(self, task: Task) -> str:
        base = expert_name(task.name)
        name, i = base, 1
        while name in self.library:
            i += 1
            name = f"{base}_{i}"
        return name

    def _accuracy(self, trainer: Any, task: Task, expert: str) -> float:
        from ..tasks import task_accuracy
        from ..tasks.prompting import scoring_options

        self.library.model.set_adapter(expert)
        return task_accuracy(
            self.library.model,
            trainer.processing_class,
            task,
            "eval",
            limit=self.eval_limit,
            **scoring_options(getattr(trainer, "args", None)),
        )

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
    def setup_task(self, trainer: Any, context: TaskContext) -> TaskSetup:
        """Route the task (its signature from `context.train_dataset`) and ask the trainer to train the chosen
        expert: the library's model with that adapter active and trainable."""
        _check_strategy(trainer.args)
        task = context.task
        owned = (self.library.model, self.library.base_model())  # the backbone: a trainer restored from a snapshot
        if len(self.library) and not any(trainer.model is m for m in owned):
            raise ValueError("ExpertRoutingPlugin: the trainer's model must be the library's model (library.model)")
        if self.lora_from_trainer and hasattr(trainer.args, "lora_r"):  # the experts' shape: the trainer's lora_*
            self.library.lora_config = lora_config_from_args(trainer.args)
        signer = self._signer(context.tokenizer)
        vector = signer.compute(task, split="train", dataset=context.train_dataset).vector
        query = self._from_main_process(trainer, vector)
        decision = self.router.route(query)
        self._trial = None
        init = None
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
                init = self._meta_initialise(trainer, context, expert)  # None: the expert stays fresh
            new = expert
        self.router.record_decision(decision, new_expert=new, query=query)
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
        if init is not None:  # the created expert started from the meta-learned phi (not fresh)
            self.decisions[-1]["init"] = init
        # the first expert (or a restored library) wrapped the backbone: the trainer moves to the library's model
        return TaskSetup(model=self.library.model, adapter=expert)

    def _meta_initialise(self, trainer: Any, context: TaskContext, expert: str) -> dict[str, Any] | None:
        """Start the just-created `expert` from the meta-learned initialisation (None: left fresh, e.g. 'fresh' or
        the first expert). 'reptile_experts' learns from the experts of the finished tasks; phi is broadcast from
        the main process, so every process trains the same expert."""
        if not self.meta_init.enabled:
            return None
        experts = None
        if self.meta_init.config.method == "reptile_experts":
            from peft import get_peft_model_state_dict

            experts = {
                task: {k: v.detach() for k, v in get_peft_model_state_dict(self.library.model, adapter_name=e).items()}
                for task, e in self.task_expert.items()
                if e in self.library and e != expert
            }
        return self.meta_init.initialise(
            self.library.model,
            expert,
            context.collator,
            experts=experts,
            sync=lambda tensor: self._from_main_process(trainer, tensor),
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

    def on_task_end(self, trainer: Any, context: TaskContext) -> None:
        task = context.task
        decision, query = self._pending or (None, None)
        trial, outcome, measured = self._trial, None, {}
        if trial is not None:
            expert, outcome, measured = self._commit_trial(trainer, task)
            self.task_expert[task.name] = expert
            self._trial = None
        expert = self.task_expert[task.name]
        signer = self._signer(context.tokenizer)
        vector = signer.compute(task, split="eval", dataset=context.eval_dataset).vector
        self.task_signatures[task.name] = self._from_main_process(trainer, vector)
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
        self.meta_init.remember(task.name, context.train_dataset)  # rows for the next meta-learned initialisation
        self._pending = None

    def adapter_for_task(self, task_name: str) -> str | None:
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
        state = {
            "router": self.router.state_dict(),
            "library": self.library.manifest(),
            "adapters": adapters,
            "task_expert": dict(self.task_expert),
            "task_accuracy": dict(self.task_accuracy),
            "task_signatures": dict(self.task_signatures),
            "decisions": list(self.decisions),
        }
        if self.meta_init.enabled or self.meta_init.phi is not None or self.meta_init.rows:
            state["meta_init"] = self.meta_init.state_dict()  # (fresh experts: the state of before, unchanged)
        return state

    def restore_model(self, snapshot: Path, model: torch.nn.Module) -> torch.nn.Module | None:
        """Before the trainer loads an end-of-task snapshot into `model`: load this plugin's state saved in
        `snapshot` (experts, weights, router) onto the library's model (`model` itself, or the library built on
        it) and return that model, which has the adapters the snapshot's weights load into (the trainer's fresh
        backbone has none). None: the snapshot holds no state of this plugin."""
        from ..utils.io import load_state_into

        folder = Path(snapshot) / PLUGIN_STATE_DIR / self.name
        if not folder.is_dir():
            return None
        load_state_into(self, folder)  # errors name the folder
        return self.library.model

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from peft import LoraConfig, set_peft_model_state_dict

        meta = MetaInitializer(self.meta_init.config)  # checked first; a state saved without it: nothing learned yet
        if "meta_init" in state:
            meta.load_state_dict(state["meta_init"])
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
        self._check_phi(meta)
        self.meta_init = meta

    def _check_phi(self, meta: MetaInitializer) -> None:
        """A restored phi has the keys and shapes of an expert of the library (the one it initialised, at least):
        else it belongs to another model or LoRA shape and would fail at the next creation."""
        from peft import get_peft_model_state_dict

        if meta.phi is None:
            return
        shape = {k: tuple(v.shape) for k, v in meta.phi.items()}
        for name in self.library.names:
            weights = get_peft_model_state_dict(self.library.model, adapter_name=name)
            if {k: tuple(v.shape) for k, v in weights.items()} == shape:
                return
        raise StateLoadError(
            f"MetaInitializer.phi ({len(shape)} tensors, e.g. {next(iter(shape.items()))}) is not allowed: it matches "
            f"the weights of no expert of the library {self.library.names} (another model or LoRA shape?)"
        )
