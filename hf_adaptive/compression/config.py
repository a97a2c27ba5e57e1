"""The options of compression, declared once: `GradualPruningConfig` (gradual magnitude pruning),
`QuantizationConfig` (post-training quantization) and `QuantizationAwareTrainingConfig` (the QAT plugin).

Light on purpose (dataclasses and the validation helpers only): `ContinualConfig` and the CLI read these fields to
offer them as options (`GRADUAL_PRUNING_OPTIONS`, prefix `prune_`; `QAT_OPTIONS`, prefix `qat_`) without importing
torch, torchao or the plugins.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..utils.options import OptionSource
from ..utils.validation import check_bool, check_choice, check_number, check_order, check_str_list

#: magnitude ranking per weight matrix ("layer") or over all targeted weights together ("global")
SCOPES = ("layer", "global")
#: "none": single weights; "mlp_channels": whole intermediate channels of the MLPs (attention heads have the gates)
STRUCTURES = ("none", "mlp_channels")
#: the attention and MLP projections of the decoder layers (Llama / Gemma / Mistral names): never the embeddings,
#: the LM head or the norms
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class GradualPruningConfig:
    """Options of `GradualPruningPlugin`: magnitude pruning on the Zhu & Gupta (2017) cubic schedule

    s_t = s_f + (s_i − s_f)(1 − (t − t0)/(nΔt))³ at t = t0, t0 + Δt, ..., t0 + nΔt optimizer steps, s_f after.
    """

    initial_sparsity: float = field(
        default=0.0, metadata={"help": "s_i: the sparsity the first update (at begin_step) prunes to, in [0, 1)."}
    )
    final_sparsity: float = field(
        default=0.5,
        metadata={"help": "s_f: the sparsity reached at begin_step + num_updates * frequency and held after, [0, 1)."},
    )
    begin_step: int = field(default=0, metadata={"help": "t0: the optimizer step of the first pruning update."})
    num_updates: int = field(
        default=10, metadata={"help": "n: pruning updates after the first one (the ramp lasts n * frequency steps)."}
    )
    frequency: int = field(default=10, metadata={"help": "Δt: optimizer steps between two pruning updates."})
    scope: str = field(
        default="layer",
        metadata={
            "help": "'layer': every weight matrix pruned to the scheduled sparsity; 'global': one magnitude ranking "
            "over all targeted weights (matrices end up unevenly sparse).",
            "choices": list(SCOPES),
        },
    )
    target_modules: tuple[str, ...] = field(
        default=DEFAULT_TARGETS,
        metadata={
            "help": "Linear layers to prune: full module names or name suffixes (default: the attention and MLP "
            "projections). Embeddings and the LM head are refused."
        },
    )
    structured: str = field(
        default="none",
        metadata={
            "help": "'none': single weights; 'mlp_channels': whole intermediate MLP channels (gate/up rows and the "
            "down column together, ranked by their L2 norm); the sparsity is then the fraction of channels.",
            "choices": list(STRUCTURES),
        },
    )
    allow_regrowth: bool = field(
        default=False,
        metadata={
            "help": "False: masks only grow, across tasks too (a weight pruned in task 1 stays zero). True: every "
            "task after the first starts with the masks released, and its updates rank all targeted weights anew."
        },
    )
    schedule_per_task: bool = field(
        default=False,
        metadata={
            "help": "False: one schedule over the optimizer steps of the whole sequence. True: every task restarts "
            "the schedule at its own step 0, from max(initial_sparsity, the sparsity reached so far)."
        },
    )
    permanent_at_end: bool = field(
        default=True,
        metadata={
            "help": "At the end of the last task (or of a plain train()), drop the masks: the zeros are ordinary "
            "weights and the plugin stops pruning."
        },
    )

    def __post_init__(self) -> None:
        owner = type(self).__name__
        check_number(owner, "initial_sparsity", self.initial_sparsity, low=0, high=1, high_open=True)
        check_number(owner, "final_sparsity", self.final_sparsity, low=0, high=1, high_open=True)
        check_order(owner, "initial_sparsity", self.initial_sparsity, "final_sparsity", self.final_sparsity)
        check_number(owner, "begin_step", self.begin_step, low=0, integer=True)
        check_number(owner, "num_updates", self.num_updates, low=1, integer=True)
        check_number(owner, "frequency", self.frequency, low=1, integer=True)
        check_choice(owner, "scope", self.scope, SCOPES)
        self.target_modules = tuple(check_str_list(owner, "target_modules", self.target_modules))
        check_choice(owner, "structured", self.structured, STRUCTURES)
        check_bool(owner, "allow_regrowth", self.allow_regrowth)
        check_bool(owner, "schedule_per_task", self.schedule_per_task)
        check_bool(owner, "permanent_at_end", self.permanent_at_end)
        self.initial_sparsity = float(self.initial_sparsity)
        self.final_sparsity = float(self.final_sparsity)


#: GradualPruningPlugin's options: `prune_initial_sparsity`, `prune_final_sparsity`, `prune_begin_step`, ...
GRADUAL_PRUNING_OPTIONS = (OptionSource(GradualPruningConfig, "prune_"),)


# ------------------------------------------------------------------------------------------------- quantization
#: the torchao schemes that run on CPU with torchao 0.18: int8 weights (activations float), int8 dynamic activations
#: + int8 weights, int8 dynamic activations + 4-bit grouped weights ("8da4w")
QUANT_SCHEMES = ("int8_weight_only", "int8_dynamic", "8da4w")
#: when the QAT plugin fake-quantizes: the last task, every task, or the last `recovery_steps` steps of the last task
QAT_TASKS = ("last", "all", "recovery")


@dataclass
class QuantizationConfig:
    """What `quantize_model` quantizes, and how (post-training quantization through torchao)."""

    scheme: str = field(
        default="8da4w",
        metadata={
            "help": "'int8_weight_only': int8 weights per output channel, float activations; 'int8_dynamic': int8 "
            "weights and int8 activations quantized per token at run time; '8da4w': int8 dynamic activations + "
            "symmetric 4-bit weights in groups of group_size input columns.",
            "choices": list(QUANT_SCHEMES),
        },
    )
    group_size: int = field(
        default=32,
        metadata={
            "help": "8da4w only: input columns that share one weight scale (every quantized Linear's in_features "
            "must be a multiple of it). Smaller: more accurate, larger scales overhead."
        },
    )
    include_lm_head: bool = field(
        default=False,
        metadata={
            "help": "Also quantize the LM head (untied from the input embeddings first when tied). Default: the LM "
            "head and the embeddings stay in their float dtype; only the decoder's Linear layers are quantized."
        },
    )

    def __post_init__(self) -> None:
        owner = type(self).__name__
        check_choice(owner, "scheme", self.scheme, QUANT_SCHEMES)
        check_number(owner, "group_size", self.group_size, low=1, integer=True)
        check_bool(owner, "include_lm_head", self.include_lm_head)


@dataclass
class QuantizationAwareTrainingConfig(QuantizationConfig):
    """Options of `QATPlugin`: torchao's `QATConfig` prepare (fake quantization) -> train -> convert.

    The scheme's fields are `QuantizationConfig`'s: the converted model is quantized exactly as `quantize_model(...,
    qat_compatible=True)` would quantize the same weights, so QAT and post-training quantization compare directly.
    """

    tasks: str = field(
        default="last",
        metadata={
            "help": "'last': fake-quantize while the last task trains; 'all': from the first task on; 'recovery': "
            "only the last recovery_steps optimizer steps of the last task (a short recovery phase).",
            "choices": list(QAT_TASKS),
        },
    )
    recovery_steps: int = field(
        default=50,
        metadata={
            "help": "tasks='recovery' only: optimizer steps at the end of the last task trained with fake "
            "quantization (the whole task when it has fewer)."
        },
    )
    convert_at_end: bool = field(
        default=True,
        metadata={
            "help": "At the end of the last task (or of a plain train()), convert the fake-quantized layers to real "
            "torchao quantized weights: the model is then evaluated, saved and pushed quantized. False: it stays "
            "fake-quantized (float weights; `QATPlugin.convert` converts later)."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        owner = type(self).__name__
        check_choice(owner, "tasks", self.tasks, QAT_TASKS)
        check_number(owner, "recovery_steps", self.recovery_steps, low=1, integer=True)
        check_bool(owner, "convert_at_end", self.convert_at_end)


#: QATPlugin's options: `qat_scheme`, `qat_group_size`, `qat_include_lm_head`, `qat_tasks`, `qat_recovery_steps`,
#: `qat_convert_at_end`
QAT_OPTIONS = (OptionSource(QuantizationAwareTrainingConfig, "qat_"),)

__all__ = [
    "DEFAULT_TARGETS",
    "GRADUAL_PRUNING_OPTIONS",
    "QAT_OPTIONS",
    "QAT_TASKS",
    "QUANT_SCHEMES",
    "SCOPES",
    "STRUCTURES",
    "GradualPruningConfig",
    "QuantizationAwareTrainingConfig",
    "QuantizationConfig",
]
