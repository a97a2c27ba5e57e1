"""Resuming a killed `train_sequence`: in its first task, past damaged checkpoints / snapshots / sequence state, with
snapshots off, and the per-task training loss across a resume."""

from __future__ import annotations

import json
import logging

import pytest
from transformers import TrainerCallback

from hf_adaptive.trainer import ContinualTrainer

SAVE = dict(save_strategy="steps", save_steps=4)


class Crash(TrainerCallback):
    """Simulates a killed run: raises once task `task_index` reaches `step`."""

    def __init__(self, ref, task_index, step):
        self.ref, self.task_index, self.step = ref, task_index, step

    def on_step_end(self, args, state, control, **kwargs):
        if self.ref[0].current_task_index == self.task_index and state.global_step == self.step:
            raise KeyboardInterrupt("simulated kill")


def _trainer(path, tokenizer, make_args, callbacks=(), **overrides):
    from hf_adaptive.models import build_tiny_gemma

    model, _ = build_tiny_gemma(tokenizer, seed=0)
    values = dict(adapter_strategy="full", learning_rate=3e-3, num_train_epochs=2, **SAVE)
    values.update(overrides)
    return ContinualTrainer(
        model=model, args=make_args(path, **values), processing_class=tokenizer, callbacks=list(callbacks)
    )


def _killed(path, tokenizer, tasks, make_args, task_index, step, **overrides):
    ref = [None]
    trainer = _trainer(path, tokenizer, make_args, [Crash(ref, task_index, step)], **overrides)
    ref[0] = trainer
    with pytest.raises(KeyboardInterrupt):
        trainer.train_sequence(tasks)


def _resumed(path, tokenizer, tasks, make_args, resume=None, **overrides):
    return _trainer(path, tokenizer, make_args, **overrides).train_sequence(
        tasks, resume_from_checkpoint=resume or str(path)
    )


_REFERENCE: dict[str, object] = {}


@pytest.fixture
def reference(tmp_path_factory, tokenizer, small_tasks, make_args):
    """The uninterrupted run every resumed run must reproduce (2 tasks, 16 steps each, a checkpoint every 4).

    Computed once per session (`make_args` is function-scoped, so this cannot be a module-scoped fixture).
    """
    if "result" not in _REFERENCE:
        path = tmp_path_factory.mktemp("reference")
        _REFERENCE["result"] = _trainer(path, tokenizer, make_args).train_sequence(small_tasks[:2])
    return _REFERENCE["result"]


def test_kill_in_the_first_task_resumes_from_its_checkpoints(tmp_path, tokenizer, small_tasks, make_args, reference):
    tasks = small_tasks[:2]
    _killed(tmp_path, tokenizer, tasks, make_args, task_index=0, step=10)
    assert (tmp_path / "task-00-first_color" / "checkpoint-8").is_dir()
    # as `hf-adaptive run ... --resume_from_checkpoint DIR` and `hf-adaptive demo --resume` pass it: a folder
    result = _resumed(tmp_path, tokenizer, tasks, make_args)
    assert result.matrix == reference.matrix and result.baseline == reference.baseline
    # the training loss of the resumed task covers its 16 steps, not only the 8 after the checkpoint
    assert result.extra["train_loss"] == pytest.approx(reference.extra["train_loss"], rel=1e-6)
    assert result.extra["steps"] == reference.extra["steps"] == [16, 16]


def test_kill_in_the_first_task_of_an_older_run_without_state(tmp_path, tokenizer, small_tasks, make_args, reference):
    """Runs killed before the initial sequence state existed have only the first task's checkpoints."""
    tasks = small_tasks[:2]
    _killed(tmp_path, tokenizer, tasks, make_args, task_index=0, step=10)
    (tmp_path / "sequence_state.json").unlink()
    result = _resumed(tmp_path, tokenizer, tasks, make_args)
    assert result.matrix == reference.matrix


def test_nothing_to_resume_is_a_clear_error(tmp_path, tokenizer, small_tasks, make_args):
    with pytest.raises(ValueError, match=r"resume_from_checkpoint=.* nothing to resume"):
        _resumed(tmp_path, tokenizer, small_tasks[:2], make_args)
    assert not list(tmp_path.glob("task-*"))


def test_truncated_newest_checkpoint_falls_back_with_a_warning(
    tmp_path, tokenizer, small_tasks, make_args, reference, caplog
):
    tasks = small_tasks[:2]
    _killed(tmp_path, tokenizer, tasks, make_args, task_index=1, step=10)
    bad = tmp_path / "task-01-last_color" / "checkpoint-8" / "model.safetensors"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    with caplog.at_level(logging.WARNING, logger="hf_adaptive.trainer"):
        result = _resumed(tmp_path, tokenizer, tasks, make_args)
    assert str(bad) in caplog.text and "checkpoint-4" not in caplog.text
    assert result.matrix == reference.matrix


@pytest.mark.parametrize("damage", ["truncate", "empty", "garble_json"])
def test_damaged_snapshot_redoes_finished_tasks_from_their_checkpoints(
    tmp_path, tokenizer, small_tasks, make_args, reference, damage, caplog
):
    tasks = small_tasks[:2]
    _killed(tmp_path, tokenizer, tasks, make_args, task_index=1, step=6)
    assert [p.name for p in tmp_path.glob("snapshot-*")] == ["snapshot-after-task-00"]  # one on disk
    snapshot = tmp_path / "snapshot-after-task-00"
    if damage == "garble_json":
        bad = snapshot / "config.json"
        bad.write_text('{"model_type": "gem', encoding="utf-8")
    else:
        bad = snapshot / "model.safetensors"
        bad.write_bytes(bad.read_bytes()[: 100 if damage == "truncate" else 0])
    with caplog.at_level(logging.WARNING, logger="hf_adaptive.trainer"):
        result = _resumed(tmp_path, tokenizer, tasks, make_args)
    assert str(bad) in caplog.text and "restarts from its first task" in caplog.text
    assert result.matrix == reference.matrix and result.baseline == reference.baseline


def test_truncated_sequence_state(tmp_path, tokenizer, small_tasks, make_args, reference, caplog):
    tasks = small_tasks[:2]
    _killed(tmp_path, tokenizer, tasks, make_args, task_index=1, step=6)
    state = tmp_path / "sequence_state.json"
    text = state.read_text(encoding="utf-8")
    state.write_text(text[: len(text) // 2], encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="hf_adaptive.trainer"):
        result = _resumed(tmp_path, tokenizer, tasks, make_args)  # the copy inside the snapshot is used
    assert str(state) in caplog.text and result.matrix == reference.matrix

    # without any snapshot to hold a copy: an error naming the file, before any training
    other = tmp_path / "nosnap"
    _killed(other, tokenizer, tasks, make_args, task_index=1, step=6, save_strategy="no")
    state = other / "sequence_state.json"
    state.write_text(state.read_text(encoding="utf-8")[:40], encoding="utf-8")
    with pytest.raises(ValueError, match=r"sequence_state\.json is damaged"):
        _resumed(other, tokenizer, tasks, make_args, save_strategy="no")


def test_save_strategy_no_writes_no_snapshot(tmp_path, tokenizer, small_tasks, make_args, reference, caplog):
    tasks = small_tasks[:2]
    _killed(tmp_path, tokenizer, tasks, make_args, task_index=1, step=6, save_strategy="no")
    assert not list(tmp_path.glob("snapshot-*")) and not list(tmp_path.rglob("checkpoint-*"))
    state = json.loads((tmp_path / "sequence_state.json").read_text())
    assert state["completed"] == 1 and state["snapshot"] is None
    with caplog.at_level(logging.WARNING, logger="hf_adaptive.trainer"):
        result = _resumed(tmp_path, tokenizer, tasks, make_args, save_strategy="no")
    assert "no end-of-task snapshot" in caplog.text and "restarts from its first task" in caplog.text
    assert result.matrix == reference.matrix  # redone from the start, deterministically
    assert result.extra["snapshot_bytes"] == [0, 0]


def test_snapshot_size_is_logged_and_recorded(tmp_path, tokenizer, small_tasks, make_args, caplog):
    with caplog.at_level(logging.INFO, logger="hf_adaptive.trainer"):
        result = _trainer(tmp_path, tokenizer, make_args, num_train_epochs=1).train_sequence(small_tasks[:2])
    on_disk = sum(f.stat().st_size for f in (tmp_path / "snapshot-after-task-01").rglob("*") if f.is_file())
    recorded = result.extra["snapshot_bytes"]
    assert len(recorded) == 2 and recorded[1] > 100_000
    assert on_disk - recorded[1] == (tmp_path / "snapshot-after-task-01" / "sequence_state.json").stat().st_size
    assert f"{recorded[1]} bytes" in caplog.text
