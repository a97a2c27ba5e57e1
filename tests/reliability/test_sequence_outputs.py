"""What a sequence writes and prints: strict JSON results, forgetting without unseen evaluations, tasks without an
eval split, and quiet runs."""

from __future__ import annotations

import json
import math

import pytest

from hf_adaptive.metrics import ContinualResult, forgetting
from hf_adaptive.trainer import ContinualTrainer

NAN = float("nan")


def _strict_json(text: str):
    def refuse(name):
        raise ValueError(f"not JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def _run(tmp_path, tokenizer, tasks, make_args, **overrides):
    from hf_adaptive.models import build_tiny_gemma

    model, _ = build_tiny_gemma(tokenizer, seed=0)
    trainer = ContinualTrainer(model=model, args=make_args(tmp_path, **overrides), processing_class=tokenizer)
    return trainer, trainer.train_sequence(tasks)


def slow_forgetting_seen(r):
    """Chaudhry et al.: for each old task j, its best accuracy once learned (rows l >= j) minus the final one."""
    t = len(r)
    total = 0.0
    for j in range(t - 1):
        best = None
        for row in range(j, t - 1):
            best = r[row][j] if best is None else max(best, r[row][j])
        total += best - r[t - 1][j]
    return total / (t - 1)


def test_forgetting_ignores_unseen_entries():
    r = [[0.9, NAN, NAN], [0.5, 0.8, NAN], [0.4, 0.6, 0.7]]
    assert forgetting(r) == pytest.approx(((0.9 - 0.4) + (0.8 - 0.6)) / 2)
    # an untrained task scoring high before it is learned is not "forgotten" later
    r = [[0.9, 0.95, 0.1], [0.5, 0.8, 0.3], [0.4, 0.6, 0.7]]
    assert forgetting(r) == pytest.approx(((0.9 - 0.4) + (0.8 - 0.6)) / 2) == pytest.approx(slow_forgetting_seen(r))


def test_results_json_is_strict_and_round_trips(tmp_path):
    result = ContinualResult(
        task_names=["a", "b", "c"],
        matrix=[[0.9, NAN, NAN], [0.5, 0.8, NAN], [0.4, 0.6, 0.7]],
        baseline=None,
        train_time=[1.0, 2.0, 3.0],
        extra={"train_loss": [0.5, NAN, 0.2]},
    )
    path = result.save(tmp_path, plot=False)["json"]
    data = _strict_json(path.read_text(encoding="utf-8"))
    assert data["matrix"][0] == [0.9, None, None] and data["extra"]["train_loss"][1] is None
    assert data["metrics"]["forgetting"] == pytest.approx(0.35) and data["metrics"]["fwt"] is None
    loaded = ContinualResult.load(tmp_path)
    assert math.isnan(loaded.matrix[0][1]) and loaded.matrix[2] == [0.4, 0.6, 0.7]
    assert loaded.forgetting == pytest.approx(0.35) and loaded.bwt == pytest.approx(result.bwt)


def test_unseen_tasks_off_writes_strict_json_without_baseline(tmp_path, tokenizer, small_tasks, make_args):
    trainer, result = _run(tmp_path, tokenizer, small_tasks, make_args, evaluate_unseen_tasks=False)
    assert result.baseline is None  # no evaluation of tasks before training them
    assert math.isnan(result.matrix[0][1]) and math.isnan(result.matrix[1][2])
    assert result.forgetting == pytest.approx(slow_forgetting_seen(result.matrix))
    assert math.isfinite(result.forgetting)
    data = _strict_json((tmp_path / "results.json").read_text(encoding="utf-8"))
    assert data["baseline"] is None and data["matrix"][0][1] is None
    assert data["metrics"]["forgetting"] == pytest.approx(result.forgetting)
    loaded = ContinualResult.load(tmp_path)
    assert [[v for v in row if v == v] for row in loaded.matrix] == [
        [v for v in row if v == v] for row in result.matrix
    ]
    assert math.isnan(loaded.matrix[0][2])


def test_task_without_eval_split_fails_before_training(tmp_path, tokenizer, small_tasks, make_args):
    import dataclasses

    from hf_adaptive.models import build_tiny_gemma

    broken = dataclasses.replace(small_tasks[1], name="no_eval", eval_dataset=None)  # `Task` allows it
    model, _ = build_tiny_gemma(tokenizer, seed=0)
    trainer = ContinualTrainer(model=model, args=make_args(tmp_path), processing_class=tokenizer)
    with pytest.raises(ValueError, match=r"Task\.eval_dataset=None is not allowed for task 'no_eval'"):
        trainer.train_sequence([small_tasks[0], broken])
    assert trainer.state.global_step == 0 and not list(tmp_path.glob("task-*"))


def test_quiet_sequence_prints_no_progress_bars(tmp_path, tokenizer, small_tasks, make_args, capfd):
    """`disable_tqdm=True`: no 'Map' bars, no 'Writing model shards' (checkpoints and snapshots), no eval bar."""
    _run(tmp_path, tokenizer, small_tasks[:2], make_args, save_strategy="steps", save_steps=4, disable_tqdm=True)
    out, err = capfd.readouterr()
    printed = out + err
    assert (tmp_path / "snapshot-after-task-01").is_dir()  # there was something to write
    for marker in ("Map", "Writing", "%|", "evaluating"):
        assert marker not in printed, (marker, printed[-2000:])
    assert "=== task 2/2: last_color ===" in out


def test_evaluation_has_one_progress_bar_when_not_quiet(tmp_path, tokenizer, small_tasks, make_args, capfd):
    from hf_adaptive.models import build_tiny_gemma

    model, _ = build_tiny_gemma(tokenizer, seed=0)
    trainer = ContinualTrainer(model=model, args=make_args(tmp_path, disable_tqdm=False), processing_class=tokenizer)
    trainer.evaluate_tasks(small_tasks[:2])
    _, err = capfd.readouterr()
    assert "evaluating" in err and "0/2" in err  # one bar over the tasks
