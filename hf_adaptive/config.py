"""`ContinualConfig`: the options of a continual run, on top of `TrainingArguments`, composed with every plugin's.

Like TRL's `SFTConfig`, it is a `TrainingArguments` subclass, so it works with `HfArgumentParser`, YAML files and
everything that already takes training arguments. It declares only what the run itself needs (task sequence,
evaluation, adapters, loss weighting). The optimizer's options (`OptimizerConfig`) and every plugin's are declared
once, in the config dataclass beside their code (`optim.py`, `consolidation/config.py`, `replay/config.py`, ...),
and composed in here from the registry, with their names (`ewc_lambda`, `router_scorer`, ...), types, defaults and
help. Every option is validated in `__post_init__` (a plugin's by its own config); a bad value raises an
`OptionError` (a `ValueError`) naming `ContinualConfig.<option>`, the value and what is allowed. Rules shared by
all options: numbers are finite, bools are real bools, a lone string for a list option is a one-element list.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from transformers import TrainingArguments

from .adapters import OSF_OPTIONS
from .optim import OPTIMIZER_OPTIONS
from .registry import all_option_sources
from .tasks.prompting import PROMPT_OPTIONS
from .utils.options import build_config, check_unique_options, options_dataclass
from .utils.validation import check_bool, check_choice, check_number, check_str_list

ADAPTER_STRATEGIES = ("full", "shared_lora", "lora_per_task", "osf")
CONTINUAL_METRICS = ("avg_acc", "bwt", "fwt", "forgetting")
LOSS_WEIGHTINGS = ("none", "uncertainty", "softmax")

#: the optimizer's options and every plugin's (one mixin generated from the option sources)
OPTION_SOURCES = [*OPTIMIZER_OPTIONS, *PROMPT_OPTIONS, *OSF_OPTIONS, *all_option_sources()]
PluginOptions = options_dataclass(
    "PluginOptions", OPTION_SOURCES, doc="The optimizer's, the prompts' and every registered plugin's options."
)
OWNER = "ContinualConfig"


@dataclass
class ContinualConfig(TrainingArguments, PluginOptions):
    """Training arguments, the options of a continual run, and (composed) the options of every plugin."""

    # --- task sequence and evaluation ------------------------------------------------------------------
    adapter_strategy: str = field(
        default="full",
        metadata={
            "help": "What trains for each task: 'full' (all trainable parameters of the model), 'shared_lora' "
            "(one LoRA adapter shared by all tasks), 'lora_per_task' (a new LoRA expert per task) or 'osf' "
            "(peft's orthogonal subspace fine-tuning of the lora_target_modules: the top singular directions of "
            "each weight frozen, the rest trained orthogonal to them, decomposed again with more frozen after "
            "every task; osf_* options).",
            "choices": list(ADAPTER_STRATEGIES),
        },
    )
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA scaling numerator (alpha / r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input, in [0, 1)."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        metadata={
            "help": "Module names LoRA adapts (peft `target_modules`); a lone name is a one-element list (not a "
            "regular expression, unlike peft's string form)."
        },
    )
    evaluate_unseen_tasks: bool = field(
        default=True,
        metadata={"help": "Also evaluate tasks not trained yet, and before the first task (needed for FWT)."},
    )
    evaluate_baseline: bool = field(
        default=True,
        metadata={
            "help": "Score every task before training the first one (the baseline FWT is measured against); "
            "only with evaluate_unseen_tasks."
        },
    )
    continual_eval_batch_size: int = field(
        default=64,
        metadata={
            "help": "At most this many examples per forward pass when scoring tasks (rank classification; each "
            "example is one packed row of its prompt and all its label words); continual_eval_token_budget "
            "bounds the pass too."
        },
    )
    continual_eval_token_budget: int = field(
        default=8192,
        metadata={
            "help": "Tokens per forward pass when scoring tasks (prompts + packed label tokens of all rows; and an "
            "eighth of it in kept logit rows): bounds evaluation memory whatever the number of labels."
        },
    )
    continual_eval_limit: int | None = field(
        default=None, metadata={"help": "Score at most this many evaluation examples per task (None: all)."}
    )
    continual_metrics: list[str] = field(
        default_factory=lambda: list(CONTINUAL_METRICS),
        metadata={"help": f"Continual metrics to report, from {list(CONTINUAL_METRICS)}."},
    )
    save_results_plot: bool = field(default=True, metadata={"help": "Write the accuracy matrix as a PNG heatmap."})
    append_eos_token: bool = field(
        default=True,
        metadata={
            "help": "Append the tokenizer's end-of-sequence token to every training target (prompt + label). "
            "True (the default) also teaches the model to stop after the label; it adds one target token per "
            "row, so the label's own tokens carry a smaller share of the task loss."
        },
    )
    answer_only_logits: bool = field(
        default=True,
        metadata={
            "help": "In task sequences, compute the LM head's logits only at the answer positions of a training "
            "batch (rows left-padded, `logits_to_keep`): the same loss and gradients, without the vocabulary "
            "projection of every prompt token. Off (full logits, right padding) when False, when you pass your own "
            "data_collator or a compute_loss_func, when the model's forward has no `logits_to_keep`, or when a "
            "plugin reads the logits of the whole input (`needs_full_logits`, e.g. generative replay with "
            "generative_replay_lm_lambda > 0); never in a plain `train()` on your own data."
        },
    )
    nonfinite_patience: int = field(
        default=5,
        metadata={
            "help": "Non-finite guard (always on): a training step whose loss or gradient is NaN/inf is skipped, "
            "counted and logged; this many consecutive skipped steps fail the task with an error."
        },
    )

    # --- loss weighting (the optimizer options are `OptimizerConfig`'s, composed in) ---------------------------
    loss_weighting: str = field(
        default="none",
        metadata={
            "help": "'none' (fixed plugin weights), 'uncertainty' (learned ½e^-s·L + ½s per term) or "
            "'softmax' (learned weights with a fixed sum): a differentiable loss-weight controller whose weights "
            "multiply each plugin's own fixed weight (replay_alpha, distill_lambda...), so it starts from them."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice(OWNER, "adapter_strategy", self.adapter_strategy, ADAPTER_STRATEGIES)
        check_number(OWNER, "lora_r", self.lora_r, 1, integer=True)
        check_number(OWNER, "lora_alpha", self.lora_alpha, 0, low_open=True)
        check_number(OWNER, "lora_dropout", self.lora_dropout, 0, 1, high_open=True)
        self.lora_target_modules = check_str_list(OWNER, "lora_target_modules", self.lora_target_modules)
        for name in ("evaluate_unseen_tasks", "evaluate_baseline", "save_results_plot", "append_eos_token"):
            check_bool(OWNER, name, getattr(self, name))
        check_bool(OWNER, "answer_only_logits", self.answer_only_logits)
        check_number(OWNER, "continual_eval_batch_size", self.continual_eval_batch_size, 1, integer=True)
        check_number(OWNER, "continual_eval_token_budget", self.continual_eval_token_budget, 1, integer=True)
        check_number(OWNER, "continual_eval_limit", self.continual_eval_limit, 1, integer=True, optional=True)
        check_number(OWNER, "nonfinite_patience", self.nonfinite_patience, 1, integer=True)
        self.continual_metrics = check_str_list(
            OWNER, "continual_metrics", self.continual_metrics, choices=CONTINUAL_METRICS, allow_empty=True
        )
        check_choice(OWNER, "loss_weighting", self.loss_weighting, LOSS_WEIGHTINGS)
        for source in OPTION_SOURCES:  # each plugin's options, by the config that owns them
            built = build_config(source, self, owner=OWNER, **dict(source.placeholders))
            for name, option in source.names().items():  # a lone string given for a list option: a 1-item list
                value = getattr(built, name)
                if isinstance(getattr(self, option), str) and isinstance(value, (list, tuple)):
                    setattr(self, option, list(value))


# a plugin option named like a TrainingArguments field or one of the run's own options would silently replace it in
# the composed dataclass: refuse that when the package is imported
check_unique_options(
    OPTION_SOURCES,
    reserved=[*(f.name for f in fields(TrainingArguments)), *ContinualConfig.__annotations__],
)
