"""A built-in, offline suite of procedurally generated text tasks.

Every task reads the same kind of input (a sequence of colour and animal words) and answers with the same
label words ("yes"/"no"), but each task asks about a different feature of the input. A model fine-tuned on
one task after another therefore reuses the same output behaviour for conflicting rules and forgets: the
suite makes forgetting measurable on a tiny model in minutes. The task word at the start of every prompt
tells the tasks apart, so joint multi-task training can learn them all (the upper bound).

Everything is seeded and deterministic; nothing is downloaded.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from ..utils.validation import fail
from .task import Task

COLORS = ["red", "blue", "green", "black", "white", "pink", "gray", "gold"]
ANIMALS = ["cat", "dog", "fox", "owl", "cow", "pig", "bee", "ant"]
CONTENT_WORDS = COLORS + ANIMALS
LABEL_WORDS = ["yes", "no"]
SEQUENCE_LENGTH = 7
TEMPLATE = "{task} : {text} ?"


def _is_color(word: str) -> bool:
    return word in COLORS


Rule = Callable[[list[str]], bool]

#: name -> (description, rule)
RULES: dict[str, tuple[str, Rule]] = {
    "first_color": ("is the first word a color", lambda w: _is_color(w[0])),
    "last_color": ("is the last word a color", lambda w: _is_color(w[-1])),
    "second_animal": ("is the second word an animal", lambda w: not _is_color(w[1])),
    "more_colors": ("are there more colors than animals", lambda w: sum(map(_is_color, w)) > len(w) / 2),
    "has_cat": ("does the word cat appear", lambda w: "cat" in w),
    "has_red": ("does the word red appear", lambda w: "red" in w),
    "third_color": ("is the third word a color", lambda w: _is_color(w[2])),
}

#: the default sequence of the main job, in order
DEFAULT_SUITE = ["first_color", "last_color", "second_animal", "more_colors", "has_cat"]


def _examples(rule: Rule, n: int, rng: random.Random) -> list[dict]:
    """`n` examples with labels balanced 50/50 (rejection sampling)."""
    wanted = {True: n - n // 2, False: n // 2}
    out: list[dict] = []
    while wanted[True] or wanted[False]:
        words = [rng.choice(CONTENT_WORDS) for _ in range(SEQUENCE_LENGTH)]
        answer = rule(words)
        if wanted[answer]:
            wanted[answer] -= 1
            out.append({"text": " ".join(words), "label": 0 if answer else 1})
    rng.shuffle(out)
    return out


def make_task(name: str, n_train: int = 256, n_eval: int = 128, seed: int = 0) -> Task:
    """One built-in task by name, with seeded train and eval splits."""
    if not isinstance(name, str) or name not in RULES:
        fail("make_task", "name", name, f"one of the built-in tasks {sorted(RULES)}")
    for field_name, value in (("n_train", n_train), ("n_eval", n_eval)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 2:
            fail("make_task", field_name, value, "an integer >= 2 (both labels appear)")
    if isinstance(seed, bool) or not isinstance(seed, int):
        fail("make_task", "seed", seed, "an integer")
    description, rule = RULES[name]
    rng = random.Random(f"{seed}-{name}")
    from datasets import Dataset

    return Task(
        name=name,
        description=description,
        train_dataset=Dataset.from_list(_examples(rule, n_train, rng)),
        eval_dataset=Dataset.from_list(_examples(rule, n_eval, rng)),
        template=TEMPLATE.replace("{task}", name),
        verbalizer=list(LABEL_WORDS),
    )


def builtin_suite(
    names: Sequence[str] | None = None, n_train: int = 256, n_eval: int = 128, seed: int = 0
) -> list[Task]:
    """The built-in task sequence (default, `names=None`: `DEFAULT_SUITE`).

    An empty `names` is an error rather than the default suite: an empty selection is a mistake to report.
    """
    if names is None:
        names = DEFAULT_SUITE
    if isinstance(names, str) or not isinstance(names, Sequence) or not names:
        fail("builtin_suite", "names", names, f"None or a non-empty list of task names from {sorted(RULES)}")
    return [make_task(n, n_train=n_train, n_eval=n_eval, seed=seed) for n in names]


def builtin_vocabulary() -> list[str]:
    """Every word the built-in suite can produce (task names, descriptions, inputs, labels, punctuation)."""
    words: set[str] = set(CONTENT_WORDS) | set(LABEL_WORDS) | {":", "?"} | set(RULES)
    for description, _ in RULES.values():
        words.update(description.split())
    return sorted(words)
