"""The distillation losses: a divergence between next-token distributions and a hidden-state MSE, at chosen positions.

The divergence mirrors TRL's `GKDTrainer.generalized_jsd_loss` (Agarwal et al. 2024, Eq. 1), conventions included:
both logits are divided by the temperature (the loss is not multiplied by T²); with S the student's and T the
teacher's distribution at a position,

    beta = 0:     KL(T || S)                       ("forward_kl")
    beta = 1:     KL(S || T)                       ("reverse_kl")
    0 < beta < 1: beta KL(T || M) + (1 - beta) KL(S || M),  M = beta T + (1 - beta) S   ("jsd")

summed over the vocabulary and averaged over the selected positions (TRL's "batchmean" with a label mask). Only the
selected positions go through the softmax (rows are gathered first), so a batch costs [positions, vocab] floats,
not [batch, length, vocab]; the arithmetic is float32 whatever the model's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..tasks.losses import IGNORE_INDEX


def generalized_jsd(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float, temperature: float = 1.0
) -> torch.Tensor:
    """Per-row divergence (summed over the last, vocabulary, dimension) of `[..., vocab]` logits; see the module."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"generalized_jsd: student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} must have the same shape"
        )
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    student = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)
    if beta == 0:
        kl = F.kl_div(student, teacher, reduction="none", log_target=True)
    elif beta == 1:
        kl = F.kl_div(teacher, student, reduction="none", log_target=True)
    else:
        b = torch.tensor(beta, dtype=dtype, device=student.device)
        mixture = torch.logsumexp(torch.stack([student + torch.log1p(-b), teacher + torch.log(b)]), dim=0)
        kl = b * F.kl_div(mixture, teacher, reduction="none", log_target=True) + (1 - b) * F.kl_div(
            mixture, student, reduction="none", log_target=True
        )
    return kl.sum(dim=-1)


def position_mask(
    positions: str,
    length: int,
    labels: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    batch_size: int | None = None,
) -> torch.Tensor:
    """`[batch, length]` bool mask of the positions to distill, lined up with logits of the last `length` columns.

    ``"answer"``: positions t whose next token is labelled (``labels[:, t + 1] != -100``, the causal shift); the
    labels may already be cut to the last `length` columns (`answer_only_logits`) or be whole. ``"sequence"``:
    every non-pad position (``attention_mask == 1``; all of them without a mask).
    """
    if positions == "answer":
        if labels is None:
            raise ValueError("distillation at positions='answer' needs the batch's labels (inputs['labels'])")
        if labels.shape[1] < length:
            raise ValueError(f"labels of {labels.shape[1]} columns cannot line up with logits of {length} positions")
        shifted = labels[:, -length:][:, 1:] != IGNORE_INDEX
        return torch.cat([shifted, shifted.new_zeros((shifted.shape[0], 1))], dim=1)
    if positions == "sequence":
        if attention_mask is None:
            if batch_size is None:
                raise ValueError("position_mask: give attention_mask or batch_size for positions='sequence'")
            return torch.ones((batch_size, length), dtype=torch.bool)
        if attention_mask.shape[1] < length:
            raise ValueError(
                f"attention_mask of {attention_mask.shape[1]} columns cannot line up with {length} positions"
            )
        return attention_mask[:, -length:].bool()
    raise ValueError(f"position_mask: positions={positions!r} is not allowed: choose 'answer' or 'sequence'")


def pad_mask_left(mask: torch.Tensor, length: int) -> torch.Tensor:
    """`mask` ([batch, k], the last k positions) widened to `length` columns with False in front."""
    missing = length - mask.shape[1]
    if missing < 0:
        raise ValueError(f"a mask of {mask.shape[1]} columns cannot be widened to {length}")
    return torch.cat([mask.new_zeros((mask.shape[0], missing)), mask], dim=1) if missing else mask


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    beta: float,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Mean of `generalized_jsd` over the positions where `mask` ([batch, length]) is True; 0 (in the graph) when
    there are none. `*_logits`: `[batch, length, vocab]`."""
    if student_logits.shape[:2] != mask.shape or teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"distillation_loss: student logits {tuple(student_logits.shape)}, teacher logits "
            f"{tuple(teacher_logits.shape)} and mask {tuple(mask.shape)} do not line up"
        )
    mask = mask.to(student_logits.device)
    per_position = generalized_jsd(student_logits[mask], teacher_logits[mask], beta, temperature)
    return per_position.sum() / mask.sum().clamp_min(1)


def feature_loss(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the positions where `mask` ([batch, length]) is True and the hidden dimensions;
    0 (in the graph) when there are none. `*_hidden`: `[batch, length, hidden]`, computed in float32."""
    if student_hidden.shape != teacher_hidden.shape or student_hidden.shape[:2] != mask.shape:
        raise ValueError(
            f"feature_loss: student hidden states {tuple(student_hidden.shape)}, teacher hidden states "
            f"{tuple(teacher_hidden.shape)} and mask {tuple(mask.shape)} do not line up (same model family and "
            "hidden size needed)"
        )
    mask = mask.to(student_hidden.device)
    dtype = torch.promote_types(student_hidden.dtype, torch.float32)
    diff = student_hidden[mask].to(dtype) - teacher_hidden[mask].to(dtype)
    count = mask.sum().clamp_min(1) * student_hidden.shape[-1]
    return diff.pow(2).sum() / count


__all__ = ["distillation_loss", "feature_loss", "generalized_jsd", "pad_mask_left", "position_mask"]
