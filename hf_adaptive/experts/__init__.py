"""LoRA experts on one backbone (peft), task signatures, the router that reuses / forks / creates experts,
the meta-learned initialisation of created experts, and sharing the library on the Hugging Face Hub.

Public names are imported on first access (PEP 562), so `import hf_adaptive.experts.config` stays light and
the optional dependencies (faiss, sentence-transformers, huggingface_hub) stay optional.
"""

from __future__ import annotations

from ..utils.lazy import lazy_exports

#: public name -> submodule that defines it
_EXPORTS: dict[str, str] = {
    "ACTIONS": "router",
    "DECISIONS": "config",
    "SCORERS": "config",
    "EXPERT_ROUTING_OPTIONS": "config",
    "ExpertRoutingConfig": "config",
    "META_INIT_METHODS": "config",
    "MetaInitConfig": "config",
    "RouterConfig": "config",
    "SignatureConfig": "config",
    "faiss_available": "config",
    "ExpertInfo": "library",
    "ExpertLibrary": "library",
    "default_lora_config": "library",
    "pull_library": "library",
    "HubPullError": "hub",
    "HubPushError": "hub",
    "push_library": "hub",
    "MetaInitializer": "meta_init",
    "MetaLearner": "meta_init",
    "ExpertRoutingPlugin": "plugin",
    "check_tolerance": "plugin",
    "signature_dim": "plugin",
    "Router": "router",
    "RoutingDecision": "router",
    "fit_logistic": "router",
    "Signature": "signature",
    "TaskSignature": "signature",
    "count_sketch": "signature",
    "gaussian_project": "signature",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
