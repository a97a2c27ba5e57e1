"""How a task's example becomes the tokens a causal LM reads: prompt format, length limit, label words.

One `PromptEncoder` per (task, tokenizer, options) is used by training rows (`tokenize_task`, `encode_example`) and
by scoring (`rank_classify`), so the model is scored on exactly the prompts it was trained on.

* `prompt_format`: `"bos"` puts the tokenizer's BOS token before the prompt (what a base model saw in
  pre-training; for some instruct tokenizers, e.g. SmolLM2's, the "BOS" is a chat-turn marker, `<|im_start|>`),
  `"plain"` adds no special token, `"chat"` wraps the prompt as a user turn of the tokenizer's chat template with
  the assistant turn opened, and the label follows as the assistant's reply.
* `prompt_max_length`: prompt + the longest label word fit in this many tokens. What is cut is the task's input
  text (from its end), never the instruction around it nor the label: a prompt cut from the left loses the
  instruction first, and the model no longer knows what is asked.
* Label words are tokenized once: `" " + word` after a plain prompt, `word` alone after a chat prompt (the assistant
  turn starts on a new line). Words the tokenizer cannot tell apart are refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..utils.options import OptionSource
from ..utils.validation import OptionError, check_choice, check_number
from .task import Task

PROMPT_FORMATS = ("bos", "plain", "chat")
LABEL_SCORINGS = ("sum", "mean", "pmi")
_TRUNCATION_ROUNDS = 8


@dataclass
class PromptConfig:
    """The prompt options of a run (composed into `ContinualConfig` under these names)."""

    prompt_max_length: int | None = field(
        default=256,
        metadata={
            "help": "Tokens of prompt + longest label word (training rows and scoring); the input text is cut "
            "to fit, never the instruction or the label. None: no limit."
        },
    )
    prompt_format: str = field(
        default="bos",
        metadata={
            "help": "'bos' (the tokenizer's BOS token, then the prompt), 'plain' (no special token) or 'chat' "
            "(the prompt as a user turn of the tokenizer's chat template, the label as the assistant's reply).",
            "choices": list(PROMPT_FORMATS),
        },
    )
    label_scoring: str = field(
        default="sum",
        metadata={
            "help": "How rank classification scores a label: 'sum' (log-likelihood of its tokens), 'mean' "
            "(per token, so a label of more tokens is not penalised) or 'pmi' (sum minus the label's "
            "log-likelihood after the instruction with an empty input: calibrated against the label's prior).",
            "choices": list(LABEL_SCORINGS),
        },
    )

    def __post_init__(self) -> None:
        check_number("PromptConfig", "prompt_max_length", self.prompt_max_length, 2, integer=True, optional=True)
        check_choice("PromptConfig", "prompt_format", self.prompt_format, PROMPT_FORMATS)
        check_choice("PromptConfig", "label_scoring", self.label_scoring, LABEL_SCORINGS)


PROMPT_OPTIONS = [OptionSource(PromptConfig)]


def _ids(encoded: Any) -> list[int]:
    """Token ids from `apply_chat_template(tokenize=True)`, which returns a list or a BatchEncoding by version."""
    if hasattr(encoded, "keys") and "input_ids" in encoded:
        encoded = encoded["input_ids"]
    if hasattr(encoded, "tolist"):
        encoded = encoded.tolist()
    if encoded and isinstance(encoded[0], list):
        encoded = encoded[0]
    return list(encoded)


class PromptEncoder:
    """Prompt and label token ids of one task for one tokenizer, under one prompt format and length limit."""

    def __init__(
        self, task: Task, tokenizer: Any, max_length: int | None = 256, prompt_format: str = "bos", owner: str = ""
    ) -> None:
        owner = owner or "PromptEncoder"
        check_choice(owner, "prompt_format", prompt_format, PROMPT_FORMATS)
        check_number(owner, "max_length", max_length, 1, integer=True, optional=True)
        if prompt_format == "chat" and not getattr(tokenizer, "chat_template", None):
            raise OptionError(
                owner,
                "prompt_format",
                prompt_format,
                f"'bos' or 'plain' for tokenizer {getattr(tokenizer, 'name_or_path', type(tokenizer).__name__)!r}, "
                "which has no chat template",
            )
        self.task, self.tokenizer, self.format, self.owner = task, tokenizer, prompt_format, owner
        self.answers = self._label_ids()
        longest = max(len(a) for a in self.answers)
        if max_length is not None and max_length <= longest:
            allowed = f"None or > {longest} (the longest label word's token count, task {task.name!r})"
            raise OptionError(owner, "max_length", max_length, allowed)
        #: tokens the prompt may take: every label fits after it, so all labels see the same prompt
        self.prompt_budget = None if max_length is None else max_length - longest

    # ------------------------------------------------------------------------------------------------ labels
    def _label_ids(self) -> list[list[int]]:
        task, prefix = self.task, "" if self.format == "chat" else " "
        ids = [list(self.tokenizer(prefix + word, add_special_tokens=False)["input_ids"]) for word in task.verbalizer]
        seen: dict[tuple[int, ...], str] = {}
        for word, word_ids in zip(task.verbalizer, ids):
            if not word_ids:
                raise OptionError(
                    "Task",
                    "verbalizer",
                    task.verbalizer,
                    f"label words with tokens; {word!r} has none (task {task.name!r})",
                )
            other = seen.setdefault(tuple(word_ids), word)
            if other != word:
                raise OptionError(
                    "Task",
                    "verbalizer",
                    task.verbalizer,
                    f"label words this tokenizer tells apart; {other!r} and {word!r} both tokenize to ids {word_ids} "
                    f"(task {task.name!r})",
                )
        return ids

    # ----------------------------------------------------------------------------------------------- prompts
    def _wrap(self, prompts: list[str]) -> list[list[int]]:
        """Token ids of whole prompt strings under the format (no truncation)."""
        tok = self.tokenizer
        if self.format == "chat":
            return [
                _ids(
                    tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True)
                )
                for p in prompts
            ]
        ids = [list(x) for x in tok(prompts, add_special_tokens=False)["input_ids"]] if prompts else []
        if self.format == "bos" and tok.bos_token_id is not None:
            ids = [[tok.bos_token_id] + x for x in ids]
        return ids

    def _truncated(self, text: str, ids: list[int]) -> list[int]:
        """`ids` of the prompt of `text` cut to the budget by shortening `text` (from its end)."""
        budget = self.prompt_budget
        text_ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        keep = len(text_ids) - (len(ids) - budget)
        for _ in range(_TRUNCATION_ROUNDS):
            keep = max(keep, 0)
            short = self.tokenizer.decode(text_ids[:keep]) if keep else ""
            ids = self._wrap([self.task.prompt(short)])[0]
            if len(ids) <= budget:
                return ids
            if keep == 0:
                raise OptionError(
                    self.owner,
                    "max_length",
                    budget + max(len(a) for a in self.answers),
                    f"a limit the prompt fits in: task {self.task.name!r}'s instruction alone takes {len(ids)} "
                    f"tokens under prompt_format={self.format!r}, the longest label word "
                    f"{max(len(a) for a in self.answers)}",
                )
            keep -= max(len(ids) - budget, 1)
        return ids[:budget]  # tokenizer round trips that never shrink: keep the instruction's start

    def prompts(self, texts: Sequence[str]) -> list[list[int]]:
        """Prompt token ids of each input text, each within the budget."""
        wrapped = self._wrap([self.task.prompt(t) for t in texts])
        if self.prompt_budget is None:
            return wrapped
        return [ids if len(ids) <= self.prompt_budget else self._truncated(t, ids) for t, ids in zip(texts, wrapped)]

    def null_prompt(self) -> list[int]:
        """The instruction with an empty input: what the labels are scored against for PMI calibration."""
        return self.prompts([""])[0]


def prompt_options(args: Any) -> dict[str, Any]:
    """The `tokenize_task` / `encode_example` keywords a run's arguments ask for (defaults where they have none),
    so every place that builds rows for a run (trainer, plugins) builds the same prompts."""
    return {
        "max_length": getattr(args, "prompt_max_length", 256),
        "prompt_format": getattr(args, "prompt_format", "bos"),
    }


def row_options(args: Any) -> dict[str, Any]:
    """The `tokenize_task` keywords of a run's training rows: its prompts and whether they end with the eos
    (`append_eos_token`), so rows built outside the trainer (validation loss, pseudo-rows) match what it trains on."""
    return {**prompt_options(args), "append_eos": getattr(args, "append_eos_token", True)}


def scoring_options(args: Any) -> dict[str, Any]:
    """The `task_accuracy` / `rank_classify` keywords a run's arguments ask for: prompts, label scoring, budget."""
    return {
        **prompt_options(args),
        "label_scoring": getattr(args, "label_scoring", "sum"),
        "token_budget": getattr(args, "continual_eval_token_budget", 8192),
    }
