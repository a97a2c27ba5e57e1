"""hf_adaptive: continual learning, adaptive structure and expert sharing on top of the Hugging Face Trainer.

Every public class is importable from here (`from hf_adaptive import EWCPlugin, ReplayPlugin, Router, ...`), as in
TRL and PEFT. Names are imported on first use, so `import hf_adaptive` stays fast and optional dependencies
(faiss, bitsandbytes, sentence-transformers, gguf) are only needed by what uses them.
"""

from __future__ import annotations

from .utils.lazy import lazy_exports

__version__ = "0.1.0"

#: public name -> the module (or subpackage) that defines or re-exports it
_EXPORTS: dict[str, str] = {
    # the trainer, its options and the protocol
    "ContinualTrainer": "hf_adaptive.trainer",
    "NonFiniteTrainingError": "hf_adaptive.trainer",
    "ContinualConfig": "hf_adaptive.config",
    "ContinualPlugin": "hf_adaptive.plugins",
    "LossTerm": "hf_adaptive.plugins",
    "TaskContext": "hf_adaptive.plugins",
    "TaskSetup": "hf_adaptive.plugins",
    "build_plugins": "hf_adaptive.registry",
    "PLUGINS": "hf_adaptive.registry",
    # tasks and metrics
    "Task": "hf_adaptive.tasks",
    "TaskStream": "hf_adaptive.tasks",
    "builtin_suite": "hf_adaptive.tasks",
    "tokenize_task": "hf_adaptive.tasks",
    "task_accuracy": "hf_adaptive.tasks",
    "load_glue_task": "hf_adaptive.tasks.glue",
    "load_cl_benchmark_task": "hf_adaptive.tasks.cl_benchmark",
    "load_cl_benchmark": "hf_adaptive.tasks.cl_benchmark",
    "ContinualResult": "hf_adaptive.metrics",
    "average_accuracy": "hf_adaptive.metrics",
    "backward_transfer": "hf_adaptive.metrics",
    "forgetting": "hf_adaptive.metrics",
    "forward_transfer": "hf_adaptive.metrics",
    # models
    "load_model_and_tokenizer": "hf_adaptive.models",
    "build_tiny_gemma": "hf_adaptive.models",
    "GatedGemma": "hf_adaptive.models",
    "GatedModel": "hf_adaptive.models",
    "gate_model": "hf_adaptive.models",
    "prune_heads": "hf_adaptive.models",
    "save_pruned_model": "hf_adaptive.models",
    "load_pruned_model": "hf_adaptive.models",
    "build_optimizer": "hf_adaptive.optim",
    # consolidation
    "EWCPlugin": "hf_adaptive.consolidation",
    "EWCConfig": "hf_adaptive.consolidation.config",
    "compute_fisher": "hf_adaptive.consolidation",
    # replay
    "ReplayPlugin": "hf_adaptive.replay",
    "GenerativeReplayPlugin": "hf_adaptive.replay",
    "FeatureReplayPlugin": "hf_adaptive.replay",
    "ReplayConfig": "hf_adaptive.replay.config",
    "GenerativeReplayConfig": "hf_adaptive.replay.config",
    "FeatureReplayConfig": "hf_adaptive.replay.config",
    # experts
    "ExpertLibrary": "hf_adaptive.experts",
    "Router": "hf_adaptive.experts",
    "RouterConfig": "hf_adaptive.experts.config",
    "SignatureConfig": "hf_adaptive.experts.config",
    "TaskSignature": "hf_adaptive.experts",
    "ExpertRoutingPlugin": "hf_adaptive.experts",
    # control
    "GateController": "hf_adaptive.control",
    "GateControllerConfig": "hf_adaptive.control.config",
    "FeedbackCallback": "hf_adaptive.control",
    "HeadGatePlugin": "hf_adaptive.control",
    "LossWeightController": "hf_adaptive.control",
    "ParetoArchive": "hf_adaptive.control",
    # scheduling
    "AdaptiveScheduler": "hf_adaptive.scheduling",
    "AdaptiveSchedulerConfig": "hf_adaptive.scheduling.config",
    "AdaptiveSchedulerCallback": "hf_adaptive.scheduling",
    "SelectiveFreezingCallback": "hf_adaptive.scheduling",
    "FreezingConfig": "hf_adaptive.scheduling.config",
    "AdapterEarlyStoppingCallback": "hf_adaptive.scheduling",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
