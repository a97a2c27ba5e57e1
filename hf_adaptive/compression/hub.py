"""Sharing a compressed model on the Hugging Face Hub (or any Hub-compatible server), with a model card that states
the method, the scheme / bit width (and the sparsity of a pruning result) and the accuracy measured per task.

Repository layout: what `save_pretrained` writes (config.json with the torchao `quantization_config` and the
`hf_adaptive_compression` manifest, model.safetensors in torchao's safetensors layout for a quantized model), the
tokenizer when given, and README.md rendered from `hf_adaptive/model_cards/compressed_card.md`. A push stages
everything in a temporary folder and sends it in a single `HfApi.create_commit`, so the remote repository never
holds half a model; any failure is raised as `HubPushError` naming the repository and the step.

The HTTP timeout and the card-escaping helpers are `hf_adaptive.utils.hub`'s, shared with the expert library's push.
"""

from __future__ import annotations

import dataclasses
import string
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..utils.hub import DEFAULT_TIMEOUT, HubPushError, commit_folder
from ..utils.hub import check_timeout as _check_timeout
from ..utils.hub import md as _md
from ..utils.hub import py as _py
from ..utils.hub import yaml_value as _yaml_value
from ..utils.validation import check_choice, check_number, check_str, fail
from .config import QUANT_SCHEMES

#: templates of the model cards (a checkout also links them as ./model_cards)
DEFAULT_TEMPLATE_DIR = Path(__file__).resolve().parents[1] / "model_cards"
CARD_TEMPLATE = "compressed_card.md"
#: compression methods a card can state
METHODS = ("ptq", "qat", "pruning")
_METHOD_TEXT = {
    "ptq": "post-training quantization (torchao quantize_, no data)",
    "qat": "quantization-aware training (torchao QATConfig: prepare, train, convert)",
    "pruning": "gradual magnitude pruning (Zhu & Gupta cubic schedule)",
}
OWNER = "CompressedCardInfo"


@dataclass
class CompressedCardInfo:
    """What the card of a compressed model states. `accuracy`: task name -> accuracy of the compressed model in
    [0, 1]; `reference_accuracy`: the same tasks' accuracy of the float model it was compressed from. `method`,
    `scheme`, `group_size` default to the model's manifest (`from_model`); `size_bytes` to the pushed files."""

    accuracy: dict[str, float]
    reference_accuracy: dict[str, float] | None = None
    method: str | None = None
    scheme: str | None = None
    group_size: int | None = None
    sparsity: float | None = None
    size_bytes: int | None = None
    reference_size_bytes: int | None = None
    base_model: str | None = None
    description: str = ""
    #: the manifest's other entries (quantized / skipped layers, torchao version), filled by `from_model`
    details: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.accuracy = _accuracies("accuracy", self.accuracy)
        if self.reference_accuracy is not None:
            self.reference_accuracy = _accuracies("reference_accuracy", self.reference_accuracy)
            if set(self.reference_accuracy) != set(self.accuracy):
                fail(
                    OWNER,
                    "reference_accuracy",
                    sorted(self.reference_accuracy),
                    f"must name the same tasks as accuracy: {sorted(self.accuracy)}",
                )
        if self.method is None:
            fail(OWNER, "method", None, f"choose one of {list(METHODS)} (or build the info with from_model)")
        check_choice(OWNER, "method", self.method, METHODS)
        if self.method in ("ptq", "qat"):
            check_choice(OWNER, "scheme", self.scheme, QUANT_SCHEMES)
        elif self.scheme is not None:
            check_choice(OWNER, "scheme", self.scheme, QUANT_SCHEMES)
        check_number(OWNER, "group_size", self.group_size, low=1, integer=True, optional=True)
        check_number(OWNER, "sparsity", self.sparsity, low=0, high=1, optional=True)
        if self.method == "pruning" and self.sparsity is None:
            fail(OWNER, "sparsity", None, "a pruning result states its sparsity (a number in [0, 1])")
        check_number(OWNER, "size_bytes", self.size_bytes, low=0, integer=True, optional=True)
        check_number(OWNER, "reference_size_bytes", self.reference_size_bytes, low=1, integer=True, optional=True)
        check_str(OWNER, "base_model", self.base_model, optional=True)
        if not isinstance(self.description, str):
            fail(OWNER, "description", self.description, "a string")

    @classmethod
    def from_model(cls, model: Any, accuracy: Mapping[str, float], **values: Any) -> CompressedCardInfo:
        """The info of a model compressed by `quantize_model` or `QATPlugin`: method, scheme and group size read
        from its manifest (`config.hf_adaptive_compression`); `values` add or override fields."""
        from .quantization import compression_manifest

        record = compression_manifest(model) or {}
        base = getattr(getattr(model, "config", None), "_name_or_path", None) or None
        defaults: dict[str, Any] = {
            "method": record.get("method"),
            "scheme": record.get("scheme"),
            "group_size": record.get("group_size"),
            "base_model": base,
            "details": {
                k: record[k]
                for k in ("quantized_linears", "skipped_linears", "torchao_version", "qat_compatible")
                if k in record
            },
        }
        return cls(accuracy=dict(accuracy), **{**defaults, **values})


def _accuracies(name: str, values: Any) -> dict[str, float]:
    if not isinstance(values, Mapping) or not values:
        fail(OWNER, name, values, "a non-empty dict task name -> accuracy in [0, 1]")
    out = {}
    for task, value in values.items():
        if not isinstance(task, str) or not task:
            fail(OWNER, name, values, f"task names must be non-empty strings, got {task!r}")
        check_number(OWNER, f"{name}[{task!r}]", value, low=0, high=1)
        out[task] = float(value)
    return out


def _size(size: int | None) -> str:
    if size is None:
        return "-"
    return f"{size:,} bytes ({size / 2**20:.2f} MiB)"


def _accuracy_table(info: CompressedCardInfo) -> str:
    ref = info.reference_accuracy
    if ref is None:
        rows = [f"| {_md(task)} | {acc:.4f} |" for task, acc in info.accuracy.items()]
        mean = sum(info.accuracy.values()) / len(info.accuracy)
        return "\n".join(["| task | accuracy |", "|---|---|", *rows, f"| **mean** | {mean:.4f} |"])
    rows = [
        f"| {_md(task)} | {acc:.4f} | {ref[task]:.4f} | {acc - ref[task]:+.4f} |" for task, acc in info.accuracy.items()
    ]
    mean = sum(info.accuracy.values()) / len(info.accuracy)
    mean_ref = sum(ref.values()) / len(ref)
    return "\n".join(
        [
            "| task | compressed | float reference | difference |",
            "|---|---|---|---|",
            *rows,
            f"| **mean** | {mean:.4f} | {mean_ref:.4f} | {mean - mean_ref:+.4f} |",
        ]
    )


def compressed_model_card(info: CompressedCardInfo, repo_id: str, template_dir: str | Path | None = None) -> str:
    """The README.md of a compressed model: method, scheme and bit widths, sparsity, size, accuracy per task."""
    from .quantization import SCHEME_BITS

    template_dir = Path(template_dir) if template_dir is not None else DEFAULT_TEMPLATE_DIR
    path = template_dir / CARD_TEMPLATE
    if not path.is_file():
        raise FileNotFoundError(f"model card template {path} is missing (template_dir={str(template_dir)!r})")
    bits = SCHEME_BITS.get(info.scheme) if info.scheme is not None else None
    method = _METHOD_TEXT[info.method]
    if info.sparsity is not None:
        pruned = "" if info.method == "pruning" else ", of weights pruned"
        method += f"{pruned} to sparsity {info.sparsity:.4f}"
    weight_bits = f"{bits[0]}" if bits else "float (not quantized)"
    activation_bits = ("float" if bits[1] is None else f"{bits[1]} (dynamic, per token)") if bits else "float"
    summary = (
        f"A causal language model compressed by {method}"
        + (f"; scheme `{_md(info.scheme)}` ({weight_bits}-bit weights)" if bits else "")
        + "; made with hf_adaptive after continual fine-tuning."
    )
    size = _size(info.size_bytes)
    if info.size_bytes is not None and info.reference_size_bytes:
        ratio = info.size_bytes / info.reference_size_bytes
        size += f"; {ratio:.3f} of the float model's {_size(info.reference_size_bytes)}"
    details = info.details
    skipped = details.get("skipped_linears")
    tags = (
        [info.method]
        + (["torchao", "quantized", info.scheme] if info.scheme else [])
        + (["pruned"] if info.sparsity is not None else [])
    )
    return string.Template(path.read_text(encoding="utf-8")).substitute(
        base_model_line=f"base_model: {_yaml_value(info.base_model)}" if info.base_model else "",
        tags="\n".join(f"- {_yaml_value(t)}" for t in tags),
        repo_id=_md(repo_id),
        repo_id_py=_py(repo_id),
        summary=summary,
        method=_md(method),
        scheme=f"`{_md(info.scheme)}`" if info.scheme else "-",
        weight_bits=weight_bits,
        activation_bits=activation_bits,
        group_size=info.group_size if info.scheme == "8da4w" and info.group_size else "-",
        sparsity=f"{info.sparsity:.4f}" if info.sparsity is not None else "-",
        quantized_linears=details.get("quantized_linears", "-"),
        skipped=", ".join(f"`{_md(s)}`" for s in skipped) if skipped else "-",
        size=_md(size),
        base_model=f"`{_md(info.base_model)}`" if info.base_model else "-",
        torchao_version=_md(details.get("torchao_version", "-")),
        description=_md(info.description) if info.description else "",
        reference_note=" (next to the float model it was compressed from)" if info.reference_accuracy else "",
        accuracy_table=_accuracy_table(info),
    )


# -------------------------------------------------------------------------------------------------- the push
def push_compressed(
    model: Any,
    repo_id: str,
    card_info: CompressedCardInfo,
    *,
    tokenizer: Any = None,
    endpoint: str | None = None,
    token: str | bool | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str = "Upload compressed model (hf_adaptive)",
    template_dir: str | Path | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> str:
    """Save `model` (and `tokenizer`) with its card and push them to `repo_id` in one commit; returns the commit id.

    The card's `size_bytes`, when not given, is measured on the saved model files (the tokenizer's excluded).
    Raises `HubPushError` on any failure, naming the step.
    """
    from huggingface_hub import HfApi

    from .quantization import model_size_bytes

    timeout = _check_timeout("push_compressed", timeout)
    if not isinstance(card_info, CompressedCardInfo):
        raise TypeError(f"push_compressed: card_info must be a CompressedCardInfo, got {type(card_info).__name__}")
    api = HfApi(endpoint=endpoint, token=token)
    with tempfile.TemporaryDirectory(prefix="hf_adaptive_push_") as tmp:
        staging = Path(tmp) / "model"
        try:
            model.save_pretrained(staging)
            info = card_info
            if info.size_bytes is None:
                info = dataclasses.replace(info, size_bytes=model_size_bytes(staging))
            if tokenizer is not None:
                tokenizer.save_pretrained(staging)
            (staging / "README.md").write_text(compressed_model_card(info, repo_id, template_dir), encoding="utf-8")
        except Exception as err:
            raise HubPushError(
                f"push of the compressed model to {repo_id!r} failed while staging its files: {err}"
            ) from err
        return commit_folder(
            api,
            staging,
            repo_id,
            "the compressed model",
            timeout=timeout,
            private=private,
            commit_message=commit_message,
            revision=revision,
        )


__all__ = [
    "CARD_TEMPLATE",
    "METHODS",
    "CompressedCardInfo",
    "HubPushError",
    "compressed_model_card",
    "push_compressed",
]
