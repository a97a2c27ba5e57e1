"""Fast label scoring (one prompt pass, label tokens against its cache) against the obvious one-row-per-label way."""

from __future__ import annotations

import pytest
import torch

from hf_adaptive.tasks.scoring import _batches, score_label_continuations


def _model(family: str, attn: str) -> torch.nn.Module:
    from transformers import (
        Gemma2Config,
        Gemma2ForCausalLM,
        GemmaConfig,
        GemmaForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
    )

    cls, cfg = {
        "llama": (LlamaForCausalLM, LlamaConfig),
        "gemma": (GemmaForCausalLM, GemmaConfig),
        "gemma2": (Gemma2ForCausalLM, Gemma2Config),
    }[family]
    torch.manual_seed(0)
    config = cfg(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=128,
    )
    config._attn_implementation = attn
    return cls(config).eval()


def _reference(model, prompts, labels, scoring="sum"):
    """One unpadded forward per (prompt, label), log-softmax over every position: slow and obviously right."""
    out = torch.empty(len(prompts), len(labels))
    with torch.no_grad():
        for i, prompt in enumerate(prompts):
            for k, label in enumerate(labels):
                ids = torch.tensor([list(prompt) + list(label)])
                logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
                total = sum(float(logp[len(prompt) - 1 + t, tok]) for t, tok in enumerate(label))
                out[i, k] = total / len(label) if scoring == "mean" else total
    return out


def _data(seed=0, n=7):
    g = torch.Generator().manual_seed(seed)
    prompts = [
        torch.randint(3, 97, (int(torch.randint(1, 20, (1,), generator=g)),), generator=g).tolist() for _ in range(n)
    ]
    labels = [[5], [7, 8, 9], [11, 12], [13, 14, 15, 16]]  # different lengths: padding inside the label phase
    return prompts, labels


@pytest.mark.parametrize(
    "family, attn", [("llama", "eager"), ("llama", "sdpa"), ("gemma", "sdpa"), ("gemma2", "eager")]
)
@pytest.mark.parametrize("scoring", ["sum", "mean"])
def test_matches_one_row_per_label(family, attn, scoring):
    model = _model(family, attn)
    prompts, labels = _data()
    fast = score_label_continuations(model, prompts, labels, token_budget=64, scoring=scoring)
    torch.testing.assert_close(fast, _reference(model, prompts, labels, scoring), rtol=1e-4, atol=1e-4)


def test_the_budget_changes_batching_not_scores():
    model = _model("llama", "sdpa")
    prompts, labels = _data(seed=1, n=9)
    small = score_label_continuations(model, prompts, labels, token_budget=1)  # one example per pass
    large = score_label_continuations(model, prompts, labels, token_budget=10_000)  # all in one pass
    torch.testing.assert_close(small, large, rtol=1e-4, atol=1e-4)


def test_single_token_labels_need_only_the_prompt_pass():
    model = _model("llama", "eager")
    prompts, _ = _data(seed=2)
    labels = [[5], [6], [7]]
    calls = []
    handle = model.register_forward_pre_hook(lambda mod, args, kwargs: calls.append(1), with_kwargs=True)
    fast = score_label_continuations(model, prompts, labels, token_budget=10_000)
    handle.remove()
    assert len(calls) == 1
    torch.testing.assert_close(fast, _reference(model, prompts, labels), rtol=1e-4, atol=1e-4)


def test_batches_respect_the_token_budget():
    lengths = [5, 30, 2, 17, 9, 40]
    batches = _batches(lengths, per_row_extra=4, token_budget=60)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for batch in batches:
        assert len(batch) == 1 or len(batch) * (max(lengths[i] for i in batch) + 4) <= 60


@pytest.mark.parametrize(
    "prompts, labels, scoring, message",
    [
        ([[1]], [[2]], "pmi", "scoring='pmi' is not allowed"),
        ([[1]], [[2], []], "sum", "every label needs at least one token"),
        ([[]], [[2]], "sum", "every prompt needs at least one token"),
    ],
)
def test_bad_input(prompts, labels, scoring, message):
    with pytest.raises(ValueError, match=message):
        score_label_continuations(_model("llama", "eager"), prompts, labels, scoring=scoring)
