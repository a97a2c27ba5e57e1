"""The distillation losses against slow references: explicit softmax / log / sums in float64 loops, and TRL's
`GKDTrainer.generalized_jsd_loss` (the reference implementation the divergence mirrors)."""

from __future__ import annotations

import math
import os

import pytest
import torch

from hf_adaptive.distillation.config import DistillationConfig
from hf_adaptive.distillation.losses import (
    distillation_loss,
    feature_loss,
    generalized_jsd,
    pad_mask_left,
    position_mask,
)


def _trl_generalized_jsd_loss():
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    try:
        from trl.experimental.gkd.gkd_trainer import GKDTrainer
    except ImportError:  # older TRL
        from trl.trainer.gkd_trainer import GKDTrainer
    return GKDTrainer.generalized_jsd_loss


def _logits(seed: int, *shape: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator, dtype=torch.float64) * 2


def _softmax(row: list[float], temperature: float) -> list[float]:
    exps = [math.exp(v / temperature) for v in row]
    total = sum(exps)
    return [e / total for e in exps]


def _hand_divergence(student: list[float], teacher: list[float], beta: float, temperature: float) -> float:
    """One position, written out: TRL's conventions (beta 0: KL(T||S), beta 1: KL(S||T), else the mixture JSD)."""
    s, t = _softmax(student, temperature), _softmax(teacher, temperature)
    if beta == 0:
        return sum(ti * (math.log(ti) - math.log(si)) for si, ti in zip(s, t))
    if beta == 1:
        return sum(si * (math.log(si) - math.log(ti)) for si, ti in zip(s, t))
    m = [beta * ti + (1 - beta) * si for si, ti in zip(s, t)]
    kl_t = sum(ti * (math.log(ti) - math.log(mi)) for ti, mi in zip(t, m))
    kl_s = sum(si * (math.log(si) - math.log(mi)) for si, mi in zip(s, m))
    return beta * kl_t + (1 - beta) * kl_s


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.7])
def test_generalized_jsd_matches_a_hand_computation(beta, temperature):
    student, teacher = _logits(0, 2, 3, 5), _logits(1, 2, 3, 5)
    got = generalized_jsd(student, teacher, beta, temperature)
    assert got.shape == (2, 3) and got.dtype == torch.float64
    for b in range(2):
        for t in range(3):
            expected = _hand_divergence(student[b, t].tolist(), teacher[b, t].tolist(), beta, temperature)
            assert float(got[b, t]) == pytest.approx(expected, rel=1e-10, abs=1e-12)
    assert (got > 0).all()  # distinct distributions


def test_divergence_directions_and_identity():
    student, teacher = _logits(2, 4, 7), _logits(3, 4, 7)
    forward = generalized_jsd(student, teacher, 0.0)
    reverse = generalized_jsd(student, teacher, 1.0)
    # KL(T||S) with the roles swapped is KL(S||T)
    torch.testing.assert_close(generalized_jsd(teacher, student, 0.0), reverse)
    assert not torch.allclose(forward, reverse)
    assert torch.allclose(generalized_jsd(student, student.clone(), 0.5), torch.zeros(4, dtype=torch.float64))
    # the JSD is bounded by the mixture's entropy gap: for beta = 0.5 by log 2
    assert (generalized_jsd(student * 50, teacher * 50, 0.5) <= math.log(2) + 1e-9).all()


def test_divergence_is_float32_for_half_precision_logits():
    student, teacher = _logits(4, 3, 6).bfloat16(), _logits(5, 3, 6).bfloat16()
    got = generalized_jsd(student, teacher, 0.0)
    assert got.dtype == torch.float32
    expected = generalized_jsd(student.double(), teacher.double(), 0.0)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("divergence,beta", [("forward_kl", None), ("reverse_kl", None), ("jsd", 0.5), ("jsd", 0.2)])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_distillation_loss_matches_trl(divergence, beta, temperature):
    """Same value and same gradient as TRL's `generalized_jsd_loss` (reduction "batchmean" with a label mask)."""
    trl_loss = _trl_generalized_jsd_loss()
    config = DistillationConfig(divergence=divergence, **({} if beta is None else {"beta": beta}))
    labels = torch.tensor([[-100, -100, 4, 2, -100, -100], [-100, 1, 3, 3, 0, -100]])
    student = _logits(6, 2, 6, 5).float().requires_grad_(True)
    teacher = _logits(7, 2, 6, 5).float()
    # our mask sits on the positions that predict a label; TRL gets the shifted pair (as the GKD trainer does)
    mask = position_mask("answer", 6, labels=labels)
    ours = distillation_loss(student, teacher, mask, config.trl_beta, temperature)
    (ours_grad,) = torch.autograd.grad(ours, student)

    reference_input = student.detach().clone().requires_grad_(True)
    reference = trl_loss(
        reference_input[:, :-1],
        teacher[:, :-1],
        labels=labels[:, 1:],
        beta=config.trl_beta,
        temperature=temperature,
        reduction="batchmean",
    )
    (reference_grad,) = torch.autograd.grad(reference, reference_input)
    torch.testing.assert_close(ours, reference, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ours_grad, reference_grad, atol=1e-7, rtol=1e-5)
    assert float(ours.detach()) > 0


def test_trl_beta_of_each_divergence():
    assert DistillationConfig(divergence="forward_kl").trl_beta == 0.0
    assert DistillationConfig(divergence="reverse_kl").trl_beta == 1.0
    assert DistillationConfig(divergence="jsd", beta=0.0).trl_beta == 0.0
    assert DistillationConfig(divergence="jsd", beta=0.25).trl_beta == 0.25


def test_distillation_loss_is_the_mean_over_masked_positions_only():
    student, teacher = _logits(8, 2, 4, 6), _logits(9, 2, 4, 6)
    mask = torch.tensor([[False, True, True, False], [True, False, False, False]])
    per_position = generalized_jsd(student, teacher, 0.0)
    expected = (per_position[0, 1] + per_position[0, 2] + per_position[1, 0]) / 3
    torch.testing.assert_close(distillation_loss(student, teacher, mask, 0.0), expected)
    # what is outside the mask does not matter
    changed = teacher.clone()
    changed[~mask] = 100.0
    torch.testing.assert_close(distillation_loss(student, changed, mask, 0.0), expected)


def test_empty_mask_gives_zero_with_a_gradient_path():
    student = _logits(10, 1, 3, 4).requires_grad_(True)
    value = distillation_loss(student, _logits(11, 1, 3, 4), torch.zeros(1, 3, dtype=torch.bool), 0.0)
    value.backward()
    assert float(value.detach()) == 0.0 and student.grad is not None and (student.grad == 0).all()


def test_shapes_that_do_not_line_up_are_refused():
    with pytest.raises(ValueError, match="same shape"):
        generalized_jsd(_logits(0, 2, 5), _logits(1, 2, 6), 0.0)
    with pytest.raises(ValueError, match="do not line up"):
        distillation_loss(_logits(0, 1, 3, 5), _logits(1, 1, 3, 5), torch.ones(1, 4, dtype=torch.bool), 0.0)
    with pytest.raises(ValueError, match="hidden size"):
        feature_loss(_logits(0, 1, 3, 5), _logits(1, 1, 3, 6), torch.ones(1, 3, dtype=torch.bool))


# ------------------------------------------------------------------------------------------------- positions
def test_answer_positions_follow_the_causal_shift():
    labels = torch.tensor([[-100, -100, 7, 8], [-100, 5, -100, -100]])
    mask = position_mask("answer", 4, labels=labels)
    assert mask.tolist() == [[False, True, True, False], [True, False, False, False]]


def test_answer_positions_of_cut_labels_are_the_last_columns_of_the_whole_mask():
    """`answer_only_logits` hands over the last k columns of the logits and of the labels: the mask of the cut
    labels is the last k columns of the mask of the whole labels (and the columns before it hold no answer)."""
    labels = torch.tensor([[-100, -100, -100, -100, 3, 9], [-100, -100, -100, 2, 4, 1]])
    whole = position_mask("answer", 6, labels=labels)
    # k = T - first labelled column + 1 = 4 is the trainer's cut; any wider cut lines up as well
    for k in (4, 5):
        cut = position_mask("answer", k, labels=labels[:, -k:])
        assert torch.equal(cut, whole[:, -k:])
        assert torch.equal(position_mask("answer", k, labels=labels), cut)  # whole labels, logits of k columns
        assert torch.equal(pad_mask_left(cut, 6), whole)


def test_sequence_positions_are_the_non_pad_positions():
    attention = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert torch.equal(position_mask("sequence", 5, attention_mask=attention), attention.bool())
    assert torch.equal(position_mask("sequence", 3, attention_mask=attention), attention[:, -3:].bool())
    assert position_mask("sequence", 4, batch_size=2).all()


def test_position_mask_refusals():
    with pytest.raises(ValueError, match="needs the batch's labels"):
        position_mask("answer", 3)
    with pytest.raises(ValueError, match="cannot line up"):
        position_mask("answer", 5, labels=torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="positions='everywhere' is not allowed"):
        position_mask("everywhere", 3, batch_size=1)
    with pytest.raises(ValueError, match="cannot be widened"):
        pad_mask_left(torch.ones(1, 4, dtype=torch.bool), 3)


# -------------------------------------------------------------------------------------------------- features
def test_feature_loss_matches_a_hand_computation():
    student, teacher = _logits(12, 2, 3, 4), _logits(13, 2, 3, 4)
    mask = torch.tensor([[True, False, True], [False, False, True]])
    total, count = 0.0, 0
    for b in range(2):
        for t in range(3):
            if mask[b, t]:
                for h in range(4):
                    total += (float(student[b, t, h]) - float(teacher[b, t, h])) ** 2
                    count += 1
    assert float(feature_loss(student, teacher, mask)) == pytest.approx(total / count, rel=1e-12)
    assert float(feature_loss(student, student.clone(), mask)) == 0.0
    assert float(feature_loss(student, teacher, torch.zeros(2, 3, dtype=torch.bool))) == 0.0
