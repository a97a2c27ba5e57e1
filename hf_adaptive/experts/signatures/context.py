"""The context part: statistics of the inputs seen by the backbone (adapters disabled): mean and spread of the
token entropy of its next-token predictions (divided by log of the vocabulary size) and of the prompt lengths
(log scale)."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from .backbone import backbone_only

CONTEXT_DIM = 6


class ContextStatistics:
    """Batches of prompts -> [mean, std of token entropy / log V, log1p of mean, std, min, max prompt length]."""

    dim = CONTEXT_DIM

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    @torch.no_grad()
    def __call__(self, batches: Iterable[dict[str, torch.Tensor]]) -> torch.Tensor:
        entropies: list[torch.Tensor] = []
        lengths: list[float] = []
        vocab = 1
        with backbone_only(self.model):
            for batch in batches:
                mask = batch["attention_mask"].bool()
                logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
                vocab = logits.size(-1)
                logp = logits.log_softmax(-1)
                ent = -(logp.exp() * logp).sum(-1)
                entropies.append(ent[mask].cpu())
                lengths.extend(mask.sum(1).double().tolist())
        ent = torch.cat(entropies).double() / math.log(vocab)
        lens = torch.tensor(lengths, dtype=torch.float64)
        std_len = lens.std(unbiased=False) if lens.numel() > 1 else torch.tensor(0.0, dtype=torch.float64)
        std_ent = ent.std(unbiased=False) if ent.numel() > 1 else torch.tensor(0.0, dtype=torch.float64)
        stats = torch.stack(
            [
                ent.mean(),
                std_ent,
                torch.log1p(lens.mean()),
                torch.log1p(std_len),
                torch.log1p(lens.min()),
                torch.log1p(lens.max()),
            ]
        )
        return stats.float()
