"""Compression during continual fine-tuning: gradual magnitude pruning on the Zhu & Gupta cubic schedule, and
quantization through torchao (post-training and quantization-aware).

* `config`: `GradualPruningConfig` / `GRADUAL_PRUNING_OPTIONS`, `QuantizationConfig`,
  `QuantizationAwareTrainingConfig` / `QAT_OPTIONS` (light: no torch);
* `schedule`: the cubic schedule and the magnitude / MLP-channel masks, as pure functions;
* `gradual_pruning`: `GradualPruningPlugin`, masks enforced while training and kept across tasks;
* `quantization`: `quantize_model` (int8 weight-only, int8 dynamic, 8da4w), save / reload, sizes on disk;
* `qat`: `QATPlugin`, torchao's QAT prepare -> train -> convert on the last task(s) or a recovery phase;
* `hub`: the model card of a compressed model and `push_compressed`.

Names are imported on first access (PEP 562), so `import hf_adaptive.compression.config` stays light.
"""

from __future__ import annotations

from ..utils.lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "DEFAULT_TARGETS": "config",
    "GRADUAL_PRUNING_OPTIONS": "config",
    "SCOPES": "config",
    "STRUCTURES": "config",
    "GradualPruningConfig": "config",
    "QAT_OPTIONS": "config",
    "QAT_TASKS": "config",
    "QUANT_SCHEMES": "config",
    "QuantizationAwareTrainingConfig": "config",
    "QuantizationConfig": "config",
    "channel_scores": "schedule",
    "cubic_sparsity": "schedule",
    "lowest_masks": "schedule",
    "magnitude_masks": "schedule",
    "prune_count": "schedule",
    "update_index": "schedule",
    "GradualPruningPlugin": "gradual_pruning",
    "MLPGroup": "gradual_pruning",
    "mlp_groups": "gradual_pruning",
    "target_weights": "gradual_pruning",
    "INSTALL_HINT": "quantization",
    "MANIFEST_KEY": "quantization",
    "SCHEME_BITS": "quantization",
    "compression_manifest": "quantization",
    "load_quantized": "quantization",
    "model_size_bytes": "quantization",
    "module_bytes": "quantization",
    "quantize_model": "quantization",
    "quantized_linears": "quantization",
    "save_quantized": "quantization",
    "tensor_bytes": "quantization",
    "torchao_config": "quantization",
    "QATPlugin": "qat",
    "fake_quantized_linears": "qat",
    "CompressedCardInfo": "hub",
    "HubPushError": "hub",
    "compressed_model_card": "hub",
    "push_compressed": "hub",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
