"""Replay inputs (issue #17): which rows a task leaves in memory, and the replay loss on the task loss's scale.

* The rows kept of a task are a seeded sample stratified by class label, not the task's first rows.
* The replay losses (exact and generative) are label-smoothed exactly like the Trainer's task loss.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from hf_adaptive.plugins import TaskContext
from hf_adaptive.replay import GenerativeReplayPlugin, ReplayPlugin
from hf_adaptive.replay._common import collate, task_rows
from hf_adaptive.replay.buffer import ReplayMemory
from hf_adaptive.tasks import Task, builtin_suite, encode_example


def sorted_task(n0: int, n1: int, name: str = "sorted_first_color") -> Task:
    """A built-in task whose first `n0` training rows are all label 0, then `n1` rows of label 1."""
    (base,) = builtin_suite(["first_color"], n_train=4 * (n0 + n1), n_eval=4, seed=0)
    data = base.train_dataset
    zeros = [i for i, y in enumerate(data["label"]) if y == 0][:n0]
    ones = [i for i, y in enumerate(data["label"]) if y == 1][:n1]
    assert len(zeros) == n0 and len(ones) == n1
    return Task(
        name=name,
        train_dataset=data.select(zeros + ones),
        eval_dataset=base.eval_dataset,
        verbalizer=base.verbalizer,
        template=base.template,
    )


def stored_labels(memory: ReplayMemory, task: Task, tokenizer) -> list[int]:
    """Class label of every stored row of `task`, read back from its answer tokens (independent of the memory)."""
    answers = {
        tuple(encode_example(task, {"text": "x", "label": k}, tokenizer)["labels"][-2:]): k
        for k in range(len(task.verbalizer))
    }
    out = []
    for name, item in memory.items():
        if name == task.name:
            labels = [t for t in item["labels"].tolist() if t != -100]
            out.append(answers[tuple(labels[-2:])])
    return out


@pytest.fixture
def stand_in(tiny_model, tokenizer):
    """What the plugins use of a trainer: `.model` and `.processing_class`."""
    return SimpleNamespace(model=tiny_model, processing_class=tokenizer)


def context(task: Task, index: int, tokenizer) -> TaskContext:
    """What the trainer hands a plugin at a task boundary: the task, its index and its tokenized rows."""
    return TaskContext.build(task, index, tokenizer)


def stored_rows(plugin: ReplayPlugin) -> list[tuple[int, ...]]:
    return sorted(tuple(item["input_ids"].tolist()) for _, item in plugin.memory.items())


# ---------------------------------------------------------------------------------------------- sampling
def test_apportion_against_exact_shares():
    """Largest remainder: every share is the floor or ceiling of n·c/total and the shares sum to n."""
    from hf_adaptive.replay._common import apportion

    for counts in ({0: 30, 1: 10}, {0: 1, 1: 1, 2: 1}, {0: 7, 1: 0, 2: 5}, {3: 2, 1: 9, 2: 9}):
        total = sum(counts.values())
        for n in range(total + 1):
            got = apportion(counts, n)
            assert sum(got.values()) == n
            for k, c in counts.items():
                exact = n * c / total
                assert int(exact) <= got[k] <= -(-n * c // total), (counts, n, got)
    assert apportion({0: 3, 1: 1}, 2) == {0: 2, 1: 0}  # 1.5 / 0.5: the tie goes to the larger stratum


def test_first_rows_of_one_label_still_give_both_labels(stand_in, tokenizer):
    """The task's first 8 rows are all label 0; a task of 30 + 10 rows keeps 6 + 2 of 8 (its 3:1 shares)."""
    task = sorted_task(30, 10)
    for policy in ("balanced", "reservoir"):
        plugin = ReplayPlugin(buffer_size=100, policy=policy, examples_per_task=8, seed=0)
        plugin.on_task_end(stand_in, context(task, 0, tokenizer))
        labels = stored_labels(plugin.memory, task, tokenizer)
        assert sorted(labels) == [0] * 6 + [1] * 2, policy


def test_balanced_share_is_a_stratified_sample_and_stays_one_when_it_shrinks(stand_in, tokenizer):
    """Share 16 of a 24 + 8 task holds 12 + 4; after a second task it shrinks to 8 and holds 6 + 2, any seed."""
    first, second = sorted_task(24, 8), sorted_task(8, 8, name="other")
    for seed in range(12):
        plugin = ReplayPlugin(buffer_size=16, policy="balanced", seed=seed)
        plugin.on_task_end(stand_in, context(first, 0, tokenizer))
        assert sorted(stored_labels(plugin.memory, first, tokenizer)) == [0] * 12 + [1] * 4, seed
        plugin.on_task_end(stand_in, context(second, 1, tokenizer))
        assert sorted(stored_labels(plugin.memory, first, tokenizer)) == [0] * 6 + [1] * 2, seed
        assert sorted(stored_labels(plugin.memory, second, tokenizer)) == [0] * 4 + [1] * 4, seed


def test_same_seed_same_rows_other_seed_or_task_index_other_rows(stand_in, tokenizer):
    task = sorted_task(30, 10)

    def kept(seed: int, index: int = 0) -> list[tuple[int, ...]]:
        plugin = ReplayPlugin(buffer_size=100, examples_per_task=8, seed=seed)
        plugin.on_task_end(stand_in, context(task, index, tokenizer))
        return stored_rows(plugin)

    assert kept(0) == kept(0)
    assert kept(0) != kept(1)
    assert kept(0, index=0) != kept(0, index=3)
    # the selection does not depend on the memory's generator having been used before (resumable)
    used = ReplayPlugin(buffer_size=100, examples_per_task=8, seed=0)
    used.memory.sample(5)
    used.memory.add("warm_up", [{"input_ids": [1, 2], "labels": [-100, 2]}])
    used.on_task_end(stand_in, context(task, 0, tokenizer))
    assert sorted(tuple(i["input_ids"].tolist()) for t, i in used.memory.items() if t == task.name) == kept(0)


def test_task_rows_match_the_slow_reference(tokenizer):
    """task_rows(limit) = the encoded rows at stratified_indices, with their class label."""
    task = sorted_task(9, 5)
    rows = task_rows(task, tokenizer, limit=7, seed=4, task_index=2)
    from hf_adaptive.replay._common import selection_generator, stratified_indices

    idx = stratified_indices(task.train_dataset["label"], 7, selection_generator(4, 2))
    assert len(idx) == len(set(idx)) == 7 and idx == sorted(idx)
    for row, i in zip(rows, idx, strict=True):
        example = task.train_dataset[i]
        ref = encode_example(task, example, tokenizer)
        assert row["input_ids"] == ref["input_ids"] and row["labels"] == ref["labels"]
        assert row["label"] == example["label"]
    assert sorted(r["label"] for r in rows) == [0] * 5 + [1] * 2  # shares 4.5 / 2.5: the tie goes to the larger
    assert len(task_rows(task, tokenizer)) == 14  # no limit: every row, in dataset order


def test_memory_state_keeps_class_labels_and_loads_old_states(tokenizer):
    mem = ReplayMemory(6, policy="balanced", seed=0)
    mem.add("a", [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3], "label": k % 2} for k in range(9)])
    restored = ReplayMemory(6, policy="balanced", seed=0)
    restored.load_state_dict(mem.state_dict())
    assert restored.label_counts() == mem.label_counts() and restored.seen_labels == mem.seen_labels
    old = {k: v for k, v in mem.state_dict().items() if k not in ("class_label", "seen_labels")}
    legacy = ReplayMemory(6, policy="balanced", seed=0)
    legacy.load_state_dict(old)
    assert legacy.label_counts() == {"a": {-1: 6}}
    bad = dict(mem.state_dict(), lengths=torch.tensor([3, 3]))
    with pytest.raises(ValueError, match="task indices for 2 items"):
        ReplayMemory(6, policy="balanced", seed=0).load_state_dict(bad)
    with pytest.raises(ValueError, match=r"label=1\.5"):
        mem.add("a", [{"input_ids": [1, 2], "labels": [-100, 2], "label": 1.5}])


# ---------------------------------------------------------------------------------------------- loss scale
def sharpen(model) -> None:
    """Scale the final norm (Gemma: x · (1 + w)) by 10: an untrained model's near-uniform output makes the
    smoothed and plain losses nearly equal, a peaked one makes them clearly different."""
    with torch.no_grad():
        model.model.norm.weight.mul_(10).add_(9)


def smoothed_reference(model, rows, epsilon: float) -> torch.Tensor:
    """Per answer token (1-ε)·NLL + ε·mean(-log p) over the vocabulary, averaged over all answer tokens of
    `rows`, each row run alone and unpadded (the slow reference of `LabelSmoother`)."""
    total, count = torch.zeros((), dtype=torch.float64), 0
    for r in rows:
        logp = torch.log_softmax(model(input_ids=torch.tensor([r["input_ids"]])).logits[0, :-1].double(), dim=-1)
        targets = torch.tensor(r["labels"])[1:]
        for pos in (targets != -100).nonzero().flatten().tolist():
            nll = -logp[pos, targets[pos]]
            total = total + (1 - epsilon) * nll + epsilon * (-logp[pos].mean())
            count += 1
    return (total / count).float()


@pytest.mark.parametrize("epsilon", [0.0, 0.1, 0.3])
def test_replay_loss_is_label_smoothed_like_the_task_loss(tiny_model, tokenizer, epsilon):
    from transformers.trainer_pt_utils import LabelSmoother

    trainer = SimpleNamespace(
        model=tiny_model, processing_class=tokenizer, args=SimpleNamespace(label_smoothing_factor=epsilon)
    )
    sharpen(tiny_model)
    (task,) = builtin_suite(["first_color"], n_train=12, n_eval=4, seed=0)
    plugin = ReplayPlugin(alpha=0.5, buffer_size=12, batch_size=5, seed=0)
    plugin.on_task_end(trainer, context(task, 0, tokenizer))
    tiny_model.train()
    (term,) = plugin.loss_terms(trainer, tiny_model, {}, None)
    rows = plugin.last_rows
    batch = collate(rows, tokenizer, torch.device("cpu"))
    with torch.no_grad():
        out = tiny_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        hand = LabelSmoother(epsilon=epsilon)(out, batch["labels"], shift_labels=True) if epsilon else None
        slow = smoothed_reference(tiny_model, rows, epsilon)
        plain = smoothed_reference(tiny_model, rows, 0.0)
    torch.testing.assert_close(term.value.detach(), slow, atol=1e-5, rtol=1e-5)
    if epsilon:
        torch.testing.assert_close(term.value.detach(), hand, atol=1e-6, rtol=1e-6)
        assert abs(float(term.value.detach()) - float(plain)) > 1e-3  # smoothing changes the value: the check can fail


@pytest.mark.parametrize("lm_lambda", [0.0, 0.25])
def test_generative_replay_loss_is_label_smoothed_like_the_task_loss(tiny_model, tokenizer, lm_lambda):
    epsilon = 0.2
    trainer = SimpleNamespace(
        model=tiny_model, processing_class=tokenizer, args=SimpleNamespace(label_smoothing_factor=epsilon)
    )
    sharpen(tiny_model)
    (task,) = builtin_suite(["first_color"], n_train=6, n_eval=4, seed=0)
    rows = task_rows(task, tokenizer)
    plugin = GenerativeReplayPlugin(alpha=0.5, lm_lambda=lm_lambda, batch_size=len(rows))
    plugin.pseudo = ReplayMemory(len(rows), policy="balanced", seed=0)
    plugin.pseudo.add(task.name, rows)
    tiny_model.train()
    terms = {t.name: t for t in plugin.loss_terms(trainer, tiny_model, {}, None)}
    with torch.no_grad():
        slow = smoothed_reference(tiny_model, rows, epsilon)  # every pseudo row is replayed (batch = memory)
        plain = smoothed_reference(tiny_model, rows, 0.0)
    torch.testing.assert_close(terms["generative_replay"].value.detach(), slow, atol=1e-5, rtol=1e-5)
    assert abs(float(terms["generative_replay"].value.detach()) - float(plain)) > 1e-3
    assert ("generative_lm" in terms) == (lm_lambda > 0)


def test_replay_and_task_loss_agree_inside_the_trainer(tmp_path, tiny_model, tokenizer, make_args):
    """With label smoothing on, the Trainer's task loss and the replay term on the same rows are equal."""
    from hf_adaptive.trainer import ContinualTrainer

    (task,) = builtin_suite(["first_color"], n_train=6, n_eval=4, seed=0)
    sharpen(tiny_model)
    args = make_args(tmp_path, label_smoothing_factor=0.2)
    plugin = ReplayPlugin(alpha=1.0, buffer_size=6, batch_size=6, seed=0)
    trainer = ContinualTrainer(model=tiny_model, args=args, processing_class=tokenizer, callbacks=[plugin])
    rows = task_rows(task, tokenizer)
    plugin.memory.add(task.name, rows)
    batch = collate(rows, tokenizer, torch.device("cpu"))
    tiny_model.train()
    trainer.compute_loss(tiny_model, dict(batch))
    task_loss, replay_loss = float(trainer._term_sums["task"]), float(trainer._term_sums["replay"])
    assert replay_loss == pytest.approx(task_loss, rel=1e-5, abs=1e-6)
    with torch.no_grad():
        plain = float(smoothed_reference(tiny_model, rows, 0.0))
    assert replay_loss != pytest.approx(plain, abs=1e-3)


# ---------------------------------------------------------------------------------------------- committed figures
def _load_benchmark(name: str):
    """Import `benchmarks/<name>.py` as a module (its folder on the path, as when it runs as a script)."""
    import importlib.util
    import sys
    from pathlib import Path

    folder = Path(__file__).resolve().parents[2] / "benchmarks"
    sys.path.insert(0, str(folder))
    try:
        spec = importlib.util.spec_from_file_location(f"_bench_{name}", folder / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(folder))
    return module


def test_committed_fisher_markdown_is_what_the_script_writes_from_its_json():
    import json
    from pathlib import Path

    fisher = _load_benchmark("fisher")
    results = Path(__file__).resolve().parents[2] / "docs" / "results"
    data = json.loads((results / "fisher.json").read_text())
    expected = fisher._markdown(data["results"], data["environment"], data["environment"]["chunk_size"])
    assert (results / "fisher.md").read_text() == expected


def test_cl_quality_reruns_results_of_older_code(tmp_path):
    import json

    cl = _load_benchmark("cl_quality")
    package, script = tmp_path / "pkg", tmp_path / "bench.py"
    (package / "sub").mkdir(parents=True)
    (package / "sub" / "a.py").write_text("x = 1\n")
    script.write_text("y = 1\n")
    before = cl.code_version(package, (script,))
    assert cl.code_version(package, (script,)) == before
    (package / "sub" / "a.py").write_text("x = 2\n")
    after_package = cl.code_version(package, (script,))
    script.write_text("y = 2\n")
    after_script = cl.code_version(package, (script,))
    assert len({before, after_package, after_script}) == 3

    cache = tmp_path / "cl_quality.json"
    runs = {
        "naive/0": {"avg_acc": 0.5, "code_version": after_script},
        "ewc/0": {"avg_acc": 0.4, "code_version": before},
    }
    runs["replay/0"] = {"avg_acc": 0.9}  # written before runs carried a code version
    cache.write_text(json.dumps({"runs": runs}))
    kept, stale = cl.cached_runs(cache, after_script, fresh=False)
    assert list(kept) == ["naive/0"] and stale == ["ewc/0", "replay/0"]
    assert cl.cached_runs(cache, after_script, fresh=True) == ({}, [])
    assert cl.cached_runs(tmp_path / "missing.json", after_script, fresh=False) == ({}, [])


def test_share_of_a_new_task_is_its_quota_once_added():
    """`share` predicts the balanced quota without registering (nothing shrinks before the rows exist)."""
    import numpy as np

    for capacity in (1, 5, 16, 17):
        mem = ReplayMemory(capacity, policy="balanced", seed=0)
        for t in range(6):
            name = f"t{t}"
            predicted = mem.share(name)
            assert mem.tasks == [f"t{i}" for i in range(t)]  # not registered by `share`
            mem.add(name, [{"input_ids": [1, 2], "labels": [-100, 2], "label": np.int64(t % 2)}] * 3)
            assert mem.quota(name) == predicted == mem.share(name), (capacity, t)
