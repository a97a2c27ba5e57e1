"""Orthogonal adapters: learning each task in a subspace that leaves the earlier tasks' alone.

* `config`: `OLoRAConfig` and `OLORA_OPTIONS` (light: no torch);
* `olora`: `OLoRAPlugin`, O-LoRA (one LoRA per task, the earlier ones frozen and merged into the weights, a loss
  keeping the new LoRA's A orthogonal to theirs).

Orthogonal subspace fine-tuning (peft's OSF) is an adapter strategy, ``adapter_strategy='osf'``
(`hf_adaptive.adapters`), with its options there (`OSF_OPTIONS`). Names are imported on first access (PEP 562),
so `import hf_adaptive.orthogonal.config` stays light.
"""

from __future__ import annotations

from ..utils.lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "OLORA_OPTIONS": "config",
    "OLoRAConfig": "config",
    "OLoRAPlugin": "olora",
    "olora_adapter_name": "olora",
    "orthogonality_loss": "olora",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
