"""EWC through `ContinualTrainer.train_sequence`: the penalty holds the Fisher-weighted weights at the anchors.

The test asserts the mechanism, not a trained accuracy: how much an old task's accuracy survives depends on the
trajectory (CPU, BLAS, thread count, seed), whereas "the weights the Fisher marks as important stay at the
anchor" is true by construction once the stiffness dominates the task gradient. The accuracy claim is measured
in `benchmarks/`, not here.
"""

from __future__ import annotations

import logging

import pytest
import torch

from hf_adaptive.config import ContinualConfig
from hf_adaptive.consolidation import EWCPlugin, trainable_parameters
from hf_adaptive.models import build_tiny_gemma
from hf_adaptive.plugins import ContinualPlugin
from hf_adaptive.tasks import builtin_suite
from hf_adaptive.trainer import ContinualTrainer
from hf_adaptive.utils.io import load_state

# Fisher normalised by its largest entry: the stiffness of the most important weight is LAMBDA whatever the
# Fisher's raw scale (a task predicted with near certainty has a Fisher ~p(1-p) ~ 0, which made a raw-Fisher
# lambda depend on how far the first task happened to saturate)
LAMBDA = 1e4


class WeightSnapshots(ContinualPlugin):
    """Records the trainable weights at every task end (what EWC anchors to), in float64."""

    name = "weight_snapshots"

    def __init__(self) -> None:
        self.weights: list[dict[str, torch.Tensor]] = []

    def on_task_end(self, trainer, context) -> None:
        params = trainable_parameters(trainer.model)
        self.weights.append({n: p.detach().double().clone() for n, p in params.items()})


@pytest.fixture(scope="module")
def two_tasks(test_seed):
    return builtin_suite(["first_color", "has_cat"], n_train=64, n_eval=16, seed=test_seed)


def _run(tokenizer, tasks, tmp_path, seed: int, ewc: bool):
    model, _ = build_tiny_gemma(tokenizer, seed=seed)
    args = ContinualConfig(
        output_dir=str(tmp_path),
        num_train_epochs=3,
        learning_rate=3e-3,
        per_device_train_batch_size=8,
        report_to=[],
        save_strategy="steps",  # end-of-task snapshots (read below) follow the save settings
        save_steps=10_000,
        use_cpu=True,
        disable_tqdm=True,
        logging_steps=4,
        seed=seed,
        save_results_plot=False,
        ewc_lambda=LAMBDA,
        fisher_samples=32,
        fisher_normalization="max",
    )
    snapshots = WeightSnapshots()
    plugins = [EWCPlugin.from_config(args), snapshots] if ewc else [snapshots]
    trainer = ContinualTrainer(model=model, args=args, processing_class=tokenizer, callbacks=plugins)
    logging.getLogger("hf_adaptive").setLevel(logging.WARNING)
    return trainer, trainer.train_sequence(tasks, evaluate_baseline=False), snapshots


def _weighted_drift(fisher: dict, anchor: dict, weights: dict) -> float:
    """Σ_p F_p (θ_p − θ*_p)², element by element in float64 (the slow reference of the penalty / (λ/2))."""
    return sum(float((fisher[n].double() * (weights[n] - anchor[n].double()) ** 2).sum()) for n in fisher)


def test_ewc_in_a_task_sequence(tokenizer, two_tasks, tmp_path, test_seed):
    _, naive, naive_weights = _run(tokenizer, two_tasks, tmp_path / "naive", test_seed, ewc=False)
    trainer, ewc, ewc_weights = _run(tokenizer, two_tasks, tmp_path / "ewc", test_seed, ewc=True)
    plugin = next(p for p in trainer.plugins if isinstance(p, EWCPlugin))

    # no penalty while the first task trains: both runs are the same computation up to its end, and the anchor
    # is exactly the weights the first task ended with
    assert naive.matrix[0] == ewc.matrix[0]
    first_end = naive_weights.weights[0]
    assert all(torch.equal(ewc_weights.weights[0][n], w) for n, w in first_end.items())
    (entry, _) = plugin.entries
    assert entry["task"] == "first_color"
    assert all(torch.equal(entry["anchor"][n].double(), first_end[n]) for n in entry["anchor"])
    assert [e["task"] for e in plugin.entries] == ["first_color", "has_cat"]
    assert [h["fisher_samples"] for h in plugin.history] == [32, 32]

    # the penalty is active only while the second task trains, and it is logged as loss_ewc
    logged = [e for e in trainer.state.log_history if "loss" in e]  # this trainer state covers task 2
    assert logged and all(e["loss_ewc"] > 0 for e in logged)

    # the mechanism: training the second task moves both models, but with EWC the Fisher-weighted distance to the
    # anchor stays a small fraction of what plain training drifts (stiffness LAMBDA on the top-Fisher weights)
    fisher, anchor = entry["fisher"], entry["anchor"]
    assert max(float(f.max()) for f in fisher.values()) == pytest.approx(1.0)  # normalised by its largest entry
    naive_drift = _weighted_drift(fisher, anchor, naive_weights.weights[1])
    ewc_drift = _weighted_drift(fisher, anchor, ewc_weights.weights[1])
    moved = sum(float((ewc_weights.weights[1][n] - first_end[n]).abs().sum()) for n in first_end)
    assert naive_drift > 0 and moved > 0
    assert ewc_drift < 0.05 * naive_drift, (ewc_drift, naive_drift)

    # the first entry's term at the final weights equals the slow reference (λ/2) Σ F (θ − θ*)²
    single = EWCPlugin(ewc_lambda=LAMBDA)
    single.entries = [entry]
    value = float(single.penalty(trainer.model).detach())
    assert value == pytest.approx(0.5 * LAMBDA * ewc_drift, rel=1e-4)

    # the end-of-task snapshot holds the Fisher and anchors, tensor for tensor
    (snapshot,) = (tmp_path / "ewc").glob("snapshot-after-task-*")
    restored = EWCPlugin(ewc_lambda=LAMBDA)
    restored.load_state_dict(load_state(snapshot / "continual" / "ewc"))
    for old, new in zip(plugin.entries, restored.entries, strict=True):
        for key in ("fisher", "anchor"):
            assert all(torch.equal(new[key][n], old[key][n].cpu()) for n in old[key])


def test_ewc_enabled_by_name_penalizes_with_its_defaults(tmp_path):
    """`plugins: [ewc]` with no EWC option is EWC with λ = 1 (it was a silent no-op with the old ewc_lambda=0)."""
    from hf_adaptive.registry import build_plugins

    args = ContinualConfig(output_dir=str(tmp_path), report_to=[], seed=3, disable_tqdm=True)
    (plugin,) = build_plugins(["ewc"], args)
    assert isinstance(plugin, EWCPlugin) and plugin.enabled and plugin.ewc_lambda == args.ewc_lambda == 1.0
    assert (plugin.seed, plugin.progress_bar) == (3, False)
    args.ewc_lambda = -1.0  # set after validation: building the plugin names the option
    with pytest.raises(ValueError, match=r"ContinualConfig\.ewc_lambda=-1\.0 is not allowed"):
        EWCPlugin.from_config(args)
