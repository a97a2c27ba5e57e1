"""`HeldOutWeightingPlugin`: the hypergradient against finite differences, Adam against torch's, the gradient it
hands back, the hold-out (never trained on, never replayed), the direction the weights move, state and resume."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from hf_adaptive.plugins import ContinualPlugin, LossTerm
from hf_adaptive.replay import ReplayPlugin
from hf_adaptive.replay._common import answer_loss, collate
from hf_adaptive.tasks import tokenize_task
from hf_adaptive.trainer import ContinualTrainer
from hf_adaptive.utils.io import StateLoadError, load_state, save_state
from hf_adaptive.utils.validation import OptionError
from hf_adaptive.weighting import HeldOutWeightingConfig, HeldOutWeightingPlugin, adam_step


def test_adam_step_equals_torch_adam():
    grads = [0.3, -0.1, 0.25, 0.0, -0.7, 0.05]
    param = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.Adam([param], lr=0.1, betas=(0.8, 0.99), eps=1e-8)
    value, moments = 0.2, (0.0, 0.0, 0)
    for g in grads:
        param.grad = torch.tensor(g, dtype=torch.float64)
        optimizer.step()
        value, moments = adam_step(value, moments, g, 0.1, (0.8, 0.99))
        assert value == pytest.approx(param.item(), rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("mode", ["first_order", "alignment"])
def test_hypergradient_is_the_derivative_of_its_objective(mode):
    """first_order: h_i * |g_val| |g| * lr == d L_val(theta - lr * (g_task + sum_j w_j g_j)) / d log w_i, to first
    order in lr; alignment: h_i == -d cos(g, g_val) / d log w_i. Both by central differences on random quadratics."""
    torch.manual_seed(0)
    n = 6
    theta = torch.randn(n, dtype=torch.float64)
    mats = {k: (lambda a: a @ a.T)(torch.randn(n, n, dtype=torch.float64)) for k in ("task", "ewc", "replay", "val")}
    centers = {k: torch.randn(n, dtype=torch.float64) for k in mats}

    def loss(kind, x):
        d = x - centers[kind]
        return 0.5 * d @ mats[kind] @ d

    def grad(kind, x):
        return mats[kind] @ (x - centers[kind])

    plugin = HeldOutWeightingPlugin(hypergradient=mode)
    plugin.log_weights = {"ewc": math.log(0.5), "replay": math.log(3.0)}
    rows = {k: grad(k, theta) for k in ("task", "ewc", "replay")}
    heldout = grad("val", theta)
    hyper, cosine = plugin.hypergradients(rows, heldout)
    step = rows["task"] + 0.5 * rows["ewc"] + 3.0 * rows["replay"]
    assert cosine == pytest.approx(float(heldout @ step / (heldout.norm() * step.norm())))
    lr, eps = 1e-6, 1e-4
    for name in ("ewc", "replay"):

        def objective(shift, name=name):
            w = {k: math.exp(v + (shift if k == name else 0.0)) for k, v in plugin.log_weights.items()}
            g = rows["task"] + w["ewc"] * rows["ewc"] + w["replay"] * rows["replay"]
            if mode == "alignment":
                return -float(heldout @ g / (heldout.norm() * g.norm()))
            return loss("val", theta - lr * g)

        numeric = (objective(eps) - objective(-eps)) / (2 * eps)
        analytic = hyper[name] * (float(heldout.norm() * step.norm()) * lr if mode == "first_order" else 1.0)
        assert analytic == pytest.approx(float(numeric), rel=1e-3)
        assert analytic != 0


def test_alignment_ignores_the_length_of_the_step():
    """Terms parallel to the step only lengthen it: no alignment push; first_order pushes them up."""
    step_dir = torch.tensor([1.0, 2.0, 0.0], dtype=torch.float64)
    rows = {"task": step_dir, "replay": 0.5 * step_dir}
    heldout = torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64)
    aligned, _ = HeldOutWeightingPlugin(hypergradient="alignment").hypergradients(rows, heldout)
    first, _ = HeldOutWeightingPlugin(hypergradient="first_order").hypergradients(rows, heldout)
    assert aligned["replay"] == pytest.approx(0.0, abs=1e-12) and first["replay"] < 0


def test_alignment_raises_a_term_that_turns_the_step_towards_the_heldout_descent():
    """The held-out gradient lies between the task's and `toward`'s: `toward` gains weight (h < 0), `away` (its
    opposite) loses it, whatever their lengths."""
    rows = {
        "task": torch.tensor([1.0, 0.0], dtype=torch.float64),
        "toward": torch.tensor([0.0, 0.1], dtype=torch.float64),
        "away": torch.tensor([0.0, -3.0], dtype=torch.float64),
    }
    heldout = torch.tensor([1.0, 1.0], dtype=torch.float64)
    plugin = HeldOutWeightingPlugin()
    hyper, _ = plugin.hypergradients(rows, heldout)
    assert hyper["toward"] < 0 < hyper["away"]
    plugin.update(hyper)
    assert plugin.weight("toward") > 1 > plugin.weight("away")


class _Fixed(ContinualPlugin):
    """Terms on fixed batches of rows (`batches`: name -> rows, each its answer loss), and with `anti` the term
    `anti`: minus the task loss of the batch."""

    name = "fixed_terms"

    def __init__(self, batches, anti=False):
        self.batches, self.anti = batches, anti

    @property
    def term_names(self):
        return (*self.batches, *(("anti",) if self.anti else ()))

    def loss_terms(self, trainer, model, inputs, outputs):
        device = next(model.parameters()).device
        terms = [
            LossTerm(name, answer_loss(trainer, model, collate(rows, trainer.processing_class, device)), 0.5)
            for name, rows in self.batches.items()
        ]
        return terms + ([LossTerm("anti", -outputs.loss, 1.0)] if self.anti else [])


def _fake_trainer(tokenizer, step=0, task=0):
    return SimpleNamespace(
        processing_class=tokenizer, state=SimpleNamespace(global_step=step), current_task_index=task, args=None
    )


def test_combined_gradient_uses_the_updated_weights(tokenizer, small_tasks, tiny_model):
    """On an update step: the weights move by Adam along the hypergradients computed from slow per-parameter
    gradients, and the gradient handed back is that of task + sum_i w_i * term_i with the new weights; the next
    micro-batch of the same step does not update and hands back the same weighted sum's gradient."""
    model = tiny_model
    rows = tokenize_task(small_tasks[0], tokenizer)
    plugin = HeldOutWeightingPlugin(holdout_rows=4, batch_size=4, lr=0.2, hypergradient="first_order")
    plugin.memory.add("first_color", [rows[i] for i in range(4)])
    trainer = _fake_trainer(tokenizer, step=3)
    params = [p for p in model.parameters() if p.requires_grad]
    device = next(model.parameters()).device

    def objectives():
        batch = collate([rows[i] for i in range(8, 16)], tokenizer, device)
        other = collate([rows[i] for i in range(16, 20)], tokenizer, device)
        task = answer_loss(trainer, model, batch)
        return {"task": task, "pro": 0.5 * answer_loss(trainer, model, other), "anti": -task}

    # the reference, slowly: each objective's gradient and the held-out gradient on the same held-out rows
    generator_state = plugin.memory.generator.get_state()
    heldout_rows = plugin.memory.sample(4, tasks=["first_color"])
    plugin.memory.generator.set_state(generator_state)
    objs = objectives()
    flat = {}
    for name, value in objs.items():
        grads = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
        flat[name] = torch.cat(
            [(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)]
        )
    val = answer_loss(trainer, model, collate(heldout_rows, tokenizer, device))
    g_val = torch.cat([g.reshape(-1) for g in torch.autograd.grad(val, params)])
    step = flat["task"] + flat["pro"] + flat["anti"]
    norm = g_val.norm() * step.norm()
    expected_weights = {}
    for name in ("pro", "anti"):
        h = -float(g_val @ flat[name] / norm)
        expected_weights[name] = math.exp(adam_step(0.0, (0.0, 0.0, 0), h, 0.2, (0.9, 0.999))[0])

    out = plugin.combine_gradients(trainer, model, objectives(), params)
    assert {k: plugin.weight(k) for k in ("pro", "anti")} == pytest.approx(expected_weights, rel=1e-5)
    assert len(plugin.history) == 1 and plugin.history[0]["step"] == 3
    expected = flat["task"] + expected_weights["pro"] * flat["pro"] + expected_weights["anti"] * flat["anti"]
    got = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(out, params)])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)

    again = plugin.combine_gradients(trainer, model, objectives(), params)  # same step: no second update
    assert len(plugin.history) == 1
    got = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(again, params)])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


def _sequence_trainer(path, tokenizer, make_args, plugins, **overrides):
    from hf_adaptive.models import build_tiny_gemma

    model, _ = build_tiny_gemma(tokenizer, seed=0)
    values = dict(
        adapter_strategy="full",
        learning_rate=3e-3,
        evaluate_unseen_tasks=False,
        save_results_plot=False,
        replay_alpha=1.0,
        replay_buffer_size=256,
        replay_batch_size=4,
    )
    values.update(overrides)
    args = make_args(path, **values)
    return ContinualTrainer(model=model, args=args, processing_class=tokenizer, callbacks=plugins(args))


def test_held_out_rows_are_never_trained_on_nor_replayed(tmp_path, tokenizer, small_tasks, make_args):
    tasks = small_tasks[:2]
    seen: list[list[int]] = []

    class Spy(ContinualPlugin):
        name = "spy"

        def loss_terms(self, trainer, model, inputs, outputs):
            mask = inputs["attention_mask"].bool()
            seen.extend(ids[m].tolist() for ids, m in zip(inputs["input_ids"], mask))
            return []

    def plugins(args):
        return [ReplayPlugin.from_config(args), HeldOutWeightingPlugin.from_config(args, holdout_rows=16), Spy()]

    trainer = _sequence_trainer(tmp_path, tokenizer, make_args, plugins)
    replay, heldout = trainer.plugins[0], trainer.plugins[1]
    result = trainer.train_sequence(tasks, evaluate_baseline=False)
    assert result.extra["steps"] == [6, 6]  # (64 - 16) rows per task, batches of 8
    assert heldout.memory.counts() == {t.name: 16 for t in tasks}
    held = {tuple(r["input_ids"]) for r in heldout.memory.sample(10_000)}
    assert len(held) == 32
    replayed = {tuple(r["input_ids"]) for r in replay.memory.sample(10_000)}
    trained = {tuple(row) for row in seen}
    assert replayed and trained
    assert not held & trained and not held & replayed
    # the held-out rows are a label-stratified sample: both labels of each task
    labels = {}
    for task, item in heldout.memory.items():
        labels.setdefault(task, set()).add(tuple(item["labels"].tolist()))
    assert all(len(v) >= 2 for v in labels.values())
    # one update per optimizer step once there is a term to weigh (the first task has only its own loss)
    assert [h["task"] for h in heldout.history] == [1] * 6
    assert result.extra["heldout_weighting"]["updates"] == 6
    logged = [log for log in trainer.state.log_history if "heldout_weighting/weight_replay" in log]
    assert logged, "the weights are logged"


def test_first_order_lowers_a_term_against_the_task_and_raises_one_with_it(
    tmp_path, tokenizer, small_tasks, make_args, test_seed
):
    """`anti` (minus the task loss) pushes against every row of the task; `pro` (the loss of other rows of the
    task) pulls with them: on held-out rows of the same task the first loses weight, the second gains it."""
    rows = tokenize_task(small_tasks[0], tokenizer)

    def plugins(args):
        fixed = _Fixed({"pro": [rows[i] for i in range(4)]}, anti=True)
        return [fixed, HeldOutWeightingPlugin.from_config(args, hypergradient="first_order")]

    heldout = _train_first_task(tmp_path, tokenizer, small_tasks, make_args, plugins, test_seed)
    assert heldout.weight("anti") < 0.8 < 1.25 < heldout.weight("pro")


def _train_first_task(tmp_path, tokenizer, small_tasks, make_args, plugins, seed):
    """The first task alone, batches of 4 accumulated twice; the held-out plugin (one update per optimizer step)."""
    trainer = _sequence_trainer(
        tmp_path, tokenizer, make_args, plugins, seed=seed, gradient_accumulation_steps=2, per_device_train_batch_size=4
    )
    trainer.train_sequence(small_tasks[:1], evaluate_baseline=False)
    heldout = trainer.plugins[1]
    assert len(heldout.history) == 6  # accumulation: one update per optimizer step, not per micro-batch
    return heldout


def test_state_round_trip_and_bad_states(tmp_path, tokenizer, small_tasks):
    rows = tokenize_task(small_tasks[0], tokenizer)
    plugin = HeldOutWeightingPlugin()
    plugin.memory.add("first_color", [rows[i] for i in range(5)])
    plugin.log_weights = {"replay": -0.5, "ewc": 0.25}
    plugin.moments = {"replay": (0.1, 0.02, 3), "ewc": (-0.2, 0.04, 3)}
    plugin.held_out_tasks = [0]
    plugin.history = [{"task": 0, "step": 0, "weights": {"ewc": 1.28, "replay": 0.61}}]
    save_state(tmp_path / "s", plugin.state_dict())
    restored = HeldOutWeightingPlugin()
    restored.load_state_dict(load_state(tmp_path / "s"))
    assert restored.log_weights == pytest.approx(plugin.log_weights)
    assert restored.moments == {k: pytest.approx(v) for k, v in plugin.moments.items()}
    assert restored.held_out_tasks == [0] and restored.history == plugin.history
    assert restored.memory.counts() == {"first_color": 5}

    good = plugin.state_dict()
    for key, value, match in (
        ("log_weights", torch.tensor([float("nan"), 0.0], dtype=torch.float64), "log_weights"),
        ("log_weights", torch.tensor([0.0], dtype=torch.float64), "log_weights"),
        ("log_weights", torch.tensor([10.0, 0.0], dtype=torch.float64), "min_weight"),
        ("adam_v", torch.tensor([-1.0, 0.0], dtype=torch.float64), "adam_v"),
        ("adam_t", [1], "adam_t"),
        ("names", ["ewc", "ewc"], "names"),
        ("held_out_tasks", [-1], "held_out_tasks"),
    ):
        with pytest.raises(StateLoadError, match=match):
            HeldOutWeightingPlugin().load_state_dict({**good, key: value})
    with pytest.raises(StateLoadError, match="lacks"):
        HeldOutWeightingPlugin().load_state_dict({k: v for k, v in good.items() if k != "adam_m"})


@pytest.mark.parametrize(
    ("field", "value", "allowed"),
    [
        ("holdout_rows", 0, ">= 1"),
        ("lr", 0.0, "> 0"),
        ("betas", (0.9,), "two numbers"),
        ("betas", (0.9, 1.0), "< 1"),
        ("min_weight", 0.0, "> 0"),
        ("max_weight", 0.01, ">= 0.05"),
        ("every", 1.5, "integer"),
    ],
)
def test_bad_options_name_the_field(field, value, allowed):
    with pytest.raises(OptionError, match=field) as err:
        HeldOutWeightingConfig(**{field: value})
    assert allowed in str(err.value)


def test_a_task_with_too_few_rows_to_hold_out_is_refused(tmp_path, tokenizer, small_tasks, make_args):
    def plugins(args):
        return [HeldOutWeightingPlugin(holdout_rows=64)]

    trainer = _sequence_trainer(tmp_path, tokenizer, make_args, plugins)
    with pytest.raises(OptionError, match="holdout_rows.*64 training rows of task 'first_color'"):
        trainer.train_sequence(small_tasks[:1], evaluate_baseline=False)


def test_a_killed_run_resumes_with_the_same_weights_and_rows(tmp_path, tokenizer, small_tasks, make_args):
    from transformers import TrainerCallback

    class Crash(TrainerCallback):
        def __init__(self, ref):
            self.ref = ref

        def on_step_end(self, args, state, control, **kwargs):
            if self.ref[0].current_task_index == 1 and state.global_step == 5:
                raise KeyboardInterrupt("simulated kill")

    save = dict(save_strategy="steps", save_steps=2)

    def plugins(args):
        return [ReplayPlugin.from_config(args), HeldOutWeightingPlugin.from_config(args)]

    reference = _sequence_trainer(tmp_path / "ref", tokenizer, make_args, plugins, **save)
    expected = reference.train_sequence(small_tasks[:2], evaluate_baseline=False)
    ref = [None]

    def crashing(args):
        return [*plugins(args), Crash(ref)]

    killed = _sequence_trainer(tmp_path / "run", tokenizer, make_args, crashing, **save)
    ref[0] = killed
    with pytest.raises(KeyboardInterrupt):
        killed.train_sequence(small_tasks[:2], evaluate_baseline=False)
    resumed = _sequence_trainer(tmp_path / "run", tokenizer, make_args, plugins, **save)
    result = resumed.train_sequence(
        small_tasks[:2], evaluate_baseline=False, resume_from_checkpoint=str(tmp_path / "run")
    )
    want, got = reference.plugins[1], resumed.plugins[1]
    assert got.log_weights == pytest.approx(want.log_weights, rel=1e-5)
    assert [h["step"] for h in got.history] == [h["step"] for h in want.history]
    assert got.memory.counts() == want.memory.counts()
    assert [h["heldout_loss"] for h in got.history] == pytest.approx([h["heldout_loss"] for h in want.history])
    assert str(result.matrix) == str(expected.matrix)
    for (name, a), b in zip(reference.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
