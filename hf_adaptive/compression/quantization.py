"""Post-training quantization through torchao, and what a quantized model is on disk.

Schemes (`QUANT_SCHEMES`) and the torchao 0.18 config each applies to the model's Linear layers:

    int8_weight_only  Int8WeightOnlyConfig: int8 weights, one symmetric scale per output row (`Int8Tensor`)
    int8_dynamic      Int8DynamicActivationInt8WeightConfig: the same weights, activations quantized to int8 per
                      token (symmetric) at run time
    8da4w             Int8DynamicActivationIntxWeightConfig(int4, PerGroup(group_size)): symmetric 4-bit weights,
                      one scale per `group_size` input columns, int8 asymmetric per-token activations
                      (`IntxUnpackedToInt8Tensor`)

With `qat_compatible=True` the two int8 schemes use the Intx configs instead (`IntxWeightOnlyConfig(int8,
PerAxis(0))`, `Int8DynamicActivationIntxWeightConfig(int8, PerAxis(0))`): those are the base configs torchao's
`QATConfig` can fake-quantize in 0.18, so `QATPlugin` converts with them and a post-training result compares with
a QAT one at identical numerics (8da4w is the same config either way). `Int4WeightOnlyConfig` is left out: it has
no CPU kernel in torchao 0.18.

Only `nn.Linear` layers are quantized; the LM head is skipped unless `include_lm_head` (a tied head is untied first:
the input embeddings stay float), the embeddings and norms always stay float.

On disk: `quantize_model` attaches transformers' torchao quantizer to the model (`model.hf_quantizer`,
`config.quantization_config = TorchAoConfig(...)`), exactly as `from_pretrained(..., quantization_config=
TorchAoConfig(...))` leaves a model, so `save_pretrained` writes safetensors through torchao's
`flatten_tensor_state_dict` (every quantized weight as plain tensors `<module>._weight_qdata`, `_weight_scale`, ...
plus JSON metadata naming its tensor class) and `from_pretrained` rebuilds the tensor subclasses from an allow-list
of torchao classes: nothing is pickled. `config.json` also carries `hf_adaptive_compression`, the manifest of what
was done (`load_quantized` checks the reloaded model against it).

Caveats measured with torchao 0.18 on CPU (eager, no `torch.compile`): the 4-bit values of 8da4w are stored
unpacked, one int8 per value (the portable `unpacked_to_int8` layout; the packed CPU layouts need torchao's C++
kernel library, which the 0.18 wheel does not load here), so 8da4w is no smaller on disk than int8; and quantized
Linear layers run slower per token than float ones on small models (dequantize / quantize per call).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ..utils.validation import fail
from .config import QuantizationConfig

logger = logging.getLogger(__name__)

OWNER = "quantize_model"
#: the install line named when torchao is missing
INSTALL_HINT = "pip install 'hf_adaptive[compress]'"
MIN_TORCHAO = (0, 18)
#: the `config.json` key of the manifest (what was quantized, how, with which versions)
MANIFEST_KEY = "hf_adaptive_compression"
#: (weight bits, activation bits or None for float activations) per scheme
SCHEME_BITS: dict[str, tuple[int, int | None]] = {
    "int8_weight_only": (8, None),
    "int8_dynamic": (8, 8),
    "8da4w": (4, 8),
}


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for part in text.split("+")[0].split(".")[:3]:
        digits = "".join(c for c in part if c.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def require_torchao() -> Any:
    """The torchao module, or an ImportError naming the install line when it is missing or older than 0.18."""
    try:
        import torchao
    except ImportError as err:
        raise ImportError(f"quantization needs torchao >= 0.18, which is not installed: {INSTALL_HINT}") from err
    if _version(torchao.__version__) < MIN_TORCHAO:
        raise ImportError(f"quantization needs torchao >= 0.18, found {torchao.__version__}: {INSTALL_HINT}")
    return torchao


def torchao_config(scheme: str, group_size: int = 32, qat_compatible: bool = False) -> Any:
    """The torchao `AOBaseConfig` that `scheme` applies (see the module docstring)."""
    QuantizationConfig(scheme=scheme, group_size=group_size)  # validation
    require_torchao()
    from torchao.quantization import (
        Int8DynamicActivationInt8WeightConfig,
        Int8DynamicActivationIntxWeightConfig,
        Int8WeightOnlyConfig,
        IntxWeightOnlyConfig,
        PerAxis,
        PerGroup,
    )

    if scheme == "8da4w":
        return Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(group_size))
    if qat_compatible:
        if scheme == "int8_weight_only":
            return IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerAxis(0))
        return Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0))
    # set_inductor_config=False: torchao would otherwise change torch._inductor's global settings
    if scheme == "int8_weight_only":
        return Int8WeightOnlyConfig(set_inductor_config=False)
    return Int8DynamicActivationInt8WeightConfig(set_inductor_config=False)


# --------------------------------------------------------------------------------------------------- the model
def output_embedding(model: torch.nn.Module) -> torch.nn.Module | None:
    try:
        return model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None


def input_embedding(model: torch.nn.Module) -> torch.nn.Module | None:
    try:
        return model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return None


def is_quantized_weight(weight: Any) -> bool:
    """Whether `weight` is a torchao quantized tensor (a `TorchAOBaseTensor` subclass)."""
    try:
        from torchao.utils import TorchAOBaseTensor
    except ImportError:
        return False
    return isinstance(weight, TorchAOBaseTensor)


def quantized_linears(model: torch.nn.Module) -> dict[str, str]:
    """{module name: tensor class} of every Linear layer whose weight is a torchao quantized tensor."""
    return {
        name: type(module.weight).__name__
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and is_quantized_weight(module.weight)
    }


def _is_fake_quantized(module: torch.nn.Module) -> bool:
    return type(module).__name__ in ("FakeQuantizedLinear", "FakeQuantizedEmbedding")


def check_quantizable(model: torch.nn.Module, owner: str = OWNER) -> None:
    """Refuse what quantizing in place would get wrong: LoRA adapters not merged, a model already quantized (or
    fake-quantized by QAT, which its `convert` finishes)."""
    if hasattr(model, "peft_config") or any("lora_" in name for name, _ in model.named_modules()):
        raise ValueError(
            f"{owner}: the model carries LoRA adapters; merge them first (`model = model.merge_and_unload()`): "
            "quantizing the base weights under an adapter would leave the adapter in float and unmerged"
        )
    done = quantized_linears(model)
    if done or getattr(model, "hf_quantizer", None) is not None:
        example = next(iter(done), "-")
        raise ValueError(f"{owner}: the model is already quantized (e.g. {example!r}); quantize a float model")
    fake = [name for name, module in model.named_modules() if _is_fake_quantized(module)]
    if fake:
        raise ValueError(
            f"{owner}: the model is fake-quantized for QAT (e.g. {fake[0]!r}); convert it with QATPlugin.convert"
        )


def linear_targets(model: torch.nn.Module, include_lm_head: bool = False) -> tuple[list[str], list[str]]:
    """(names of the Linear layers a scheme quantizes, names of those it leaves in float): every Linear but the LM
    head, which `include_lm_head` adds."""
    head = output_embedding(model)
    targets, skipped = [], []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        (skipped if module is head and not include_lm_head else targets).append(name)
    if not targets:
        fail(OWNER, "model", type(model).__name__, "it has no Linear layer to quantize")
    return targets, skipped


def check_group_size(model: torch.nn.Module, targets: list[str], group_size: int, owner: str = OWNER) -> None:
    """8da4w groups `group_size` input columns: every targeted layer's in_features must be a multiple of it."""
    modules = dict(model.named_modules())
    for name in targets:
        width = modules[name].in_features
        if width % group_size:
            fail(owner, "group_size", group_size, f"{name!r} has in_features={width}, not a multiple of it")


def untie_lm_head(model: torch.nn.Module) -> bool:
    """Give a head tied to the input embeddings its own copy of the weight (and say so in the config), so that
    quantizing the head leaves the embeddings float. True when it was tied."""
    head, embedding = output_embedding(model), input_embedding(model)
    if head is None or embedding is None or head.weight is not embedding.weight:
        return False
    head.weight = torch.nn.Parameter(head.weight.detach().clone(), requires_grad=head.weight.requires_grad)
    mark_untied(model)
    return True


def mark_untied(model: torch.nn.Module) -> None:
    """Record in the config that the LM head no longer shares the input embeddings' weight (saved and reloaded
    as two tensors)."""
    config = getattr(model, "config", None)
    if config is None:
        return
    config.tie_word_embeddings = False
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if text is not config:
        text.tie_word_embeddings = False


def _filter(names: list[str]) -> Any:
    wanted = set(names)
    return lambda module, fqn: fqn in wanted and isinstance(module, torch.nn.Linear)


def quantize_model(
    model: torch.nn.Module,
    scheme: str = "8da4w",
    *,
    group_size: int = 32,
    include_lm_head: bool = False,
    qat_compatible: bool = False,
) -> torch.nn.Module:
    """Quantize `model`'s Linear layers in place with `scheme` (post-training, no data) and return it.

    The model is then ready for evaluation, `save_pretrained` (safetensors) and `push_compressed`; its weights do not
    train any more. `group_size` is used by 8da4w only.
    """
    config = QuantizationConfig(scheme=scheme, group_size=group_size, include_lm_head=include_lm_head)
    if not isinstance(qat_compatible, bool):
        fail(OWNER, "qat_compatible", qat_compatible, "must be True or False (a bool)")
    require_torchao()
    check_quantizable(model)
    targets, skipped = linear_targets(model, include_lm_head)
    if scheme == "8da4w":
        check_group_size(model, targets, group_size)
    if include_lm_head:
        untie_lm_head(model)
    ao_config = torchao_config(scheme, group_size, qat_compatible)
    from torchao.quantization import quantize_

    quantize_(model, ao_config, filter_fn=_filter(targets))
    mark_quantized(model, ao_config, config, method="ptq", skipped=skipped, qat_compatible=qat_compatible)
    return model


def manifest(
    config: QuantizationConfig, method: str, quantized: int, skipped: list[str], qat_compatible: bool
) -> dict[str, Any]:
    """What `config.json` records of a quantization (`MANIFEST_KEY`)."""
    import torchao

    weight_bits, activation_bits = SCHEME_BITS[config.scheme]
    return {
        "method": method,
        "scheme": config.scheme,
        "weight_bits": weight_bits,
        "activation_bits": activation_bits,
        "group_size": config.group_size if config.scheme == "8da4w" else None,
        "include_lm_head": config.include_lm_head,
        "qat_compatible": qat_compatible or method == "qat",
        "quantized_linears": quantized,
        "skipped_linears": list(skipped),
        "torchao_version": torchao.__version__,
        "torch_version": torch.__version__.split("+")[0],
    }


def mark_quantized(
    model: torch.nn.Module,
    ao_config: Any,
    config: QuantizationConfig,
    *,
    method: str,
    skipped: list[str],
    qat_compatible: bool = False,
) -> None:
    """Attach transformers' torchao quantizer and the manifest to a model whose Linear layers `quantize_` changed,
    as `from_pretrained(..., quantization_config=TorchAoConfig(...))` would: `save_pretrained` then writes the
    torchao safetensors format and `from_pretrained` reloads it. A plain `nn.Module` (no config) is left as is."""
    quantized = quantized_linears(model)
    if not quantized:
        raise ValueError(f"{OWNER}: torchao quantized no Linear layer of the model")
    if getattr(model, "config", None) is None or not hasattr(model, "save_pretrained"):
        return
    from transformers import TorchAoConfig
    from transformers.quantizers.quantizer_torchao import TorchAoHfQuantizer

    hf_config = TorchAoConfig(quant_type=ao_config, modules_to_not_convert=list(skipped) or None)
    quantizer = TorchAoHfQuantizer(hf_config, pre_quantized=False)
    model.hf_quantizer = quantizer
    model.quantization_method = hf_config.quant_method
    quantizer.postprocess_model(model)  # config.quantization_config and the config's quantized flag
    setattr(model.config, MANIFEST_KEY, manifest(config, method, len(quantized), skipped, qat_compatible))


def compression_manifest(model: Any) -> dict[str, Any] | None:
    """The manifest a quantized model (or its config) carries, or None."""
    config = getattr(model, "config", model)
    value = getattr(config, MANIFEST_KEY, None)
    return dict(value) if isinstance(value, dict) else None


# ------------------------------------------------------------------------------------------------ save / load
def save_quantized(model: torch.nn.Module, directory: str | os.PathLike, tokenizer: Any = None) -> Path:
    """`save_pretrained` (and the tokenizer's) into `directory`, written whole: into a temporary sibling folder,
    then renamed over `directory` (a crash leaves the previous folder or none, never half a model)."""
    if getattr(model, "hf_quantizer", None) is None:
        raise ValueError(
            "save_quantized: the model carries no torchao quantizer; quantize it with quantize_model or QATPlugin "
            "(or load it with load_quantized)"
        )
    final = Path(directory)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def load_quantized(directory: str | os.PathLike, model_class: Any = None, **kwargs: Any) -> torch.nn.Module:
    """Reload a model saved by `save_quantized` / `save_pretrained` / `push_compressed`, and check it.

    transformers checks at load: torchao is installed, the config's `quant_type` names a torchao config class, the
    safetensors metadata is torchao's and every tensor class in it is on torchao's allow-list (no pickle). This adds:
    `config.json` declares torchao quantization; the reloaded model has as many quantized Linear layers as the
    manifest records and the skipped ones are float; a different torchao version than the one that saved is logged
    as a warning (the format is torchao's safetensors layout, read by the versions that support it).
    """
    require_torchao()
    import torchao

    path = Path(directory)
    config_file = path / "config.json"
    if config_file.is_file():
        saved = json.loads(config_file.read_text(encoding="utf-8"))
        method = (saved.get("quantization_config") or {}).get("quant_method")
        if method != "torchao":
            raise ValueError(
                f"load_quantized: {config_file} declares no torchao quantization (quant_method={method!r})"
            )
    if model_class is None:
        from transformers import AutoModelForCausalLM

        model_class = AutoModelForCausalLM
    model = model_class.from_pretrained(str(directory), **kwargs)
    record = compression_manifest(model)
    quantized = quantized_linears(model)
    if not quantized:
        raise ValueError(f"load_quantized: {directory} reloaded with no quantized Linear layer")
    if record is not None:
        if len(quantized) != record["quantized_linears"]:
            raise ValueError(
                f"load_quantized: {directory} reloaded {len(quantized)} quantized Linear layers, the manifest records "
                f"{record['quantized_linears']}"
            )
        still = [name for name in record["skipped_linears"] if name in quantized]
        if still:
            raise ValueError(f"load_quantized: {still} were saved in float but reloaded quantized")
        if record.get("torchao_version") != torchao.__version__:
            logger.warning(
                "load_quantized: %s was saved with torchao %s, loaded with %s",
                directory,
                record.get("torchao_version"),
                torchao.__version__,
            )
    return model


# ------------------------------------------------------------------------------------------------------- sizes
def model_size_bytes(directory: str | os.PathLike) -> int:
    """The size on disk of a saved model: the bytes of every file under `directory`."""
    return sum(f.stat().st_size for f in Path(directory).rglob("*") if f.is_file())


def _safetensors_headers(directory: Path) -> Iterator[dict[str, Any]]:
    for file in sorted(directory.rglob("*.safetensors")):
        with open(file, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            yield json.loads(handle.read(length))


def tensor_bytes(directory: str | os.PathLike) -> dict[str, int]:
    """{tensor name: bytes} of every tensor in the folder's safetensors files, read from their headers (no tensor is
    loaded). A torchao quantized weight appears as its parts: `<module>._weight_qdata`, `<module>._weight_scale`, ..."""
    out: dict[str, int] = {}
    for header in _safetensors_headers(Path(directory)):
        for name, info in header.items():
            if name != "__metadata__":
                start, end = info["data_offsets"]
                out[name] = end - start
    return out


def module_bytes(directory: str | os.PathLike) -> dict[str, int]:
    """{module name: bytes of its saved tensors} (a quantized weight's parts counted together with its bias)."""
    out: dict[str, int] = {}
    for name, size in tensor_bytes(directory).items():
        module = name.rsplit(".", 1)[0]
        out[module] = out.get(module, 0) + size
    return out


__all__ = [
    "INSTALL_HINT",
    "MANIFEST_KEY",
    "SCHEME_BITS",
    "check_quantizable",
    "compression_manifest",
    "is_quantized_weight",
    "linear_targets",
    "load_quantized",
    "mark_quantized",
    "mark_untied",
    "model_size_bytes",
    "module_bytes",
    "output_embedding",
    "quantize_model",
    "quantized_linears",
    "require_torchao",
    "save_quantized",
    "tensor_bytes",
    "torchao_config",
    "untie_lm_head",
]
