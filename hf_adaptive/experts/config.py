"""Options of expert routing, declared once: the router's (`RouterConfig`), the task signatures'
(`SignatureConfig`), the routing plugin's own (`ExpertRoutingConfig`) and the new experts' initialisation
(`MetaInitConfig`).

Light on purpose (dataclasses and the validation helpers only): `ContinualConfig` and the CLI build their
`router_*` / `signature_*` options from these fields (`EXPERT_ROUTING_OPTIONS`) without importing torch or peft.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..utils.options import OptionSource
from ..utils.validation import (
    OptionError,
    check_bool,
    check_choice,
    check_number,
    check_order,
    check_str,
    check_str_list,
    fail,
)

SCORERS = ("cosine", "linear", "mlp")
DECISIONS = ("threshold", "ucb", "calibrated", "adaptive")
INDEXES = ("exact", "faiss", "auto")
NORMALIZATIONS = ("none", "center", "standardize")
SIGNATURE_PARTS = ("text", "gradient", "context")
SKETCH_METHODS = ("gaussian", "countsketch")
#: how a created expert starts: peft's fresh LoRA, or a meta-learned initialisation (`hf_adaptive.experts.meta_init`)
META_INIT_METHODS = ("fresh", "reptile", "reptile_experts", "fomaml")


def faiss_available() -> bool:
    """Whether faiss imports (the optional `faiss` extra)."""
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class RouterConfig:
    """Router settings (see `hf_adaptive.experts.router` for what each rule does). `dim` is the signature size:
    read from the model by the routing plugin, never an option."""

    dim: int
    scorer: str = field(
        default="cosine",
        metadata={
            "help": "Expert routing: how a task's signature is scored against each expert's profile: "
            "'cosine', 'linear' or 'mlp' (learned: refitted from all reuse outcomes once router_min_outcomes "
            "exist with a success and a failure; until then routing is by cosine, after it the score is "
            "p(reuse succeeds), compared with router_p_reuse / router_p_fork instead of the cosine thresholds)."
        },
    )
    decision: str = field(
        default="threshold",
        metadata={
            "help": "Expert routing: decision rule for reuse / fork / create: 'threshold', 'ucb', 'calibrated' "
            "or 'adaptive'."
        },
    )
    normalize: str = field(
        default="standardize",
        metadata={
            "help": "Expert routing: signatures compared after 'standardize' (against the signatures seen), "
            "'center' or 'none' (raw cosine; then use higher thresholds, e.g. 0.9 / 0.75)."
        },
    )
    normalize_prior: float = field(
        default=0.5,
        metadata={
            "help": "Expert routing: pseudo-observations of the no-normalisation prior the standardisation "
            "statistics are shrunk towards (> 0)."
        },
    )
    # thresholds on the standardised cosine (recurring tasks score ≈ 0.5-0.9, different ones ≈ 0;
    # with normalize="none" raw cosines are much higher: use e.g. 0.9 / 0.75)
    reuse_threshold: float = field(
        default=0.5, metadata={"help": "Expert routing: reuse the best expert if its score is >= this."}
    )
    fork_threshold: float = field(
        default=0.3,
        metadata={
            "help": "Expert routing: fork the best expert if its score is >= this (and below the reuse "
            "threshold), else create a new one."
        },
    )
    ucb_c: float = field(default=0.1, metadata={"help": "Expert routing ('ucb'): exploration bonus weight (>= 0)."})
    ucb_reward_weight: float = field(
        default=0.2, metadata={"help": "Expert routing ('ucb'): weight of an expert's mean reuse reward."}
    )
    p_reuse: float = field(
        default=0.5,
        metadata={"help": "Expert routing: reuse if p(reuse succeeds) >= this (calibrated / fitted scorers)."},
    )
    p_fork: float = field(
        default=0.25,
        metadata={"help": "Expert routing: fork if p(reuse succeeds) >= this (0 <= p_fork <= p_reuse <= 1)."},
    )
    min_outcomes: int = field(
        default=4,
        metadata={"help": "Expert routing: reuse outcomes needed before calibrating / fitting a learned scorer."},
    )
    tau_init: float = field(default=0.5, metadata={"help": "Expert routing ('adaptive'): initial reuse threshold tau."})
    tau_lr: float = field(
        default=0.1, metadata={"help": "Expert routing ('adaptive'): step of tau after each outcome, in (0, 1]."}
    )
    tau_min: float = field(default=0.2, metadata={"help": "Expert routing ('adaptive'): lowest tau."})
    tau_max: float = field(default=0.9, metadata={"help": "Expert routing ('adaptive'): highest tau."})
    bootstrap_experts: int = field(
        default=0,
        metadata={"help": "Expert routing: create experts (reusing only near-duplicates) until this many exist."},
    )
    bootstrap_duplicate: float = field(
        default=0.9,
        metadata={"help": "Expert routing: while bootstrapping, reuse only when the score is >= this."},
    )
    top_k: int = field(default=8, metadata={"help": "Expert routing: candidates re-ranked by learned scorers."})
    index: str = field(
        default="exact",
        metadata={"help": "Expert routing: nearest-expert search: 'exact', 'faiss' (needs faiss-cpu) or 'auto'."},
    )
    mlp_hidden: int = field(default=32, metadata={"help": "Expert routing: hidden size of the 'mlp' scorer."})
    ann_min_experts: int = field(
        default=4096,
        metadata={"help": "Expert routing (faiss): experts from which an approximate HNSW index is used."},
    )
    hnsw_m: int = field(default=32, metadata={"help": "Expert routing (faiss): links per node of the HNSW graph."})
    hnsw_ef_search: int = field(
        default=64, metadata={"help": "Expert routing (faiss): candidates an HNSW search explores."}
    )
    seed: int = field(default=0, metadata={"help": "Expert routing: seed of the learned scorers' initialisation."})

    def __post_init__(self) -> None:
        owner = type(self).__name__
        check_number(owner, "dim", self.dim, 1, integer=True)
        check_choice(owner, "scorer", self.scorer, SCORERS)
        check_choice(owner, "decision", self.decision, DECISIONS)
        check_choice(owner, "normalize", self.normalize, NORMALIZATIONS)
        check_number(owner, "normalize_prior", self.normalize_prior, 0, low_open=True)
        check_choice(owner, "index", self.index, INDEXES)
        if self.index == "faiss" and not faiss_available():
            fail(
                owner, "index", self.index, "'faiss' needs faiss installed (pip install faiss-cpu); use 'exact'/'auto'"
            )
        check_number(owner, "reuse_threshold", self.reuse_threshold, -1.0, 1.0)
        check_number(owner, "fork_threshold", self.fork_threshold, -1.0, 1.0)
        check_order(owner, "fork_threshold", self.fork_threshold, "reuse_threshold", self.reuse_threshold)
        check_number(owner, "p_reuse", self.p_reuse, 0.0, 1.0)
        check_number(owner, "p_fork", self.p_fork, 0.0, 1.0)
        check_order(owner, "p_fork", self.p_fork, "p_reuse", self.p_reuse)
        check_number(owner, "tau_min", self.tau_min)
        check_number(owner, "tau_max", self.tau_max)
        check_order(owner, "tau_min", self.tau_min, "tau_max", self.tau_max)
        check_number(owner, "tau_init", self.tau_init)
        check_order(owner, "tau_min", self.tau_min, "tau_init", self.tau_init)
        check_order(owner, "tau_init", self.tau_init, "tau_max", self.tau_max)
        check_number(owner, "tau_lr", self.tau_lr, 0.0, 1.0, low_open=True)
        check_number(owner, "ucb_c", self.ucb_c, 0.0)
        check_number(owner, "ucb_reward_weight", self.ucb_reward_weight)
        check_number(owner, "bootstrap_experts", self.bootstrap_experts, 0, integer=True)
        check_number(owner, "bootstrap_duplicate", self.bootstrap_duplicate)
        check_number(owner, "top_k", self.top_k, 1, integer=True)
        check_number(owner, "min_outcomes", self.min_outcomes, 1, integer=True)
        for name in ("mlp_hidden", "ann_min_experts", "hnsw_m", "hnsw_ef_search"):
            check_number(owner, name, getattr(self, name), 1, integer=True)
        check_number(owner, "seed", self.seed, integer=True)


@dataclass
class SignatureConfig:
    """How task signatures are computed (see `hf_adaptive.experts.signature`)."""

    parts: tuple[str, ...] = field(
        default=SIGNATURE_PARTS,
        metadata={"help": "Expert routing: parts of a task signature, from 'text', 'gradient', 'context'."},
    )
    weights: dict[str, float] = field(
        default_factory=dict,
        metadata={"help": "Expert routing: weight of each signature part (default 1 each), keyed by part."},
    )
    sketch_dim: int = field(default=64, metadata={"help": "Expert routing: size of the gradient sketch."})
    sketch_method: str = field(
        default="gaussian",
        metadata={"help": "Expert routing: projection of the gradient sketch: 'gaussian' or 'countsketch'."},
    )
    layers: list[str] | None = field(
        default=None,
        metadata={
            "help": "Expert routing: parameter/module names the gradient sketch is taken on, and/or "
            "'input_embeddings' (None: input embeddings + the last layer's attention)."
        },
    )
    n_examples: int = field(
        default=16, metadata={"help": "Expert routing: examples of a task its gradient and context parts use."}
    )
    batch_size: int = field(
        default=16, metadata={"help": "Expert routing: batch size of the signature's forward/backward passes."}
    )
    seed: int = field(
        default=0, metadata={"help": "Expert routing: seed of the signature's example choice and projections."}
    )
    text_encoder: str | None = field(
        default=None,
        metadata={
            "help": "Expert routing: sentence-transformers model embedding task descriptions (e.g. "
            "all-MiniLM-L6-v2); None: the backbone's mean-pooled hidden states."
        },
    )
    #: the text embedding is projected to this size (fixed-seed Gaussian), so the signature has the same size
    #: (text_dim + sketch_dim + 6 = 198 by default) for any backbone and routing over 10 000 experts stays < 1 ms
    text_dim: int | None = field(
        default=128,
        metadata={
            "help": "Expert routing: the description embedding is projected to this size (None: the "
            "encoder's own size)."
        },
    )

    def __post_init__(self) -> None:
        owner = type(self).__name__
        allowed = f"a non-empty subset of {SIGNATURE_PARTS} without repeats"
        if isinstance(self.parts, str):  # a lone part is a one-element list, never split into characters
            self.parts = (self.parts,)
        if not isinstance(self.parts, (list, tuple)):
            fail(owner, "parts", self.parts, allowed)
        self.parts = tuple(self.parts)
        unknown = any(p not in SIGNATURE_PARTS for p in self.parts)
        if not self.parts or unknown or len(set(self.parts)) != len(self.parts):
            fail(owner, "parts", self.parts, allowed)
        if not isinstance(self.weights, dict) or any(
            k not in SIGNATURE_PARTS or isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0
            for k, v in self.weights.items()
        ):
            fail(owner, "weights", self.weights, f"positive weights keyed by {SIGNATURE_PARTS}")
        check_number(owner, "sketch_dim", self.sketch_dim, 1, integer=True)
        check_choice(owner, "sketch_method", self.sketch_method, SKETCH_METHODS)
        check_number(owner, "n_examples", self.n_examples, 1, integer=True)
        check_number(owner, "batch_size", self.batch_size, 1, integer=True)
        check_number(owner, "seed", self.seed, integer=True)
        check_str(owner, "text_encoder", self.text_encoder, optional=True)
        check_number(owner, "text_dim", self.text_dim, 1, integer=True, optional=True)
        self.layers = check_str_list(owner, "layers", self.layers, optional=True)  # a lone name: a one-item list


@dataclass
class ExpertRoutingConfig:
    """The routing plugin's own settings (LoRA experts' shape: the trainer's `lora_*` options)."""

    tolerance: float = field(
        default=0.05,
        metadata={
            "help": "Expert routing: a reuse succeeds if the expert's earlier tasks lose at most this much "
            "accuracy, in [0, 1]."
        },
    )
    eval_limit: int | None = field(
        default=64,
        metadata={"help": "Expert routing: validation examples scored per task for an expert's accuracy (None: all)."},
    )
    verify_reuse: bool = field(
        default=True,
        metadata={
            "help": "Expert routing: a reuse trains a fork of the expert, kept as the task's own expert (the "
            "original untouched) if the expert's earlier tasks lose more than router_tolerance with it, else "
            "merged back. False: train the reused expert itself (a wrong reuse cannot be undone)."
        },
    )

    def __post_init__(self) -> None:
        owner = type(self).__name__
        check_number(owner, "tolerance", self.tolerance, 0.0, 1.0)
        check_number(owner, "eval_limit", self.eval_limit, 1, integer=True, optional=True)
        check_bool(owner, "verify_reuse", self.verify_reuse)


@dataclass
class MetaInitConfig:
    """How the routing plugin initialises an expert it creates (see `hf_adaptive.experts.meta_init`).

    'fresh' is peft's LoRA initialisation (B = 0: the model starts as the base). The other methods start the new
    expert from phi, an initialisation meta-learned over the earlier tasks (both LoRA factors set from phi):
    'reptile' (phi += outer_lr * mean_i (W_i - phi), W_i = phi after inner_steps SGD steps on task i's kept rows),
    'reptile_experts' (the same with W_i = the weights of task i's trained expert: no inner steps, no rows kept)
    and 'fomaml' (phi -= outer_lr * mean_i grad L_i^query(phi_i'), phi_i' = phi after inner_steps SGD steps on a
    support batch of task i, the gradient taken at phi_i'). phi is kept and trained further at every creation.
    """

    method: str = field(
        default="fresh",
        metadata={
            "help": "Expert routing: initialisation of a created expert: 'fresh' (peft's LoRA init, B = 0), "
            "'reptile', 'reptile_experts' (Reptile over the stored experts' weights) or 'fomaml' (first-order "
            "MAML), meta-learned over the earlier tasks."
        },
    )
    inner_steps: int = field(
        default=5,
        metadata={"help": "Meta-init ('reptile', 'fomaml'): plain SGD steps of the inner loop on one task (>= 1)."},
    )
    inner_lr: float = field(
        default=0.05, metadata={"help": "Meta-init ('reptile', 'fomaml'): learning rate of the inner SGD steps (> 0)."}
    )
    outer_steps: int = field(
        default=10,
        metadata={"help": "Meta-init: outer updates of phi each time an expert is created (>= 1)."},
    )
    outer_lr: float = field(
        default=0.5,
        metadata={
            "help": "Meta-init: outer step size: Reptile's epsilon (in (0, 1]) or FOMAML's beta (> 0; plain SGD)."
        },
    )
    support_batch_size: int = field(
        default=8,
        metadata={"help": "Meta-init ('reptile', 'fomaml'): rows of a task in each inner SGD step (>= 1)."},
    )
    query_batch_size: int = field(
        default=8,
        metadata={"help": "Meta-init ('fomaml'): rows of a task whose loss gives the outer gradient (>= 1)."},
    )
    rows_per_task: int = field(
        default=32,
        metadata={
            "help": "Meta-init ('reptile', 'fomaml'): training rows kept of each finished task (a seeded sample; "
            "memory: this many tokenized rows per task)."
        },
    )
    tasks_per_step: int | None = field(
        default=None,
        metadata={"help": "Meta-init: earlier tasks sampled for each outer update (None: all of them)."},
    )
    seed: int = field(
        default=0, metadata={"help": "Meta-init: seed of the rows kept and of the batches and tasks sampled (>= 0)."}
    )

    def __post_init__(self) -> None:
        owner = type(self).__name__
        check_choice(owner, "method", self.method, META_INIT_METHODS)
        for name in ("inner_steps", "outer_steps", "support_batch_size", "query_batch_size", "rows_per_task"):
            check_number(owner, name, getattr(self, name), 1, integer=True)
        check_number(owner, "inner_lr", self.inner_lr, 0.0, low_open=True)
        reptile = self.method in ("reptile", "reptile_experts")
        check_number(owner, "outer_lr", self.outer_lr, 0.0, 1.0 if reptile else None, low_open=True)
        check_number(owner, "tasks_per_step", self.tasks_per_step, 1, integer=True, optional=True)
        check_number(owner, "seed", self.seed, 0, integer=True)
        check_order(owner, "support_batch_size", self.support_batch_size, "rows_per_task", self.rows_per_task)
        if self.method == "fomaml" and self.support_batch_size + self.query_batch_size > self.rows_per_task:
            raise OptionError(
                owner,
                "query_batch_size",
                self.query_batch_size,
                "must be <= {0} - {1} with 'fomaml' (support and query rows are disjoint)",
                related=(("rows_per_task", self.rows_per_task), ("support_batch_size", self.support_batch_size)),
            )


#: the options of the `expert_routing` plugin: `router_*` (RouterConfig and the plugin's own), `signature_*` and
#: `meta_init_*` (how a created expert is initialised)
EXPERT_ROUTING_OPTIONS = (
    # dim: the signature size, read from the model (a placeholder validates the other fields standalone)
    OptionSource(RouterConfig, "router_", exclude=("dim",), placeholders=(("dim", 1),)),
    # weights: a dict, which HfArgumentParser cannot read from a flag; set it in Python (SignatureConfig(weights=))
    OptionSource(SignatureConfig, "signature_", exclude=("weights",)),
    OptionSource(ExpertRoutingConfig, "router_"),
    OptionSource(MetaInitConfig, "meta_init_"),
)

__all__ = [
    "DECISIONS",
    "EXPERT_ROUTING_OPTIONS",
    "INDEXES",
    "META_INIT_METHODS",
    "NORMALIZATIONS",
    "SCORERS",
    "SIGNATURE_PARTS",
    "SKETCH_METHODS",
    "ExpertRoutingConfig",
    "MetaInitConfig",
    "RouterConfig",
    "SignatureConfig",
    "faiss_available",
]
