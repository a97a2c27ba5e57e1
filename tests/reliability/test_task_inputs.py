"""Task data validation and formatting (issues #11 §5 and #17).

* Bad task data fails when the `Task` is built, naming the task, split, row, field and value (not later inside
  `datasets.map` or as a quietly wrong accuracy); lists of dicts and dicts of lists are converted to a `Dataset`.
* Label words the tokenizer cannot tell apart are an error at tokenization and scoring.
* `tokenize_task(append_eos=...)` against a slow per-row reference; tokenization prints nothing, writes no cache.
* Rank classification: no rows is an error; a model with non-finite scores has NaN accuracy, with a warning.
"""

from __future__ import annotations

import json
import logging
import math
import re

import pytest
import torch
from datasets import Dataset, DatasetDict

from hf_adaptive.tasks import Task, builtin_suite, make_task, rank_classify, task_accuracy, tokenize_task
from hf_adaptive.tasks.glue import load_glue_task

ROWS = [{"text": "red cat", "label": 0}, {"text": "dog owl", "label": 1}, {"text": "pink fox", "label": 0}]


def _task(train=None, eval_=None, verbalizer=("yes", "no"), name="probe") -> Task:
    train = Dataset.from_list(ROWS) if train is None else train
    return Task(name, train, eval_, list(verbalizer), template="q : {text} ?")


# ----------------------------------------------------------------------------------------------- Task construction
@pytest.mark.parametrize("kind", ["list_of_dicts", "dict_of_lists"])
def test_plain_python_data_is_converted_and_trains(kind, tokenizer, tiny_model):
    data = ROWS if kind == "list_of_dicts" else {k: [r[k] for r in ROWS] for k in ("text", "label")}
    task = _task(train=data, eval_=data)
    assert isinstance(task.train_dataset, Dataset) and isinstance(task.eval_dataset, Dataset)
    assert task.train_dataset.to_list() == ROWS
    assert len(tokenize_task(task, tokenizer)) == len(ROWS)
    acc = task_accuracy(tiny_model, tokenizer, task)
    assert acc in {0.0, 1 / 3, 2 / 3, 1.0}


@pytest.mark.parametrize(
    "data",
    ["red cat", 42, DatasetDict({"train": Dataset.from_list(ROWS)}), [("red cat", 0)], {"text": "red", "label": 0}],
    ids=["str", "int", "datasetdict", "list_of_tuples", "dict_of_scalars"],
)
def test_other_data_types_are_rejected_up_front(data):
    with pytest.raises(ValueError, match=r"Task\.train_dataset.* is not allowed: .*task 'probe'"):
        _task(train=data)


@pytest.mark.parametrize("split", ["train", "eval"])
def test_empty_split_is_an_error(split):
    empty = Dataset.from_dict({"text": [], "label": []})
    kwargs = {"train": empty, "eval_": Dataset.from_list(ROWS)} if split == "train" else {"eval_": empty}
    with pytest.raises(ValueError, match=rf"Task\.{split}_dataset=<0 rows> is not allowed.*task 'probe'"):
        _task(**kwargs)
    with pytest.raises(ValueError, match=rf"Task\.{split}_dataset=.*is not allowed.*task 'probe'"):
        _task(**{k: [] for k in kwargs})


BAD_ROWS = {
    "label_word": ({"text": "red cat", "label": "yes"}, "label", "'yes'"),
    "text_none": ({"text": None, "label": 0}, "text", "None"),
    "text_int": ({"text": 7, "label": 0}, "text", "7"),
    "label_too_big": ({"text": "red cat", "label": 2}, "label", "2"),
    "label_negative": ({"text": "red cat", "label": -1}, "label", "-1"),
    "label_float": ({"text": "red cat", "label": 1.5}, "label", "1.5"),
    "label_missing": ({"text": "red cat"}, "label", "None"),
}
#: the bad rows that Arrow can hold in one column with the good rows (the others only exist in Python lists)
ARROW_OK = ["text_none", "label_too_big", "label_negative", "label_missing"]


def _assert_cell_error(data, field, shown, index=2):
    with pytest.raises(ValueError) as info:
        _task(eval_=data)
    message = str(info.value)
    assert f"Task.eval_dataset[{index}][{field!r}]={shown} is not allowed" in message, message
    assert "task 'probe'" in message
    assert ("integer class index in [0, 2)" in message) if field == "label" else ("a string" in message)


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_bad_row_in_a_list_names_task_split_row_field_and_value(case):
    """Row 2 of the eval split is bad (the others fine): the error points at exactly that cell."""
    bad_row, field, shown = BAD_ROWS[case]
    _assert_cell_error(ROWS[:2] + [bad_row], field, shown)


@pytest.mark.parametrize("case", ARROW_OK)
def test_bad_row_in_a_dataset_names_task_split_row_field_and_value(case):
    bad_row, field, shown = BAD_ROWS[case]
    _assert_cell_error(Dataset.from_list(ROWS[:2] + [bad_row]), field, shown)


def test_non_integer_label_columns_in_a_dataset():
    _assert_cell_error(Dataset.from_dict({"text": ["a", "b"], "label": ["yes", "no"]}), "label", "'yes'", index=0)
    _assert_cell_error(Dataset.from_dict({"text": ["a", "b"], "label": [0.0, 1.0]}), "label", "0.0", index=0)
    _assert_cell_error(Dataset.from_dict({"text": ["a", "b"], "label": [True, False]}), "label", "True", index=0)
    _assert_cell_error(Dataset.from_dict({"text": [None, None], "label": [0, 1]}), "text", "None", index=0)


def test_row_index_is_that_of_the_selected_view():
    data = Dataset.from_list(ROWS + [{"text": "cow", "label": 5}]).select([1, 3, 0])
    with pytest.raises(ValueError, match=r"Task\.train_dataset\[1\]\['label'\]=5 is not allowed"):
        _task(train=data)


def test_reassigning_a_split_is_checked_and_rolled_back():
    task = _task(eval_=ROWS)
    before = task.eval_dataset
    with pytest.raises(ValueError, match=r"Task\.eval_dataset\[0\]\['label'\]='no' is not allowed"):
        task.eval_dataset = [{"text": "red", "label": "no"}]
    assert task.eval_dataset is before
    task.eval_dataset = ROWS[:1]  # a good one is converted
    assert isinstance(task.eval_dataset, Dataset) and len(task.eval_dataset) == 1
    with pytest.raises(ValueError, match=r"Task\.verbalizer=\['only'\] is not allowed"):
        task.verbalizer = ["only"]
    assert task.verbalizer == ["yes", "no"]


@pytest.mark.parametrize("verbalizer", [["yes", 3], ["yes", ""], ["yes", "  "], "yes no", ["yes", "yes"]])
def test_bad_verbalizer(verbalizer):
    with pytest.raises(ValueError, match=r"Task\.verbalizer.* is not allowed.*task 'probe'"):
        _task(verbalizer=verbalizer)


def test_label_index_rejects_non_integers():
    task = _task()
    assert task.answer(1) == "no" and task.answer(torch.tensor(0).item()) == "yes"
    for bad in ("1", 1.0, True, 2, -1, None):
        with pytest.raises(ValueError, match=r"Task\.label=.* is not allowed: an integer class index in \[0, 2\)"):
            task.answer(bad)
    with pytest.raises(ValueError, match=r"Task\.prompt\.text=None is not allowed"):
        task.prompt(None)


def test_eval_split_none_is_allowed_but_evaluation_says_what_is_missing(tokenizer, tiny_model):
    task = _task(eval_=None)
    assert len(tokenize_task(task, tokenizer, "train")) == len(ROWS)
    for call in (lambda: tokenize_task(task, tokenizer, "eval"), lambda: task_accuracy(tiny_model, tokenizer, task)):
        with pytest.raises(ValueError, match=r"task 'probe' has no eval split \(Task\.eval_dataset=None\)"):
            call()


# ------------------------------------------------------------------------------------------------- tokenization
def test_label_words_with_identical_token_ids_are_an_error(tokenizer, tiny_model):
    """Two emoji both become <unk>: rank classification would report 0.5 whatever the model."""
    task = _task(eval_=ROWS, verbalizer=("😀", "🙂"))
    unk = tokenizer(" 😀", add_special_tokens=False)["input_ids"]
    assert unk == tokenizer(" 🙂", add_special_tokens=False)["input_ids"]  # the premise of the test
    pattern = (
        rf"Task\.verbalizer=.* is not allowed: .*'😀' and '🙂' both tokenize to ids {re.escape(str(unk))}.*task 'probe'"
    )
    with pytest.raises(ValueError, match=pattern):
        tokenize_task(task, tokenizer)
    with pytest.raises(ValueError, match=pattern):
        task_accuracy(tiny_model, tokenizer, task)


def _reference_prompt(task, tokenizer, text, max_length):
    """[bos] + the prompt of the longest start of `text` (in whole tokens) that leaves room for every label word.

    Slow and obvious: try every cut of the text, longest first. The instruction and the label are never cut.
    """
    longest = max(len(tokenizer(" " + w, add_special_tokens=False)["input_ids"]) for w in task.verbalizer)
    text_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    for keep in range(len(text_ids), -1, -1):
        cut = text if keep == len(text_ids) else tokenizer.decode(text_ids[:keep])
        prompt = [tokenizer.bos_token_id] + tokenizer(task.prompt(cut), add_special_tokens=False)["input_ids"]
        if max_length is None or len(prompt) + longest <= max_length:
            return prompt
    raise AssertionError("the instruction alone does not fit")


def _reference_rows(task, tokenizer, split, max_length, append_eos):
    """One row at a time from full-string tokenizer calls: [bos] + prompt (input text cut to fit) + answer (+ eos)."""
    rows = []
    data = task.train_dataset if split == "train" else task.eval_dataset
    for ex in data:
        prompt = _reference_prompt(task, tokenizer, ex["text"], max_length)
        answer = tokenizer(" " + task.verbalizer[ex["label"]], add_special_tokens=False)["input_ids"]
        ids = prompt + answer + ([tokenizer.eos_token_id] if append_eos else [])
        rows.append(
            {
                "input_ids": ids,
                "attention_mask": [1] * len(ids),
                "labels": [-100] * len(prompt) + ids[len(prompt) :],
                "task_name": task.name,
            }
        )
    return rows


@pytest.mark.parametrize("append_eos", [True, False])
@pytest.mark.parametrize("max_length", [256, 5, None])
def test_tokenize_task_matches_per_row_reference(tokenizer, small_tasks, append_eos, max_length):
    task = small_tasks[1]
    rows = tokenize_task(task, tokenizer, "eval", max_length=max_length, append_eos=append_eos)
    assert rows.to_list() == _reference_rows(task, tokenizer, "eval", max_length, append_eos)
    eos_rows = sum(r["input_ids"][-1] == tokenizer.eos_token_id for r in rows)
    assert eos_rows == (len(rows) if append_eos else 0)


def test_default_appends_eos(tokenizer, small_tasks):
    assert tokenize_task(small_tasks[0], tokenizer).to_list() == _reference_rows(
        small_tasks[0], tokenizer, "train", 256, True
    )


class _CountingTokenizer:
    """Delegates to a tokenizer and counts its calls."""

    def __init__(self, inner) -> None:
        self.inner, self.calls = inner, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.inner(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_tokenization_is_batched_not_per_row(tokenizer):
    task = make_task("has_cat", n_train=3000, n_eval=2)
    counting = _CountingTokenizer(tokenizer)
    rows = tokenize_task(task, counting)
    assert len(rows) == 3000
    assert counting.calls <= len(task.verbalizer) + 3  # 2 label words + 3 batches of 1000 prompts


def test_bad_tokenize_arguments(tokenizer, small_tasks):
    task = small_tasks[0]
    with pytest.raises(ValueError, match=r"tokenize_task\.split='validation' is not allowed: one of \['eval'"):
        tokenize_task(task, tokenizer, "validation")
    with pytest.raises(ValueError, match=r"tokenize_task\.append_eos='no' is not allowed"):
        tokenize_task(task, tokenizer, append_eos="no")
    with pytest.raises(ValueError, match=r"tokenize_task\.max_length=1 is not allowed"):
        tokenize_task(task, tokenizer, max_length=1)


@pytest.fixture
def progress_bars_on(monkeypatch):
    """`datasets` progress bars switched on (the test session turns them off by environment variable)."""
    import importlib

    ds_tqdm = importlib.import_module("datasets.utils.tqdm")  # the module (`datasets.utils.tqdm` is also a class)

    monkeypatch.setattr(ds_tqdm, "HF_DATASETS_DISABLE_PROGRESS_BARS", None)
    monkeypatch.setattr(ds_tqdm, "_hf_datasets_progress_bars_disabled", False)
    return ds_tqdm


def test_tokenize_task_prints_nothing_and_restores_progress_bars(tokenizer, small_tasks, progress_bars_on, capfd):
    Dataset.from_list(ROWS).map(lambda r: r)  # the premise: with bars on, a plain map prints its bar
    assert "Map" in capfd.readouterr().err
    rows = tokenize_task(small_tasks[0], tokenizer)
    out, err = capfd.readouterr()
    assert len(rows) == len(small_tasks[0].train_dataset)
    assert out == "" and err == ""
    assert not progress_bars_on.are_progress_bars_disabled()  # the caller's setting is back


def test_tokenize_task_writes_no_cache_files(tokenizer, tmp_path):
    folder = tmp_path / "sst2"
    folder.mkdir()
    for split in ("train", "validation"):
        lines = [json.dumps({"sentence": f"film {i}", "label": i % 2}) for i in range(4)]
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    task = load_glue_task("sst2", data_dir=str(tmp_path))
    rows = tokenize_task(task, tokenizer)
    assert rows.cache_files == [] and task.train_dataset.cache_files == []


# --------------------------------------------------------------------------------------- rank classification
def test_no_evaluation_rows_is_an_error_not_zero_accuracy(tiny_model, tokenizer, small_tasks):
    with pytest.raises(ValueError, match=r"task_accuracy\.limit=0 is not allowed"):
        task_accuracy(tiny_model, tokenizer, small_tasks[0], limit=0)
    with pytest.raises(ValueError, match=r"task_accuracy\.split='test' is not allowed.*task 'first_color'"):
        task_accuracy(tiny_model, tokenizer, small_tasks[0], split="test")


def test_non_finite_scores_give_nan_accuracy_and_a_warning(tiny_model, tokenizer, small_tasks, caplog):
    task = small_tasks[0]
    with torch.no_grad():
        tiny_model.lm_head.weight[:, 0] = float("nan")  # every logit row is NaN
    with caplog.at_level(logging.WARNING, logger="hf_adaptive.tasks.formatting"):
        acc = task_accuracy(tiny_model, tokenizer, task, limit=8)
    assert math.isnan(acc)
    assert any("first_color" in r.getMessage() and "NaN" in r.getMessage() for r in caplog.records)
    preds, scores = rank_classify(tiny_model, tokenizer, task, task.eval_dataset.select(range(4)))
    assert preds == [-1] * 4 and all(math.isnan(s) for row in scores for s in row)


def test_rank_classify_truncation_matches_reference(tiny_model, tokenizer, small_tasks):
    """With a short max_length, the batched scorer cuts the input text like the obvious per-row reference."""
    task = small_tasks[2]
    with torch.no_grad():
        tiny_model.model.embed_tokens.weight.mul_(4)
    examples = task.eval_dataset.select(range(6))
    _, scores = rank_classify(tiny_model, tokenizer, task, examples, batch_size=4, max_length=5)
    tiny_model.eval()
    for ex, row_scores in zip(examples, scores):
        for label, score in enumerate(row_scores):
            prompt = _reference_prompt(task, tokenizer, ex["text"], 5)
            answer = tokenizer(" " + task.verbalizer[label], add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logits = tiny_model(input_ids=torch.tensor([prompt + answer])).logits[0].double()
            logp = torch.log_softmax(logits, -1)
            expected = sum(float(logp[len(prompt) - 1 + k, tok]) for k, tok in enumerate(answer))
            assert score == pytest.approx(expected, abs=1e-4)


# ------------------------------------------------------------------------------------------- built-in and GLUE
def test_builtin_suite_rejects_empty_and_bad_sizes():
    with pytest.raises(ValueError, match=r"builtin_suite\.names=\[\] is not allowed"):
        builtin_suite([])
    with pytest.raises(ValueError, match=r"builtin_suite\.names='has_cat' is not allowed"):
        builtin_suite("has_cat")
    with pytest.raises(ValueError, match=r"make_task\.n_train='8' is not allowed: an integer >= 2"):
        make_task("has_cat", n_train="8")
    with pytest.raises(ValueError, match=r"make_task\.name='nope' is not allowed"):
        make_task("nope")


def _glue_dir(tmp_path, train_rows, validation_rows=None):
    folder = tmp_path / "sst2"
    folder.mkdir(exist_ok=True)
    for split, rows in (("train", train_rows), ("validation", validation_rows or train_rows)):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(tmp_path)


def test_glue_null_text_is_an_error_not_the_string_none(tmp_path):
    rows = [{"sentence": "good", "label": 1}, {"sentence": None, "label": 0}, {"sentence": "bad", "label": 0}]
    with pytest.raises(ValueError, match=r"row 1 field 'sentence'=None is not allowed: a string"):
        load_glue_task("sst2", data_dir=_glue_dir(tmp_path, rows))


def test_glue_string_labels_and_bad_limits(tmp_path):
    rows = [{"sentence": "good", "label": "positive"}, {"sentence": "bad", "label": "negative"}]
    with pytest.raises(ValueError, match=r"row 0 field 'label'='positive' is not allowed: an integer class index"):
        load_glue_task("sst2", data_dir=_glue_dir(tmp_path, rows))
    good = [{"sentence": "good", "label": 1}, {"sentence": "bad", "label": 0}]
    with pytest.raises(ValueError, match=r"load_glue_task\.max_train=0 is not allowed"):
        load_glue_task("sst2", data_dir=_glue_dir(tmp_path, good), max_train=0)
