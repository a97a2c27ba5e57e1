"""Options of the replay plugins, declared once: fields, defaults, help and validation (dataclasses only).

Shared options: exact replay owns `replay_alpha`, `replay_batch_size` and `replay_buffer_size`
(`REPLAY_SOURCE`); generative replay reads its replay weight and batch size from the first two and feature replay
its batch size and row cap from the last two, as before the options moved here. Those plugins therefore list
`REPLAY_SOURCE` among their option sources (the same object, so the option is declared once) and exclude the
mirrored fields from their own source. `seed` is no option of its own: `from_config` takes the run's `seed`
(`TrainingArguments.seed`).

Defaults: enabling a plugin by name with no options makes it act (issue #12): `replay_alpha` 0.2 (was 0.0, a
silent no-op), `generative_replay_ratio` 0.2 (was 0.0), `feature_replay_alpha` 0.1 (was 0.0), the defaults the
plugins' constructors already had.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..utils.options import OptionSource
from ..utils.validation import check_choice, check_number

REPLAY_POLICIES = ("reservoir", "balanced")
CONDITIONINGS = ("task", "prototype")
FEATURE_TARGETS = ("features", "prototypes")
FEATURE_DTYPES = ("float32", "float16", "bfloat16")

_SEED_HELP = "Seed of the plugin's draws (set from the run's `seed` by `from_config`)."


@dataclass
class ReplayConfig:
    """`ReplayPlugin`: exact replay of stored rows (see `replay.exact`)."""

    alpha: float = field(
        default=0.2, metadata={"help": "Weight of the replay loss, in [0, 1]; 0 stores rows but adds no term."}
    )
    buffer_size: int = field(
        default=200,
        metadata={"help": "Examples kept in the replay memory (feature replay: the most feature rows kept)."},
    )
    policy: str = field(
        default="balanced",
        metadata={"help": "'reservoir' or 'balanced' (equal share per task).", "choices": list(REPLAY_POLICIES)},
    )
    batch_size: int = field(default=8, metadata={"help": "Replayed examples per training step."})
    examples_per_task: int | None = field(
        default=None,
        metadata={
            "help": "Replay: offer at most this many training rows of each finished task to the memory (None: all "
            "its rows); the memory itself keeps at most replay_buffer_size rows."
        },
    )
    seed: int = field(default=0, metadata={"help": _SEED_HELP})

    def __post_init__(self) -> None:
        owner = type(self).__name__
        check_number(owner, "alpha", self.alpha, 0, 1)
        check_number(owner, "buffer_size", self.buffer_size, 1, integer=True)
        check_choice(owner, "policy", self.policy, REPLAY_POLICIES)
        check_number(owner, "batch_size", self.batch_size, 1, integer=True)
        check_number(owner, "examples_per_task", self.examples_per_task, 1, integer=True, optional=True)
        check_number(owner, "seed", self.seed, integer=True)
        self.alpha = float(self.alpha)


def _replay_default(name: str):
    """The default of `ReplayConfig.<name>` (a field mirrored by another plugin keeps one default)."""
    return ReplayConfig.__dataclass_fields__[name].default


@dataclass
class GenerativeReplayConfig:
    """`GenerativeReplayPlugin`: LAMOL-style generative replay (see `replay.generative`)."""

    ratio: float = field(
        default=0.2,
        metadata={"help": "Pseudo-examples generated per new-task example (LAMOL); 0: no generation."},
    )
    alpha: float = field(
        default=_replay_default("alpha"),
        metadata={"help": "Weight of the pseudo-example answer loss, in [0, 1] (the option replay_alpha)."},
    )
    lm_lambda: float = field(
        default=0.25,
        metadata={"help": "Generative replay: weight of the generation (LM) loss on real and pseudo rows; 0: off."},
    )
    batch_size: int = field(
        default=_replay_default("batch_size"),
        metadata={"help": "Pseudo rows replayed per training step (the option replay_batch_size)."},
    )
    conditioning: str = field(
        default="task",
        metadata={
            "help": "Generative replay: 'task' (plain LAMOL, task-prefixed generation) or 'prototype' "
            "(generation conditioned on class-prototype prefixes).",
            "choices": list(CONDITIONINGS),
        },
    )
    max_new_tokens: int = field(
        default=32, metadata={"help": "Generative replay: generation budget per pseudo-example (tokens)."}
    )
    top_k: int = field(
        default=0, metadata={"help": "Generative replay: top-k sampling (0: sample the full distribution)."}
    )
    temperature: float = field(default=1.0, metadata={"help": "Generative replay: sampling temperature (> 0)."})
    max_rounds: int = field(
        default=3, metadata={"help": "Generative replay: sampling rounds per old task before giving up its share."}
    )
    prototype_samples: int = field(
        default=64, metadata={"help": "Generative replay ('prototype'): training rows the prototypes come from."}
    )
    prototypes_per_class: int = field(
        default=2, metadata={"help": "Generative replay ('prototype'): real rows kept per class as prefixes."}
    )
    prefix_words: int = field(
        default=1, metadata={"help": "Generative replay ('prototype'): words of a prototype's prompt kept."}
    )
    seed: int = field(default=0, metadata={"help": _SEED_HELP})

    def __post_init__(self) -> None:
        owner = type(self).__name__
        check_number(owner, "ratio", self.ratio, 0)
        check_number(owner, "alpha", self.alpha, 0, 1)
        check_number(owner, "lm_lambda", self.lm_lambda, 0)
        check_number(owner, "batch_size", self.batch_size, 1, integer=True)
        check_choice(owner, "conditioning", self.conditioning, CONDITIONINGS)
        check_number(owner, "max_new_tokens", self.max_new_tokens, 1, integer=True)
        check_number(owner, "top_k", self.top_k, 0, integer=True)
        check_number(owner, "temperature", self.temperature, 0, low_open=True)
        check_number(owner, "max_rounds", self.max_rounds, 1, integer=True)
        check_number(owner, "prototype_samples", self.prototype_samples, 1, integer=True)
        check_number(owner, "prototypes_per_class", self.prototypes_per_class, 1, integer=True)
        check_number(owner, "prefix_words", self.prefix_words, 0, integer=True)
        check_number(owner, "seed", self.seed, integer=True)
        self.ratio, self.alpha, self.lm_lambda = float(self.ratio), float(self.alpha), float(self.lm_lambda)


@dataclass
class FeatureReplayConfig:
    """`FeatureReplayPlugin`: feature distillation toward a memory of old tasks' features (see `replay.feature`)."""

    alpha: float = field(
        default=0.1, metadata={"help": "Weight of the feature-distillation loss, in [0, 1]; 0 adds no term."}
    )
    samples_per_task: int = field(
        default=64, metadata={"help": "Feature replay: training rows of each task kept in its feature memory."}
    )
    max_rows: int | None = field(
        default=_replay_default("buffer_size"),
        metadata={"help": "The most feature rows kept over all tasks (None: no cap; the option replay_buffer_size)."},
    )
    target: str = field(
        default="features",
        metadata={
            "help": "Feature replay: 'features' (distil the exact stored features) or 'prototypes' (distances to "
            "k-means centroids).",
            "choices": list(FEATURE_TARGETS),
        },
    )
    k_per_class: int = field(
        default=1, metadata={"help": "Feature replay: k-means centroids per class ('prototypes' target)."}
    )
    batch_size: int = field(
        default=_replay_default("batch_size"),
        metadata={"help": "Stored rows distilled per training step (the option replay_batch_size)."},
    )
    feature_dtype: str = field(
        default="float32",
        metadata={
            "help": "Feature replay: dtype the stored features are kept in.",
            "choices": list(FEATURE_DTYPES),
            "option": "feature_replay_dtype",
        },
    )
    seed: int = field(default=0, metadata={"help": _SEED_HELP})

    def __post_init__(self) -> None:
        owner = type(self).__name__
        check_number(owner, "alpha", self.alpha, 0, 1)
        check_number(owner, "samples_per_task", self.samples_per_task, 1, integer=True)
        check_number(owner, "max_rows", self.max_rows, 1, integer=True, optional=True)
        check_choice(owner, "target", self.target, FEATURE_TARGETS)
        check_number(owner, "k_per_class", self.k_per_class, 1, integer=True)
        check_number(owner, "batch_size", self.batch_size, 1, integer=True)
        check_choice(owner, "feature_dtype", self.feature_dtype, FEATURE_DTYPES)
        check_number(owner, "seed", self.seed, integer=True)
        self.alpha = float(self.alpha)


# `seed` is excluded everywhere: it is the run's `seed` (a TrainingArguments field), passed by `from_config`.
REPLAY_SOURCE = OptionSource(ReplayConfig, "replay_", exclude=("seed",))
# alpha / batch_size: the shared options replay_alpha / replay_batch_size of REPLAY_SOURCE
GENERATIVE_REPLAY_SOURCE = OptionSource(
    GenerativeReplayConfig, "generative_replay_", exclude=("alpha", "batch_size", "seed")
)
# max_rows / batch_size: the shared options replay_buffer_size / replay_batch_size of REPLAY_SOURCE
FEATURE_REPLAY_SOURCE = OptionSource(FeatureReplayConfig, "feature_replay_", exclude=("max_rows", "batch_size", "seed"))

REPLAY_OPTIONS = (REPLAY_SOURCE,)
GENERATIVE_REPLAY_OPTIONS = (GENERATIVE_REPLAY_SOURCE, REPLAY_SOURCE)
FEATURE_REPLAY_OPTIONS = (FEATURE_REPLAY_SOURCE, REPLAY_SOURCE)
