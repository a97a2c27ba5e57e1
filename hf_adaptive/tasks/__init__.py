"""Tasks, task streams, the built-in offline suite, formatting, the answer-token loss and the GLUE loader.

Names are imported on first use (PEP 562), so `import hf_adaptive.tasks` stays light.
"""

from __future__ import annotations

from ..utils.lazy import lazy_exports

#: public name -> submodule that defines it
_EXPORTS = {
    "DEFAULT_SUITE": "builtin",
    "RULES": "builtin",
    "builtin_suite": "builtin",
    "builtin_vocabulary": "builtin",
    "make_task": "builtin",
    "Task": "task",
    "TaskStream": "task",
    "IGNORE_INDEX": "losses",
    "answer_cross_entropy": "losses",
    "CausalLMCollator": "formatting",
    "encode_example": "formatting",
    "label_token_ids": "formatting",
    "rank_classify": "formatting",
    "task_accuracy": "formatting",
    "tokenize_task": "formatting",
}

__all__ = list(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
