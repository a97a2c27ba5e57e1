"""The CL_Benchmark folder reader, on small folders the tests write (the real texts are for measurement only)."""

from __future__ import annotations

import json

import pytest

from hf_adaptive.tasks.cl_benchmark import load_cl_benchmark, load_cl_benchmark_task


def _write_task(root, name, labels, train, test):
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "labels.json").write_text(json.dumps(labels))
    (folder / "train.json").write_text(json.dumps([{"sentence": s, "label": y} for s, y in train]))
    (folder / "test.json").write_text(json.dumps([{"sentence": s, "label": y} for s, y in test]))
    return folder


@pytest.fixture
def bench(tmp_path):
    _write_task(
        tmp_path,
        "SST-2",
        ["Bad", "Good"],
        [(f"Text: review {i} ", "Good" if i % 3 else "Bad") for i in range(12)],
        [("Text: fine ", "Good"), ("Text: awful ", "Bad")],
    )
    _write_task(tmp_path, "MyNLI", ["yes", "no", "maybe"], [("a b", "maybe"), ("c d", "yes")], [("e f", "no")])
    return tmp_path


def test_rows_labels_and_prompt(bench):
    task = load_cl_benchmark_task(bench, "SST-2")
    assert task.name == "SST-2" and task.verbalizer == ["Bad", "Good"]
    assert len(task.train_dataset) == 12 and len(task.eval_dataset) == 2
    assert task.train_dataset[0] == {"text": "Text: review 0", "label": 0}
    assert task.train_dataset[1] == {"text": "Text: review 1", "label": 1}
    assert task.eval_dataset["label"] == [1, 0]
    prompt = task.prompt("Text: fine")
    assert prompt.startswith("What is the sentiment") and "Options: Bad, Good" in prompt
    assert prompt.endswith("Text: fine\nAnswer:")


def test_unknown_task_gets_the_generic_instruction_and_a_renamed_verbalizer(bench):
    (task,) = load_cl_benchmark(bench, ["MyNLI"], verbalizer=["entail", "contradict", "neutral"])
    assert task.verbalizer == ["entail", "contradict", "neutral"]
    assert task.train_dataset["label"] == [2, 0] and task.metadata["labels"] == ["yes", "no", "maybe"]
    assert task.template.startswith("Classify the following text.")


def test_limits_take_a_seeded_subset(bench):
    a = load_cl_benchmark_task(bench, "SST-2", max_train=5, seed=1)
    b = load_cl_benchmark_task(bench, "SST-2", max_train=5, seed=1)
    c = load_cl_benchmark_task(bench, "SST-2", max_train=5, seed=2)
    assert len(a.train_dataset) == 5 and a.train_dataset["text"] == b.train_dataset["text"]
    assert a.train_dataset["text"] != c.train_dataset["text"]


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: (d / "labels.json").unlink(), r"labels\.json is missing"),
        (lambda d: (d / "train.json").write_text("[{"), r"train\.json is not valid JSON"),
        (lambda d: (d / "labels.json").write_text('["only"]'), "at least 2 label words"),
        (lambda d: (d / "test.json").write_text('[{"sentence": "x", "label": "Great"}]'), "label='Great'"),
        (lambda d: (d / "test.json").write_text('[{"text": "x", "label": "Good"}]'), "row 0 has no string 'sentence'"),
    ],
)
def test_bad_files_are_named(bench, mutate, message):
    mutate(bench / "SST-2")
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        load_cl_benchmark_task(bench, "SST-2")


def test_a_verbalizer_of_the_wrong_length_is_refused(bench):
    with pytest.raises(ValueError, match=r"verbalizer=\['x'\] is not allowed: task 'SST-2' has 2 labels"):
        load_cl_benchmark_task(bench, "SST-2", verbalizer=["x"])
