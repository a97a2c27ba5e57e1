"""benchmarks/freezing_real.py's speed part: the answer-only batch is the trainer's cut (same loss and gradients as
the full batch), and every arm is timed in both ways the LM head can run."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from benchmark_loader import load_benchmark


@pytest.fixture(scope="module")
def fr():
    yield from load_benchmark("freezing_real")


@pytest.fixture
def rows(tokenizer, small_tasks):
    from hf_adaptive.tasks import tokenize_task

    return [
        {k: r[k] for k in ("input_ids", "attention_mask", "labels")}
        for r in tokenize_task(small_tasks[0], tokenizer, max_length=32)
    ]


def test_answer_only_batch_is_the_trainers_cut(fr, tokenizer, tiny_model, rows):
    from hf_adaptive.tasks import CausalLMCollator
    from hf_adaptive.trainer import ContinualTrainer

    collate = CausalLMCollator(tokenizer, padding_side="left")
    batch = collate(rows[:8])
    trainer_like = SimpleNamespace(data_collator=collate, _answer_only_wanted=lambda model: True)
    tiny_model.train()
    expected = ContinualTrainer._answer_only_inputs(trainer_like, tiny_model, batch)
    got = fr.answer_only_batch(batch)
    assert expected is not None and got["logits_to_keep"] == expected["logits_to_keep"] < batch["labels"].shape[1]
    assert set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in batch)
    with pytest.raises(ValueError, match="no labelled token"):
        fr.answer_only_batch({**batch, "labels": torch.full_like(batch["labels"], -100)})


def test_answer_only_logits_give_the_full_batchs_loss_and_gradients(fr, tokenizer, rows):
    """What makes the two speed measurements compare the same training step."""
    from hf_adaptive.models import build_tiny_gemma

    batches = fr.speed_batches(rows, tokenizer, 1)
    grads = {}
    for logits in fr.LOGITS:
        model = fr.with_lora(build_tiny_gemma(tokenizer, seed=0)[0], 0)
        model.train()
        loss = model(**batches[logits][0]).loss
        loss.backward()
        grads[logits] = (float(loss.detach()), [p.grad.clone() for p in model.parameters() if p.requires_grad])
    (a_loss, a_grads), (f_loss, f_grads) = grads["answer"], grads["full"]
    assert a_loss == pytest.approx(f_loss, rel=1e-5)
    assert len(a_grads) == len(f_grads) > 0
    for a, f in zip(a_grads, f_grads, strict=True):
        torch.testing.assert_close(a, f, rtol=1e-4, atol=1e-6)


def test_speed_times_every_arm_with_both_logits(fr, tokenizer, rows):
    from hf_adaptive.models import build_tiny_gemma

    base, _ = build_tiny_gemma(tokenizer, seed=0, num_hidden_layers=4)
    out = fr.speed(base, fr.speed_batches(rows, tokenizer, 2), steps=1, warmup=1, half=2)
    names = [*fr.SPEED_ARMS, *(f"{n}_full_logits" for n in fr.SPEED_ARMS)]
    assert list(out) == names
    for name, r in out.items():
        assert r["logits"] == ("full" if name.endswith("_full_logits") else "answer")
        assert len(r["step_s"]) == 1 and r["median_step_s"] > 0
    for baseline in ("lora", "full", "lora_full_logits", "full_full_logits"):
        assert out[baseline]["speedup"] == 1.0
    kind = out["lora_half_full_logits"]
    assert kind["speedup"] == out["lora_full_logits"]["median_step_s"] / kind["median_step_s"]
    assert out["lora_half"]["trainable_params"] == out["lora"]["trainable_params"] // 2  # LoRA on the top half only
