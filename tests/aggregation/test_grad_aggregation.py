"""The aggregation itself, against torchjd on a hand-built Jacobian: a 2-objective toy, then the tiny Gemma with a
task loss, a replay term and an EWC term going through `ContinualTrainer.compute_loss` and its backward."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("torchjd")

from torchjd import aggregation as tjd  # noqa: E402

from hf_adaptive.aggregation import AGGREGATORS, GradAggregationPlugin  # noqa: E402
from hf_adaptive.aggregation.plugin import objective_gradients  # noqa: E402
from hf_adaptive.plugins import ContinualPlugin, LossTerm  # noqa: E402
from hf_adaptive.tasks import CausalLMCollator, tokenize_task  # noqa: E402
from hf_adaptive.trainer import ContinualTrainer  # noqa: E402

#: torchjd's class for each option, written out here (not read from the plugin)
TORCHJD = {
    "upgrad": tjd.UPGrad,
    "dualproj": tjd.DualProj,
    "mgda": tjd.MGDA,
    "pcgrad": tjd.PCGrad,
    "imtl_g": tjd.IMTLG,
    "aligned_mtl": tjd.AlignedMTL,
    "gradvac": tjd.GradVac,
    "mean": tjd.Mean,
}
#: the aggregators whose weights sum to 1 (torchjd's papers): scale "sum" multiplies them by m; pcgrad and
#: gradvac add their (projected) rows: scale "mean" divides them by m
AVERAGING = {"upgrad", "dualproj", "mgda", "imtl_g", "aligned_mtl", "mean"}


def _toy(params=None):
    """Two parameters and two objectives whose gradients conflict (negative inner product)."""
    w, b = params or (
        torch.tensor([1.0, -2.0, 0.5], requires_grad=True),
        torch.tensor([[0.3, -0.7]], requires_grad=True),
    )
    f1 = (w * torch.tensor([3.0, 1.0, 0.0])).sum() + (b**2).sum()
    f2 = ((w - 1.0) ** 2).sum() * 4.0 - b.sum()
    return [w, b], {"task": f1, "replay": f2}


def _hand_jacobian(params, objectives):
    """Rows: each objective's gradient by its own autograd call, flattened (the slow obvious reference)."""
    rows = []
    for value in objectives.values():
        grads = torch.autograd.grad(value, params, retain_graph=True)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


def _flat(grads):
    return torch.cat([g.reshape(-1) for g in grads])


def test_every_aggregator_is_offered_and_covered():
    assert set(AGGREGATORS) == set(TORCHJD)


@pytest.mark.parametrize("name", AGGREGATORS)
@pytest.mark.parametrize("scale", ["sum", "mean"])
def test_the_toy_matches_torchjd_on_the_hand_built_jacobian(name, scale):
    params, objectives = _toy()
    jacobian = _hand_jacobian(params, objectives)
    assert jacobian.shape == (2, 5) and float(jacobian[0] @ jacobian[1]) < 0  # the objectives conflict
    torch.manual_seed(0)  # pcgrad and gradvac draw a random order of the rows
    expected = TORCHJD[name]()(jacobian)
    if scale == "sum" and name in AVERAGING:
        expected = expected * 2
    if scale == "mean" and name not in AVERAGING:
        expected = expected / 2
    plugin = GradAggregationPlugin(aggregator=name, scale=scale)
    torch.manual_seed(0)
    grads = plugin.combine_gradients(None, None, objectives, params)
    assert [g.shape for g in grads] == [p.shape for p in params]
    torch.testing.assert_close(_flat(grads), expected)
    assert plugin.totals["calls"] == 1 and plugin.totals["conflicts"] == 1


@pytest.mark.parametrize("name", AGGREGATORS)
def test_scale_sum_gives_the_sum_of_two_agreeing_gradients(name):
    """Two equal gradients: every aggregator, on scale 'sum', returns their sum (the summed loss's gradient), on
    scale 'mean' their mean: the scale of each aggregator is what the plugin assumes."""
    jacobian = torch.tensor([[3.0, -1.0, 2.0], [3.0, -1.0, 2.0]])
    torch.testing.assert_close(GradAggregationPlugin(aggregator=name).aggregate(jacobian), 2 * jacobian[0])
    torch.testing.assert_close(GradAggregationPlugin(aggregator=name, scale="mean").aggregate(jacobian), jacobian[0])


def test_upgrad_never_increases_an_objective_where_the_sum_does():
    torch.manual_seed(0)
    jacobian = torch.randn(4, 12)
    jacobian[1] = -0.9 * jacobian[0] + 0.1 * torch.randn(12)  # strongly conflicting pair
    summed = jacobian.sum(dim=0)
    assert float((jacobian @ summed).min()) < 0  # plain summing increases one of the objectives
    combined = GradAggregationPlugin(aggregator="upgrad").aggregate(jacobian)
    assert float((jacobian @ combined).min()) >= -1e-5 * float(combined.norm() * jacobian.norm(dim=1).max())
    assert float(combined.norm()) > 0


def test_objectives_without_a_gradient_path_are_dropped_not_zero_rows():
    """A constant term and one that no parameter reaches leave no row: with scale 'mean' the result is then the
    task's own gradient (a zero row would have halved it)."""
    params, objectives = _toy()
    task_gradient = _flat(torch.autograd.grad(objectives["task"], params))
    other = torch.tensor(2.0, requires_grad=True)

    def mixed():
        task = _toy(params)[1]["task"]
        return {"task": task, "constant": torch.tensor(0.5), "elsewhere": other * 3, "zero": 0 * params[0].sum()}

    assert list(objective_gradients(mixed(), params)) == ["task", "zero"]
    plugin = GradAggregationPlugin(aggregator="upgrad", scale="mean")
    grads = plugin.combine_gradients(None, None, mixed(), params)
    torch.testing.assert_close(_flat(grads), task_gradient)
    assert plugin.totals["objectives"] == 1  # the exact-zero row of "zero" is dropped as well


def test_a_parameter_no_objective_reaches_gets_no_gradient():
    params, objectives = _toy()
    idle = torch.zeros(3, requires_grad=True)
    grads = GradAggregationPlugin().combine_gradients(None, None, objectives, [params[0], idle, params[1]])
    assert grads[1] is None and grads[0] is not None and grads[2] is not None


@pytest.mark.parametrize("name", AGGREGATORS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_jacobian_is_summed_not_aggregated(name, bad):
    """IMTL-G's SVD fails on NaN and GradVac would keep it in its state: a non-finite Jacobian is not aggregated;
    the sum of its rows is returned, non-finite, for the trainer's guard to skip the step."""
    plugin = GradAggregationPlugin(aggregator=name)
    combined = plugin.aggregate(torch.tensor([[1.0, bad], [0.5, 1.0]]))
    assert combined[0] == 1.5 and not bool(torch.isfinite(combined[1]))
    if name == "gradvac":
        assert plugin.state_dict().keys() == {"aggregator", "totals"}  # no target learned from it


def test_task_vs_rest_groups_the_terms():
    params, objectives = _toy()
    objectives["ewc"] = (params[0] ** 2).sum() * 0.1
    plugin = GradAggregationPlugin(objectives="task_vs_rest", aggregator="upgrad", scale="mean")
    grouped = plugin.group(objectives)
    assert list(grouped) == ["task", "rest"]
    torch.testing.assert_close(grouped["rest"], objectives["replay"] + objectives["ewc"])
    two = {"task": objectives["task"], "rest": objectives["replay"] + objectives["ewc"]}
    expected = tjd.UPGrad()(_hand_jacobian(params, two))
    torch.testing.assert_close(_flat(plugin.combine_gradients(None, None, objectives, params)), expected)
    assert list(plugin.group({"task": objectives["task"]})) == ["task"]


# ------------------------------------------------------------------------------------------ on the tiny Gemma
class ConstantTerm(ContinualPlugin):
    """A term with no gradient path (a constant), as a plugin may return."""

    name = "constant"

    def loss_terms(self, trainer, model, inputs, outputs):
        return [LossTerm("constant", torch.tensor(0.25), 1.0)]


def _memory_plugins(tiny_model, tokenizer, small_tasks, context_of):
    """Exact replay holding rows of the second task, and EWC anchored away from the model (so both pull)."""
    from hf_adaptive.consolidation import EWCPlugin
    from hf_adaptive.replay import ReplayPlugin

    replay = ReplayPlugin(alpha=0.5, buffer_size=8, batch_size=4, seed=0)
    replay.on_task_end(None, context_of(small_tasks[1], 1))
    ewc = EWCPlugin(ewc_lambda=50.0, progress_bar=False)
    generator = torch.Generator().manual_seed(0)
    named = {n: p for n, p in tiny_model.named_parameters() if p.requires_grad}
    fisher = {n: torch.rand(p.shape, generator=generator) for n, p in named.items()}
    anchor = {n: p.detach() + 0.05 * torch.randn(p.shape, generator=generator) for n, p in named.items()}
    ewc.consolidate(small_tasks[0].name, fisher, anchor)
    return replay, ewc


def _batch(tokenizer, task, n=8):
    rows = tokenize_task(task, tokenizer)
    return CausalLMCollator(tokenizer)([rows[i] for i in range(n)])


def _grads_through_the_trainer(model, tokenizer, tmp_path, make_args, callbacks, batch):
    """`compute_loss` + backward of one batch (what `training_step` does, no accumulation): the `.grad`s."""
    trainer = ContinualTrainer(
        model=model,
        args=make_args(tmp_path),
        processing_class=tokenizer,
        data_collator=CausalLMCollator(tokenizer),
        callbacks=callbacks,
    )
    model.train()
    model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(model, dict(batch))
    loss.backward()
    params = [p for p in model.parameters() if p.requires_grad]
    grads = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]
    model.zero_grad(set_to_none=True)
    return trainer, loss.detach(), _flat(grads)


@pytest.fixture(scope="module")
def context_of(tokenizer):
    from hf_adaptive.plugins import TaskContext

    return lambda task, index=0: TaskContext.build(task, index, tokenizer)


def test_tiny_model_matches_torchjd_on_the_hand_built_jacobian(
    tiny_model, tokenizer, small_tasks, tmp_path, make_args, context_of
):
    """Task + replay + EWC (+ a constant term, dropped): the gradient the trainer backpropagates is UPGrad of the
    Jacobian whose rows are the three weighted objectives' gradients, each by its own autograd call."""
    from hf_adaptive.replay._common import answer_loss, collate

    replay, ewc = _memory_plugins(tiny_model, tokenizer, small_tasks, context_of)
    batch = _batch(tokenizer, small_tasks[0])
    plugin = GradAggregationPlugin(aggregator="upgrad")
    trainer, loss, got = _grads_through_the_trainer(
        tiny_model, tokenizer, tmp_path, make_args, [replay, ewc, ConstantTerm(), plugin], batch
    )

    params = [p for p in tiny_model.parameters() if p.requires_grad]
    objectives = {
        "task": tiny_model(**batch).loss,
        "replay": 0.5 * answer_loss(trainer, tiny_model, collate(replay.last_rows, tokenizer, torch.device("cpu"))),
        "ewc": ewc.penalty(tiny_model),
    }
    torch.testing.assert_close(loss, sum(objectives.values()) + 0.25)  # the value is still the summed loss
    jacobian = _hand_jacobian(params, objectives)
    assert jacobian.shape == (3, sum(p.numel() for p in params))
    expected = tjd.UPGrad()(jacobian) * 3
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    # the property UPGrad exists for: no objective's gradient is opposed by the update
    assert float((jacobian @ got).min()) >= -1e-4 * float(got.norm() * jacobian.norm(dim=1).max())
    assert plugin.totals["objectives"] == 3 and plugin.totals["max_jacobian_numel"] == jacobian.numel()
    assert plugin.totals["conflicts"] == 1  # two of the objectives' gradients conflict: UPGrad is not the sum here


def test_tiny_model_mean_equals_the_summed_backward(
    tiny_model, tokenizer, small_tasks, tmp_path, make_args, context_of
):
    """aggregator 'mean' on scale 'sum' (the control): the same gradients as the plain trainer's summed loss."""
    replay, ewc = _memory_plugins(tiny_model, tokenizer, small_tasks, context_of)
    batch = _batch(tokenizer, small_tasks[0])
    memory = replay.memory.state_dict()
    _, loss_a, combined = _grads_through_the_trainer(
        tiny_model, tokenizer, tmp_path / "a", make_args, [replay, ewc, GradAggregationPlugin(aggregator="mean")], batch
    )
    rows_a = replay.last_rows
    replay.memory.load_state_dict(memory)  # the same replayed rows for the plain run
    _, loss_b, summed = _grads_through_the_trainer(
        tiny_model, tokenizer, tmp_path / "b", make_args, [replay, ewc], batch
    )
    assert replay.last_rows == rows_a
    assert torch.equal(loss_a, loss_b)
    assert float(summed.norm()) > 0
    torch.testing.assert_close(combined, summed, rtol=1e-6, atol=1e-6)
    # and UPGrad, on the same scale, does change the gradient here: the objectives conflict (the test is not vacuous)
    replay.memory.load_state_dict(memory)
    upgrad_plugin = GradAggregationPlugin(aggregator="upgrad", scale="sum")
    _, _, upgrad = _grads_through_the_trainer(
        tiny_model, tokenizer, tmp_path / "c", make_args, [replay, ewc, upgrad_plugin], batch
    )
    assert upgrad_plugin.totals["conflicts"] == 1
    assert float((upgrad - summed).norm() / summed.norm()) > 1e-4
