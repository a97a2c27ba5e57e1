"""The one answer-token loss against torch's cross-entropy and the Trainer's LabelSmoother."""

from __future__ import annotations

import pytest
import torch
from transformers.modeling_outputs import CausalLMOutput
from transformers.trainer_pt_utils import LabelSmoother

from hf_adaptive.tasks.losses import answer_cross_entropy


def _batch():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, 11, generator=g)
    labels = torch.randint(0, 11, (3, 6), generator=g)
    labels[:, :2] = -100  # prompt
    labels[2, 4:] = -100  # a shorter answer
    return logits, labels


def _loop(logits, labels):
    """Per row, the labelled tokens' -log p, one position at a time."""
    rows = []
    for b in range(labels.shape[0]):
        vals = [
            -torch.log_softmax(logits[b, t - 1], -1)[labels[b, t]]
            for t in range(1, labels.shape[1])
            if labels[b, t] >= 0
        ]
        rows.append(torch.stack(vals))
    return rows


def test_reductions_match_a_loop():
    logits, labels = _batch()
    rows = _loop(logits, labels)
    flat = torch.cat(rows)
    torch.testing.assert_close(answer_cross_entropy(logits, labels), flat.mean())
    torch.testing.assert_close(answer_cross_entropy(logits, labels, "sum"), flat.sum())
    torch.testing.assert_close(answer_cross_entropy(logits, labels, "per_row"), torch.stack([r.mean() for r in rows]))
    torch.testing.assert_close(
        answer_cross_entropy(logits, labels, "per_row_sum"), torch.stack([r.sum() for r in rows])
    )
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(answer_cross_entropy(logits, labels), ref)


def test_label_smoothing_matches_the_trainers_label_smoother():
    logits, labels = _batch()
    expected = LabelSmoother(epsilon=0.1)(CausalLMOutput(logits=logits), labels, shift_labels=True)
    torch.testing.assert_close(answer_cross_entropy(logits, labels, label_smoothing=0.1), expected)


def test_unknown_reduction():
    with pytest.raises(ValueError, match="reduction='avg' is not allowed"):
        answer_cross_entropy(*_batch(), reduction="avg")
