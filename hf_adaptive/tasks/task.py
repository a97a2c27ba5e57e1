"""`Task` and `TaskStream`: what a continual run learns, one after another."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

_TEXT_FIELD = "text"
_LABEL_FIELD = "label"


@dataclass
class Task:
    """A classification task for a causal LM.

    Examples are rows with a `text` (str) and an integer `label`; the prompt is `template` with `{text}`
    filled in, and the answer is `verbalizer[label]`. The model is trained to produce the answer after the
    prompt and scored by comparing the log-likelihood of every verbalized label (rank classification).
    """

    name: str
    train_dataset: Any
    eval_dataset: Any
    verbalizer: list[str]
    template: str = "{text}"
    description: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise ValueError(f"Task.name must be a non-empty string, got {self.name!r}")
        if "{text}" not in self.template:
            raise ValueError(f"Task.template must contain '{{text}}', got {self.template!r} (task {self.name!r})")
        if len(self.verbalizer) < 2 or len(set(self.verbalizer)) != len(self.verbalizer):
            raise ValueError(
                f"Task.verbalizer must hold at least 2 distinct label words, got {self.verbalizer!r} "
                f"(task {self.name!r})"
            )
        for split in ("train_dataset", "eval_dataset"):
            data = getattr(self, split)
            if data is None:
                continue
            columns = getattr(data, "column_names", None) or (list(data[0]) if len(data) else [])
            missing = {_TEXT_FIELD, _LABEL_FIELD} - set(columns)
            if missing:
                raise ValueError(f"Task.{split} of task {self.name!r} lacks columns {sorted(missing)}")

    def prompt(self, text: str) -> str:
        return self.template.replace("{text}", text)

    def answer(self, label: int) -> str:
        if not 0 <= int(label) < len(self.verbalizer):
            raise ValueError(f"label {label} out of range for task {self.name!r} with {len(self.verbalizer)} labels")
        return self.verbalizer[int(label)]


class TaskStream(Sequence[Task]):
    """An ordered sequence of tasks with unique names."""

    def __init__(self, tasks: Sequence[Task]) -> None:
        tasks = list(tasks)
        if not tasks:
            raise ValueError("TaskStream needs at least one task")
        names = [t.name for t in tasks]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"TaskStream task names must be unique, repeated: {dupes}")
        self._tasks = tasks

    def __getitem__(self, index):  # type: ignore[override]
        return self._tasks[index]

    def __len__(self) -> int:
        return len(self._tasks)

    def __iter__(self) -> Iterator[Task]:
        return iter(self._tasks)

    @property
    def names(self) -> list[str]:
        return [t.name for t in self._tasks]
