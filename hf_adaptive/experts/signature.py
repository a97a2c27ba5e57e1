"""Task signatures ("triple signal"): what a router compares to decide whether an expert serves a task.

Three parts, each computed by its own encoder, L2-normalised and weighted, then concatenated:

* **text** (`signatures.text.TextEncoder`): the task description embedded by the backbone (mean-pooled last
  hidden states) or a sentence-transformers model, projected to `text_dim`;
* **gradient** (`signatures.gradient.GradientSketch`): a fixed-seed sketch of the answer-loss gradient that
  `n_examples` examples of the task produce on chosen parameters of the backbone (adapters disabled);
* **context** (`signatures.context.ContextStatistics`): entropy and prompt-length statistics of those examples.

The examples are `n_examples` rows of a split, chosen by a seed and the task's name. The gradient and context
parts read them as training rows (`input_ids`, `attention_mask`, `labels`): pass the split as already tokenized
(`dataset=`, e.g. a plugin's `TaskContext.train_dataset`: same rows in the same order as the task's split) and
nothing is tokenized again; without it the chosen rows are encoded here. Everything runs in eval mode under
`torch.no_grad` except the gradient sketch; the model's training mode and `requires_grad` flags are restored.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

import torch

from ..tasks.losses import IGNORE_INDEX
from .config import SIGNATURE_PARTS, SKETCH_METHODS, SignatureConfig
from .signatures.backbone import device_of
from .signatures.context import CONTEXT_DIM, ContextStatistics
from .signatures.gradient import INPUT_EMBEDDINGS, GradientSketch
from .signatures.projection import _CHUNK, count_sketch, gaussian_project, l2, project_rows
from .signatures.text import _BUNDLED_MINILM, TextEncoder, _encoder_source, load_sentence_encoder

__all__ = [
    "CONTEXT_DIM",
    "INPUT_EMBEDDINGS",
    "SIGNATURE_PARTS",
    "SKETCH_METHODS",
    "_BUNDLED_MINILM",
    "_CHUNK",
    "Signature",
    "SignatureConfig",
    "TaskSignature",
    "_encoder_source",
    "count_sketch",
    "gaussian_project",
    "load_sentence_encoder",
    "project_rows",
]


@dataclass
class Signature:
    """A task signature: the normalised parts and their weighted concatenation (`vector`, unit norm)."""

    parts: dict[str, torch.Tensor]
    vector: torch.Tensor

    @property
    def dim(self) -> int:
        return int(self.vector.numel())


def prompt_row(row: dict[str, Any]) -> dict[str, list[int]]:
    """The prompt of a training row (`[bos] + prompt`: the tokens before the first labelled one)."""
    labels = list(row["labels"])
    n = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))
    ids = list(row["input_ids"][:n])
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": ids}


class TaskSignature:
    """Computes `Signature`s of tasks with one backbone (a transformers model or a `PeftModel`)."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, config: SignatureConfig | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = config or SignatureConfig()
        self.text = TextEncoder(model, tokenizer, self.config)
        self.gradient = GradientSketch(model, self.config)
        self.context = ContextStatistics(model)

    # ------------------------------------------------------------------ sizes
    @property
    def layer_names(self) -> list[str]:
        return self.gradient.layer_names

    @property
    def input_embeddings(self) -> bool:
        return self.gradient.input_embeddings

    @property
    def part_dims(self) -> dict[str, int]:
        dims = {"text": self.text.dim, "gradient": self.gradient.dim, "context": self.context.dim}
        return {p: dims[p] for p in self.config.parts}

    @property
    def dim(self) -> int:
        return sum(self.part_dims.values())

    @property
    def _encoder(self) -> Any:
        return self.text._encoder

    def _sentence_encoder(self) -> Any:
        return self.text.sentence_encoder()

    # ------------------------------------------------------------------ inputs
    def _indices(self, task: Any, n_rows: int) -> list[int]:
        idx = list(range(n_rows))
        random.Random(f"{self.config.seed}-{task.name}").shuffle(idx)
        return sorted(idx[: self.config.n_examples])

    def _examples(self, task: Any, split: str) -> list[dict]:
        """The raw rows (`text`, `label`) of `split` a signature uses."""
        data = task.eval_dataset if split == "eval" else task.train_dataset
        if data is None:
            raise ValueError(f"task {task.name!r} has no {split} split for its signature")
        return [data[i] for i in self._indices(task, len(data))]

    def _rows(self, task: Any, split: str, dataset: Any = None) -> list[dict]:
        """The same rows as training rows: taken from `dataset` (the split already tokenized, same order) or
        encoded here."""
        if dataset is None:
            from ..tasks.formatting import encode_example

            return [encode_example(task, row, self.tokenizer) for row in self._examples(task, split)]
        return [dataset[i] for i in self._indices(task, len(dataset))]

    def _batches(self, rows: list[dict]):
        from ..tasks.formatting import CausalLMCollator

        collate = CausalLMCollator(self.tokenizer)
        device = device_of(self.model)
        for start in range(0, len(rows), self.config.batch_size):
            batch = collate(rows[start : start + self.config.batch_size])
            yield {k: v.to(device) for k, v in batch.items()}

    # ------------------------------------------------------------------ the three parts
    def text_embedding(self, description: str) -> torch.Tensor:
        """The description's embedding, projected to `text_dim` (fixed seed) when that is set."""
        return self.text(description)

    def _raw_text_embedding(self, description: str) -> torch.Tensor:
        return self.text.raw(description)

    def gradient_sketch(self, task: Any, split: str = "eval", dataset: Any = None) -> torch.Tensor:
        """Sketch of the mean answer-loss gradient of `n_examples` examples (backbone only)."""
        return self.gradient(self._batches(self._rows(task, split, dataset)))

    def context_stats(self, task: Any, split: str = "eval", dataset: Any = None) -> torch.Tensor:
        """[mean, std of token entropy / log V, log1p of mean, std, min, max prompt length]."""
        prompts = [prompt_row(row) for row in self._rows(task, split, dataset)]
        return self.context(self._batches(prompts))

    # ------------------------------------------------------------------ the signature
    def combine(self, parts: dict[str, torch.Tensor]) -> Signature:
        """Normalise each part, weight it, concatenate, normalise the whole; dimensions checked."""
        dims = self.part_dims
        normed: dict[str, torch.Tensor] = {}
        for name in self.config.parts:
            vec = parts[name].flatten().float()
            if vec.numel() != dims[name]:
                raise ValueError(f"signature part {name!r} has {vec.numel()} dims, expected {dims[name]}")
            normed[name] = l2(vec)
        weighted = [normed[p] * math.sqrt(self.config.weights.get(p, 1.0)) for p in self.config.parts]
        return Signature(parts=normed, vector=l2(torch.cat(weighted)))

    def compute(self, task: Any, split: str = "eval", dataset: Any = None) -> Signature:
        """The signature of `task` from its description and `n_examples` examples of `split` (`dataset`: that
        split already tokenized, e.g. `TaskContext.train_dataset`; None: the rows are encoded here)."""
        was_training = self.model.training
        self.model.eval()
        try:
            parts: dict[str, torch.Tensor] = {}
            if "text" in self.config.parts:
                parts["text"] = self.text_embedding(task.description or task.name)
            if "gradient" in self.config.parts:
                parts["gradient"] = self.gradient_sketch(task, split, dataset)
            if "context" in self.config.parts:
                parts["context"] = self.context_stats(task, split, dataset)
        finally:
            self.model.train(was_training)
        return self.combine(parts)
