"""ContinualTrainer as a drop-in Trainer, its loss terms, their logging and gradient-accumulation scaling."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import Trainer, TrainingArguments

from hf_adaptive.plugins import ContinualPlugin, LossTerm
from hf_adaptive.tasks import CausalLMCollator, tokenize_task
from hf_adaptive.trainer import ContinualTrainer


class L2Plugin(ContinualPlugin):
    """A parameter-only term (same for every batch), so accumulation must not change its gradient."""

    name = "l2"

    def __init__(self, weight: float = 0.5):
        self.weight = weight
        self.calls = 0

    def loss_terms(self, trainer, model, inputs, outputs):
        self.calls += 1
        value = sum((p.float() ** 2).sum() for p in model.parameters() if p.requires_grad)
        return [LossTerm("l2", value, self.weight)]

    def state_dict(self):
        return {"calls": self.calls, "vec": torch.arange(3.0) * self.calls}

    def load_state_dict(self, state):
        self.calls = state["calls"]
        assert torch.equal(state["vec"], torch.arange(3.0) * self.calls)


def _data(tokenizer, small_tasks, n=32):
    rows = tokenize_task(small_tasks[0], tokenizer)
    return rows.select(range(n)), tokenize_task(small_tasks[0], tokenizer, "eval").select(range(16))


def _trainer(cls, model, args, tokenizer, train, evals, **kw):
    return cls(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=evals,
        data_collator=CausalLMCollator(tokenizer),
        processing_class=tokenizer,
        **kw,
    )


def _losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


@pytest.mark.parametrize("accumulation", [1, 2])
def test_drop_in_equality_with_trainer(tmp_path, tokenizer, small_tasks, make_args, accumulation):
    """Same seed, same data: every logged loss, the final weights, evaluate() and predict() are identical."""
    from hf_adaptive.models import build_tiny_gemma

    train, evals = _data(tokenizer, small_tasks)
    results = {}
    for cls in (Trainer, ContinualTrainer):
        model, _ = build_tiny_gemma(tokenizer, seed=0)
        args = make_args(
            tmp_path / cls.__name__,
            cls=TrainingArguments,
            gradient_accumulation_steps=accumulation,
            per_device_train_batch_size=4,
            num_train_epochs=2,
            save_strategy="steps",
            save_steps=4,
        )
        trainer = _trainer(cls, model, args, tokenizer, train, evals)
        trainer.train()
        results[cls] = (
            _losses(trainer),
            {k: v.clone() for k, v in model.state_dict().items()},
            trainer.evaluate(),
            trainer.predict(evals).predictions,
            sorted(p.name for p in (tmp_path / cls.__name__).iterdir()),
        )
    (l1, w1, e1, p1, c1), (l2, w2, e2, p2, c2) = results[Trainer], results[ContinualTrainer]
    # 32 rows / 4 per batch x 2 epochs = 16 batches, one optimizer step (and one logged loss) per `accumulation`
    assert len(l1) == 16 // accumulation
    assert l1 == l2
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    assert {k: v for k, v in e1.items() if "runtime" not in k and "per_second" not in k} == {
        k: v for k, v in e2.items() if "runtime" not in k and "per_second" not in k
    }
    assert (p1 == p2).all()
    assert c1 == c2 and any(name.startswith("checkpoint-") for name in c1)


def test_drop_in_resume_matches_uninterrupted(tmp_path, tokenizer, small_tasks, make_args):
    from hf_adaptive.models import build_tiny_gemma

    train, evals = _data(tokenizer, small_tasks)
    args = dict(per_device_train_batch_size=4, num_train_epochs=2, save_strategy="steps", save_steps=4)
    model, _ = build_tiny_gemma(tokenizer, seed=0)
    full = _trainer(ContinualTrainer, model, make_args(tmp_path / "a", **args), tokenizer, train, evals)
    full.train()
    model2, _ = build_tiny_gemma(tokenizer, seed=0)
    resumed = _trainer(ContinualTrainer, model2, make_args(tmp_path / "a", **args), tokenizer, train, evals)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-8"))
    assert len(_losses(full)) == 16 and _losses(full) == _losses(resumed)  # history restored, then continued
    assert all(torch.allclose(a, b) for a, b in zip(model.parameters(), model2.parameters()))


def test_loss_terms_are_added_weighted_and_logged(tmp_path, tiny_model, tokenizer, small_tasks, tiny_batch, make_args):
    train, evals = _data(tokenizer, small_tasks, 16)
    plugin = L2Plugin(weight=0.25)
    trainer = _trainer(ContinualTrainer, tiny_model, make_args(tmp_path), tokenizer, train, evals, callbacks=[plugin])
    tiny_model.train()
    total = trainer.compute_loss(tiny_model, dict(tiny_batch))
    task = tiny_model(**tiny_batch).loss
    l2 = sum((p**2).sum() for p in tiny_model.parameters())
    torch.testing.assert_close(total, task + 0.25 * l2)
    # evaluation is Trainer's: no terms
    tiny_model.eval()
    torch.testing.assert_close(trainer.compute_loss(tiny_model, dict(tiny_batch)), tiny_model(**tiny_batch).loss)

    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs and all({"loss_l2", "loss_task", "weight_l2"} <= set(h) for h in logs)
    for h in logs:  # logged total = task + w * term (logging_steps=1, no accumulation)
        assert h["loss"] == pytest.approx(h["loss_task"] + 0.25 * h["loss_l2"], rel=1e-3)


@pytest.mark.parametrize("scaled", [True, False])
def test_accumulation_scales_terms(tmp_path, tokenizer, small_tasks, make_args, scaled):
    """Batch 8 in one step == 2 accumulated micro-batches of 4, with a term, whether or not the loss is GA-scaled."""
    from hf_adaptive.models import build_tiny_gemma

    train, evals = _data(tokenizer, small_tasks, 8)
    weights = []
    for batch, accumulation in ((8, 1), (4, 2)):
        model, _ = build_tiny_gemma(tokenizer, seed=0)
        args = make_args(
            tmp_path / f"{batch}",
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=accumulation,
            optim="sgd",
            learning_rate=0.1,
            max_steps=1,
        )
        trainer = _trainer(ContinualTrainer, model, args, tokenizer, train, evals, callbacks=[L2Plugin(0.5)])
        if not scaled:
            trainer.model_accepts_loss_kwargs = False  # mean loss per micro-batch; Trainer divides by GA
        trainer.train()
        weights.append({k: v.clone() for k, v in model.state_dict().items()})
    for k in weights[0]:
        torch.testing.assert_close(weights[0][k], weights[1][k], rtol=1e-4, atol=1e-6)


def test_plugin_state_is_checkpointed_and_restored(tmp_path, tokenizer, small_tasks, make_args):
    from hf_adaptive.models import build_tiny_gemma

    train, evals = _data(tokenizer, small_tasks, 16)
    model, _ = build_tiny_gemma(tokenizer, seed=0)
    plugin = L2Plugin()
    args = make_args(tmp_path, save_strategy="steps", save_steps=1)
    _trainer(ContinualTrainer, model, args, tokenizer, train, evals, callbacks=[plugin]).train()
    ckpt = tmp_path / "checkpoint-1"
    assert (ckpt / "continual" / "l2" / "state.json").exists()
    assert (ckpt / "continual" / "l2" / "tensors.safetensors").exists()
    assert json.loads((ckpt / "trainer_state.json").read_text())["global_step"] == 1

    model2, _ = build_tiny_gemma(tokenizer, seed=0)
    fresh = L2Plugin()
    trainer = _trainer(
        ContinualTrainer, model2, make_args(tmp_path, max_steps=2), tokenizer, train, evals, callbacks=[fresh]
    )
    trainer.train(resume_from_checkpoint=str(ckpt))
    assert fresh.calls == 1 + 1  # restored 1 call from the checkpoint, then one more step


def test_duplicate_term_names_are_rejected(tmp_path, tiny_model, tokenizer, small_tasks, tiny_batch, make_args):
    train, evals = _data(tokenizer, small_tasks, 8)
    trainer = _trainer(
        ContinualTrainer, tiny_model, make_args(tmp_path), tokenizer, train, evals, callbacks=[L2Plugin(), L2Plugin()]
    )
    tiny_model.train()
    with pytest.raises(ValueError, match="duplicate loss term"):
        trainer.compute_loss(tiny_model, dict(tiny_batch))


def test_user_optimizer_instance_is_rejected_for_sequences(tmp_path, tiny_model, tokenizer, small_tasks, make_args):
    opt = torch.optim.SGD(tiny_model.parameters(), lr=0.1)
    trainer = ContinualTrainer(
        model=tiny_model, args=make_args(tmp_path), processing_class=tokenizer, optimizers=(opt, None)
    )
    with pytest.raises(ValueError, match="optimizer_cls_and_kwargs"):
        trainer.train_sequence(small_tasks)


def test_optimizer_by_name_from_config(tmp_path, tiny_model, tokenizer, small_tasks, make_args):
    from pytorch_optimizer import Lookahead

    train, evals = _data(tokenizer, small_tasks, 8)
    args = make_args(tmp_path, optimizer_name="lookahead", lookahead_inner="lamb", max_steps=2)
    trainer = _trainer(ContinualTrainer, tiny_model, args, tokenizer, train, evals)
    trainer.train()
    inner = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    assert isinstance(inner, Lookahead) and type(inner.optimizer).__name__ == "Lamb"
    with pytest.raises(ValueError, match="ContinualConfig.optimizer_name"):
        make_args(tmp_path, optimizer_name="no_such_optimizer")
    with pytest.raises(ValueError, match="ContinualConfig.gradient_centralization"):
        make_args(tmp_path, gradient_centralization=True)


@pytest.mark.parametrize("mode", ["uncertainty", "softmax"])
def test_learned_weighting_multiplies_the_terms_fixed_weights(
    tmp_path, tiny_model, tokenizer, small_tasks, tiny_batch, make_args, mode
):
    """The controller sees each term times its plugin's own weight (it must not drop replay's alpha & co.), and the
    logged weight is learned x fixed: two plugins that differ only by their weight give different totals."""
    train, evals = _data(tokenizer, small_tasks, 16)
    tiny_model.train()
    totals = {}
    for weight in (0.25, 4.0):
        args = make_args(tmp_path / f"{mode}{weight}", loss_weighting=mode)
        trainer = _trainer(ContinualTrainer, tiny_model, args, tokenizer, train, evals, callbacks=[L2Plugin(weight)])
        controller, seen = trainer.loss_weighting, {}

        def spy(task_loss, terms, outputs, controller=controller, seen=seen):
            seen["terms"], seen["result"] = terms, controller(task_loss, terms, outputs)
            return seen["result"]

        trainer.loss_weighting = spy
        total = trainer.compute_loss(tiny_model, dict(tiny_batch))
        l2 = sum((p.float() ** 2).sum() for p in tiny_model.parameters())
        torch.testing.assert_close(seen["terms"]["l2"], weight * l2)  # the term as its plugin weighs it
        expected, learned = seen["result"]
        torch.testing.assert_close(total, expected)
        assert trainer._weights_last["l2"] == pytest.approx(float(learned["l2"].detach()) * weight, rel=1e-5)
        totals[weight] = float(total)
    assert totals[0.25] != pytest.approx(totals[4.0], rel=1e-3)


def test_learned_loss_weighting_from_config(tmp_path, tiny_model, tokenizer, small_tasks, make_args):
    train, evals = _data(tokenizer, small_tasks, 16)
    args = make_args(tmp_path, loss_weighting="uncertainty", save_strategy="steps", save_steps=2)
    trainer = _trainer(ContinualTrainer, tiny_model, args, tokenizer, train, evals, callbacks=[L2Plugin()])
    trainer.train()
    controller = trainer.loss_weighting
    assert controller.term_names == ["l2"]
    in_optimizer = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert all(id(p) in in_optimizer for p in controller.parameters())
    assert all("weight_l2" in h and "weight_task" in h for h in trainer.state.log_history if "loss" in h)
    assert (tmp_path / "checkpoint-2" / "continual" / "loss_weighting" / "tensors.safetensors").exists()
    with pytest.raises(ValueError, match="needs plugins"):
        _trainer(ContinualTrainer, tiny_model, args, tokenizer, train, evals)
