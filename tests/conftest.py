"""Shared fixtures: a tiny Gemma, its tokenizer and the built-in tasks, all built offline."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# the thread count the caller asked for (1 by default): the trained tests are checked with 1 and 2
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session")
def test_seed() -> int:
    """The seed of the tests that train (HF_ADAPTIVE_TEST_SEED, default 0).

    Those tests assert a mechanism or an effect that is large by construction, so they must pass for any seed:
    sweeping this variable (and OMP_NUM_THREADS) is how they are checked not to hang on one lucky trajectory.
    """
    value = os.environ.get("HF_ADAPTIVE_TEST_SEED", "0")
    if not value.isdigit():
        raise ValueError(f"HF_ADAPTIVE_TEST_SEED={value!r} is not allowed: a non-negative integer")
    return int(value)


@pytest.fixture(scope="session")
def tokenizer():
    from hf_adaptive.models import build_tokenizer

    return build_tokenizer()


@pytest.fixture
def tiny_model(tokenizer):
    """A fresh tiny Gemma (the `tiny` preset: 2 layers, 4 heads, 2 kv heads, hidden 64), same weights every time."""
    from hf_adaptive.models import build_tiny_gemma

    model, _ = build_tiny_gemma(tokenizer, seed=0)
    return model


@pytest.fixture
def eager_tiny_model(tokenizer):
    from hf_adaptive.models import build_tiny_gemma

    model, _ = build_tiny_gemma(tokenizer, seed=0, attn_implementation="eager")
    return model


@pytest.fixture(scope="session")
def small_tasks():
    """Three built-in tasks with small splits (64 train / 32 eval)."""
    from hf_adaptive.tasks import builtin_suite

    return builtin_suite(["first_color", "last_color", "has_cat"], n_train=64, n_eval=32, seed=0)


@pytest.fixture(scope="session")
def tiny_gemma_dir(tmp_path_factory):
    """The tiny Gemma and its tokenizer saved as a plain folder, so they load by path like any hub model."""
    from hf_adaptive.models import build_tiny_gemma

    model, tok = build_tiny_gemma(seed=0)
    path = tmp_path_factory.mktemp("tiny_gemma")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture
def tiny_batch(tokenizer, small_tasks):
    """A padded training batch of 8 rows of the first task."""
    from hf_adaptive.tasks import CausalLMCollator, tokenize_task

    rows = tokenize_task(small_tasks[0], tokenizer)
    return CausalLMCollator(tokenizer)([rows[i] for i in range(8)])


def small_args(output_dir, cls=None, **overrides):
    """Fast, deterministic training arguments for tests (`ContinualConfig` unless `cls` is given)."""
    from hf_adaptive.config import ContinualConfig

    values = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=8,
        per_device_eval_batch_size=8,
        num_train_epochs=1,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        seed=0,
        use_cpu=True,
        dataloader_num_workers=0,
    )
    values.update(overrides)
    return (cls or ContinualConfig)(**values)


@pytest.fixture
def make_args():
    return small_args
