"""FeedbackCallback inside real Trainers, continuous mode, checkpoints, and the inference-time adapter."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from hf_adaptive.control.feedback import FeedbackCallback, FeedbackConfig, OnlineGateAdapter, validation_loss
from hf_adaptive.control.gate_controller import GateController, GateControllerConfig
from hf_adaptive.models import build_tiny_gemma
from hf_adaptive.models.gates import gate_model
from hf_adaptive.tasks import CausalLMCollator, tokenize_task
from hf_adaptive.tasks.formatting import cross_entropy_per_row


class _LogRecorder(TrainerCallback):
    """What a reporting integration sees: the `logs` of every `on_log`."""

    def __init__(self) -> None:
        self.logs: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))


@pytest.fixture
def rows(tokenizer, small_tasks):
    return tokenize_task(small_tasks[0], tokenizer)


def _args(tmp_path, **kw) -> TrainingArguments:
    base = dict(
        output_dir=str(tmp_path),
        max_steps=6,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    base.update(kw)
    return TrainingArguments(**base)


def test_validation_loss_matches_per_row_reference(tiny_model, tokenizer, rows):
    collate = CausalLMCollator(tokenizer)
    batches = [collate([rows[i] for i in range(s, s + 4)]) for s in (0, 4)]
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(8):
            ids = torch.tensor([rows[i]["input_ids"]])
            labels = torch.tensor([rows[i]["labels"]])
            n = int((labels[:, 1:] != -100).sum())
            total += float(cross_entropy_per_row(tiny_model(ids).logits, labels)) * n
            count += n
    assert validation_loss(tiny_model, batches) == pytest.approx(total / count, rel=1e-5)


def test_periodic_feedback_in_a_trainer(tmp_path, tiny_model, tokenizer, rows):
    gated = gate_model(tiny_model)
    ctrl = GateController(
        2, 4, GateControllerConfig(algorithm="a2c", rollout_steps=1, keep_bias=0.0, efficiency_factor=0.2, seed=0)
    )
    cb = FeedbackCallback(
        FeedbackConfig(eval_every=2, eval_size=16, eval_batch_size=8),
        controller=ctrl,
        eval_dataset=rows,
        data_collator=CausalLMCollator(tokenizer),
    )
    trainer = Trainer(
        model=tiny_model,
        args=_args(tmp_path),
        train_dataset=rows,
        data_collator=CausalLMCollator(tokenizer),
        callbacks=[cb],
    )
    cb.bind(trainer)  # a plain Trainer: the callback logs its rounds through trainer.log
    seen = _LogRecorder()
    trainer.add_callback(seen)
    trainer.train()
    assert [e["step"] for e in ctrl.log] == [0, 2, 4, 6]
    assert ctrl.log[0]["reward"] is None and all(e["reward"] is not None for e in ctrl.log[1:])
    # rewards follow the documented formula from consecutive validation losses and the gates in force
    l0, l1 = ctrl.log[0]["loss"], ctrl.log[1]["loss"]
    pruned = 1 - sum(ctrl.log[1]["gates"]) / 8
    assert ctrl.log[1]["reward"] == pytest.approx(math.tanh((l0 - l1) / l0 + 0.2 * pruned))
    assert torch.equal(gated.fixed_gates, ctrl.gates)  # the controller's last gates are applied
    assert ctrl.updates >= 2 and len(ctrl.archive) >= 1
    records = [r for r in trainer.state.log_history if "gate_reward" in r]
    assert [r["step"] for r in records] == [2, 4, 6] and len(records[0]["gate_values"]) == 8
    # through Trainer.log: every callback's on_log (W&B, TensorBoard, ...) receives the rounds
    assert [r["gate_reward"] for r in seen.logs if "gate_reward" in r] == [r["gate_reward"] for r in records]


def test_continuous_mode_uses_running_training_loss(tmp_path, tiny_model, tokenizer, rows):
    gate_model(tiny_model)
    ctrl = GateController(2, 4, GateControllerConfig(algorithm="reinforce", rollout_steps=2, seed=1))
    cb = FeedbackCallback(FeedbackConfig(mode="continuous", eval_every=2), controller=ctrl)
    trainer = Trainer(
        model=tiny_model,
        args=_args(tmp_path, max_steps=7),
        train_dataset=rows,
        data_collator=CausalLMCollator(tokenizer),
        callbacks=[cb],
    )
    cb.bind(trainer)
    trainer.train()
    train_losses = {r["step"]: r["loss"] for r in trainer.state.log_history if "loss" in r}
    assert [e["step"] for e in ctrl.log] == [1, 3, 5, 7]
    for e in ctrl.log:
        assert e["loss"] == pytest.approx(train_losses[e["step"]])
    assert [r["step"] for r in trainer.state.log_history if "gate_reward" in r] == [3, 5, 7]


def test_callback_validates_on_train_begin(tmp_path, tiny_model, tokenizer, rows):
    collate = CausalLMCollator(tokenizer)
    gate_model(tiny_model, mode="hard_concrete")
    cb = FeedbackCallback(controller=GateController(2, 4), eval_dataset=rows, data_collator=collate)
    with pytest.raises(ValueError, match="fixed gates"):
        Trainer(
            model=tiny_model, args=_args(tmp_path), train_dataset=rows, data_collator=collate, callbacks=[cb]
        ).train()
    model, _ = build_tiny_gemma(tokenizer)
    gate_model(model)
    for cb, match in [
        (FeedbackCallback(controller=GateController(3, 4), eval_dataset=rows, data_collator=collate), "shape"),
        (FeedbackCallback(controller=GateController(2, 4)), "eval_dataset"),
    ]:
        with pytest.raises(ValueError, match=match):
            Trainer(
                model=model, args=_args(tmp_path), train_dataset=rows, data_collator=collate, callbacks=[cb]
            ).train()
    with pytest.raises(ValueError, match="FeedbackConfig.mode"):
        FeedbackConfig(mode="sometimes")
    with pytest.raises(TypeError, match="controller="):
        FeedbackCallback(GateController(2, 4))  # the former positional signature


def test_continual_trainer_sequence_saves_and_restores_controller(tmp_path, tokenizer, small_tasks):
    from hf_adaptive.config import ContinualConfig
    from hf_adaptive.trainer import ContinualTrainer
    from hf_adaptive.utils.io import load_state

    model, _ = build_tiny_gemma(tokenizer, seed=0)
    gate_model(model)
    ctrl = GateController(2, 4, GateControllerConfig(rollout_steps=1, seed=2))
    cb = FeedbackCallback(FeedbackConfig(eval_every=2, eval_size=16, statistics=("entropy",)), controller=ctrl)
    args = ContinualConfig(
        output_dir=str(tmp_path),
        max_steps=4,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        report_to=[],
        save_strategy="steps",
        save_steps=4,
        logging_steps=2,
        use_cpu=True,
        disable_tqdm=True,
        continual_eval_limit=16,
        save_results_plot=False,
    )
    trainer = ContinualTrainer(model=model, args=args, processing_class=tokenizer, callbacks=[cb])
    result = trainer.train_sequence(small_tasks[:2], evaluate_baseline=False)
    assert len(result.matrix) == 2
    # per task: a fresh baseline loss (step 0, no reward), then feedback at steps 2 and 4
    steps = [e["step"] for e in ctrl.log]
    assert steps == [0, 2, 4, 0, 2, 4]
    assert ctrl.log[3]["reward"] is None
    saved = sorted(tmp_path.glob("**/checkpoint-4/continual/gate_feedback"))
    assert len(saved) == 2
    restored = GateController(2, 4)
    restored.load_state_dict(load_state(saved[-1])["controller"])
    assert restored.log == ctrl.log and restored.archive.front() == ctrl.archive.front()
    assert all(pt.step >= 0 for pt in ctrl.archive.points) and len(ctrl.archive) <= 3  # this task's points only
    for p, q in zip(restored.policy.parameters(), ctrl.policy.parameters(), strict=True):
        assert torch.equal(p, q)


def test_online_adapter_learns_without_lm_backward(tokenizer):
    model, _ = build_tiny_gemma(tokenizer, seed=0)
    model.eval()
    gated = gate_model(model)
    before = {k: v.clone() for k, v in model.state_dict().items() if "head_gates" not in k}
    ctrl = GateController(2, 4, GateControllerConfig(algorithm="ppo", efficiency_factor=0.0, seed=0))
    adapter = OnlineGateAdapter(model, ctrl)
    target = torch.tensor([[1.0, 1, 0, 0], [1, 0, 1, 0]])  # the gates this "user" is happy with

    def match(g: torch.Tensor) -> float:
        return float(1 - (g - target).abs().mean())

    previous, current, matches = match(torch.ones(2, 4)), ctrl.gates.clone(), []
    for _ in range(200):
        reward = 4 * (match(current) - previous)  # user feedback: better or worse than before
        previous = match(current)
        current = adapter.feedback(reward)
        assert torch.equal(gated.fixed_gates, current)
        matches.append(match(current))
    assert sum(matches[-40:]) / 40 > sum(matches[:20]) / 20 + 0.1
    out = adapter.generate(torch.tensor([[2, 10, 11]]), max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 6)
    assert all(p.grad is None for p in model.parameters())
    for k, v in model.state_dict().items():
        if k in before:
            assert torch.equal(v, before[k])


def test_validation_loss_matches_the_former_cross_entropy(tiny_model, tokenizer, rows):
    """`validation_loss` now sums `answer_cross_entropy`: the same number as the former formula, to ~1e-6."""
    collate = CausalLMCollator(tokenizer)
    batches = [collate([rows[i] for i in range(s, s + 4)]) for s in (0, 4)]
    total, count = 0.0, 0.0
    with torch.no_grad():
        for batch in batches:
            logits = tiny_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            targets = batch["labels"][:, 1:]
            valid = targets != -100
            ce = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().transpose(1, 2), targets.clamp_min(0), reduction="none"
            )
            total += float((ce * valid).sum())
            count += float(valid.sum())
    assert validation_loss(tiny_model, batches) == pytest.approx(total / count, rel=1e-6)


def test_task_begin_uses_the_context_eval_split(tokenizer, small_tasks):
    from dataclasses import replace

    from hf_adaptive.plugins import TaskContext

    class Stub:
        pass

    cb = FeedbackCallback(FeedbackConfig(eval_batch_size=8), controller=GateController(2, 4))
    context = TaskContext.build(small_tasks[0], 0, tokenizer)
    stub = Stub()
    cb.on_task_begin(stub, context)
    assert cb.trainer is stub and cb.data_collator is context.collator
    assert cb.eval_dataset is context.eval_dataset  # the trainer's tokenized rows, not a second tokenization
    assert cb.eval_batches()[0]["input_ids"].shape[0] == 8
    no_eval = replace(context, task=replace(small_tasks[1], eval_dataset=None), eval_dataset=None)
    with pytest.raises(ValueError, match="no eval split"):
        cb.on_task_begin(stub, no_eval)
    continuous = FeedbackCallback(FeedbackConfig(mode="continuous"), controller=GateController(2, 4))
    continuous.on_task_begin(stub, no_eval)  # the running training loss needs no eval split
    assert continuous.eval_dataset is None


def test_unbound_callback_warns_once_and_keeps_the_controller_log(tmp_path, tiny_model, tokenizer, rows):
    gate_model(tiny_model)
    ctrl = GateController(2, 4, GateControllerConfig(rollout_steps=1, seed=0))
    cb = FeedbackCallback(
        FeedbackConfig(eval_every=2, eval_size=8, statistics=()),
        controller=ctrl,
        eval_dataset=rows,
        data_collator=CausalLMCollator(tokenizer),
    )
    trainer = Trainer(
        model=tiny_model,
        args=_args(tmp_path, max_steps=4),
        train_dataset=rows,
        data_collator=CausalLMCollator(tokenizer),
        callbacks=[cb],
    )
    with pytest.warns(UserWarning, match="bind") as caught:
        trainer.train()
    assert sum("bind" in str(w.message) for w in caught) == 1
    assert [e["step"] for e in ctrl.log] == [0, 2, 4]
    assert not [r for r in trainer.state.log_history if "gate_reward" in r]
