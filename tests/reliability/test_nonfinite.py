"""The trainer's always-on non-finite guard: a NaN/inf loss or gradient skips the whole update (no weight, optimizer
state or LR moves), is counted and logged, and `nonfinite_patience` skips in a row fail the task."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import TrainerCallback

from hf_adaptive.plugins import ContinualPlugin, LossTerm
from hf_adaptive.tasks import CausalLMCollator, tokenize_task
from hf_adaptive.trainer import ContinualTrainer, NonFiniteTrainingError


class BadTerm(ContinualPlugin):
    """Adds a term that makes the loss (or only the gradient) non-finite on chosen training micro-batches."""

    name = "bad"

    def __init__(self, kind: str, calls: set[int] | None = None, every: bool = False):
        self.kind, self.calls, self.every, self.count = kind, calls or set(), every, 0

    def loss_terms(self, trainer, model, inputs, outputs):
        self.count += 1
        params = [p for p in model.parameters() if p.requires_grad]
        delta = sum(((p - p.detach()) ** 2).sum() for p in params)  # 0 with gradient 0
        if not (self.every or self.count in self.calls):
            return [LossTerm("bad", delta, 1.0)]
        if self.kind == "nan_loss":
            value = delta + float("nan") * params[0].sum()
        elif self.kind == "inf_loss":
            value = delta + float("inf") * (params[0].sum() ** 2 + 1)
        else:  # finite loss (0), NaN gradient: d sqrt(u)/du is inf at u = 0, times du/dp = 0
            value = torch.sqrt(delta)
        return [LossTerm("bad", value, 1.0)]


class Watch(TrainerCallback):
    """Weights and optimizer step counts around every optimizer step, and the LR in force at each step."""

    def __init__(self):
        self.before, self.after, self.lrs, self.opt_steps = {}, {}, {}, {}

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.before[state.global_step + 1] = [p.detach().clone() for p in model.parameters()]
        self.lrs[state.global_step + 1] = optimizer.param_groups[0]["lr"]

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.after[state.global_step] = [p.detach().clone() for p in model.parameters()]
        steps = [s["step"] for s in optimizer.state.values() if "step" in s]
        self.opt_steps[state.global_step] = float(max(steps)) if steps else 0.0


def _trainer(tmp_path, tokenizer, small_tasks, make_args, callbacks, n=32, **overrides):
    from hf_adaptive.models import build_tiny_gemma

    model, _ = build_tiny_gemma(tokenizer, seed=0)
    rows = tokenize_task(small_tasks[0], tokenizer).select(range(n))
    values = dict(per_device_train_batch_size=4, weight_decay=0.1, lr_scheduler_type="linear")
    values.update(overrides)
    return ContinualTrainer(
        model=model,
        args=make_args(tmp_path, **values),
        train_dataset=rows,
        data_collator=CausalLMCollator(tokenizer),
        processing_class=tokenizer,
        callbacks=callbacks,
    )


@pytest.mark.parametrize("kind", ["nan_loss", "inf_loss", "nan_grad"])
def test_bad_step_is_skipped_whole_and_counted(tmp_path, tokenizer, small_tasks, make_args, kind):
    """AdamW with weight decay would move weights even with zero gradients: the step must really not happen."""
    watch = Watch()
    trainer = _trainer(tmp_path, tokenizer, small_tasks, make_args, [BadTerm(kind, {3}), watch])
    trainer.train()
    assert all(torch.equal(a, b) for a, b in zip(watch.before[3], watch.after[3]))  # step 3 moved nothing
    assert not all(torch.equal(a, b) for a, b in zip(watch.before[4], watch.after[4]))  # step 4 did
    assert watch.opt_steps[3] == watch.opt_steps[2] == 2.0 and watch.opt_steps[4] == 3.0  # Adam state untouched
    assert watch.lrs[4] == watch.lrs[3]  # the LR schedule did not advance on the skipped step
    assert watch.lrs[3] != watch.lrs[2]
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert "nonfinite_steps_skipped" not in logged[1] and logged[2]["nonfinite_steps_skipped"] == 1
    assert logged[-1]["nonfinite_steps_skipped"] == 1 and trainer._nonfinite_skipped == 1


def test_one_bad_micro_batch_skips_the_accumulated_update(tmp_path, tokenizer, small_tasks, make_args):
    watch = Watch()
    # micro-batch 5 is the first half of optimizer step 3
    trainer = _trainer(
        tmp_path, tokenizer, small_tasks, make_args, [BadTerm("nan_loss", {5}), watch], gradient_accumulation_steps=2
    )
    trainer.train()
    assert all(torch.equal(a, b) for a, b in zip(watch.before[3], watch.after[3]))
    assert not all(torch.equal(a, b) for a, b in zip(watch.before[2], watch.after[2]))
    assert trainer._nonfinite_skipped == 1 and trainer.state.global_step == 4


def test_patience_fails_the_task_with_finite_weights(tmp_path, tokenizer, small_tasks, make_args):
    trainer = _trainer(
        tmp_path, tokenizer, small_tasks, make_args, [BadTerm("nan_loss", every=True)], nonfinite_patience=3
    )
    initial = [p.detach().clone() for p in trainer.model.parameters()]
    with pytest.raises(NonFiniteTrainingError, match=r"3 consecutive .*nonfinite_patience=3"):
        trainer.train()
    assert trainer.state.global_step == 2  # failed on the third step
    assert all(torch.equal(a, b) for a, b in zip(initial, trainer.model.parameters()))


def test_patience_counts_consecutive_skips_only(tmp_path, tokenizer, small_tasks, make_args):
    # bad steps 1, 2, 4, 5: never 3 in a row, so the task finishes with 4 skips
    trainer = _trainer(
        tmp_path, tokenizer, small_tasks, make_args, [BadTerm("inf_loss", {1, 2, 4, 5})], nonfinite_patience=3
    )
    trainer.train()
    assert trainer._nonfinite_skipped == 4 and trainer.state.global_step == 8


def test_patience_fires_with_the_adaptive_scheduler(tmp_path, tokenizer, small_tasks, make_args):
    """The scheduler's own NaN safety used to swallow every step silently; it now defers to the trainer's guard."""
    from hf_adaptive.scheduling import AdaptiveSchedulerCallback

    scheduler = AdaptiveSchedulerCallback()
    trainer = _trainer(
        tmp_path,
        tokenizer,
        small_tasks,
        make_args,
        [BadTerm("nan_loss", every=True), scheduler],
        nonfinite_patience=4,
        lr_scheduler_type="constant",
    )
    with pytest.raises(NonFiniteTrainingError, match="nonfinite_patience=4"):
        trainer.train()
    assert trainer._nonfinite_skipped == 4  # counted once, by the trainer
    assert scheduler.scheduler.num_skipped == 3  # observations of the 3 logged steps before the failing one


def test_scheduler_skip_is_counted_once_and_backs_off(tmp_path, tokenizer, small_tasks, make_args):
    from hf_adaptive.scheduling import AdaptiveSchedulerCallback

    scheduler = AdaptiveSchedulerCallback()
    trainer = _trainer(
        tmp_path,
        tokenizer,
        small_tasks,
        make_args,
        [BadTerm("nan_grad", {3}), scheduler],
        lr_scheduler_type="constant",
    )
    trainer.train()
    events = [h["event"] for h in scheduler.history]
    assert events[2] == "skipped" and events.count("skipped") == 1
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert logged[-1]["nonfinite_steps_skipped"] == 1 and "skipped_steps" not in logged[-1]


def test_sequence_counts_skips_and_fails_a_hopeless_task(tmp_path, tokenizer, small_tasks, make_args):
    from hf_adaptive.models import build_tiny_gemma

    class BadInTask(BadTerm):
        def loss_terms(self, trainer, model, inputs, outputs):
            self.every = trainer.current_task_index == 1
            return super().loss_terms(trainer, model, inputs, outputs)

    model, _ = build_tiny_gemma(tokenizer, seed=0)
    args = make_args(tmp_path, nonfinite_patience=2, num_train_epochs=1)
    trainer = ContinualTrainer(
        model=model, args=args, processing_class=tokenizer, callbacks=[BadInTask("nan_loss", {2})]
    )
    with pytest.raises(NonFiniteTrainingError, match="task 'last_color'"):
        trainer.train_sequence(small_tasks[:2])
    import json

    state = json.loads((tmp_path / "sequence_state.json").read_text())
    assert state["completed"] == 1 and state["extra"]["nonfinite_steps_skipped"] == [1]
    assert all(math.isfinite(v) for v in state["matrix"][0])


def test_model_with_nonfinite_weights_is_not_scored(tmp_path, tokenizer, small_tasks, make_args, caplog):
    """An argmax over NaN scores looks like chance accuracy; the row must say 'not measurable' instead."""
    from hf_adaptive.models import build_tiny_gemma

    model, _ = build_tiny_gemma(tokenizer, seed=0)
    with torch.no_grad():
        next(model.parameters())[0, 0] = float("nan")
    trainer = ContinualTrainer(model=model, args=make_args(tmp_path), processing_class=tokenizer)
    with caplog.at_level("WARNING"):
        row = trainer.evaluate_tasks(small_tasks[:2])
    assert len(row) == 2 and all(math.isnan(v) for v in row)
    assert "non-finite weights" in caplog.text


def test_create_optimizer_on_the_old_parent_signature(tmp_path, tokenizer, small_tasks, make_args, monkeypatch):
    """Before transformers 5.3 `Trainer.create_optimizer` took no model argument."""
    from transformers import Trainer

    import hf_adaptive.trainer as module

    original = Trainer.create_optimizer

    def old_create_optimizer(self):
        return original(self)

    monkeypatch.setattr(Trainer, "create_optimizer", old_create_optimizer)
    monkeypatch.setattr(module, "_PARENT_CREATE_OPTIMIZER_TAKES_MODEL", False)
    trainer = _trainer(tmp_path, tokenizer, small_tasks, make_args, [], n=8)
    optimizer = trainer.create_optimizer()
    assert optimizer is trainer.optimizer and len(optimizer.param_groups) >= 1
