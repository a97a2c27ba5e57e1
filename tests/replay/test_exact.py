"""ReplayPlugin: memory filled at task end, the replay term equals the model's loss on the replayed rows."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from hf_adaptive.replay import ReplayPlugin
from hf_adaptive.tasks import tokenize_task
from hf_adaptive.utils.io import load_state, save_state
from hf_adaptive.utils.validation import OptionError


def direct_loss(model, rows) -> torch.Tensor:
    """Mean NLL over all answer tokens of `rows`, each row run alone and unpadded (the slow reference)."""
    total, count = torch.zeros(()), 0
    for r in rows:
        ids = torch.tensor([r["input_ids"]])
        labels = torch.tensor(r["labels"])
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
        targets = labels[1:]
        mask = targets != -100
        total = total - logp[mask].gather(-1, targets[mask].unsqueeze(-1)).sum()
        count += int(mask.sum())
    return total / count


def test_on_task_end_stores_the_task_rows(stand_in, two_tasks, contexts, tokenizer):
    plugin = ReplayPlugin(alpha=0.5, buffer_size=30, policy="balanced", batch_size=4)
    plugin.on_task_end(stand_in, contexts[0])
    assert plugin.memory.counts() == {"first_color": 24}
    plugin.on_task_end(stand_in, contexts[1])
    assert plugin.memory.counts() == {"first_color": 15, "last_color": 15}
    real = {tuple(r["input_ids"]) for t in two_tasks for r in tokenize_task(t, tokenizer)}
    assert all(tuple(item["input_ids"].tolist()) in real for _, item in plugin.memory.items())


def test_replay_loss_equals_the_models_loss_on_those_rows(stand_in, contexts, tiny_model):
    plugin = ReplayPlugin(alpha=0.3, buffer_size=40, policy="reservoir", batch_size=6, seed=1)
    for context in contexts:
        plugin.on_task_end(stand_in, context)
    tiny_model.train()
    terms = plugin.loss_terms(stand_in, tiny_model, {}, None)
    assert [(t.name, t.weight) for t in terms] == [("replay", 0.3)]
    rows = plugin.last_rows
    assert len(rows) == 6
    assert len({len(r["input_ids"]) for r in rows}) >= 1
    torch.testing.assert_close(terms[0].value.detach(), direct_loss(tiny_model, rows), atol=1e-5, rtol=1e-5)
    terms[0].value.backward()
    grads = [p.grad for p in tiny_model.parameters() if p.grad is not None]
    assert grads and any(float(g.abs().sum()) > 0 for g in grads)


def test_padding_uses_the_tokenizer_pad_id(stand_in, tiny_model, tokenizer):
    """Rows of different lengths: the padded batch's loss still equals the per-row reference."""
    plugin = ReplayPlugin(alpha=1.0, buffer_size=10, batch_size=3)
    ids = tokenizer("<bos> first_color : red cat ? yes", add_special_tokens=False)["input_ids"]
    rows = [
        {"input_ids": ids[:n] + ids[-1:], "labels": [-100] * (n - 1) + ids[n - 1 : n] + ids[-1:]} for n in (3, 5, 7)
    ]
    plugin.memory.add("manual", rows)
    tiny_model.train()
    (term,) = plugin.loss_terms(stand_in, tiny_model, {}, None)
    torch.testing.assert_close(term.value.detach(), direct_loss(tiny_model, plugin.last_rows), atol=1e-5, rtol=1e-5)


def test_no_term_when_disabled_empty_or_evaluating(stand_in, contexts, tiny_model):
    assert ReplayPlugin(alpha=0.5).loss_terms(stand_in, tiny_model.train(), {}, None) == []  # empty memory
    off = ReplayPlugin(alpha=0.0)
    off.on_task_end(stand_in, contexts[0])
    assert len(off.memory) > 0 and off.loss_terms(stand_in, tiny_model, {}, None) == []
    on = ReplayPlugin(alpha=0.5)
    on.on_task_end(stand_in, contexts[0])
    assert on.loss_terms(stand_in, tiny_model.eval(), {}, None) == []
    assert len(on.loss_terms(stand_in, tiny_model.train(), {}, None)) == 1


def test_from_config():
    """The `replay_*` options and the run's `seed` (a `ContinualConfig`-like object carries them)."""
    args = SimpleNamespace(
        replay_alpha=0.3,
        replay_buffer_size=50,
        replay_policy="reservoir",
        replay_batch_size=4,
        replay_examples_per_task=7,
        seed=5,
    )
    plugin = ReplayPlugin.from_config(args)
    assert (plugin.alpha, plugin.batch_size, plugin.memory.capacity, plugin.memory.policy, plugin.memory.seed) == (
        0.3,
        4,
        50,
        "reservoir",
        5,
    )
    assert plugin.examples_per_task == 7
    assert ReplayPlugin.from_config(args, alpha=0.7).alpha == 0.7  # keyword overrides of single fields
    with pytest.raises(OptionError, match=r"^SimpleNamespace.replay_alpha=1.5 is not allowed"):
        ReplayPlugin.from_config(SimpleNamespace(replay_alpha=1.5))


def test_enabled_by_name_it_replays():
    """With no options the plugin adds a replay term (issue #12: `replay_alpha` was 0.0, a silent no-op)."""
    plugin = ReplayPlugin.from_config(SimpleNamespace())
    assert plugin.alpha == 0.2 and plugin.config == ReplayPlugin().config


def test_state_round_trip(stand_in, contexts, tiny_model, tmp_path):
    plugin = ReplayPlugin(alpha=0.2, buffer_size=20, batch_size=4, seed=3)
    plugin.on_task_end(stand_in, contexts[0])
    save_state(tmp_path / "replay", plugin.state_dict())
    restored = ReplayPlugin(alpha=0.2, buffer_size=20, batch_size=4, seed=99)
    restored.load_state_dict(load_state(tmp_path / "replay"))
    for p in (plugin, restored):
        p.on_task_end(stand_in, contexts[1])
    tiny_model.train()
    a = plugin.loss_terms(stand_in, tiny_model, {}, None)[0].value
    b = restored.loss_terms(stand_in, tiny_model, {}, None)[0].value
    assert plugin.last_rows == restored.last_rows
    torch.testing.assert_close(a, b)


def test_bad_arguments_name_the_field():
    with pytest.raises(OptionError, match=r"ReplayConfig.alpha=1.5 is not allowed"):
        ReplayPlugin(alpha=1.5)
    with pytest.raises(OptionError, match=r"ReplayConfig.batch_size=0 is not allowed"):
        ReplayPlugin(batch_size=0)
    with pytest.raises(OptionError, match=r"ReplayConfig.policy='lifo' is not allowed"):
        ReplayPlugin(policy="lifo")
    with pytest.raises(OptionError, match=r"ReplayConfig.buffer_size=0 is not allowed"):
        ReplayPlugin(buffer_size=0)
    with pytest.raises(TypeError, match=r"ReplayPlugin got unknown option\(s\) \['lambda_'\]"):
        ReplayPlugin(lambda_=1.0)
