"""`GradAggregationPlugin` inside `ContinualTrainer`: gradient accumulation, the non-finite guard, the one-plugin
rule, a 2-task sequence with replay, and the plugin's resumable state."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("torchjd")

from hf_adaptive.aggregation import GradAggregationPlugin  # noqa: E402
from hf_adaptive.plugins import ContinualPlugin, LossTerm  # noqa: E402
from hf_adaptive.tasks import CausalLMCollator, tokenize_task  # noqa: E402
from hf_adaptive.trainer import ContinualTrainer  # noqa: E402
from hf_adaptive.utils.io import StateLoadError, load_state, save_state  # noqa: E402
from hf_adaptive.utils.validation import OptionError  # noqa: E402


def _ewc(model, seed=0):
    """EWC anchored away from the model: a parameter-only term, the same for every batch (so accumulation must
    not change its gradient)."""
    from hf_adaptive.consolidation import EWCPlugin

    ewc = EWCPlugin(ewc_lambda=20.0, progress_bar=False)
    generator = torch.Generator().manual_seed(seed)
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    fisher = {n: torch.rand(p.shape, generator=generator) for n, p in named.items()}
    anchor = {n: p.detach() + 0.05 * torch.randn(p.shape, generator=generator) for n, p in named.items()}
    ewc.consolidate("earlier", fisher, anchor)
    return ewc


def _trainer(model, tokenizer, args, callbacks, train=None):
    return ContinualTrainer(
        model=model,
        args=args,
        train_dataset=train,
        data_collator=CausalLMCollator(tokenizer),
        processing_class=tokenizer,
        callbacks=callbacks,
    )


@pytest.mark.parametrize("scaled", [True, False])
def test_accumulation_with_mean_equals_one_big_batch_and_the_plain_trainer(
    tmp_path, tokenizer, small_tasks, make_args, scaled
):
    """Batch 8 in one step == 2 accumulated micro-batches of 4 (aggregator 'mean', an EWC term), whether or not
    the task loss is normalised over the accumulated batch; and both == the plain trainer's summed loss."""
    from hf_adaptive.models import build_tiny_gemma

    train = tokenize_task(small_tasks[0], tokenizer).select(range(8))
    weights = {}
    for key, batch, accumulation, aggregate in (("one", 8, 1, True), ("two", 4, 2, True), ("plain", 8, 1, False)):
        model, _ = build_tiny_gemma(tokenizer, seed=0)
        args = make_args(
            tmp_path / key,
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=accumulation,
            optim="sgd",
            learning_rate=0.1,
            max_steps=1,
        )
        plugins = [_ewc(model)] + ([GradAggregationPlugin(aggregator="mean")] if aggregate else [])
        trainer = _trainer(model, tokenizer, args, plugins, train)
        if not scaled:
            trainer.model_accepts_loss_kwargs = False  # mean loss per micro-batch; Trainer divides by GA
        trainer.train()
        if aggregate:
            assert plugins[1].totals["calls"] == accumulation and plugins[1].totals["objectives"] == 2 * accumulation
        weights[key] = {k: v.clone() for k, v in model.state_dict().items()}
    initial = build_tiny_gemma(tokenizer, seed=0)[0].state_dict()
    assert any(not torch.equal(weights["one"][k], initial[k]) for k in initial)  # it trained
    for k in weights["one"]:
        torch.testing.assert_close(weights["one"][k], weights["two"][k], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(weights["one"][k], weights["plain"][k], rtol=1e-6, atol=1e-6)


class NaNGradient(ContinualPlugin):
    """A finite term (0) whose gradient is NaN (inf x 0): only the gradient check of the guard can catch it."""

    name = "spike"

    def loss_terms(self, trainer, model, inputs, outputs):
        p = next(p for p in model.parameters() if p.requires_grad)
        return [LossTerm("spike", torch.sqrt((p.sum() - p.sum().detach()).abs()), 1.0)]


def test_a_non_finite_gradient_is_skipped_by_the_guard_not_fed_to_the_solver(
    tmp_path, tiny_model, tokenizer, small_tasks, make_args
):
    """IMTL-G's SVD would raise on the NaN row: the step is skipped by the trainer's guard instead."""
    train = tokenize_task(small_tasks[0], tokenizer).select(range(8))
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    args = make_args(tmp_path, max_steps=1, nonfinite_patience=5)
    trainer = _trainer(tiny_model, tokenizer, args, [NaNGradient(), GradAggregationPlugin(aggregator="imtl_g")], train)
    trainer.train()
    assert trainer._nonfinite_skipped == 1
    assert all(torch.equal(before[k], v) for k, v in tiny_model.state_dict().items())
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs and logs[0]["nonfinite_steps_skipped"] == 1 and logs[0]["loss_spike"] == 0.0


def test_at_most_one_aggregating_plugin(tmp_path, tiny_model, tokenizer, tiny_batch, make_args):
    with pytest.raises(
        ValueError, match=r"plugins \['grad_aggregation', 'grad_aggregation'\] each combine .* at most one"
    ):
        _trainer(tiny_model, tokenizer, make_args(tmp_path), [GradAggregationPlugin(), GradAggregationPlugin()])
    trainer = _trainer(tiny_model, tokenizer, make_args(tmp_path), [_ewc(tiny_model), GradAggregationPlugin()])
    trainer.add_callback(GradAggregationPlugin(aggregator="mgda"))  # added later: refused at the next step
    tiny_model.train()
    with pytest.raises(ValueError, match="at most one may"):
        trainer.compute_loss(tiny_model, dict(tiny_batch))


def test_a_learned_loss_weighting_is_refused_with_aggregation(tmp_path, tiny_model, tokenizer, make_args):
    with pytest.raises(ValueError, match=r"loss_weighting='uncertainty' .* cannot be combined with plugin 'grad_agg"):
        _trainer(
            tiny_model,
            tokenizer,
            make_args(tmp_path, loss_weighting="uncertainty"),
            [_ewc(tiny_model), GradAggregationPlugin()],
        )


def test_reentrant_gradient_checkpointing_is_refused():
    args = SimpleNamespace(gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": True})
    with pytest.raises(ValueError, match="use_reentrant=False"):
        GradAggregationPlugin().on_train_begin(args, None, None)
    args.gradient_checkpointing_kwargs = {"use_reentrant": False}
    GradAggregationPlugin().on_train_begin(args, None, None)


def test_two_task_sequence_with_replay_and_aggregation(tiny_model, tokenizer, tmp_path, make_args):
    """Under a shared LoRA adapter: the Jacobian holds the adapter's parameters only, the base stays frozen."""
    from hf_adaptive.replay import ReplayPlugin
    from hf_adaptive.tasks import builtin_suite

    tasks = builtin_suite(["first_color", "last_color"], n_train=32, n_eval=8, seed=0)
    args = make_args(
        tmp_path,
        learning_rate=5e-3,
        adapter_strategy="shared_lora",
        replay_alpha=0.5,
        replay_buffer_size=16,
        replay_batch_size=4,
        evaluate_unseen_tasks=False,
        save_results_plot=False,
        save_strategy="steps",  # end-of-task snapshots (read below) follow the save settings
        save_steps=10_000,
    )
    base = {n: p.detach().clone() for n, p in tiny_model.named_parameters()}
    replay = ReplayPlugin.from_config(args)
    plugin = GradAggregationPlugin(aggregator="upgrad")
    trainer = ContinualTrainer(model=tiny_model, args=args, processing_class=tokenizer, callbacks=[replay, plugin])
    result = trainer.train_sequence(tasks, evaluate_baseline=False)

    assert len(result.matrix) == 2
    train_logs = [log for log in trainer.state.log_history if "loss" in log]
    assert len(train_logs) == 4  # this trainer's state covers the second task: 32 rows / batch 8
    assert all(log["loss_replay"] > 0 and log["weight_replay"] == 0.5 for log in train_logs)
    ours = [log for log in trainer.state.log_history if "grad_aggregation/mean_objectives" in log]
    assert len(ours) == 4 and all(log["grad_aggregation/mean_objectives"] == 2 for log in ours)
    assert all(-1 <= log["grad_aggregation/mean_min_cosine"] <= 1 for log in ours)
    # the first task had no replay term: the plain path, nothing aggregated; the second, one call per step
    summary = result.extra["grad_aggregation"]
    assert summary["aggregator"] == "upgrad" and summary["calls"] == 4 and summary["mean_objectives"] == 2
    lora = {n: p for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in n for n in lora)
    assert summary["jacobian_seconds"] > 0 and summary["max_jacobian_numel"] == 2 * sum(
        p.numel() for p in lora.values()
    )
    frozen = {
        n.replace("base_model.model.", "").replace(".base_layer", ""): p for n, p in trainer.model.named_parameters()
    }
    assert all(torch.equal(frozen[n], value) for n, value in base.items())
    saved = next(tmp_path.glob("snapshot-after-task-01/continual/grad_aggregation"))
    restored = GradAggregationPlugin(aggregator="upgrad")
    restored.load_state_dict(load_state(saved))
    assert restored.totals == plugin.totals


def test_gradvac_state_round_trip(tmp_path):
    """GradVac keeps a moving target of the cosines: a restored plugin continues exactly like the original."""
    generator = torch.Generator().manual_seed(0)
    jacobians = [torch.randn(3, 10, generator=generator) for _ in range(4)]
    plugin = GradAggregationPlugin(aggregator="gradvac")
    for jacobian in jacobians[:2]:
        plugin.aggregate(jacobian)
        plugin._record(jacobian, 0.5, 0.25)
    state = plugin.state_dict()
    assert state["gradvac_phi"].shape == (3, 3) and bool(state["gradvac_phi"].ne(0).any())
    save_state(tmp_path / "state", state)
    restored = GradAggregationPlugin(aggregator="gradvac")
    restored.load_state_dict(load_state(tmp_path / "state"))
    assert restored.totals == plugin.totals and restored.totals["calls"] == 2
    fresh = GradAggregationPlugin(aggregator="gradvac")
    for jacobian in jacobians[2:]:
        torch.manual_seed(1)
        expected = plugin.aggregate(jacobian)
        torch.manual_seed(1)
        torch.testing.assert_close(restored.aggregate(jacobian), expected)
        torch.manual_seed(1)
        assert not torch.allclose(fresh.aggregate(jacobian), expected)  # the state matters


def test_a_wrong_state_is_refused(tmp_path):
    state = GradAggregationPlugin(aggregator="pcgrad").state_dict()
    assert set(state) == {"aggregator", "totals"}  # stateless aggregator: only the running totals
    with pytest.raises(OptionError, match=r"aggregator='upgrad' is not allowed: the saved state was written with"):
        GradAggregationPlugin(aggregator="upgrad").load_state_dict(state)
    with pytest.raises(StateLoadError, match=r"totals\['calls'\]=-1"):
        GradAggregationPlugin(aggregator="pcgrad").load_state_dict(
            {**state, "totals": {**state["totals"], "calls": -1}}
        )
    bad = {"aggregator": "gradvac", "totals": state["totals"], "gradvac_phi": torch.zeros(2, 3)}
    with pytest.raises(StateLoadError, match="square matrix"):
        GradAggregationPlugin(aggregator="gradvac").load_state_dict(bad)
