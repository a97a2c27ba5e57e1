"""Built-in tasks, formatting, rank classification (against a one-row-at-a-time reference) and GLUE files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hf_adaptive.tasks import (
    DEFAULT_SUITE,
    RULES,
    CausalLMCollator,
    Task,
    TaskStream,
    builtin_suite,
    make_task,
    rank_classify,
    task_accuracy,
    tokenize_task,
)

FIXTURES = Path(__file__).parent / "fixtures" / "glue"


def test_builtin_suite_is_deterministic_balanced_and_large_enough():
    assert len(DEFAULT_SUITE) >= 5 and set(DEFAULT_SUITE) <= set(RULES)
    a, b = builtin_suite(seed=3), builtin_suite(seed=3)
    assert [t.train_dataset["text"] for t in a] == [t.train_dataset["text"] for t in b]
    assert a[0].train_dataset["text"] != builtin_suite(seed=4)[0].train_dataset["text"]
    for task in a:
        labels = task.train_dataset["label"]
        assert abs(sum(labels) / len(labels) - 0.5) < 0.1
        _, rule = RULES[task.name]
        for text, label in zip(task.eval_dataset["text"], task.eval_dataset["label"]):
            assert label == (0 if rule(text.split()) else 1)  # label 0 = "yes" = the rule holds


def test_tasks_interfere_same_inputs_different_rules():
    """Different tasks label the same input differently: what makes sequential training forget."""
    tasks = builtin_suite(n_train=64, n_eval=64)
    first_rule = RULES[tasks[0].name][1]
    for task in tasks[1:]:
        texts = task.eval_dataset["text"]
        disagree = sum(first_rule(x.split()) != RULES[task.name][1](x.split()) for x in texts) / len(texts)
        assert 0.2 < disagree < 0.8, (task.name, disagree)


def test_bad_task_definitions():
    from datasets import Dataset

    data = Dataset.from_list([{"text": "a", "label": 0}, {"text": "b", "label": 1}])
    with pytest.raises(ValueError, match="template"):
        Task("t", data, data, ["yes", "no"], template="no placeholder")
    with pytest.raises(ValueError, match="verbalizer"):
        Task("t", data, data, ["yes", "yes"])
    with pytest.raises(ValueError, match="lacks columns"):
        Task("t", Dataset.from_list([{"sentence": "a"}]), None, ["yes", "no"])
    with pytest.raises(ValueError, match="unique"):
        TaskStream([make_task("has_cat", 4, 4), make_task("has_cat", 4, 4)])
    with pytest.raises(ValueError, match="allowed"):
        make_task("no_such_task")


def test_tokenized_rows_mask_the_prompt(tokenizer, small_tasks):
    task = small_tasks[0]
    rows = tokenize_task(task, tokenizer)
    row = rows[0]
    answer = task.verbalizer[task.train_dataset[0]["label"]]
    labelled = [t for t, lab in zip(row["input_ids"], row["labels"]) if lab != -100]
    assert tokenizer.decode(labelled).split()[0] == answer
    assert tokenizer.decode(row["input_ids"]).startswith(tokenizer.bos_token + " " + task.name)


def _slow_accuracy(model, tokenizer, task):
    """One unpadded sequence per (example, label): sum of log p(answer tokens | prompt)."""
    from hf_adaptive.tasks.formatting import encode_example

    correct = 0
    model.eval()
    for ex in task.eval_dataset:
        scores = []
        for label in range(len(task.verbalizer)):
            row = encode_example(task, {"text": ex["text"], "label": label}, tokenizer)
            ids = torch.tensor([row["input_ids"]])
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
            score = 0.0
            for pos, lab in enumerate(row["labels"][1:]):
                if lab != -100:
                    score += float(logp[pos, lab])
            scores.append(score)
        correct += int(max(range(len(scores)), key=scores.__getitem__) == ex["label"])
    return correct / len(task.eval_dataset)


def test_rank_classification_matches_slow_reference(tiny_model, tokenizer, small_tasks):
    task = small_tasks[2]
    with torch.no_grad():  # make the untrained model's answers non-trivial
        tiny_model.model.embed_tokens.weight.mul_(4)
    fast = task_accuracy(tiny_model, tokenizer, task, batch_size=7)
    assert fast == pytest.approx(_slow_accuracy(tiny_model, tokenizer, task))
    preds, scores = rank_classify(tiny_model, tokenizer, task, task.eval_dataset, batch_size=5)
    assert len(preds) == len(scores) == len(task.eval_dataset)
    assert all(p == max(range(2), key=s.__getitem__) for p, s in zip(preds, scores))


def test_collator_pads_labels_with_ignore_index(tokenizer, small_tasks):
    rows = tokenize_task(small_tasks[0], tokenizer)
    batch = CausalLMCollator(tokenizer, pad_to_multiple_of=16)([rows[0], rows[1]])
    assert batch["input_ids"].shape[1] == 16
    pad = batch["attention_mask"] == 0
    assert (batch["labels"][pad] == -100).all() and (batch["input_ids"][pad] == tokenizer.pad_token_id).all()


def test_glue_loader_on_local_fixture_files():
    from hf_adaptive.tasks.glue import load_glue_task

    sst2 = load_glue_task("sst2", data_dir=str(FIXTURES))
    assert sst2.name == "glue_sst2" and sst2.verbalizer == ["negative", "positive"]
    assert len(sst2.train_dataset) == 6 and len(sst2.eval_dataset) == 4  # the unlabelled (-1) row is dropped
    assert sst2.train_dataset[0] == {"text": "a gripping and moving film", "label": 1}
    rte = load_glue_task("rte", data_dir=str(FIXTURES), max_train=3)
    assert len(rte.train_dataset) == 3
    assert rte.train_dataset[0]["text"].startswith("sentence1: ") and " sentence2: " in rte.train_dataset[0]["text"]
    with pytest.raises(ValueError, match="allowed"):
        load_glue_task("squad", data_dir=str(FIXTURES))
    with pytest.raises(FileNotFoundError):
        load_glue_task("cola", data_dir=str(FIXTURES))


def test_glue_task_trains_in_a_sequence(tmp_path, tokenizer, make_args):
    """A GLUE task goes through the same pipeline (unknown words map to <unk> in the tiny tokenizer)."""
    from hf_adaptive.models import build_tiny_gemma
    from hf_adaptive.tasks.glue import load_glue_task
    from hf_adaptive.trainer import ContinualTrainer

    tasks = [load_glue_task(n, data_dir=str(FIXTURES)) for n in ("sst2", "rte")]
    model, _ = build_tiny_gemma(tokenizer)
    result = ContinualTrainer(model=model, args=make_args(tmp_path), processing_class=tokenizer).train_sequence(tasks)
    assert len(result.matrix) == 2


def test_answer_scores_match_the_former_local_copies(tiny_model, tiny_batch):
    """`answer_logprobs` and `cross_entropy_per_row` now go through `answer_cross_entropy`: the same numbers as
    the code they replaced (log_softmax + gather, and `F.cross_entropy`)."""
    import torch.nn.functional as F

    from hf_adaptive.tasks.formatting import answer_logprobs, cross_entropy_per_row

    with torch.no_grad():
        logits = tiny_model(input_ids=tiny_batch["input_ids"], attention_mask=tiny_batch["attention_mask"]).logits
        ids, mask, labels = tiny_batch["input_ids"], tiny_batch["attention_mask"], tiny_batch["labels"]
        targets = labels[:, 1:]
        keep = targets != -100
        logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        torch.testing.assert_close(answer_logprobs(tiny_model, ids, mask, labels), (logp * keep).sum(-1))
        ce = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets.clamp_min(0), reduction="none")
        old = (ce * keep.float()).sum(-1) / keep.float().sum(-1).clamp_min(1.0)
        torch.testing.assert_close(cross_entropy_per_row(logits, labels), old, rtol=0, atol=1e-6)


def test_tasks_package_exports_lazily():
    import subprocess
    import sys

    code = "import sys, hf_adaptive.tasks as t; assert 'torch' not in sys.modules; t.Task; print(sorted(dir(t))[:1])"
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
