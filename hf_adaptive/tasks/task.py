"""`Task` and `TaskStream`: what a continual run learns, one after another.

A `Task` checks its data when it is built (and again when a split or the verbalizer is reassigned), so a bad row
fails here with the task, split, row, field and value named, not later inside `datasets.map` or as a quietly wrong
accuracy. The checks are vectorised over Arrow columns, so they stay cheap on large datasets.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..utils.validation import OptionError

_TEXT_FIELD = "text"
_LABEL_FIELD = "label"
_SPLITS = ("train_dataset", "eval_dataset")
#: fields whose reassignment re-runs the checks (the data are checked against the verbalizer)
_CHECKED_FIELDS = frozenset({"name", "train_dataset", "eval_dataset", "verbalizer", "template"})
_DATA_ALLOWED = (
    "a datasets.Dataset, a list of dicts (rows) or a dict of lists (columns) with a 'text' (str) and a 'label' "
    "(int) field, or None for no such split"
)


def _fail(field_name: str, value: Any, allowed: str, task: str | None = None) -> OptionError:
    """`Task.<field>=<value> is not allowed: <allowed> (task '<name>')`, to raise."""
    return OptionError("Task", field_name, value, allowed + (f" (task {task!r})" if task is not None else ""))


class _Shown(str):
    """Text shown as is in an error message (its `repr` is itself), e.g. a shortened repr."""

    def __repr__(self) -> str:
        return str(self)


def _short(value: Any, limit: int = 80) -> _Shown:
    """One-line `repr` cut to `limit` characters: error messages name huge inputs without printing them whole."""
    text = " ".join(repr(value).split())
    return _Shown(text if len(text) <= limit else text[: limit - 3] + "...")


def _label_allowed(verbalizer: Sequence[str]) -> str:
    return f"an integer class index in [0, {len(verbalizer)}) into the verbalizer {list(verbalizer)!r}"


def _row_error(task: str, split: str, index: int, column: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"Task.{split}[{index}][{column!r}]={_short(value)} is not allowed: {allowed} (task {task!r})")


def _text_allowed() -> str:
    return "a string (what the template's {text} is filled with)"


def _first_bad_python_row(task: str, split: str, rows: Sequence[Mapping], verbalizer: Sequence[str]) -> ValueError:
    """The error for the first bad row of a list of dicts (only run when converting it to a Dataset failed)."""
    for i, row in enumerate(rows):
        text, label = row.get(_TEXT_FIELD), row.get(_LABEL_FIELD)
        if not isinstance(text, str):
            return _row_error(task, split, i, _TEXT_FIELD, text, _text_allowed())
        if isinstance(label, bool) or not isinstance(label, int):
            return _row_error(task, split, i, _LABEL_FIELD, label, _label_allowed(verbalizer))
    return _fail(split, _Shown(f"<{len(rows)} rows>"), "rows whose fields have the same type in every row", task)


def as_dataset(data: Any, task: str, split: str, verbalizer: Sequence[str]) -> Any:
    """`data` as a `datasets.Dataset` (lists of dicts and dicts of lists are converted); other types are rejected."""
    if data is None:
        return None
    from datasets import Dataset, DatasetDict, IterableDataset, IterableDatasetDict

    if isinstance(data, Dataset):
        return data
    if isinstance(data, (DatasetDict, IterableDatasetDict)):
        raise _fail(split, _short(data), f"one split, e.g. data['train'], not a whole {type(data).__name__}", task)
    if isinstance(data, IterableDataset):
        raise _fail(
            split, _short(data), "a map-style datasets.Dataset (a streaming IterableDataset has no length)", task
        )
    if isinstance(data, Mapping):
        lengths = {}
        for key, column in data.items():
            if isinstance(column, (str, bytes)) or not hasattr(column, "__len__"):
                raise _fail(f"{split}[{key!r}]", _short(column), "a list of values (dict of columns)", task)
            lengths[key] = len(column)
        if len(set(lengths.values())) > 1:
            raise _fail(split, _Shown(f"<dict of columns of lengths {lengths}>"), "columns of equal length", task)
        try:
            return Dataset.from_dict({k: list(v) for k, v in data.items()})
        except Exception as exc:  # noqa: BLE001 - pyarrow raises several types; report them with the field named
            rows = [dict(zip(data, values)) for values in zip(*data.values())]
            raise _first_bad_python_row(task, split, rows, verbalizer) from exc
    if isinstance(data, (list, tuple)):
        for i, row in enumerate(data):
            if not isinstance(row, Mapping):
                raise _fail(f"{split}[{i}]", _short(row), "a dict with 'text' and 'label' (list of rows)", task)
        try:
            return Dataset.from_list([dict(row) for row in data])
        except Exception as exc:  # noqa: BLE001 - pyarrow raises several types; report them with the field named
            raise _first_bad_python_row(task, split, data, verbalizer) from exc
    raise _fail(split, _short(data), _DATA_ALLOWED, task)


def _arrow_column(data: Any, column: str) -> Any:
    """The column as Arrow, in the dataset's row order (after `select`/`shuffle`), without Python objects per row.

    Taking the indices mapping in Arrow is ~1000x faster than `with_format("arrow")[column]` on a selected view.
    """
    table, indices = getattr(data, "data", None), getattr(data, "_indices", None)
    if table is None or not hasattr(table, "column"):
        return data.with_format("arrow")[column]
    values = table.column(column)
    return values if indices is None else values.take(indices.column(0))


def check_rows(data: Any, task: str, split: str, verbalizer: Sequence[str]) -> None:
    """Vectorised checks of a split: not empty, has `text` (str, no nulls) and `label` (int in range, no nulls)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if len(data) == 0:
        raise _fail(split, _Shown("<0 rows>"), "at least one row (use None for a task without this split)", task)
    columns = list(data.column_names)
    missing = sorted({_TEXT_FIELD, _LABEL_FIELD} - set(columns))
    if missing:
        raise ValueError(
            f"Task.{split} of task {task!r} lacks columns {missing} (has {columns}): every row needs a "
            f"{_TEXT_FIELD!r} (str) and a {_LABEL_FIELD!r} (int) field"
        )
    text = _arrow_column(data, _TEXT_FIELD)
    if not (pa.types.is_string(text.type) or pa.types.is_large_string(text.type)):
        first = 0 if text.null_count == 0 else int(pc.index(pc.is_valid(text), True).as_py())
        first = max(first, 0)
        raise _row_error(task, split, first, _TEXT_FIELD, text[first].as_py(), _text_allowed())
    if text.null_count:
        first = int(pc.index(pc.is_null(text), True).as_py())
        raise _row_error(task, split, first, _TEXT_FIELD, None, _text_allowed())
    label = _arrow_column(data, _LABEL_FIELD)
    allowed = _label_allowed(verbalizer)
    if label.null_count:
        first = int(pc.index(pc.is_null(label), True).as_py())
        raise _row_error(task, split, first, _LABEL_FIELD, None, allowed)
    if not pa.types.is_integer(label.type):
        first = 0
        if pa.types.is_floating(label.type):  # point at a fractional value when there is one
            first = max(int(pc.index(pc.not_equal(label, pc.floor(label)), True).as_py()), 0)
        words = pa.types.is_string(label.type) or pa.types.is_large_string(label.type)
        hint = "; label words belong in Task.verbalizer, rows hold their index" if words else ""
        shown = label[first].as_py()
        raise _row_error(task, split, first, _LABEL_FIELD, shown, f"{allowed} (column type {label.type}){hint}")
    bad = pc.or_(pc.less(label, 0), pc.greater_equal(label, len(verbalizer)))
    if pc.any(bad).as_py():
        first = int(pc.index(bad, True).as_py())
        raise _row_error(task, split, first, _LABEL_FIELD, label[first].as_py(), allowed)


@dataclass
class Task:
    """A classification task for a causal LM.

    Examples are rows with a `text` (str) and an integer `label`; the prompt is `template` with `{text}`
    filled in, and the answer is `verbalizer[label]`. The model is trained to produce the answer after the
    prompt and scored by comparing the log-likelihood of every verbalized label (rank classification).

    `train_dataset` / `eval_dataset`: a `datasets.Dataset`, a list of dicts or a dict of lists (converted to a
    `Dataset` here), or None. Every split is checked when the task is built or a split is reassigned: at least one
    row, `text` strings, `label` integers in `[0, len(verbalizer))`. `eval_dataset=None` is allowed for a task that
    is only trained on or only described (generative-replay specs, `train_joint`); evaluating it (`task_accuracy`,
    the accuracy matrix of `train_sequence`) needs an evaluation split and fails naming the task. Whether two label
    words are told apart depends on the tokenizer, so that is checked at tokenization (`tokenize_task`,
    `rank_classify`).
    """

    name: str
    train_dataset: Any
    eval_dataset: Any
    verbalizer: list[str]
    template: str = "{text}"
    description: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise _fail("name", self.name, "a non-empty string")
        name = self.name
        if not isinstance(self.template, str) or "{text}" not in self.template:
            raise _fail("template", self.template, "a string containing '{text}'", name)
        if not isinstance(self.verbalizer, (list, tuple)) or len(self.verbalizer) < 2:
            raise _fail("verbalizer", self.verbalizer, "a list of at least 2 distinct label words", name)
        for i, word in enumerate(self.verbalizer):
            if not isinstance(word, str) or not word.strip():
                raise _fail(f"verbalizer[{i}]", word, "a non-empty string (a label word)", name)
        if len(set(self.verbalizer)) != len(self.verbalizer):
            raise _fail("verbalizer", self.verbalizer, "at least 2 distinct label words (this list repeats one)", name)
        object.__setattr__(self, "verbalizer", list(self.verbalizer))
        if not isinstance(self.description, str):
            raise _fail("description", self.description, "a string", name)
        if not isinstance(self.metadata, dict):
            raise _fail("metadata", self.metadata, "a dict", name)
        for split in _SPLITS:
            data = as_dataset(getattr(self, split), name, split, self.verbalizer)
            if data is not None:
                check_rows(data, name, split, self.verbalizer)
            object.__setattr__(self, split, data)
        object.__setattr__(self, "_checked", True)

    def __setattr__(self, key: str, value: Any) -> None:
        """Reassigning a split, the verbalizer, template or name re-runs the checks (and rolls back on error)."""
        if key not in _CHECKED_FIELDS or not self.__dict__.get("_checked"):
            object.__setattr__(self, key, value)
            return
        old = self.__dict__[key]
        object.__setattr__(self, key, value)
        try:
            self.__post_init__()
        except Exception:
            object.__setattr__(self, key, old)
            raise

    def prompt(self, text: str) -> str:
        if not isinstance(text, str):
            raise _fail("prompt.text", _short(text), _text_allowed(), self.name)
        return self.template.replace("{text}", text)

    def label_index(self, label: Any) -> int:
        """`label` as a verbalizer index; bools, strings, floats and out-of-range values are errors."""
        try:
            if isinstance(label, bool):
                raise TypeError
            index = operator.index(label)
        except TypeError:
            raise _fail("label", label, _label_allowed(self.verbalizer), self.name) from None
        if not 0 <= index < len(self.verbalizer):
            raise _fail("label", label, _label_allowed(self.verbalizer), self.name)
        return index

    def answer(self, label: int) -> str:
        return self.verbalizer[self.label_index(label)]


class TaskStream(Sequence[Task]):
    """An ordered sequence of tasks with unique names."""

    def __init__(self, tasks: Sequence[Task]) -> None:
        tasks = list(tasks)
        if not tasks:
            raise ValueError("TaskStream.tasks=[] is not allowed: at least one Task")
        for i, task in enumerate(tasks):
            if not isinstance(task, Task):
                raise ValueError(f"TaskStream.tasks[{i}]={_short(task)} is not allowed: a Task")
        names = [t.name for t in tasks]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"TaskStream.tasks names {dupes} are not allowed: task names must be unique")
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
