"""LoRA experts on one backbone (peft), task signatures, the router that reuses / forks / creates experts,
and sharing the library on the Hugging Face Hub."""

from .hub import HubPullError, HubPushError, pull_library, push_library
from .library import ExpertInfo, ExpertLibrary, default_lora_config
from .plugin import ExpertRoutingPlugin, check_tolerance, signature_dim
from .router import ACTIONS, DECISIONS, SCORERS, Router, RouterConfig, RoutingDecision, faiss_available, fit_logistic
from .signature import Signature, SignatureConfig, TaskSignature, count_sketch, gaussian_project

__all__ = [
    "ACTIONS",
    "DECISIONS",
    "SCORERS",
    "ExpertInfo",
    "ExpertLibrary",
    "ExpertRoutingPlugin",
    "HubPullError",
    "HubPushError",
    "Router",
    "RouterConfig",
    "RoutingDecision",
    "Signature",
    "SignatureConfig",
    "TaskSignature",
    "check_tolerance",
    "count_sketch",
    "default_lora_config",
    "faiss_available",
    "fit_logistic",
    "gaussian_project",
    "pull_library",
    "push_library",
    "signature_dim",
]
