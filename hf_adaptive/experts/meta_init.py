"""Meta-learned initialisation of new LoRA experts: Reptile and first-order MAML over the earlier tasks.

A fresh LoRA expert starts at the base model (B = 0) and learns its task from nothing; a fork of the nearest
expert starts from one earlier task's solution. A meta-learned start phi (both factors, A and B) is instead a
point from which a few SGD steps go far on any of the earlier tasks. Three ways to learn it (`MetaInitConfig`):

* ``reptile`` (Nichol et al. 2018): ``phi <- phi + eps * mean_i (W_i - phi)``, ``W_i`` = phi after k plain SGD
  steps on task i's kept rows (one sampled batch per step);
* ``reptile_experts``: the same update with ``W_i`` = the trained weights of task i's expert (the "k = a whole
  training" limit: no inner loop, no rows kept). n outer steps give ``mean_i W_i + (1 - eps)^n (phi_0 - mean_i W_i)``.
  LoRA factors of experts that started from different random A matrices are not aligned, so their mean is not the
  mean of their updates; it is sensible once the experts themselves start from phi (which this module makes so);
* ``fomaml`` (first-order MAML, Finn et al. 2017): ``phi <- phi - beta * mean_i grad L_i^query(phi_i')``,
  ``phi_i'`` = phi after k SGD steps on task i's support batch, the gradient taken at ``phi_i'`` (the second-order
  terms of MAML dropped).

The inner loops are pure functions of the adapter's tensors: `torch.func.functional_call` runs the model with the
parameters of the new expert (the "slot", the active adapter) replaced by a dict of tensors and `torch.func.grad`
differentiates the loss with respect to that dict only, so the backbone stays a constant, no optimizer, module
copy or `.grad` field is involved, and the live weights are untouched until phi is written into the new expert.
The model runs in eval mode meanwhile (no dropout; the sampled batches alone make the randomness, from `seed`).

phi is state (`state_dict`): kept between creations and trained further at each, so a resumed run continues it.
The first meta-training starts phi at the new expert's own fresh initialisation (peft's). Memory: `rows_per_task`
tokenized training rows per finished task (a seeded sample; none for 'fresh' and 'reptile_experts') and phi, one
adapter's size.
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch

from ..utils.io import StateLoadError, check_tensor
from .config import MetaInitConfig

__all__ = [
    "ROW_KEYS",
    "MetaInitializer",
    "MetaLearner",
    "adapter_parameters",
    "fomaml_update",
    "meta_generator",
    "reptile_update",
]

#: a tensor per adapter weight, keyed like peft's state dict of one adapter (the adapter name removed)
ParamDict = dict[str, torch.Tensor]
Batch = dict[str, torch.Tensor]
#: the columns of a tokenized training row that the meta-learning keeps (what the collator pads)
ROW_KEYS = ("input_ids", "attention_mask", "labels")


def meta_generator(seed: int, kind: str, salt: int | str) -> torch.Generator:
    """A CPU generator seeded from (`seed`, `kind`, `salt`), the same in every process and Python run (crc32, not
    Python's salted `hash`): 'rows' of a task by its name, 'meta' of the n-th meta-training."""
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}/{kind}/{salt}".encode()))


def adapter_parameters(model: torch.nn.Module, adapter: str) -> dict[str, str]:
    """peft state-dict key of each weight of `adapter` (its name removed, as `get_peft_model_state_dict` writes it)
    -> the name of that parameter in `model`."""
    marker = f".{adapter}."
    names = {name.replace(marker, ".", 1): name for name, _ in model.named_parameters() if marker in name}
    if not names:
        raise ValueError(f"MetaLearner.adapter={adapter!r} is not allowed: the model has no parameter of that adapter")
    return names


def reptile_update(phi: ParamDict, targets: Sequence[ParamDict], epsilon: float) -> ParamDict:
    """Reptile's outer step: ``phi + epsilon * mean_i (W_i - phi)`` over the adapted weights `targets` (``W_i``)."""
    if not targets:
        raise ValueError("reptile_update targets=[] is not allowed: give the adapted weights of at least one task")
    return {k: p + epsilon * torch.stack([w[k] - p for w in targets]).mean(0) for k, p in phi.items()}


def fomaml_update(phi: ParamDict, grads: Sequence[ParamDict], beta: float) -> ParamDict:
    """First-order MAML's outer step: ``phi - beta * mean_i g_i``, ``g_i`` the query gradients at the adapted
    weights."""
    if not grads:
        raise ValueError("fomaml_update grads=[] is not allowed: give the query gradient of at least one task")
    return {k: p - beta * torch.stack([g[k] for g in grads]).mean(0) for k, p in phi.items()}


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode (no dropout, no activation checkpointing) and no autograd graph outside `torch.func.grad`."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():  # torch.func.grad still differentiates inside (it ignores an outer no_grad)
            yield
    finally:
        model.train(was_training)


class MetaLearner:
    """The inner and outer updates of meta-learning on `model`, run through the parameters of adapter `slot` (the
    active adapter): pure functions of a `ParamDict`, the backbone a constant. Call them in eval mode under
    `torch.no_grad()` (`MetaInitializer` does), or the model's other trainable parameters grow a graph."""

    def __init__(self, model: torch.nn.Module, slot: str) -> None:
        self.model, self.slot = model, slot
        self.names = adapter_parameters(model, slot)
        self._grad = torch.func.grad(self._loss)

    def _loss(self, params: ParamDict, batch: Batch) -> torch.Tensor:
        named = {self.names[k]: v for k, v in params.items()}
        return torch.func.functional_call(self.model, named, args=(), kwargs=batch).loss

    def current(self) -> ParamDict:
        """The slot's weights now (detached copies)."""
        live = dict(self.model.named_parameters())
        return {k: live[n].detach().clone() for k, n in self.names.items()}

    def write(self, params: ParamDict) -> None:
        """Copy `params` into the slot's parameters (every weight of the slot, nothing else)."""
        self.check(params, "params")
        live = dict(self.model.named_parameters())
        with torch.no_grad():
            for k, n in self.names.items():
                live[n].copy_(params[k])

    def check(self, params: Mapping[str, torch.Tensor], what: str) -> None:
        """`params` has exactly the slot's weights and shapes (else a ValueError naming `what`)."""
        live = dict(self.model.named_parameters())
        if set(params) != set(self.names):
            missing, extra = sorted(set(self.names) - set(params)), sorted(set(params) - set(self.names))
            raise ValueError(
                f"MetaLearner.{what} is not allowed: its weights differ from those of adapter {self.slot!r} "
                f"(missing {missing[:3]}, unexpected {extra[:3]}): the experts' LoRA shape changed?"
            )
        for k, n in self.names.items():
            if tuple(params[k].shape) != tuple(live[n].shape):
                raise ValueError(
                    f"MetaLearner.{what}[{k!r}].shape={tuple(params[k].shape)} is not allowed: adapter "
                    f"{self.slot!r} has {tuple(live[n].shape)} (the experts' LoRA rank or modules changed?)"
                )

    def loss(self, params: ParamDict, batch: Batch) -> torch.Tensor:
        """The model's loss on `batch` with the slot's weights = `params`."""
        return self._loss(params, batch)

    def gradient(self, params: ParamDict, batch: Batch) -> ParamDict:
        """d loss / d params on `batch` (`torch.func.grad`)."""
        return self._grad(params, batch)

    def adapt(self, params: ParamDict, batches: Sequence[Batch], lr: float) -> ParamDict:
        """The inner loop: one plain SGD step ``params - lr * grad`` per batch, in order."""
        for batch in batches:
            grad = self.gradient(params, batch)
            params = {k: p - lr * grad[k] for k, p in params.items()}
        return params

    def reptile_step(self, phi: ParamDict, plans: Sequence[Sequence[Batch]], lr: float, epsilon: float) -> ParamDict:
        """One Reptile outer update: ``W_i = adapt(phi, plans[i])``, then `reptile_update`."""
        return reptile_update(phi, [self.adapt(phi, batches, lr) for batches in plans], epsilon)

    def fomaml_step(
        self, phi: ParamDict, plans: Sequence[tuple[Sequence[Batch], Batch]], lr: float, beta: float
    ) -> ParamDict:
        """One first-order MAML outer update over `(support batches, query batch)` per task."""
        grads = [self.gradient(self.adapt(phi, support, lr), query) for support, query in plans]
        return fomaml_update(phi, grads, beta)


def _int_rows(value: Any, what: str) -> list[list[int]]:
    if not isinstance(value, list) or not all(
        isinstance(r, list) and r and all(isinstance(x, int) and not isinstance(x, bool) for x in r) for r in value
    ):
        raise StateLoadError(f"MetaInitializer.{what}={value!r:.120} is not allowed: expected lists of token ids")
    return value


class MetaInitializer:
    """The meta-learned initialisation of the routing plugin's new experts, and the memory it learns from.

    `remember` keeps a seeded sample of each finished task's rows; `initialise` meta-trains phi over the earlier
    tasks (`outer_steps` updates, continuing the phi of the previous creation) and writes it into a newly created
    expert. With method 'fresh' both do nothing.
    """

    def __init__(self, config: MetaInitConfig | None = None) -> None:
        self.config = config or MetaInitConfig()
        #: the meta-learned initialisation (CPU, float32), None until the first meta-training
        self.phi: ParamDict | None = None
        #: task name -> its kept training rows (ROW_KEYS -> token ids)
        self.rows: dict[str, dict[str, list[list[int]]]] = {}
        #: meta-trainings done (salts the sampling generator, so a resumed run draws the same batches)
        self.rounds = 0

    @property
    def enabled(self) -> bool:
        return self.config.method != "fresh"

    @property
    def keeps_rows(self) -> bool:
        return self.config.method in ("reptile", "fomaml")

    # ------------------------------------------------------------------ memory
    def remember(self, task_name: str, dataset: Any) -> None:
        """Keep `rows_per_task` of the task's tokenized training rows (a sample seeded by `seed` and the task name;
        a task seen again replaces its rows). Nothing for methods without an inner loop."""
        if not self.keeps_rows:
            return
        n = len(dataset)
        if n == 0:
            return
        order = torch.randperm(n, generator=meta_generator(self.config.seed, "rows", task_name))
        kept: dict[str, list[list[int]]] = {}
        for i in order[: self.config.rows_per_task].tolist():
            row = dataset[i]
            if "input_ids" not in row:
                raise ValueError(f"MetaInitializer.remember: rows of task {task_name!r} lack 'input_ids'")
            for key in ROW_KEYS:
                if key in row:
                    kept.setdefault(key, []).append([int(x) for x in row[key]])
        self.rows[task_name] = kept

    def _task_rows(self, name: str) -> list[dict[str, list[int]]]:
        columns = self.rows[name]
        return [{k: columns[k][i] for k in columns} for i in range(len(columns["input_ids"]))]

    # ------------------------------------------------------------------ sampling
    def _inner_plan(self, rows: list[dict[str, list[int]]], gen: torch.Generator, collate: Callable) -> Any:
        """The batches of one task for one outer step: Reptile, k batches of `support_batch_size` rows (each an
        independent draw without replacement); FOMAML, one support batch (used for the k steps) and a disjoint query
        batch. A task with fewer rows uses what it has (FOMAML: at least one row each; one row: query = support)."""
        cfg, n = self.config, len(rows)
        if cfg.method == "reptile":
            size = min(cfg.support_batch_size, n)
            return [
                collate([rows[i] for i in torch.randperm(n, generator=gen)[:size].tolist()])
                for _ in range(cfg.inner_steps)
            ]
        order = torch.randperm(n, generator=gen).tolist()
        s = min(cfg.support_batch_size, max(1, n - 1))
        q = min(cfg.query_batch_size, n - s)
        support = collate([rows[i] for i in order[:s]])
        query = collate([rows[i] for i in order[s : s + q]]) if q else support
        return [support] * cfg.inner_steps, query

    def _choose(self, tasks: list[str], gen: torch.Generator) -> list[str]:
        m = self.config.tasks_per_step
        if m is None or m >= len(tasks):
            return list(tasks)
        return [tasks[i] for i in torch.randperm(len(tasks), generator=gen)[:m].tolist()]

    # ------------------------------------------------------------------ meta-training
    def initialise(
        self,
        model: torch.nn.Module,
        adapter: str,
        collator: Callable[[list[dict[str, Any]]], Batch] | None = None,
        experts: Mapping[str, ParamDict] | None = None,
        sync: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> dict[str, Any] | None:
        """Meta-train phi over the earlier tasks and write it into `adapter`, a newly created expert (active).

        Tasks: those with kept rows ('reptile', 'fomaml'; `collator` pads them) or the entries of `experts` (task
        name -> its expert's weights, peft keys; 'reptile_experts'; experts of another shape are left out). None
        and the adapter left as it is when there is no earlier task (the first expert) or the method is 'fresh'.
        `sync`: applied to every tensor of the new phi (the routing plugin broadcasts the main process's under
        DDP). Returns what was done (method, tasks, outer steps), for the routing decisions.
        """
        if not self.enabled:
            return None
        cfg = self.config
        learner = MetaLearner(model, adapter)
        start = learner.current()
        if self.phi is not None:
            learner.check(self.phi, "phi")
        if cfg.method == "reptile_experts":
            targets = {}
            for task, weights in (experts or {}).items():
                try:
                    learner.check(weights, f"experts[{task!r}]")
                except ValueError:
                    continue  # another LoRA shape (e.g. a merged expert): not a point of this parameter space
                targets[task] = weights
            tasks = list(targets)
        else:
            if collator is None:
                raise ValueError(f"MetaInitializer.initialise collator=None is not allowed with {cfg.method!r}")
            tasks = [t for t, columns in self.rows.items() if columns.get("input_ids")]
        if not tasks:
            return None
        live = dict(model.named_parameters())
        dtype = {k: live[n].dtype for k, n in learner.names.items()}
        device = live[next(iter(learner.names.values()))].device
        phi = {k: (self.phi if self.phi is not None else start)[k].to(device=device, dtype=dtype[k]) for k in start}
        gen = meta_generator(cfg.seed, "meta", self.rounds)

        def collate(rows: list[dict[str, Any]]) -> Batch:
            return {k: v.to(device) for k, v in collator(rows).items()}  # type: ignore[misc]

        with _eval_mode(model):
            for _ in range(cfg.outer_steps):
                chosen = self._choose(tasks, gen)
                if cfg.method == "reptile_experts":
                    weights = [{k: targets[t][k].to(device=device, dtype=dtype[k]) for k in phi} for t in chosen]
                    phi = reptile_update(phi, weights, cfg.outer_lr)
                elif cfg.method == "reptile":
                    plans = [self._inner_plan(self._task_rows(t), gen, collate) for t in chosen]
                    phi = learner.reptile_step(phi, plans, cfg.inner_lr, cfg.outer_lr)
                else:
                    plans = [self._inner_plan(self._task_rows(t), gen, collate) for t in chosen]
                    phi = learner.fomaml_step(phi, plans, cfg.inner_lr, cfg.outer_lr)
        new = {k: v.detach().to(device="cpu", dtype=torch.float32).clone() for k, v in phi.items()}
        if sync is not None:
            new = {k: sync(v).to(device="cpu", dtype=torch.float32) for k, v in new.items()}
        for k, v in new.items():
            if not bool(torch.isfinite(v).all()):
                raise FloatingPointError(
                    f"MetaInitializer: the meta-learned phi[{k!r}] is not finite: lower meta_init_inner_lr "
                    f"({cfg.inner_lr}) or meta_init_outer_lr ({cfg.outer_lr})"
                )
        self.phi = new
        self.rounds += 1
        learner.write(new)
        return {"method": cfg.method, "tasks": tasks, "outer_steps": cfg.outer_steps, "round": self.rounds}

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "method": self.config.method,
            "rounds": self.rounds,
            "phi": None if self.phi is None else {k: v.clone() for k, v in self.phi.items()},
            "rows": {t: {k: [list(r) for r in v] for k, v in columns.items()} for t, columns in self.rows.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Inverse of `state_dict`, every value checked (a `StateLoadError` names the field): phi finite floating
        tensors, rows lists of token ids of matching lengths, rounds an integer >= 0. Nothing changes on an error."""
        rounds = state.get("rounds")
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
            raise StateLoadError(f"MetaInitializer.rounds={rounds!r} is not allowed: expected an integer >= 0")
        phi = state.get("phi")
        if phi is not None:
            if not isinstance(phi, Mapping) or not phi:
                raise StateLoadError(f"MetaInitializer.phi={phi!r:.120} is not allowed: expected adapter tensors")
            phi = {
                k: check_tensor(f"MetaInitializer.phi[{k!r}]", v, floating=True).float().clone() for k, v in phi.items()
            }
        rows = state.get("rows")
        if not isinstance(rows, Mapping):
            raise StateLoadError(f"MetaInitializer.rows={rows!r:.120} is not allowed: expected task name -> rows")
        kept: dict[str, dict[str, list[list[int]]]] = {}
        for task, columns in rows.items():
            if not isinstance(columns, Mapping) or "input_ids" not in columns or not set(columns) <= set(ROW_KEYS):
                raise StateLoadError(
                    f"MetaInitializer.rows[{task!r}]={columns!r:.120} is not allowed: expected columns {ROW_KEYS} "
                    "(input_ids required)"
                )
            ids = _int_rows(columns["input_ids"], f"rows[{task!r}]['input_ids']")
            for key, values in columns.items():
                values = _int_rows(values, f"rows[{task!r}][{key!r}]")
                if [len(r) for r in values] != [len(r) for r in ids]:
                    raise StateLoadError(
                        f"MetaInitializer.rows[{task!r}][{key!r}] is not allowed: its rows' lengths differ from "
                        "those of input_ids"
                    )
            kept[task] = {k: [list(r) for r in v] for k, v in columns.items()}
        self.rounds, self.phi, self.rows = rounds, phi, kept
