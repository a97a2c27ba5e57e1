"""EWC through `ContinualTrainer.train_sequence`: logged penalty, less forgetting than naive, saved state."""

from __future__ import annotations

import logging

import pytest
import torch

from hf_adaptive.config import ContinualConfig
from hf_adaptive.consolidation import EWCPlugin
from hf_adaptive.models import build_tiny_gemma
from hf_adaptive.tasks import builtin_suite
from hf_adaptive.trainer import ContinualTrainer
from hf_adaptive.utils.io import load_state


@pytest.fixture(scope="module")
def two_tasks():
    # seed 0: first_color is learned in ~4 epochs and forgotten by plain training on has_cat afterwards; the
    # Fisher of a task the model predicts with near certainty is tiny, hence the large lambda
    return builtin_suite(["first_color", "has_cat"], n_train=256, n_eval=64, seed=0)


def _run(tokenizer, tasks, tmp_path, ewc_lambda: float):
    model, _ = build_tiny_gemma(tokenizer, seed=0)
    args = ContinualConfig(
        output_dir=str(tmp_path),
        num_train_epochs=5,
        learning_rate=3e-3,
        per_device_train_batch_size=8,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        logging_steps=5,
        seed=0,
        save_results_plot=False,
        ewc_lambda=ewc_lambda,
        fisher_samples=50,
    )
    plugins = [EWCPlugin.from_config(args)] if ewc_lambda > 0 else []
    trainer = ContinualTrainer(model=model, args=args, processing_class=tokenizer, callbacks=plugins)
    logging.getLogger("hf_adaptive").setLevel(logging.WARNING)
    return trainer, trainer.train_sequence(tasks)


def test_ewc_in_a_task_sequence(tokenizer, two_tasks, tmp_path):
    _, naive = _run(tokenizer, two_tasks, tmp_path / "naive", 0.0)
    trainer, ewc = _run(tokenizer, two_tasks, tmp_path / "ewc", 1e6)
    (plugin,) = trainer.plugins
    assert isinstance(plugin, EWCPlugin)

    # the penalty appears only while the second task trains, and it is logged as loss_ewc
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]  # last train() call = task 2
    assert logged and all(entry["loss_ewc"] > 0 for entry in logged)
    assert [e["task"] for e in plugin.entries] == ["first_color", "has_cat"]
    assert [h["fisher_samples"] for h in plugin.history] == [50, 50]

    # both runs learn the first task equally (no penalty yet); naive forgets it, EWC keeps it
    assert naive.matrix[0][0] == ewc.matrix[0][0] >= 0.9
    assert naive.matrix[1][0] <= 0.7
    assert ewc.matrix[1][0] >= naive.matrix[1][0] + 0.25

    # the end-of-task snapshot holds the Fisher and anchors, tensor for tensor
    (snapshot,) = (tmp_path / "ewc").glob("snapshot-after-task-*")
    restored = EWCPlugin(ewc_lambda=1e6)
    restored.load_state_dict(load_state(snapshot / "continual" / "ewc"))
    for old, new in zip(plugin.entries, restored.entries, strict=True):
        for key in ("fisher", "anchor"):
            assert all(torch.equal(new[key][n], old[key][n].cpu()) for n in old[key])
