"""The trainer tokenizes each task once (issue #12): plugins receive the rows through the `TaskContext`."""

from __future__ import annotations

import hf_adaptive.tasks.formatting as formatting
from hf_adaptive import ContinualTrainer, build_plugins
from hf_adaptive.plugins import ContinualPlugin, TaskContext


def test_plugins_use_the_context_instead_of_tokenizing_again(
    tmp_path, tiny_model, tokenizer, small_tasks, make_args, monkeypatch
):
    calls = {"tokenize_task": [], "encode_example": 0}
    tokenize, encode = formatting.tokenize_task, formatting.encode_example

    def counting_tokenize(task, tok, split="train", *args, **kwargs):
        calls["tokenize_task"].append((task.name, split))
        return tokenize(task, tok, split, *args, **kwargs)

    def counting_encode(*args, **kwargs):
        calls["encode_example"] += 1
        return encode(*args, **kwargs)

    for module in ("hf_adaptive.tasks.formatting", "hf_adaptive.tasks", "hf_adaptive.trainer", "hf_adaptive.plugins"):
        monkeypatch.setattr(f"{module}.tokenize_task", counting_tokenize, raising=False)
        monkeypatch.setattr(f"{module}.encode_example", counting_encode, raising=False)

    args = make_args(tmp_path, replay_alpha=0.5, ewc_lambda=1.0, fisher_samples=8, early_stopping_metric="loss")
    seen: list[TaskContext] = []

    class Spy(ContinualPlugin):
        name = "spy"

        def on_task_end(self, trainer, context):
            seen.append(context)

    plugins = [*build_plugins(["ewc", "replay", "early_stopping"], args), Spy()]
    trainer = ContinualTrainer(model=tiny_model, args=args, processing_class=tokenizer, callbacks=plugins)
    tasks = small_tasks[:2]
    trainer.train_sequence(tasks)

    assert sorted(calls["tokenize_task"]) == sorted((t.name, s) for t in tasks for s in ("train", "eval"))
    assert calls["encode_example"] == 0
    assert [c.task.name for c in seen] == [t.name for t in tasks] and [c.index for c in seen] == [0, 1]
    assert all(len(c.train_dataset) == len(c.task.train_dataset) for c in seen)
