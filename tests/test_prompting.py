"""Prompt formats, truncation of the input (never the instruction or label), label scorings, packed scoring."""

from __future__ import annotations

import copy

import pytest
import torch

from hf_adaptive.config import ContinualConfig
from hf_adaptive.tasks import Task, rank_classify, task_accuracy, tokenize_task
from hf_adaptive.tasks.prompting import PromptConfig, PromptEncoder, scoring_options
from hf_adaptive.tasks.scoring import reference_label_scores

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ 'user : ' + m['content'] }}{% endfor %}{% if add_generation_prompt %} red :{% endif %}"
)


def _task(texts=("red blue cat", "green pig dog"), verbalizer=("yes", "no"), template="has_cat : {text} ?"):
    rows = [{"text": t, "label": i % len(verbalizer)} for i, t in enumerate(texts)]
    return Task("t", rows, rows, list(verbalizer), template=template)


@pytest.fixture
def chat_tokenizer(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _words(tokenizer, ids):
    return tokenizer.decode(ids).split()


def test_truncation_cuts_the_input_keeps_instruction_and_label(tokenizer):
    long_text = " ".join(["red", "blue", "cat", "dog", "pig"] * 8)
    task = _task(texts=(long_text, "cat"))
    rows = tokenize_task(task, tokenizer, "train", max_length=10, append_eos=False)
    first = rows[0]
    assert len(first["input_ids"]) == 10
    words = _words(tokenizer, first["input_ids"])
    assert words[:3] == [tokenizer.bos_token, "has_cat", ":"]  # the instruction survives
    assert words[-2:] == ["?", "yes"]  # the end of the template and the label survive
    assert words[3:-2] == long_text.split()[: len(words) - 5]  # the input is cut from its end
    assert first["labels"][-1] == first["input_ids"][-1] and first["labels"][-2] == -100
    assert (
        rows[1]["input_ids"]
        == tokenize_task(task, tokenizer, "train", max_length=None, append_eos=False)[1]["input_ids"]
    )  # a short example is untouched


def test_an_instruction_longer_than_the_limit_is_an_error(tokenizer):
    task = _task(template="has_cat : red blue cat dog pig : {text} ?")
    with pytest.raises(ValueError, match=r"tokenize_task\.max_length=5 is not allowed: .*instruction alone takes"):
        tokenize_task(task, tokenizer, "train", max_length=5)


@pytest.mark.parametrize("prompt_format", ["bos", "plain", "chat"])
def test_prompt_formats(chat_tokenizer, prompt_format):
    task = _task()
    encoder = PromptEncoder(task, chat_tokenizer, None, prompt_format)
    ids = encoder.prompts(["red blue cat"])[0]
    words = _words(chat_tokenizer, ids)
    if prompt_format == "bos":
        assert words == [chat_tokenizer.bos_token, "has_cat", ":", "red", "blue", "cat", "?"]
    elif prompt_format == "plain":
        assert words == ["has_cat", ":", "red", "blue", "cat", "?"]
    else:
        expected = chat_tokenizer.apply_chat_template(
            [{"role": "user", "content": task.prompt("red blue cat")}], add_generation_prompt=True, tokenize=False
        )
        assert ids == chat_tokenizer(expected, add_special_tokens=False)["input_ids"]
    rows = tokenize_task(task, chat_tokenizer, "train", prompt_format=prompt_format)
    assert rows[0]["input_ids"][: len(ids)] == ids


def test_chat_format_needs_a_chat_template(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = None
    with pytest.raises(ValueError, match=r"prompt_format='chat' is not allowed: 'bos' or 'plain' .*no chat template"):
        tokenize_task(_task(), tok, "train", prompt_format="chat")


def test_chat_labels_have_no_leading_space(chat_tokenizer):
    task = _task()
    chat = PromptEncoder(task, chat_tokenizer, None, "chat").answers
    plain = PromptEncoder(task, chat_tokenizer, None, "plain").answers
    assert chat == [chat_tokenizer(w, add_special_tokens=False)["input_ids"] for w in task.verbalizer]
    assert plain == [chat_tokenizer(" " + w, add_special_tokens=False)["input_ids"] for w in task.verbalizer]


def _multi_token_task(tokenizer):
    """Label words of 1, 2 and 3 tokens (the tiny tokenizer is word-level)."""
    return _task(
        texts=("red blue cat", "green pig dog", "cat cat", "blue"),
        verbalizer=("red", "blue cat", "pig dog green"),
    )


@pytest.mark.parametrize("label_scoring", ["sum", "mean", "pmi"])
@pytest.mark.parametrize("prompt_format", ["bos", "chat"])
def test_rank_classify_matches_the_slow_reference(tiny_model, chat_tokenizer, label_scoring, prompt_format):
    task = _multi_token_task(chat_tokenizer)
    with torch.no_grad():
        tiny_model.model.embed_tokens.weight.mul_(4)  # scores far apart: an error would show
    preds, scores = rank_classify(
        tiny_model, chat_tokenizer, task, task.eval_dataset, prompt_format=prompt_format, label_scoring=label_scoring
    )
    encoder = PromptEncoder(task, chat_tokenizer, 256, prompt_format)
    prompts = encoder.prompts(task.eval_dataset["text"])
    ref = reference_label_scores(
        tiny_model, prompts, encoder.answers, scoring="mean" if label_scoring == "mean" else "sum"
    )
    if label_scoring == "pmi":
        ref = ref - reference_label_scores(tiny_model, [encoder.null_prompt()], encoder.answers)
    torch.testing.assert_close(torch.tensor(scores), ref, rtol=1e-4, atol=1e-4)
    assert preds == ref.argmax(-1).tolist()


def test_mean_scoring_divides_by_the_label_length(tiny_model, tokenizer):
    task = _multi_token_task(tokenizer)
    _, total = rank_classify(tiny_model, tokenizer, task, task.eval_dataset, label_scoring="sum")
    _, mean = rank_classify(tiny_model, tokenizer, task, task.eval_dataset, label_scoring="mean")
    torch.testing.assert_close(torch.tensor(mean), torch.tensor(total) / torch.tensor([1.0, 2.0, 3.0]))


def test_the_token_budget_changes_batching_not_scores(tiny_model, tokenizer):
    task = _multi_token_task(tokenizer)
    _, small = rank_classify(tiny_model, tokenizer, task, task.eval_dataset, token_budget=1)
    _, large = rank_classify(tiny_model, tokenizer, task, task.eval_dataset, token_budget=100_000, batch_size=64)
    torch.testing.assert_close(torch.tensor(small), torch.tensor(large), rtol=1e-5, atol=1e-5)


class _NoKeepModel(torch.nn.Module):
    """A causal LM whose forward takes only input_ids and attention_mask (no logits_to_keep, no position_ids)."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask=None):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask)


def test_a_model_without_logits_to_keep_is_scored_the_slow_way(tiny_model, tokenizer):
    task = _multi_token_task(tokenizer)
    _, fast = rank_classify(tiny_model, tokenizer, task, task.eval_dataset)
    _, slow = rank_classify(_NoKeepModel(tiny_model), tokenizer, task, task.eval_dataset)
    torch.testing.assert_close(torch.tensor(fast), torch.tensor(slow), rtol=1e-4, atol=1e-4)


def test_one_token_labels_cost_one_forward_over_the_prompt(tiny_model, tokenizer):
    task = _task(texts=("red blue cat",) * 5)
    seen = []
    handle = tiny_model.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append((kwargs["input_ids"].shape, kwargs.get("logits_to_keep"))),
        with_kwargs=True,
    )
    rank_classify(tiny_model, tokenizer, task, task.eval_dataset)
    handle.remove()
    prompt_length = len(PromptEncoder(task, tokenizer).prompts(["red blue cat"])[0])
    assert seen == [(torch.Size([5, prompt_length]), 1)]


def test_config_options_reach_the_scorer():
    config = ContinualConfig(
        output_dir="unused",
        prompt_max_length=64,
        prompt_format="plain",
        label_scoring="pmi",
        continual_eval_token_budget=512,
        report_to=[],
    )
    assert scoring_options(config) == {
        "max_length": 64,
        "prompt_format": "plain",
        "label_scoring": "pmi",
        "token_budget": 512,
    }


@pytest.mark.parametrize(
    "option, value, pattern",
    [
        (
            "prompt_format",
            "markdown",
            r"ContinualConfig.prompt_format='markdown' is not allowed: choose one of \['bos', 'plain', 'chat'\]",
        ),
        ("label_scoring", "max", r"label_scoring='max' is not allowed"),
        ("prompt_max_length", 1, r"prompt_max_length=1 is not allowed"),
        ("continual_eval_token_budget", 0, r"continual_eval_token_budget=0 is not allowed"),
        ("evaluate_baseline", "yes", r"evaluate_baseline='yes' is not allowed"),
    ],
)
def test_bad_options_name_the_field(option, value, pattern):
    with pytest.raises(ValueError, match=pattern):
        ContinualConfig(output_dir="unused", report_to=[], **{option: value})


def test_prompt_config_defaults_keep_the_old_behaviour():
    config = PromptConfig()
    assert (config.prompt_max_length, config.prompt_format, config.label_scoring) == (256, "bos", "sum")


def test_task_accuracy_takes_the_options(tiny_model, tokenizer):
    task = _multi_token_task(tokenizer)
    for scoring in ("sum", "mean", "pmi"):
        acc = task_accuracy(tiny_model, tokenizer, task, label_scoring=scoring, max_length=12, token_budget=64)
        assert 0.0 <= acc <= 1.0
