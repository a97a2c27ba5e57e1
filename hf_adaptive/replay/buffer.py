"""`ReplayMemory`: an exact, count-capped memory of past tokenized examples.

Why a memory of token ids and not of text: replaying needs no re-tokenization, and what is replayed is
exactly what was trained on. Two admission policies:

* ``"reservoir"`` (Vitter's algorithm R over the whole stream): after ``n`` examples were offered, every one
  of them is in memory with probability ``capacity / n``, whatever task it came from. The ``n``-th offered
  example (0-based) is stored if the memory is not full; otherwise a slot ``j ~ U{0..n}`` is drawn and the
  example replaces slot ``j`` when ``j < capacity``.
* ``"balanced"`` (per-task balanced): the capacity is split into equal shares, one per task seen so far
  (the first ``capacity mod T`` tasks, in order of arrival, get one more). Inside its share a task keeps a
  uniform sample of its examples (algorithm R per task). When a new task arrives the older tasks shrink to
  their new share by dropping a uniformly drawn subset, which keeps each of them a uniform sample. A row may
  carry its class ``label`` (an int): the shrink is then stratified, each label keeping the largest-remainder
  share (`_common.apportion`) of the labels *offered* for that task, so a task stored as a stratified sample
  (`ReplayPlugin` offers exactly its share) stays one.

Every random draw comes from one seeded ``torch.Generator`` whose state is part of ``state_dict``, so a
resumed run admits and samples exactly as an uninterrupted one.

Memory bound: an item of ``L`` tokens costs ``8 L`` bytes of payload (``input_ids`` and ``labels`` as
int32) plus ~ 200 bytes of Python/tensor object overhead; the memory holds at most ``capacity`` items, so at
most ``capacity × (8 L_max + 200)`` bytes (``nbytes()`` reports the payload). On the built-in suite
(``L = 13``) that is 104 bytes of payload per item, ~ 60 KB for the default 200 items with overhead.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from ..utils.validation import check_choice, check_number, check_str
from ._common import apportion
from .config import REPLAY_POLICIES

_FIELDS = ("input_ids", "labels")
NO_LABEL = -1  # the stratum of a row offered without a class label


def _as_int32(values: Any) -> torch.Tensor:
    return torch.as_tensor(values, dtype=torch.int32).reshape(-1).clone()


class ReplayMemory:
    """A capped memory of ``{"input_ids", "labels"}`` rows tagged with their task.

    Args:
        capacity: the most items kept (>= 1).
        policy: ``"reservoir"`` or ``"balanced"``, see the module docstring.
        seed: seed of the generator behind every admission and sampling draw.
    """

    def __init__(self, capacity: int, policy: str = "balanced", seed: int = 0) -> None:
        check_number("ReplayMemory", "capacity", capacity, 1, integer=True)
        check_choice("ReplayMemory", "policy", policy, REPLAY_POLICIES)
        check_number("ReplayMemory", "seed", seed, integer=True)
        self.capacity = capacity
        self.policy = policy
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self.tasks: list[str] = []  # in order of arrival
        self.seen: dict[str, int] = {}  # examples offered per task
        self.seen_labels: dict[str, dict[int, int]] = {}  # examples offered per task and class label
        self.total_seen = 0
        # an item is one int32 tensor [2, L] (input_ids; labels), a single object to keep the overhead small,
        # with its class label (NO_LABEL if none). reservoir: one list of (task, item, label); balanced: one list
        # of (item, label) per task
        self._items: list[tuple[str, torch.Tensor, int]] = []
        self._per_task: dict[str, list[tuple[torch.Tensor, int]]] = {}

    # ------------------------------------------------------------------ admission
    def _randint(self, high: int) -> int:
        """A uniform draw from {0, ..., high - 1}."""
        return int(torch.randint(high, (1,), generator=self.generator).item())

    def quota(self, task: str) -> int:
        """The share of `task` under the balanced policy (tasks seen so far)."""
        base, extra = divmod(self.capacity, max(len(self.tasks), 1))
        return base + (1 if self.tasks.index(task) < extra else 0)

    def share(self, task: str) -> int:
        """The balanced share `task` has, or would have once added (without registering it)."""
        if task in self.seen:
            return self.quota(task)
        base, extra = divmod(self.capacity, len(self.tasks) + 1)
        return base + (1 if len(self.tasks) < extra else 0)

    def register(self, task: str) -> None:
        """Announce `task` (no-op if known): under ``"balanced"`` the older tasks shrink to their new share now."""
        check_str("ReplayMemory", "task", task)
        if task in self.seen:
            return
        self.tasks.append(task)
        self.seen[task] = 0
        self.seen_labels[task] = {}
        if self.policy == "balanced":
            self._per_task[task] = []
            for name in self.tasks:  # older tasks shrink to their new share
                if len(self._per_task[name]) > self.quota(name):
                    self._shrink(name, self.quota(name))

    def _shrink(self, task: str, keep: int) -> None:
        """Keep `keep` of the task's items: a uniform subset per label, label counts by `apportion` of the labels
        offered (capped by what is stored; a shortfall goes to the labels with items to spare, largest first)."""
        items = self._per_task[task]
        by_label: dict[int, list[int]] = {}
        for i, (_, label) in enumerate(items):
            by_label.setdefault(label, []).append(i)
        if len(by_label) == 1:
            order = torch.randperm(len(items), generator=self.generator)[:keep].sort().values.tolist()
            self._per_task[task] = [items[i] for i in order]
            return
        offered = self.seen_labels.get(task, {})
        weights = {k: offered.get(k, 0) or len(v) for k, v in by_label.items()}
        quota = {k: min(q, len(by_label[k])) for k, q in apportion(weights, keep).items()}
        for k in sorted(by_label, key=lambda k: (-(len(by_label[k]) - quota[k]), k)):
            extra = min(keep - sum(quota.values()), len(by_label[k]) - quota[k])
            quota[k] += max(extra, 0)
        picked: list[int] = []
        for k in sorted(by_label):
            members = by_label[k]
            picked += [members[j] for j in torch.randperm(len(members), generator=self.generator)[: quota[k]].tolist()]
        self._per_task[task] = [items[i] for i in sorted(picked)]

    def add(self, task: str, rows: Iterable[Mapping[str, Any]]) -> None:
        """Offer `rows` (each with ``input_ids`` and ``labels``, optionally an int class ``label``) of `task`."""
        self.register(task)
        for row in rows:
            missing = [f for f in _FIELDS if f not in row]
            if missing:
                raise ValueError(f"ReplayMemory.add: a row of task {task!r} lacks {missing}")
            ids, labels = (_as_int32(row[f]) for f in _FIELDS)
            if ids.numel() != labels.numel() or ids.numel() == 0:
                raise ValueError(f"ReplayMemory.add: a row of task {task!r} has empty or mismatched input_ids/labels")
            label = row.get("label", NO_LABEL)
            if hasattr(label, "__index__") and not isinstance(label, bool):
                label = operator.index(label)  # numpy / torch integers from a dataset
            if isinstance(label, bool) or not isinstance(label, int) or label < NO_LABEL:
                raise ValueError(
                    f"ReplayMemory.add: a row of task {task!r} has label={label!r}: a class label must be an int >= 0"
                )
            item = torch.stack([ids, labels])
            if self.policy == "reservoir":
                n = self.total_seen
                if len(self._items) < self.capacity:
                    self._items.append((task, item, label))
                else:
                    j = self._randint(n + 1)
                    if j < self.capacity:
                        self._items[j] = (task, item, label)
            else:
                n, slots, keep = self.seen[task], self._per_task[task], self.quota(task)
                if len(slots) < keep:
                    slots.append((item, label))
                else:
                    j = self._randint(n + 1)
                    if j < keep:
                        slots[j] = (item, label)
            self.seen[task] += 1
            self.seen_labels[task][label] = self.seen_labels[task].get(label, 0) + 1
            self.total_seen += 1

    # ------------------------------------------------------------------ reading
    def _stored(self) -> list[tuple[str, torch.Tensor, int]]:
        if self.policy == "reservoir":
            return list(self._items)
        return [(t, item, label) for t in self.tasks for item, label in self._per_task[t]]

    def items(self) -> list[tuple[str, dict[str, torch.Tensor]]]:
        """Every stored ``(task, {"input_ids", "labels"})`` (int32 views), in a deterministic order."""
        return [(t, {"input_ids": item[0], "labels": item[1]}) for t, item, _ in self._stored()]

    def label_counts(self) -> dict[str, dict[int, int]]:
        """Stored items per task and class label (`NO_LABEL` for rows offered without one)."""
        out: dict[str, dict[int, int]] = {t: {} for t in self.tasks}
        for task, _, label in self._stored():
            out[task][label] = out[task].get(label, 0) + 1
        return out

    def __len__(self) -> int:
        return len(self._stored())

    def counts(self) -> dict[str, int]:
        """Stored items per task."""
        out = dict.fromkeys(self.tasks, 0)
        for task, _, _ in self._stored():
            out[task] += 1
        return out

    def sample(self, k: int, tasks: Sequence[str] | None = None) -> list[dict[str, list[int]]]:
        """`min(k, len)` stored rows drawn uniformly without replacement (optionally only from `tasks`).

        Rows come back as ``{"input_ids": [...], "labels": [...], "task_name": str}``, ready for a collator.
        """
        pool = [(t, it) for t, it, _ in self._stored() if tasks is None or t in tasks]
        if not pool or k <= 0:
            return []
        picks = torch.randperm(len(pool), generator=self.generator)[: min(k, len(pool))].tolist()
        return [
            {"input_ids": pool[i][1][0].tolist(), "labels": pool[i][1][1].tolist(), "task_name": pool[i][0]}
            for i in picks
        ]

    def nbytes(self) -> int:
        """Payload bytes of the stored token tensors (object overhead excluded)."""
        return sum(item.numel() * item.element_size() for _, item, _ in self._stored())

    def clear(self) -> None:
        """Forget every item and task (the generator keeps its state)."""
        self.tasks, self.seen, self.seen_labels, self.total_seen = [], {}, {}, 0
        self._items, self._per_task = [], {}

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Flat tensors (concatenated tokens + lengths + task index per item) and JSON counters."""
        stored = self._stored()
        lengths = torch.tensor([it.shape[1] for _, it, _ in stored], dtype=torch.int64)
        empty = torch.zeros(0, dtype=torch.int32)
        return {
            "capacity": self.capacity,
            "policy": self.policy,
            "seed": self.seed,
            "tasks": list(self.tasks),
            "seen": dict(self.seen),
            "seen_labels": {t: {str(k): v for k, v in c.items()} for t, c in self.seen_labels.items()},
            "total_seen": self.total_seen,
            "generator_state": self.generator.get_state(),
            "lengths": lengths,
            "task_index": torch.tensor([self.tasks.index(t) for t, _, _ in stored], dtype=torch.int64),
            "class_label": torch.tensor([label for _, _, label in stored], dtype=torch.int64),
            "input_ids": torch.cat([it[0] for _, it, _ in stored]) if stored else empty,
            "labels": torch.cat([it[1] for _, it, _ in stored]) if stored else empty,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a `state_dict`, checked first (keys, sizes, task indices): a bad state leaves this memory as is."""
        required = ("capacity", "policy", "seed", "tasks", "seen", "total_seen", "generator_state", "lengths")
        missing = [k for k in (*required, "task_index", "input_ids", "labels") if k not in state]
        if missing:
            raise ValueError(f"ReplayMemory.load_state_dict: the saved state lacks {missing}")
        lengths, task_index = state["lengths"].reshape(-1), state["task_index"].reshape(-1)
        total = int(lengths.sum()) if lengths.numel() else 0
        problems = []
        if task_index.numel() != lengths.numel():
            problems.append(f"{task_index.numel()} task indices for {lengths.numel()} items")
        if "class_label" in state and state["class_label"].numel() != lengths.numel():
            problems.append(f"{state['class_label'].numel()} class labels for {lengths.numel()} items")
        if state["input_ids"].numel() != total or state["labels"].numel() != total:
            problems.append(
                f"{state['input_ids'].numel()} input_ids / {state['labels'].numel()} labels for {total} stored tokens"
            )
        if lengths.numel() and (
            int(lengths.min()) < 1 or not 0 <= int(task_index.min()) <= int(task_index.max()) < len(state["tasks"])
        ):
            problems.append("item lengths must be >= 1 and task indices within the saved task list")
        if problems:
            raise ValueError(f"ReplayMemory.load_state_dict: inconsistent saved state: {'; '.join(problems)}")
        if state["policy"] != self.policy or int(state["capacity"]) != self.capacity:
            raise ValueError(
                f"ReplayMemory.load_state_dict: saved policy={state['policy']!r} capacity={state['capacity']} "
                f"differ from this memory's policy={self.policy!r} capacity={self.capacity}"
            )
        self.clear()
        self.seed = int(state["seed"])
        self.tasks = list(state["tasks"])
        self.seen = {k: int(v) for k, v in state["seen"].items()}
        # states saved before class labels were kept: every row is unlabelled
        saved_labels = state.get("seen_labels", {t: {str(NO_LABEL): n} for t, n in self.seen.items()})
        self.seen_labels = {t: {int(k): int(v) for k, v in c.items()} for t, c in saved_labels.items()}
        self.total_seen = int(state["total_seen"])
        self.generator.set_state(state["generator_state"].to(torch.uint8).cpu())
        self._per_task = {t: [] for t in self.tasks} if self.policy == "balanced" else {}
        ids, labels = state["input_ids"].to(torch.int32).cpu(), state["labels"].to(torch.int32).cpu()
        task_index = state["task_index"].tolist()
        classes = state["class_label"].tolist() if "class_label" in state else [NO_LABEL] * len(task_index)
        offset = 0
        for length, t_idx, label in zip(state["lengths"].tolist(), task_index, classes, strict=True):
            item = torch.stack([ids[offset : offset + length], labels[offset : offset + length]])
            offset += length
            task = self.tasks[t_idx]
            if self.policy == "reservoir":
                self._items.append((task, item, int(label)))
            else:
                self._per_task[task].append((item, int(label)))
