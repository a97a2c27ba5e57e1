"""`ContinualConfig`: every continual-learning option, on top of `TrainingArguments`.

Like TRL's `SFTConfig`, it is a `TrainingArguments` subclass, so it works with `HfArgumentParser`, YAML
files and everything that already takes training arguments. Every option is validated in `__post_init__`;
a bad value raises a `ValueError` naming the field, the value and what is allowed. Rules shared by all options:
numbers must be finite (NaN and +-inf are refused), bools must be real bools (`'yes'` or `2` are refused: the
CLI and YAML convert strings, Python callers pass bools), and a lone string for a list option is a one-element
list (`lora_target_modules='q_proj'` is `['q_proj']`, never split into characters; not a regex as in peft).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from transformers import TrainingArguments

ADAPTER_STRATEGIES = ("full", "shared_lora", "lora_per_task")
CONTINUAL_METRICS = ("avg_acc", "bwt", "fwt", "forgetting")
EWC_MODES = ("separate", "online")
FISHER_TYPES = ("empirical", "true")
REPLAY_POLICIES = ("reservoir", "balanced")
EARLY_STOPPING_METRICS = ("accuracy", "loss")
LOSS_WEIGHTINGS = ("none", "uncertainty", "softmax")
GENERATIVE_CONDITIONINGS = ("task", "prototype")
FEATURE_REPLAY_TARGETS = ("features", "prototypes")
FEATURE_REPLAY_DTYPES = ("float32", "float16", "bfloat16")


def _fail(name: str, value, allowed: str) -> None:
    raise ValueError(f"ContinualConfig.{name}={value!r} is not allowed: {allowed}")


def config_error(err: ValueError, config: Any, owner: str, prefix: str) -> ValueError:
    """`<owner>.<name>=<v> is not allowed: ...` (an error of a config that `ContinualConfig` builds) restated as
    `ContinualConfig.<prefix><name>=<the field's value> is not allowed: ...`, so it names the option the user set."""
    message = str(err)
    match = re.match(rf"{owner}\.(\w+)(.*?) is not allowed: (.*)$", message, flags=re.S)
    if match and hasattr(config, prefix + match.group(1)):
        name, detail, allowed = prefix + match.group(1), match.group(2), match.group(3)
        if not detail.startswith("="):  # e.g. "SignatureConfig.layers entry 'x' is not allowed: ..."
            allowed = f"{detail.strip()}: {allowed}"
        return ValueError(f"ContinualConfig.{name}={getattr(config, name)!r} is not allowed: {allowed}")
    return ValueError(message.replace(f"{owner}.", f"ContinualConfig.{prefix}"))


def check_choice(name: str, value, choices) -> None:
    if isinstance(value, bool) or value not in choices:
        _fail(name, value, f"choose one of {list(choices)}")


def check_bool(name: str, value) -> None:
    """A real `bool`: `'yes'`, `'false'` or `2` would be truthy by accident (the CLI and YAML convert strings)."""
    if not isinstance(value, bool):
        _fail(name, value, "must be True or False (a bool)")


def check_str_list(name: str, value, choices=None, optional=False, allow_empty=False) -> list[str] | None:
    """A list of non-empty strings, returned as a new list. A lone string is a one-element list (like peft's and
    TRL's `target_modules` accept a string), never split into characters; `None` passes when `optional`."""
    if value is None and optional:
        return None
    if isinstance(value, str):
        value = [value]
    allowed = "a list of non-empty strings" + (f" from {list(choices)}" if choices is not None else "")
    allowed += " (or None)" if optional else ""
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
        _fail(name, value, allowed)
    if not value and not allow_empty:
        _fail(name, value, f"must be non-empty: {allowed}")
    if choices is not None:
        for item in value:
            check_choice(name, item, choices)
    return list(value)


def check_range(
    name: str, value, low=None, high=None, low_open=False, integer=False, optional=False, allow_inf=False
) -> None:
    """`low <= value <= high` (or `low < value` when `low_open`); `None` passes when `optional`.

    NaN is always refused and so is +-inf unless `allow_inf` (no option of this package gives infinity a meaning:
    an infinite weight or threshold only turns into NaN losses or a rule that never fires)."""
    if value is None and optional:
        return
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        _fail(name, value, f"must be {kind}" + (" or None" if optional else ""))
    if isinstance(value, float) and math.isnan(value):
        _fail(name, value, "must not be NaN")
    if isinstance(value, float) and math.isinf(value) and not allow_inf:
        _fail(name, value, "must be finite")
    bounds = f"{'>' if low_open else '>='} {low}" if low is not None else ""
    if high is not None:
        bounds = f"{bounds} and <= {high}" if bounds else f"<= {high}"
    if low is not None and (value <= low if low_open else value < low):
        _fail(name, value, f"must be {bounds}")
    if high is not None and value > high:
        _fail(name, value, f"must be {bounds}")


@dataclass
class ContinualConfig(TrainingArguments):
    """Training arguments plus the options of a continual run and of the built-in plugins."""

    # --- task sequence -------------------------------------------------------------------------------
    adapter_strategy: str = field(
        default="full",
        metadata={
            "help": "What trains for each task: 'full' (all trainable parameters of the model), 'shared_lora' "
            "(one LoRA adapter shared by all tasks) or 'lora_per_task' (a new LoRA expert per task).",
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
    continual_eval_batch_size: int = field(
        default=64, metadata={"help": "Examples per batch when scoring tasks by rank classification."}
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
    nonfinite_patience: int = field(
        default=5,
        metadata={
            "help": "Non-finite guard (always on): a training step whose loss or gradient is NaN/inf is skipped, "
            "counted and logged; this many consecutive skipped steps fail the task with an error."
        },
    )

    # --- EWC ----------------------------------------------------------------------------------------
    ewc_lambda: float = field(
        default=0.0, metadata={"help": "EWC strength lambda in (lambda/2) sum F (theta - theta*)^2; 0 disables EWC."}
    )
    ewc_mode: str = field(
        default="separate",
        metadata={
            "help": "'separate' (one Fisher and anchor per task) or 'online' (decayed running Fisher).",
            "choices": list(EWC_MODES),
        },
    )
    ewc_gamma: float = field(default=1.0, metadata={"help": "Online EWC decay of the old Fisher, in [0, 1]."})
    fisher_samples: int = field(default=50, metadata={"help": "Examples of a task used for its Fisher."})
    fisher_type: str = field(
        default="empirical",
        metadata={
            "help": "'empirical' (dataset labels) or 'true' (labels sampled from the model).",
            "choices": list(FISHER_TYPES),
        },
    )
    fisher_chunk_size: int | None = field(
        default=None,
        metadata={"help": "Rows per vmap call of the per-sample Fisher; None: as many as fit the memory budget."},
    )
    fisher_method: str = field(
        default="vmap",
        metadata={"help": "'vmap' (vectorized per-sample gradients) or 'loop' (one row at a time, the reference)."},
    )
    fisher_normalization: str = field(
        default="none",
        metadata={
            "help": "'none', 'max' or 'mean': divide each task's Fisher by its largest/mean entry so that "
            "ewc_lambda does not depend on how confident the model is on the task."
        },
    )
    gamma_gated_ewc: bool = field(
        default=False, metadata={"help": "Scale how much new Fisher accumulates by the neuromodulatory gamma gain."}
    )
    gamma_gain_lambda: float = field(default=3.0, metadata={"help": "Global scale of the gamma gain (>= 0)."})
    ewc_fixed_lambda_bypass_gamma: bool = field(
        default=False, metadata={"help": "Ignore the gamma gain even when gamma_gated_ewc is on."}
    )

    # --- replay -------------------------------------------------------------------------------------
    replay_alpha: float = field(default=0.0, metadata={"help": "Weight of the replay loss, in [0, 1]; 0 disables."})
    replay_buffer_size: int = field(default=200, metadata={"help": "Examples kept in the replay memory."})
    replay_policy: str = field(
        default="balanced",
        metadata={"help": "'reservoir' or 'balanced' (equal share per task).", "choices": list(REPLAY_POLICIES)},
    )
    replay_batch_size: int = field(default=8, metadata={"help": "Replayed examples per training step."})
    replay_examples_per_task: int | None = field(
        default=None,
        metadata={
            "help": "Replay: offer at most this many training rows of each finished task to the memory (None: all "
            "its rows); the memory itself keeps at most replay_buffer_size rows."
        },
    )
    generative_replay_ratio: float = field(
        default=0.0, metadata={"help": "Pseudo-examples generated per new-task example (LAMOL); 0 disables."}
    )
    generative_replay_lm_lambda: float = field(
        default=0.25,
        metadata={"help": "Generative replay: weight of the generation (LM) loss on real and pseudo rows; 0: off."},
    )
    generative_replay_conditioning: str = field(
        default="task",
        metadata={
            "help": "Generative replay: 'task' (plain LAMOL, task-prefixed generation) or 'prototype' "
            "(generation conditioned on class-prototype prefixes).",
            "choices": list(GENERATIVE_CONDITIONINGS),
        },
    )
    generative_replay_max_new_tokens: int = field(
        default=32, metadata={"help": "Generative replay: generation budget per pseudo-example (tokens)."}
    )
    generative_replay_top_k: int = field(
        default=0, metadata={"help": "Generative replay: top-k sampling (0: sample the full distribution)."}
    )
    generative_replay_temperature: float = field(
        default=1.0, metadata={"help": "Generative replay: sampling temperature (> 0)."}
    )
    generative_replay_max_rounds: int = field(
        default=3, metadata={"help": "Generative replay: sampling rounds per old task before giving up its share."}
    )
    generative_replay_prototype_samples: int = field(
        default=64, metadata={"help": "Generative replay ('prototype'): training rows the prototypes come from."}
    )
    generative_replay_prototypes_per_class: int = field(
        default=2, metadata={"help": "Generative replay ('prototype'): real rows kept per class as prefixes."}
    )
    generative_replay_prefix_words: int = field(
        default=1, metadata={"help": "Generative replay ('prototype'): words of a prototype's prompt kept."}
    )
    feature_replay_alpha: float = field(
        default=0.0, metadata={"help": "Weight of the feature-distillation loss, in [0, 1]; 0 disables."}
    )
    feature_replay_samples_per_task: int = field(
        default=64, metadata={"help": "Feature replay: training rows of each task kept in its feature memory."}
    )
    feature_replay_target: str = field(
        default="features",
        metadata={
            "help": "Feature replay: 'features' (distil the exact stored features) or 'prototypes' (distances to "
            "k-means centroids).",
            "choices": list(FEATURE_REPLAY_TARGETS),
        },
    )
    feature_replay_k_per_class: int = field(
        default=1, metadata={"help": "Feature replay: k-means centroids per class ('prototypes' target)."}
    )
    feature_replay_dtype: str = field(
        default="float32",
        metadata={
            "help": "Feature replay: dtype the stored features are kept in.",
            "choices": list(FEATURE_REPLAY_DTYPES),
        },
    )

    # --- early stopping of adapter training ---------------------------------------------------------
    early_stopping_patience: int = field(
        default=3,
        metadata={
            "help": "Early stopping: epochs without improvement before a task stops (an integer >= 1). It acts "
            "only with the 'early_stopping' plugin: to train every epoch, leave the plugin out."
        },
    )
    early_stopping_metric: str = field(
        default="accuracy",
        metadata={"help": "'accuracy' (maximized) or 'loss' (minimized).", "choices": list(EARLY_STOPPING_METRICS)},
    )
    early_stopping_min_epochs: int = field(default=1, metadata={"help": "Epochs always run before stopping."})
    early_stopping_min_delta: float = field(default=0.001, metadata={"help": "Smallest change that counts."})
    early_stopping_restore_best: bool = field(
        default=True, metadata={"help": "Early stopping: restore the best epoch's weights when a task ends."}
    )

    # --- adaptive scheduling and freezing (plugins "adaptive_scheduler", "freezing") -----------------------
    adaptive_lr_up: float = field(default=1.02, metadata={"help": "Adaptive scheduler: LR factor on improvement."})
    adaptive_lr_down: float = field(default=0.8, metadata={"help": "Adaptive scheduler: LR factor on worsening."})
    adaptive_patience: int = field(default=5, metadata={"help": "Adaptive scheduler: logs without improvement."})
    adaptive_cooldown: int = field(default=5, metadata={"help": "Adaptive scheduler: logs held after a cut."})
    adaptive_dither: bool = field(default=False, metadata={"help": "Adaptive scheduler: exploration noise."})
    adaptive_reward_key: str | None = field(
        default=None,
        metadata={"help": "Adaptive scheduler: a logged metric also fed to the laws as a reward (None: loss only)."},
    )
    freeze_threshold: float = field(default=1e-3, metadata={"help": "Freezing: gradient-norm EMA threshold."})
    freeze_threshold_mode: str = field(default="absolute", metadata={"help": "Freezing: 'absolute' or 'relative'."})
    freeze_granularity: str = field(default="parameter", metadata={"help": "Freezing: 'parameter' or 'module'."})
    freeze_probe_every: int = field(default=20, metadata={"help": "Freezing: steps between probes (0: never)."})
    freeze_ema_beta: float = field(
        default=0.9, metadata={"help": "Freezing: EMA factor of the gradient norms, [0, 1)."}
    )
    freeze_warmup_steps: int = field(default=10, metadata={"help": "Freezing: steps before anything may freeze."})
    freeze_max_frozen_fraction: float = field(
        default=0.9, metadata={"help": "Freezing: most of the parameters (by count) frozen at once, in [0, 1)."}
    )

    # --- head gates and their controller (plugins "head_l0", "gate_feedback") -----------------------------
    gate_mode: str | None = field(
        default=None,
        metadata={
            "help": "Attach one gate per attention head: None (no gates), 'fixed' (set by the RL controller) "
            "or 'hard_concrete' (learnable L0 gates)."
        },
    )
    gate_l0_weight: float = field(default=0.01, metadata={"help": "Weight of the L0 penalty of hard-concrete gates."})
    gate_algorithm: str = field(default="ppo", metadata={"help": "Gate controller: 'reinforce', 'a2c' or 'ppo'."})
    gate_feedback_every: int = field(default=50, metadata={"help": "Steps between controller feedback rounds."})
    gate_feedback_mode: str = field(
        default="periodic", metadata={"help": "'periodic' (validation subset) or 'continuous' (training loss)."}
    )
    gate_eval_size: int = field(default=64, metadata={"help": "Validation rows scored per feedback round."})
    gate_min_active_fraction: float = field(default=0.0, metadata={"help": "Fewest heads kept, as a fraction."})
    gate_max_active_fraction: float = field(default=1.0, metadata={"help": "Compute budget: most heads active."})
    gate_efficiency_factor: float = field(default=0.1, metadata={"help": "Reward per pruned fraction of heads."})
    gate_eval_batch_size: int = field(default=16, metadata={"help": "Gate feedback: rows per validation batch."})
    gate_statistics: list[str] = field(
        default_factory=lambda: ["importance", "entropy"],
        metadata={
            "help": "Gate feedback: per-head statistics in the controller's state, from 'importance', 'entropy'."
        },
    )
    gate_stats_batches: int = field(default=1, metadata={"help": "Gate feedback: batches the statistics use."})
    gate_preference: float | None = field(
        default=None,
        metadata={"help": "Gate feedback: at train end apply the Pareto point picked with this preference (>= 0)."},
    )
    gate_log_gates: bool = field(default=True, metadata={"help": "Gate feedback: log the active-head fraction."})

    # --- optimizers and loss weighting ------------------------------------------------------------------
    optimizer_name: str | None = field(
        default=None,
        metadata={
            "help": "Optimizer by name through pytorch_optimizer / torch: adamw, adam, sgd, lamb, lookahead "
            "or any pytorch_optimizer name; None keeps TrainingArguments.optim."
        },
    )
    lookahead_inner: str = field(default="adamw", metadata={"help": "Optimizer wrapped by 'lookahead'."})
    lookahead_k: int = field(default=5, metadata={"help": "Fast steps between Lookahead's slow-weight updates."})
    lookahead_alpha: float = field(default=0.5, metadata={"help": "Lookahead interpolation factor in [0, 1]."})
    gradient_centralization: bool = field(
        default=False, metadata={"help": "Centralize the gradients of matrix parameters (needs optimizer_name)."}
    )
    loss_weighting: str = field(
        default="none",
        metadata={
            "help": "'none' (fixed plugin weights), 'uncertainty' (learned ½e^-s·L + ½s per term) or "
            "'softmax' (learned weights with a fixed sum): a differentiable loss-weight controller."
        },
    )

    # --- expert routing (plugin "expert_routing"; defaults are RouterConfig's / SignatureConfig's) -----------------
    router_scorer: str = field(
        default="cosine",
        metadata={
            "help": "Expert routing: how a task's signature is scored against each expert's profile: "
            "'cosine', 'linear' or 'mlp' (learned: refitted from all reuse outcomes once 4 exist with a success "
            "and a failure; until then routing is by cosine, after it the score is p(reuse succeeds), compared "
            "with 0.5 to reuse and 0.25 to fork instead of the cosine thresholds)."
        },
    )
    router_decision: str = field(
        default="threshold",
        metadata={
            "help": "Expert routing: decision rule for reuse / fork / create: 'threshold', 'ucb', 'calibrated' "
            "or 'adaptive'."
        },
    )
    router_normalize: str = field(
        default="standardize",
        metadata={
            "help": "Expert routing: signatures compared after 'standardize' (against the signatures seen), "
            "'center' or 'none' (raw cosine; then use higher thresholds, e.g. 0.9 / 0.75)."
        },
    )
    router_reuse_threshold: float = field(
        default=0.5, metadata={"help": "Expert routing: reuse the best expert if its score is >= this."}
    )
    router_fork_threshold: float = field(
        default=0.3,
        metadata={
            "help": "Expert routing: fork the best expert if its score is >= this (and below the reuse "
            "threshold), else create a new one."
        },
    )
    router_bootstrap_experts: int = field(
        default=0,
        metadata={"help": "Expert routing: create experts (reusing only near-duplicates) until this many exist."},
    )
    router_index: str = field(
        default="exact",
        metadata={"help": "Expert routing: nearest-expert search: 'exact', 'faiss' (needs faiss-cpu) or 'auto'."},
    )
    router_top_k: int = field(default=8, metadata={"help": "Expert routing: candidates re-ranked by learned scorers."})
    router_tolerance: float = field(
        default=0.05,
        metadata={
            "help": "Expert routing: a reuse succeeds if the expert's earlier tasks lose at most this much "
            "accuracy, in [0, 1]."
        },
    )
    router_eval_limit: int | None = field(
        default=64,
        metadata={"help": "Expert routing: validation examples scored per task for an expert's accuracy (None: all)."},
    )
    router_verify_reuse: bool = field(
        default=True,
        metadata={
            "help": "Expert routing: a reuse trains a fork of the expert, kept as the task's own expert (the "
            "original untouched) if the expert's earlier tasks lose more than router_tolerance with it, else "
            "merged back. False: train the reused expert itself (a wrong reuse cannot be undone)."
        },
    )
    signature_parts: list[str] = field(
        default_factory=lambda: ["text", "gradient", "context"],
        metadata={"help": "Expert routing: parts of a task signature, from 'text', 'gradient', 'context'."},
    )
    signature_layers: list[str] | None = field(
        default=None,
        metadata={
            "help": "Expert routing: parameter/module names the gradient sketch is taken on, and/or "
            "'input_embeddings' (None: input embeddings + the last layer's attention)."
        },
    )
    signature_sketch_dim: int = field(default=64, metadata={"help": "Expert routing: size of the gradient sketch."})
    signature_text_dim: int | None = field(
        default=128,
        metadata={
            "help": "Expert routing: the description embedding is projected to this size (None: the "
            "encoder's own size)."
        },
    )
    signature_text_encoder: str | None = field(
        default=None,
        metadata={
            "help": "Expert routing: sentence-transformers model embedding task descriptions (e.g. "
            "all-MiniLM-L6-v2); None: the backbone's mean-pooled hidden states."
        },
    )
    signature_n_examples: int = field(
        default=16, metadata={"help": "Expert routing: examples of a task its gradient and context parts use."}
    )

    def expert_signature_config(self) -> Any:
        """The `SignatureConfig` of the `signature_*` fields (its errors renamed to the fields)."""
        from .experts.signature import SignatureConfig

        try:
            return SignatureConfig(
                parts=tuple(self.signature_parts),
                layers=None if self.signature_layers is None else list(self.signature_layers),
                sketch_dim=self.signature_sketch_dim,
                text_dim=self.signature_text_dim,
                text_encoder=self.signature_text_encoder,
                n_examples=self.signature_n_examples,
            )
        except ValueError as err:
            raise config_error(err, self, "SignatureConfig", "signature_") from None

    def expert_router_config(self, dim: int) -> Any:
        """The `RouterConfig` of the `router_*` fields for signatures of size `dim` (errors renamed to the fields)."""
        from .experts.router import RouterConfig

        try:
            return RouterConfig(
                dim=dim,
                scorer=self.router_scorer,
                decision=self.router_decision,
                normalize=self.router_normalize,
                reuse_threshold=self.router_reuse_threshold,
                fork_threshold=self.router_fork_threshold,
                bootstrap_experts=self.router_bootstrap_experts,
                index=self.router_index,
                top_k=self.router_top_k,
            )
        except ValueError as err:
            raise config_error(err, self, "RouterConfig", "router_") from None

    def _check_expert_routing(self) -> None:
        """Validate the routing options by building the configs that own the rules (the router's `dim` is only
        known from the model, in `ExpertRoutingPlugin.from_config`: any valid size stands in here)."""
        from .experts.plugin import check_tolerance

        for name in ("router_reuse_threshold", "router_fork_threshold"):
            check_range(name, getattr(self, name), -1, 1)  # cosine similarities
        if self.router_fork_threshold > self.router_reuse_threshold:  # name both: either may be the one set
            _fail(
                "router_fork_threshold",
                self.router_fork_threshold,
                f"with ContinualConfig.router_reuse_threshold={self.router_reuse_threshold!r}: -1 <= "
                f"router_fork_threshold <= router_reuse_threshold ({self.router_reuse_threshold}) <= 1",
            )
        check_range("router_tolerance", self.router_tolerance)  # a finite number; its range: check_tolerance below
        check_range("router_bootstrap_experts", self.router_bootstrap_experts, 0, integer=True)
        check_range("router_top_k", self.router_top_k, 1, integer=True)
        check_range("router_eval_limit", self.router_eval_limit, 1, integer=True, optional=True)
        for name in ("router_scorer", "router_decision", "router_normalize", "router_index"):
            if not isinstance(getattr(self, name), str):
                _fail(name, getattr(self, name), "must be a string (see the option's help for the names)")
        self.signature_parts = check_str_list(
            "signature_parts", self.signature_parts, allow_empty=True
        )  # names and emptiness: SignatureConfig's rules below
        self.signature_layers = check_str_list(
            "signature_layers", self.signature_layers, optional=True, allow_empty=True
        )
        check_range("signature_sketch_dim", self.signature_sketch_dim, 1, integer=True)
        check_range("signature_text_dim", self.signature_text_dim, 1, integer=True, optional=True)
        check_range("signature_n_examples", self.signature_n_examples, 1, integer=True)
        if self.signature_text_encoder is not None and (
            not isinstance(self.signature_text_encoder, str) or not self.signature_text_encoder
        ):
            _fail("signature_text_encoder", self.signature_text_encoder, "None or a sentence-transformers model name")
        self.expert_signature_config()
        self.expert_router_config(dim=1)
        try:
            check_tolerance(self.router_tolerance)
        except ValueError as err:
            raise config_error(err, self, "ExpertRoutingPlugin", "router_") from None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("adapter_strategy", self.adapter_strategy, ADAPTER_STRATEGIES)
        check_range("lora_r", self.lora_r, 1, integer=True)
        check_range("lora_alpha", self.lora_alpha, 0, low_open=True)
        check_range("lora_dropout", self.lora_dropout, 0, 0.999)
        self.lora_target_modules = check_str_list("lora_target_modules", self.lora_target_modules)
        for name in BOOL_FIELDS:
            check_bool(name, getattr(self, name))
        check_range("continual_eval_batch_size", self.continual_eval_batch_size, 1, integer=True)
        check_range("continual_eval_limit", self.continual_eval_limit, 1, integer=True, optional=True)
        check_range("nonfinite_patience", self.nonfinite_patience, 1, integer=True)
        self.continual_metrics = check_str_list(
            "continual_metrics", self.continual_metrics, choices=CONTINUAL_METRICS, allow_empty=True
        )
        check_range("ewc_lambda", self.ewc_lambda, 0)
        check_choice("ewc_mode", self.ewc_mode, EWC_MODES)
        check_range("ewc_gamma", self.ewc_gamma, 0, 1)
        check_range("fisher_samples", self.fisher_samples, 1, integer=True)
        check_choice("fisher_type", self.fisher_type, FISHER_TYPES)
        check_range("fisher_chunk_size", self.fisher_chunk_size, 1, integer=True, optional=True)
        check_choice("fisher_method", self.fisher_method, ("vmap", "loop"))
        check_choice("fisher_normalization", self.fisher_normalization, ("none", "max", "mean"))
        check_range("gamma_gain_lambda", self.gamma_gain_lambda, 0)
        check_range("replay_alpha", self.replay_alpha, 0, 1)
        check_range("replay_buffer_size", self.replay_buffer_size, 1, integer=True)
        check_choice("replay_policy", self.replay_policy, REPLAY_POLICIES)
        check_range("replay_batch_size", self.replay_batch_size, 1, integer=True)
        check_range("replay_examples_per_task", self.replay_examples_per_task, 1, integer=True, optional=True)
        check_range("generative_replay_ratio", self.generative_replay_ratio, 0)
        check_range("generative_replay_lm_lambda", self.generative_replay_lm_lambda, 0)
        check_choice("generative_replay_conditioning", self.generative_replay_conditioning, GENERATIVE_CONDITIONINGS)
        check_range("generative_replay_max_new_tokens", self.generative_replay_max_new_tokens, 1, integer=True)
        check_range("generative_replay_top_k", self.generative_replay_top_k, 0, integer=True)
        check_range("generative_replay_temperature", self.generative_replay_temperature, 0, low_open=True)
        check_range("generative_replay_max_rounds", self.generative_replay_max_rounds, 1, integer=True)
        check_range("generative_replay_prototype_samples", self.generative_replay_prototype_samples, 1, integer=True)
        check_range(
            "generative_replay_prototypes_per_class", self.generative_replay_prototypes_per_class, 1, integer=True
        )
        check_range("generative_replay_prefix_words", self.generative_replay_prefix_words, 0, integer=True)
        check_range("feature_replay_alpha", self.feature_replay_alpha, 0, 1)
        check_range("feature_replay_samples_per_task", self.feature_replay_samples_per_task, 1, integer=True)
        check_choice("feature_replay_target", self.feature_replay_target, FEATURE_REPLAY_TARGETS)
        check_range("feature_replay_k_per_class", self.feature_replay_k_per_class, 1, integer=True)
        check_choice("feature_replay_dtype", self.feature_replay_dtype, FEATURE_REPLAY_DTYPES)
        if self.early_stopping_patience is None:
            _fail(
                "early_stopping_patience",
                None,
                "an integer >= 1 (to train every epoch, leave the 'early_stopping' plugin out)",
            )
        check_range("early_stopping_patience", self.early_stopping_patience, 1, integer=True)
        check_choice("early_stopping_metric", self.early_stopping_metric, EARLY_STOPPING_METRICS)
        check_range("early_stopping_min_epochs", self.early_stopping_min_epochs, 0, integer=True)
        check_range("early_stopping_min_delta", self.early_stopping_min_delta, 0)
        check_choice("loss_weighting", self.loss_weighting, LOSS_WEIGHTINGS)
        check_choice("gate_mode", self.gate_mode, (None, "fixed", "hard_concrete"))
        check_range("gate_l0_weight", self.gate_l0_weight, 0)
        check_choice("gate_algorithm", self.gate_algorithm, ("reinforce", "a2c", "ppo"))
        check_range("gate_feedback_every", self.gate_feedback_every, 1, integer=True)
        check_choice("gate_feedback_mode", self.gate_feedback_mode, ("periodic", "continuous"))
        check_range("gate_eval_size", self.gate_eval_size, 1, integer=True)
        check_range("gate_min_active_fraction", self.gate_min_active_fraction, 0, 1)
        check_range("gate_max_active_fraction", self.gate_max_active_fraction, self.gate_min_active_fraction, 1)
        check_range("gate_efficiency_factor", self.gate_efficiency_factor, 0)
        check_range("gate_eval_batch_size", self.gate_eval_batch_size, 1, integer=True)
        self.gate_statistics = check_str_list(
            "gate_statistics", self.gate_statistics, choices=("importance", "entropy"), allow_empty=True
        )
        check_range("gate_stats_batches", self.gate_stats_batches, 1, integer=True)
        check_range("gate_preference", self.gate_preference, 0, optional=True)
        check_range("adaptive_lr_up", self.adaptive_lr_up, 1)
        check_range("adaptive_lr_down", self.adaptive_lr_down, 0, 1, low_open=True)
        check_range("adaptive_patience", self.adaptive_patience, 0, integer=True)
        check_range("adaptive_cooldown", self.adaptive_cooldown, 0, integer=True)
        if self.adaptive_reward_key is not None and (
            not isinstance(self.adaptive_reward_key, str) or not self.adaptive_reward_key
        ):
            _fail("adaptive_reward_key", self.adaptive_reward_key, "None or the name of a logged metric")
        check_range("freeze_threshold", self.freeze_threshold, 0)
        check_choice("freeze_threshold_mode", self.freeze_threshold_mode, ("absolute", "relative"))
        check_choice("freeze_granularity", self.freeze_granularity, ("parameter", "module"))
        check_range("freeze_probe_every", self.freeze_probe_every, 0, integer=True)
        check_range("freeze_ema_beta", self.freeze_ema_beta, 0, 1)
        if self.freeze_ema_beta == 1:
            _fail("freeze_ema_beta", self.freeze_ema_beta, "must be >= 0 and < 1")
        check_range("freeze_warmup_steps", self.freeze_warmup_steps, 0, integer=True)
        check_range("freeze_max_frozen_fraction", self.freeze_max_frozen_fraction, 0, 1)
        if self.freeze_max_frozen_fraction == 1:
            _fail("freeze_max_frozen_fraction", self.freeze_max_frozen_fraction, "must be >= 0 and < 1")
        if self.gradient_centralization and self.optimizer_name is None:
            _fail("gradient_centralization", True, "needs optimizer_name (it hooks the named optimizer)")
        if self.optimizer_name is not None and (not isinstance(self.optimizer_name, str) or not self.optimizer_name):
            _fail("optimizer_name", self.optimizer_name, "None or an optimizer name (adamw, lamb, lookahead, ...)")
        from .optim import OptimizerConfig

        try:  # the lookahead_* options are checked even when unused (a typo there should not wait for its use)
            OptimizerConfig(
                self.optimizer_name or "adamw",
                self.lookahead_inner,
                self.lookahead_k,
                self.lookahead_alpha,
                self.gradient_centralization,
            )
        except ValueError as err:
            raise ValueError(str(err).replace("OptimizerConfig.", "ContinualConfig.")) from None
        self._check_expert_routing()


#: the bool options of `ContinualConfig` (checked to be real bools)
BOOL_FIELDS = (
    "evaluate_unseen_tasks",
    "save_results_plot",
    "append_eos_token",
    "gamma_gated_ewc",
    "ewc_fixed_lambda_bypass_gamma",
    "early_stopping_restore_best",
    "adaptive_dither",
    "gradient_centralization",
    "router_verify_reuse",
    "gate_log_gates",
)
