"""Generative replay's sampling (minutes on a real model) shows a progress bar over the pseudo-rows it collects."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from hf_adaptive.replay.generative import GenerativeReplayPlugin, TaskSpec
from hf_adaptive.tasks import encode_example


def _writes_valid_rows(model, tokenizer, task):
    """`model.generate` replaced by one that always completes the prompt with the same well-formed example."""
    spec = TaskSpec(task.name, task.template, list(task.verbalizer))
    row = encode_example(spec.as_task(), {"text": "red cat dog owl cow pig bee", "label": 0}, tokenizer)["input_ids"]
    prompt = [tokenizer.bos_token_id] + tokenizer(spec.prefix, add_special_tokens=False)["input_ids"]
    completion = torch.tensor(row[len(prompt) :])

    def generate(input_ids, **kwargs):
        return torch.cat([input_ids, completion.expand(len(input_ids), -1)], dim=1)

    model.generate = generate
    return model


def _run(trainer, two_tasks, context_of, contexts):
    plugin = GenerativeReplayPlugin(ratio=0.5, max_rounds=1)
    plugin.on_task_end(trainer, context_of(two_tasks[0], 0))
    plugin.on_task_begin(trainer, contexts[1])
    return plugin


def test_sampling_shows_a_bar_unless_quiet(tiny_model, tokenizer, two_tasks, contexts, context_of, capsys):
    model = _writes_valid_rows(tiny_model, tokenizer, two_tasks[0])
    trainer = SimpleNamespace(model=model, processing_class=tokenizer, args=SimpleNamespace(disable_tqdm=False))
    plugin = _run(trainer, two_tasks, context_of, contexts)
    wanted = round(0.5 * len(two_tasks[1].train_dataset))
    assert plugin.stats["first_color"]["accepted"] == wanted
    err = capsys.readouterr().err
    assert "generative replay: sampling before last_color" in err and f"0/{wanted} " in err

    trainer.args.disable_tqdm = True
    _run(trainer, two_tasks, context_of, contexts)
    trainer.args.disable_tqdm = False
    trainer.is_world_process_zero = lambda: False  # a secondary process of a distributed run
    _run(trainer, two_tasks, context_of, contexts)
    assert "generative replay" not in capsys.readouterr().err
