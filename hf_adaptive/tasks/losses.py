"""The answer-token loss, written once: next-token cross-entropy over the labelled positions of causal-LM rows.

Rows are `prompt + answer` with the prompt's labels set to -100 (`tokenize_task`); the prediction at position t is
scored against the label at t + 1. Every plugin that scores a batch (replay, feedback, early stopping, head
importance, signatures) calls this instead of re-deriving the shift and the mask.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100
REDUCTIONS = ("mean", "sum", "per_row", "per_row_sum", "none")


def answer_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean", label_smoothing: float = 0.0
) -> torch.Tensor:
    """Cross-entropy of the next-token predictions at labelled positions, in float32.

    `reduction`: `"mean"` over all labelled tokens of the batch (what a causal LM returns as `outputs.loss`),
    `"sum"` over them, `"per_row"` the mean per row (`[B]`, rows without labelled tokens give 0), `"per_row_sum"`
    the sum per row, `"none"` the `[B, T-1]` values with 0 at unlabelled positions. `label_smoothing` follows
    `transformers.trainer_pt_utils.LabelSmoother` (the Trainer's `label_smoothing_factor`).
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"answer_cross_entropy.reduction={reduction!r} is not allowed: choose one of {REDUCTIONS}")
    logits = logits[:, :-1].float()
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    logp = torch.log_softmax(logits, dim=-1)
    nll = -logp.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    if label_smoothing > 0:
        # LabelSmoother: (1 - eps) * nll + eps * mean over the vocabulary of -log p
        nll = (1 - label_smoothing) * nll + label_smoothing * (-logp.mean(dim=-1))
    nll = nll * mask
    if reduction == "none":
        return nll
    if reduction == "sum":
        return nll.sum()
    if reduction == "per_row_sum":
        return nll.sum(-1)
    if reduction == "per_row":
        return nll.sum(-1) / mask.sum(-1).clamp_min(1)
    return nll.sum() / mask.sum().clamp_min(1)
