"""benchmarks/compression.py: the balanced accuracy against a hand count, `score` against the package's
`task_accuracy`, and one `--quick` run end to end (every arm stored with accuracy and balanced accuracy, the recovery
learning-rate controls trained at their own rate, the report's tables)."""

from __future__ import annotations

import json

import pytest
from benchmark_loader import load_benchmark


@pytest.fixture(scope="module")
def cb():
    yield from load_benchmark("compression")


def test_balanced_accuracy_is_the_mean_recall_over_labels(cb):
    labels = [0] * 68 + [1] * 32  # BoolQA's eval split: 68 % True
    assert cb.balanced_accuracy([0] * 100, labels, 2) == 0.5  # always True: 0.68 accuracy, chance balanced
    assert cb.balanced_accuracy([1] * 100, labels, 2) == 0.5  # always False: 0.32 accuracy, chance balanced
    # 58 of 68 True and 14 of 32 False right (the finished model's BoolQA counts): (58/68 + 14/32) / 2
    predictions = [0] * 58 + [1] * 10 + [0] * 18 + [1] * 14
    assert cb.balanced_accuracy(predictions, labels, 2) == pytest.approx((58 / 68 + 14 / 32) / 2)
    # a label absent from the rows is left out of the mean rather than counted as 0 or 1
    assert cb.balanced_accuracy([0, 1, 1], [1, 1, 1], 3) == pytest.approx(2 / 3)


def _skewed(task, share_of_first: float):
    """`task` with an eval split whose first label has `share_of_first` of the rows (so that accuracy, its
    complement and the balanced accuracy all differ)."""
    from hf_adaptive.tasks import Task

    data = task.eval_dataset
    first = [i for i, y in enumerate(data["label"]) if task.label_index(y) == 0]
    other = [i for i, y in enumerate(data["label"]) if task.label_index(y) != 0]
    n_other = max(1, round(len(first) * (1 - share_of_first) / share_of_first))
    return Task(
        name=task.name,
        train_dataset=task.train_dataset,
        eval_dataset=data.select(sorted(first + other[:n_other])),
        verbalizer=list(task.verbalizer),
        template=task.template,
        description=task.description,
        metadata=dict(task.metadata),
    )


def test_score_counts_like_task_accuracy_and_a_hand_count(cb):
    """`score` replaces the trainer's scoring in the recovery phase: its accuracy must be `task_accuracy`'s, its
    balanced accuracy the per-label count of `rank_classify`'s predictions."""
    from hf_adaptive.models import build_tiny_gemma
    from hf_adaptive.tasks import task_accuracy
    from hf_adaptive.tasks.formatting import rank_classify

    s = cb.QUICK_SETTINGS
    tasks = [_skewed(t, 0.75) for t in cb.load_tasks(s, cb.DEFAULT_DATA)]
    model, tokenizer = build_tiny_gemma(seed=3)
    accuracy, balanced = cb.score(model, tokenizer, tasks, s)
    e = s["eval"]
    options = {
        "max_length": e["prompt_max_length"],
        "prompt_format": e["prompt_format"],
        "label_scoring": e["label_scoring"],
        "token_budget": e["continual_eval_token_budget"],
    }
    batch = e["continual_eval_batch_size"]
    assert accuracy == [task_accuracy(model, tokenizer, t, "eval", batch, **options) for t in tasks]
    for task, acc, bal in zip(tasks, accuracy, balanced):
        predictions, _ = rank_classify(model, tokenizer, task, task.eval_dataset, batch, **options)
        labels = [task.label_index(y) for y in task.eval_dataset["label"]]
        recalls = []
        for k in (0, 1):
            rows = [p for p, y in zip(predictions, labels) if y == k]
            recalls.append(sum(p == k for p in rows) / len(rows))
        assert bal == pytest.approx(sum(recalls) / 2)
        assert acc in (0.75, 0.25) or acc != bal  # a skewed split: accuracy is not the balanced accuracy


@pytest.fixture(scope="module")
def quick_run(cb, tmp_path_factory):
    pytest.importorskip("torchao")
    out = tmp_path_factory.mktemp("compression_quick")
    return cb.main(["--quick", "--out", str(out)]), out


def test_quick_stores_every_arm_with_balanced_accuracy_and_the_rate_controls(cb, quick_run):
    status, out = quick_run
    assert status == 0
    names = cb.QUICK_SETTINGS["tasks"]
    for arm_name, arm in cb.ARMS.items():
        record = json.loads((out / "runs" / f"{arm_name}.json").read_text())
        assert set(record["accuracy"]) == set(record["balanced_accuracy"]) == set(names), arm_name
        if arm.recovery and (arm.qat or arm.sparsity or arm.heads or arm.scheme is None):
            rate = arm.recovery_lr if arm.recovery_lr is not None else cb.QUICK_SETTINGS["recovery"]["learning_rate"]
            assert record["recovery"]["learning_rate"] == rate, arm_name
    report = (out / "compression.md").read_text()
    assert "| arm | what | " + " | ".join(names) + " | avg acc | avg bal |" in report
    assert "The recovery phase alone, by learning rate" in report
    for rate in ("1e-05 (recovered)", "2e-05 (recovered_lr2e-5)", "5e-05 (recovered_lr5e-5)"):
        assert f"| {rate} |" in report
    assert "Still to run (`--all` order): none." in report
