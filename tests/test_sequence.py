"""`train_sequence`: adapter strategies, the accuracy matrix, logging, snapshots and resuming a killed run."""

from __future__ import annotations

import json
import math

import pytest
from transformers import TrainerCallback

from hf_adaptive.metrics import ContinualResult
from hf_adaptive.plugins import ContinualPlugin
from hf_adaptive.trainer import ContinualTrainer


class Recorder(ContinualPlugin):
    name = "recorder"

    def __init__(self):
        self.events = []

    def on_task_begin(self, trainer, context):
        task, index = context.task, context.index
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        self.events.append(("begin", task.name, index, trainable))

    def on_task_end(self, trainer, context):
        task, index = context.task, context.index
        self.events.append(("end", task.name, index, trainer.state.global_step))

    def state_dict(self):
        return {"events": [list(e) for e in self.events]}

    def load_state_dict(self, state):
        self.events = [tuple(e) for e in state["events"]]


class Crash(TrainerCallback):
    """Simulates a killed run: raises once task `task_index` reaches `step`."""

    def __init__(self, trainer_ref, task_index, step):
        self.ref, self.task_index, self.step = trainer_ref, task_index, step

    def on_step_end(self, args, state, control, **kwargs):
        if self.ref[0].current_task_index == self.task_index and state.global_step == self.step:
            raise KeyboardInterrupt("simulated kill")


def _run(tmp_path, tokenizer, tasks, make_args, strategy="full", callbacks=(), resume=None, **overrides):
    from hf_adaptive.models import build_tiny_gemma

    model, _ = build_tiny_gemma(tokenizer, seed=0)
    values = dict(adapter_strategy=strategy, learning_rate=3e-3, num_train_epochs=2)
    values.update(overrides)
    args = make_args(tmp_path, **values)
    trainer = ContinualTrainer(model=model, args=args, processing_class=tokenizer, callbacks=list(callbacks))
    return trainer, trainer.train_sequence(tasks, resume_from_checkpoint=resume)


@pytest.mark.parametrize("strategy", ["full", "shared_lora", "lora_per_task"])
def test_sequence_runs_every_strategy(tmp_path, tokenizer, small_tasks, make_args, strategy):
    recorder = Recorder()
    trainer, result = _run(tmp_path, tokenizer, small_tasks, make_args, strategy, [recorder])
    n = len(small_tasks)
    assert isinstance(result, ContinualResult) and result.task_names == [t.name for t in small_tasks]
    assert len(result.matrix) == n and all(len(r) == n for r in result.matrix)
    assert all(0.0 <= v <= 1.0 for row in result.matrix for v in row)
    assert len(result.baseline) == n and len(result.train_time) == n
    assert [e[:3] for e in recorder.events] == [
        (k, t.name, i) for i, t in enumerate(small_tasks) for k in ("begin", "end")
    ]
    trainable = [e[3] for e in recorder.events if e[0] == "begin"]
    total = sum(p.numel() for p in trainer.model.get_base_model().parameters()) if strategy != "full" else None
    if strategy == "full":
        assert len(set(trainable)) == 1
    else:  # only LoRA weights train, and the same amount for every task
        assert len(set(trainable)) == 1 and trainable[0] < total / 10
    if strategy == "lora_per_task":
        assert sorted(trainer.model.peft_config) == sorted(f"expert_{t.name}" for t in small_tasks)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["matrix"] == result.matrix and saved["metrics"]["bwt"] == pytest.approx(result.bwt)
    assert (tmp_path / "accuracy_matrix.png").stat().st_size > 1000
    logged = {k: v for h in trainer.state.log_history for k, v in h.items() if k.startswith("cl/")}
    assert logged["cl/avg_acc"] == pytest.approx(result.avg_acc)
    assert logged["cl/bwt"] == pytest.approx(result.bwt)


def _constant_answer(task, name: str, label: int):
    """The task's prompts (same template, same rows), every answer `verbalizer[label]`."""
    from hf_adaptive.tasks import Task

    def relabel(split):
        return [{"text": r["text"], "label": label} for r in split]

    return Task(
        name=name,
        train_dataset=relabel(task.train_dataset),
        eval_dataset=relabel(task.eval_dataset),
        verbalizer=task.verbalizer,
        template=task.template,
    )


def test_full_finetuning_learns_and_forgets(tmp_path, tokenizer, make_args, test_seed):
    """Full fine-tuning on a task that contradicts the first one: learning it is forgetting the first.

    Both tasks ask the same prompts, one always answers "yes", the other always "no": for any weights the two
    accuracies sum to 1 (conflict by construction), and a constant answer is learned in a few steps from any
    start (the effect is large by construction, not a lucky trajectory of learning a rule).
    """
    from hf_adaptive.tasks import builtin_suite, task_accuracy

    (prompts,) = builtin_suite(["first_color"], n_train=64, n_eval=32, seed=test_seed)
    tasks = [_constant_answer(prompts, "always_yes", 0), _constant_answer(prompts, "always_no", 1)]
    trainer, result = _run(
        tmp_path,
        tokenizer,
        tasks,
        make_args,
        num_train_epochs=2,
        per_device_train_batch_size=16,
        learning_rate=3e-3,
        logging_steps=50,
        seed=test_seed,
        save_results_plot=False,
    )
    matrix = result.matrix
    for row in [result.baseline, *matrix]:  # conflict, whatever the weights
        assert row[0] + row[1] == pytest.approx(1.0), (result.baseline, matrix)
    # the last row is the trained model's accuracy on every task, as task_accuracy measures it
    assert matrix[1] == [task_accuracy(trainer.model, tokenizer, t) for t in tasks]
    # each task is learned completely, so the second one undoes the first
    assert matrix[0][0] == 1.0 and matrix[1][1] == 1.0, matrix
    assert result.bwt == -1.0, matrix


def test_lora_per_task_keeps_old_experts(tmp_path, tokenizer, make_args):
    """Each task is scored with its own expert: training a later expert cannot change an earlier one."""
    from hf_adaptive.tasks import builtin_suite

    tasks = builtin_suite(["first_color", "last_color"], n_train=64, n_eval=32, seed=1)
    _, result = _run(tmp_path, tokenizer, tasks, make_args, "lora_per_task")
    assert result.matrix[1][0] == result.matrix[0][0]
    assert result.bwt == 0.0


def test_resume_after_kill_mid_task(tmp_path, tokenizer, small_tasks, make_args):
    overrides = dict(save_strategy="steps", save_steps=4)
    _, reference = _run(tmp_path / "ref", tokenizer, small_tasks, make_args, "lora_per_task", [Recorder()], **overrides)

    ref = [None]
    recorder = Recorder()
    from hf_adaptive.models import build_tiny_gemma

    model, _ = build_tiny_gemma(tokenizer, seed=0)
    args = make_args(
        tmp_path / "run", adapter_strategy="lora_per_task", learning_rate=3e-3, num_train_epochs=2, **overrides
    )
    trainer = ContinualTrainer(
        model=model, args=args, processing_class=tokenizer, callbacks=[recorder, Crash(ref, task_index=1, step=6)]
    )
    ref[0] = trainer
    with pytest.raises(KeyboardInterrupt):
        trainer.train_sequence(small_tasks)
    state = json.loads((tmp_path / "run" / "sequence_state.json").read_text())
    assert state["completed"] == 1 and len(state["matrix"]) == 1

    recorder2 = Recorder()
    _, result = _run(
        tmp_path / "run", tokenizer, small_tasks, make_args, "lora_per_task", [recorder2], resume=True, **overrides
    )
    assert result.matrix[0] == state["matrix"][0]  # results of finished tasks intact
    assert result.matrix == reference.matrix  # and the run continues exactly where it stopped
    # the plugin state was restored (events of task 0 and of the interrupted task) and continued
    assert [e[:3] for e in recorder2.events][:2] == [("begin", small_tasks[0].name, 0), ("end", small_tasks[0].name, 0)]
    assert recorder2.events[-1][:3] == ("end", small_tasks[-1].name, 2)


def test_resume_rejects_a_different_sequence(tmp_path, tokenizer, small_tasks, make_args):
    _run(tmp_path, tokenizer, small_tasks[:2], make_args)
    with pytest.raises(ValueError, match="differs from the tasks"):
        _run(tmp_path, tokenizer, small_tasks, make_args, resume=True)


def test_unseen_tasks_can_be_skipped(tmp_path, tokenizer, small_tasks, make_args):
    _, result = _run(tmp_path, tokenizer, small_tasks[:2], make_args, evaluate_unseen_tasks=False)
    assert math.isnan(result.matrix[0][1])  # task 2 not scored before it was trained
    # no baseline either (it scores tasks before training), so forward transfer is not measured at all
    assert result.baseline is None and result.fwt is None
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["matrix"][0][1] is None and saved["metrics"]["fwt"] is None
    assert result.bwt is not None and not math.isnan(result.bwt)


def test_results_reach_tensorboard(tmp_path, tokenizer, small_tasks, make_args):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _run(tmp_path, tokenizer, small_tasks[:2], make_args, report_to=["tensorboard"])
    tags = set()
    for events in tmp_path.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    assert {"train/cl/avg_acc", "train/cl/bwt", "train/cl/acc/first_color"} <= tags


def test_joint_upper_bound(tmp_path, tokenizer, small_tasks, make_args):
    from hf_adaptive.models import build_tiny_gemma

    model, _ = build_tiny_gemma(tokenizer, seed=0)
    trainer = ContinualTrainer(model=model, args=make_args(tmp_path), processing_class=tokenizer)
    accuracies = trainer.train_joint(small_tasks)
    assert len(accuracies) == len(small_tasks)
    assert trainer.state.global_step == math.ceil(sum(len(t.train_dataset) for t in small_tasks) / 8)


def test_results_reach_wandb_offline(tmp_path, tokenizer, small_tasks, make_args, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    try:
        _run(tmp_path / "out", tokenizer, small_tasks[:2], make_args, report_to=["wandb"])
        summary = dict(wandb.run.summary)
    finally:
        wandb.finish()
    assert "train/cl/avg_acc" in summary and "train/cl/bwt" in summary
    assert list((tmp_path / "wandb").glob("offline-run-*"))
