"""Fixtures of the replay tests: a stand-in trainer (the attributes the plugins read) and tiny task sets."""

from __future__ import annotations

from types import SimpleNamespace

import pytest


@pytest.fixture
def stand_in(tiny_model, tokenizer):
    """What the plugins use of a trainer: `.model` and `.processing_class`."""
    return SimpleNamespace(model=tiny_model, processing_class=tokenizer)


@pytest.fixture(scope="session")
def two_tasks():
    from hf_adaptive.tasks import builtin_suite

    return builtin_suite(["first_color", "last_color"], n_train=24, n_eval=8, seed=0)


@pytest.fixture(scope="session")
def contexts(two_tasks, tokenizer):
    """`TaskContext`s of `two_tasks` (index 0 and 1), tokenized once like the trainer does."""
    from hf_adaptive.plugins import TaskContext

    return [TaskContext.build(task, i, tokenizer) for i, task in enumerate(two_tasks)]


@pytest.fixture(scope="session")
def context_of(tokenizer):
    """`context_of(task, index)`: the `TaskContext` the trainer would hand the plugins for `task`."""
    from hf_adaptive.plugins import TaskContext

    return lambda task, index=0: TaskContext.build(task, index, tokenizer)
