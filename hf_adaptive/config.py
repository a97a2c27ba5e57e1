"""`ContinualConfig`: every continual-learning option, on top of `TrainingArguments`.

Like TRL's `SFTConfig`, it is a `TrainingArguments` subclass, so it works with `HfArgumentParser`, YAML
files and everything that already takes training arguments. Every option is validated in `__post_init__`;
a bad value raises a `ValueError` naming the field, the value and what is allowed.
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
    if value not in choices:
        _fail(name, value, f"choose one of {list(choices)}")


def check_range(name: str, value, low=None, high=None, low_open=False, integer=False, optional=False) -> None:
    """`low <= value <= high` (or `low < value` when `low_open`); `None` passes when `optional`."""
    if value is None and optional:
        return
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        _fail(name, value, f"must be {kind}")
    if isinstance(value, float) and math.isnan(value):
        _fail(name, value, "must not be NaN")
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
        metadata={"help": "Module names LoRA adapts (peft `target_modules`)."},
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
    generative_replay_ratio: float = field(
        default=0.0, metadata={"help": "Pseudo-examples generated per new-task example (LAMOL); 0 disables."}
    )
    feature_replay_alpha: float = field(
        default=0.0, metadata={"help": "Weight of the feature-distillation loss, in [0, 1]; 0 disables."}
    )

    # --- early stopping of adapter training ---------------------------------------------------------
    early_stopping_patience: int | None = field(
        default=None, metadata={"help": "Epochs without improvement before a task stops; None disables."}
    )
    early_stopping_metric: str = field(
        default="accuracy",
        metadata={"help": "'accuracy' (maximized) or 'loss' (minimized).", "choices": list(EARLY_STOPPING_METRICS)},
    )
    early_stopping_min_epochs: int = field(default=1, metadata={"help": "Epochs always run before stopping."})
    early_stopping_min_delta: float = field(default=0.001, metadata={"help": "Smallest change that counts."})

    # --- adaptive scheduling and freezing (plugins "adaptive_scheduler", "freezing") -----------------------
    adaptive_lr_up: float = field(default=1.02, metadata={"help": "Adaptive scheduler: LR factor on improvement."})
    adaptive_lr_down: float = field(default=0.8, metadata={"help": "Adaptive scheduler: LR factor on worsening."})
    adaptive_patience: int = field(default=5, metadata={"help": "Adaptive scheduler: logs without improvement."})
    adaptive_cooldown: int = field(default=5, metadata={"help": "Adaptive scheduler: logs held after a cut."})
    adaptive_dither: bool = field(default=False, metadata={"help": "Adaptive scheduler: exploration noise."})
    freeze_threshold: float = field(default=1e-3, metadata={"help": "Freezing: gradient-norm EMA threshold."})
    freeze_threshold_mode: str = field(default="absolute", metadata={"help": "Freezing: 'absolute' or 'relative'."})
    freeze_granularity: str = field(default="parameter", metadata={"help": "Freezing: 'parameter' or 'module'."})
    freeze_probe_every: int = field(default=20, metadata={"help": "Freezing: steps between probes (0: never)."})

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
            "'cosine', 'linear' or 'mlp' (learned from reuse outcomes)."
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

        for name in ("router_reuse_threshold", "router_fork_threshold", "router_tolerance"):
            check_range(name, getattr(self, name))  # a number (the configs compare them)
        if not isinstance(self.signature_parts, (list, tuple)) or not all(
            isinstance(p, str) for p in self.signature_parts
        ):
            _fail("signature_parts", self.signature_parts, "a list of part names from ['text', 'gradient', 'context']")
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
        if not self.lora_target_modules or not all(isinstance(m, str) and m for m in self.lora_target_modules):
            _fail("lora_target_modules", self.lora_target_modules, "must be a non-empty list of module names")
        check_range("continual_eval_batch_size", self.continual_eval_batch_size, 1, integer=True)
        check_range("continual_eval_limit", self.continual_eval_limit, 1, integer=True, optional=True)
        for metric in self.continual_metrics:
            check_choice("continual_metrics", metric, CONTINUAL_METRICS)
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
        check_range("generative_replay_ratio", self.generative_replay_ratio, 0)
        check_range("feature_replay_alpha", self.feature_replay_alpha, 0, 1)
        check_range("early_stopping_patience", self.early_stopping_patience, 1, integer=True, optional=True)
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
        check_range("adaptive_lr_up", self.adaptive_lr_up, 1)
        check_range("adaptive_lr_down", self.adaptive_lr_down, 0, 1, low_open=True)
        check_range("adaptive_patience", self.adaptive_patience, 0, integer=True)
        check_range("adaptive_cooldown", self.adaptive_cooldown, 0, integer=True)
        check_range("freeze_threshold", self.freeze_threshold, 0)
        check_choice("freeze_threshold_mode", self.freeze_threshold_mode, ("absolute", "relative"))
        check_choice("freeze_granularity", self.freeze_granularity, ("parameter", "module"))
        check_range("freeze_probe_every", self.freeze_probe_every, 0, integer=True)
        if self.gradient_centralization and self.optimizer_name is None:
            _fail("gradient_centralization", True, "needs optimizer_name (it hooks the named optimizer)")
        if self.optimizer_name is not None:
            from .optim import OptimizerConfig

            try:
                OptimizerConfig(
                    self.optimizer_name,
                    self.lookahead_inner,
                    self.lookahead_k,
                    self.lookahead_alpha,
                    self.gradient_centralization,
                )
            except ValueError as err:
                raise ValueError(str(err).replace("OptimizerConfig.", "ContinualConfig.")) from None
        self._check_expert_routing()
