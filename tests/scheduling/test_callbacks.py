"""The scheduling callbacks inside a real `transformers.Trainer` / `ContinualTrainer` on the tiny Gemma."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from hf_adaptive.config import ContinualConfig
from hf_adaptive.scheduling import (
    AdaptiveSchedulerCallback,
    AdaptiveSchedulerConfig,
    FreezingConfig,
    SelectiveFreezingCallback,
)
from hf_adaptive.tasks import CausalLMCollator, tokenize_task
from hf_adaptive.trainer import ContinualTrainer

COMMON = dict(
    per_device_train_batch_size=8,
    logging_steps=1,
    report_to=[],
    use_cpu=True,
    disable_tqdm=True,
    save_strategy="no",
    seed=0,
    lr_scheduler_type="constant",
)


def _args(tmp_path, **kw):
    return TrainingArguments(output_dir=str(tmp_path), **{**COMMON, **kw})


class NaNAtStep(Trainer):
    """A real Trainer whose loss turns NaN on one optimizer step (as an overflow would)."""

    nan_step = 3

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if self.state.global_step == self.nan_step:
            loss = loss * float("nan")
        return loss


@pytest.fixture
def rows(tokenizer, small_tasks):
    return tokenize_task(small_tasks[0], tokenizer)


def test_adaptive_callback_controls_the_trainer_lr(tiny_model, tokenizer, rows, tmp_path):
    used: list[float] = []

    class Spy(AdaptiveSchedulerCallback.__mro__[-2]):  # records the LR each optimizer step really uses
        def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kw):
            used.append(optimizer.param_groups[0]["lr"])

    trainer = Trainer(
        model=tiny_model,
        args=_args(tmp_path, max_steps=8, learning_rate=5e-3),
        train_dataset=rows,
        data_collator=CausalLMCollator(tokenizer),
        callbacks=[Spy()],
    )
    cb = AdaptiveSchedulerCallback(AdaptiveSchedulerConfig(warmup=1, cooldown=0), trainer=trainer)
    trainer.add_callback(cb)
    trainer.train()
    assert used[0] == 5e-3
    assert used[1:] == pytest.approx([h["lr"] for h in cb.history[:-1]])
    sched = cb.scheduler
    assert sched is not None and len(cb.history) == 8
    # decisions are logged through trainer.log: their own entries, at the step of the training log they answer
    logged = [h for h in trainer.state.log_history if "adaptive_lr" in h]
    train_logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == len(train_logs) == 8 and logged[-1]["adaptive_lr"] == sched.lr
    assert [h["step"] for h in logged] == [h["step"] for h in train_logs]
    assert sched.lr != 5e-3  # the laws acted
    assert all(g["lr"] == pytest.approx(sched.lr) for g in trainer.optimizer.param_groups)
    # the lr the Trainer logged for step t+1 (its scheduler's get_last_lr) is the one chosen after step t
    for decision, cur in zip(logged, train_logs[1:], strict=False):
        assert cur["learning_rate"] == decision["adaptive_lr"]
    assert [h["learning_rate"] for h in train_logs[1:]] == used[1:]
    assert trainer.lr_scheduler.get_last_lr()[0] == sched.lr
    assert sched.optimizer.param_groups[0]["betas"][0] == sched.momentum


@pytest.mark.parametrize("logging_steps", [1, 2])
def test_cosine_anneal_with_a_still_law_is_the_trainers_cosine_schedule(
    tiny_model, tokenizer, rows, tmp_path, logging_steps
):
    """With the law held still (no rise, no cut, no spike), the anneal reproduces transformers' cosine schedule:
    the horizon is the train() call's number of observations, taken from the Trainer."""
    used: list[float] = []

    class Spy(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kw):
            used.append(optimizer.param_groups[0]["lr"])

    steps, lr = 8, 5e-3
    trainer = Trainer(
        model=tiny_model,
        args=_args(tmp_path, max_steps=steps, learning_rate=lr, logging_steps=logging_steps),
        train_dataset=rows,
        data_collator=CausalLMCollator(tokenizer),
        callbacks=[Spy()],
    )
    still = AdaptiveSchedulerConfig(lr_up=1.0, patience=10**6, spike_ratio=0.0, adapt_momentum=False, anneal="cosine")
    cb = AdaptiveSchedulerCallback(still, trainer=trainer)
    trainer.add_callback(cb)
    trainer.train()
    horizon = steps // logging_steps
    assert cb.scheduler.horizon == horizon
    # the decision after observation n (at step n * logging_steps) is in force from the next step on
    expected = [lr * 0.5 * (1 + math.cos(math.pi * ((t // logging_steps) / horizon))) for t in range(steps)]
    assert used == pytest.approx(expected, rel=1e-9)
    if logging_steps == 1:  # transformers' own cosine schedule, no warm-up: the same LRs
        from transformers import get_cosine_schedule_with_warmup

        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
        ref = get_cosine_schedule_with_warmup(opt, 0, steps)
        reference = []
        for _ in range(steps):
            reference.append(opt.param_groups[0]["lr"])
            opt.step()
            ref.step()
        assert used == pytest.approx(reference, rel=1e-9)


def test_without_a_trainer_decisions_go_into_the_logs_of_later_callbacks(tiny_model, tokenizer, rows, tmp_path):
    seen: list[dict] = []

    class Reporter(AdaptiveSchedulerCallback.__mro__[-2]):  # a reporting integration placed after the plugin
        def on_log(self, args, state, control, logs=None, **kw):
            seen.append(dict(logs))

    cb = AdaptiveSchedulerCallback(warmup=1, cooldown=0)
    trainer = Trainer(
        model=tiny_model,
        args=_args(tmp_path, max_steps=3, learning_rate=5e-3),
        train_dataset=rows,
        data_collator=CausalLMCollator(tokenizer),
        callbacks=[cb, Reporter()],
    )
    trainer.train()
    assert [h["adaptive_lr"] for h in seen if "loss" in h] == [h["lr"] for h in cb.history]
    assert not any("adaptive_lr" in h for h in trainer.state.log_history)  # log_history is not written to


def test_nan_step_is_skipped_inside_the_trainer(tiny_model, tokenizer, rows, tmp_path):
    cb = AdaptiveSchedulerCallback(AdaptiveSchedulerConfig(nan_backoff=0.5, warmup=100))
    seen: dict[str, torch.Tensor] = {}

    class Watch(AdaptiveSchedulerCallback.__mro__[-2]):  # a plain ContinualPlugin/TrainerCallback spy
        def on_step_begin(self, args, state, control, model=None, **kw):
            if state.global_step == NaNAtStep.nan_step:
                seen["before"] = model.model.embed_tokens.weight.detach().clone()

        def on_step_end(self, args, state, control, model=None, **kw):
            if state.global_step == NaNAtStep.nan_step + 1:
                seen["after"] = model.model.embed_tokens.weight.detach().clone()

    trainer = NaNAtStep(
        model=tiny_model,
        args=_args(tmp_path, max_steps=6, learning_rate=1e-2),
        train_dataset=rows,
        data_collator=CausalLMCollator(tokenizer),
        callbacks=[cb, Watch()],
    )
    trainer.train()
    assert cb.scheduler.num_skipped == 1
    assert torch.equal(seen["before"], seen["after"])  # the NaN step moved nothing
    assert all(torch.isfinite(p).all() for p in tiny_model.parameters())
    events = [h["event"] for h in cb.history]
    assert events.count("skipped") == 1
    skipped = events.index("skipped")
    assert cb.history[skipped]["lr"] == pytest.approx(cb.history[skipped - 1]["lr"] * 0.5)
    assert math.isfinite(trainer.state.log_history[-1]["train_loss"])


@pytest.mark.parametrize(("field", "value"), [("lr_scheduler_type", "linear"), ("logging_strategy", "epoch")])
def test_callback_validates_training_arguments(tiny_model, tokenizer, rows, tmp_path, field, value):
    trainer = Trainer(
        model=tiny_model,
        args=_args(tmp_path, max_steps=2, **{field: value}),
        train_dataset=rows,
        data_collator=CausalLMCollator(tokenizer),
        callbacks=[AdaptiveSchedulerCallback()],
    )
    with pytest.raises(ValueError, match=rf"TrainingArguments\.{field}="):
        trainer.train()


def test_freezing_callback_in_trainer_logs_fraction_and_releases(tiny_model, tokenizer, rows, tmp_path):
    trainer = Trainer(
        model=tiny_model,
        args=_args(tmp_path, max_steps=6, learning_rate=5e-3),
        train_dataset=rows,
        data_collator=CausalLMCollator(tokenizer),
    )
    cb = SelectiveFreezingCallback(
        FreezingConfig(threshold=0.3, threshold_mode="relative", warmup_steps=2, probe_every=0, granularity="module"),
        trainer=trainer,
    )
    trainer.add_callback(cb)
    trainer.train()
    fractions = [h["frozen_fraction"] for h in trainer.state.log_history if "frozen_fraction" in h]
    assert len(fractions) == 6 and fractions[0] == 0.0 and max(fractions) > 0.0
    assert cb.freezer.steps == 6
    assert all(p.requires_grad for p in tiny_model.parameters())  # released at train end


def test_layer_freezing_in_trainer_on_lora_frees_adam_state_and_logs_the_prefix(tiny_model, tokenizer, rows, tmp_path):
    """LoRA on a 4-layer tiny Gemma; every layer is equally quiet under an absolute threshold above all norms, so the
    prefix grows to the cap (half the parameters: 2 layers); Adam keeps no moments for the frozen adapters."""
    from peft import LoraConfig, get_peft_model

    from hf_adaptive.models import build_tiny_gemma

    model, _ = build_tiny_gemma(tokenizer, seed=0, num_hidden_layers=4)
    model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    trainer = Trainer(
        model=model,
        args=_args(tmp_path, max_steps=5, learning_rate=5e-3),
        train_dataset=rows,
        data_collator=CausalLMCollator(tokenizer),
    )
    cb = SelectiveFreezingCallback(
        FreezingConfig(granularity="layer", threshold=1e9, warmup_steps=2, probe_every=0, max_frozen_fraction=0.5),
        trainer=trainer,
    )
    trainer.add_callback(cb)
    states: list = []

    class Spy(TrainerCallback):
        def on_step_end(self, args, state, control, optimizer=None, **kw):
            if state.global_step == 4:
                inner = getattr(optimizer, "optimizer", optimizer)
                states.append({id(p) for p in inner.state})

    trainer.add_callback(Spy())
    trainer.train()
    logged = [h["frozen_layers"] for h in trainer.state.log_history if "frozen_layers" in h]
    assert logged[:2] == [0, 0] and logged[2:] == [2, 2, 2]
    assert cb.freezer.freeze_history() == {"base_model.model.model.layers.0": 3, "base_model.model.model.layers.1": 3}
    lora_frozen = cb.freezer.units[0].params + cb.freezer.units[1].params  # 2 layers x (q, v) x (A, B)
    assert len(lora_frozen) == 8 and not {id(p) for p in lora_frozen} & states[0]
    assert any(id(p) in states[0] for p in cb.freezer.units[2].params)
    assert all(p.requires_grad for p in cb.freezer.units[0].params)  # released at train end


def test_through_continual_trainer_with_resume(tiny_model, tokenizer, rows, tmp_path):
    """Both callbacks are plugins: their state lands in every checkpoint and is restored on resume."""

    def make(model):
        args = ContinualConfig(
            output_dir=str(tmp_path),
            max_steps=6,
            learning_rate=5e-3,
            save_strategy="steps",
            save_steps=3,
            **{k: v for k, v in COMMON.items() if k != "save_strategy"},
        )
        sched = AdaptiveSchedulerCallback(AdaptiveSchedulerConfig(warmup=1, cooldown=0))
        freeze = SelectiveFreezingCallback(
            FreezingConfig(
                threshold=0.3, threshold_mode="relative", warmup_steps=1, probe_every=0, granularity="module"
            )
        )
        trainer = ContinualTrainer(
            model=model,
            args=args,
            train_dataset=rows,
            data_collator=CausalLMCollator(tokenizer),
            callbacks=[sched, freeze],
        )
        return trainer, sched, freeze

    trainer, sched, freeze = make(tiny_model)
    trainer.train()
    at_3 = sched.history[2]
    assert (tmp_path / "checkpoint-3" / "continual" / "adaptive_scheduler").is_dir()
    assert (tmp_path / "checkpoint-3" / "continual" / "selective_freezing").is_dir()

    from hf_adaptive.models import build_tiny_gemma

    model, _ = build_tiny_gemma(tokenizer, seed=0)
    trainer2, sched2, freeze2 = make(model)
    restored: dict = {}

    class Spy(AdaptiveSchedulerCallback.__mro__[-2]):
        def on_step_begin(self, args, state, control, **kw):
            if not restored:
                restored.update(lr=sched2.scheduler.lr, steps=sched2.scheduler.num_steps, frozen=freeze2.freezer.steps)

    trainer2.add_callback(Spy())
    trainer2.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))
    assert restored == {"lr": pytest.approx(at_3["lr"]), "steps": 3, "frozen": 3}
    # same data order, same state: the resumed run ends where the uninterrupted one did
    assert sched2.scheduler.lr == pytest.approx(sched.scheduler.lr, rel=1e-4)
