"""Tasks, task streams, the built-in offline suite, formatting and the GLUE loader."""

from .builtin import DEFAULT_SUITE, RULES, builtin_suite, builtin_vocabulary, make_task
from .task import Task, TaskStream

__all__ = ["DEFAULT_SUITE", "RULES", "Task", "TaskStream", "builtin_suite", "builtin_vocabulary", "make_task"]
from .formatting import (  # noqa: E402
    IGNORE_INDEX,
    CausalLMCollator,
    encode_example,
    label_token_ids,
    rank_classify,
    task_accuracy,
    tokenize_task,
)

__all__ += [
    "IGNORE_INDEX",
    "CausalLMCollator",
    "encode_example",
    "label_token_ids",
    "rank_classify",
    "task_accuracy",
    "tokenize_task",
]
