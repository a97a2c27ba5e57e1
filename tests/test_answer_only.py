"""`answer_only_logits`: in task sequences the model computes logits at the answer positions only (left-padded
batches, `logits_to_keep`), with the same loss and gradients as the full-logit path; the drop-in `train()` stays
`Trainer`'s."""

from __future__ import annotations

import pytest
import torch
from transformers import Trainer

from hf_adaptive.plugins import ContinualPlugin
from hf_adaptive.tasks import CausalLMCollator, Task, answer_cross_entropy, builtin_suite, tokenize_task
from hf_adaptive.trainer import ContinualTrainer
from hf_adaptive.utils.validation import OptionError


def _ragged_task(name: str, n_train: int = 32, n_eval: int = 16, seed: int = 0) -> Task:
    """A built-in task whose inputs keep their first 2 to 7 words, so that rows differ in length (padding)."""
    from datasets import Dataset

    base = builtin_suite([name], n_train=n_train, n_eval=n_eval, seed=seed)[0]

    def cut(data):
        return Dataset.from_list(
            [{"text": " ".join(r["text"].split()[: 2 + i % 6]), "label": r["label"]} for i, r in enumerate(data)]
        )

    return Task(
        name=name,
        train_dataset=cut(base.train_dataset),
        eval_dataset=cut(base.eval_dataset),
        verbalizer=base.verbalizer,
        template=base.template,
    )


def _tiny_llama(tokenizer, seed: int = 0):
    """A 2-layer Llama with GQA (4 query heads over 2 KV heads), sdpa attention."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


def _model(kind: str, tokenizer):
    from hf_adaptive.models import build_tiny_gemma

    return build_tiny_gemma(tokenizer, seed=0)[0] if kind == "gemma" else _tiny_llama(tokenizer)


class _Spy:
    """Records, for every training forward of `model`, the positions the LM head projected and the input width
    (evaluation forwards are the scorer's business). Hooks sit on the embedding and the LM head, which every
    forward calls as modules (peft < 0.17 calls the model's `forward` directly, past a hook on the model itself)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.calls: list[tuple[int, int, int]] = []
        self._width = 0
        model.get_input_embeddings().register_forward_hook(self._embedded)
        model.get_output_embeddings().register_forward_hook(self._projected)

    def _embedded(self, module, args, output):
        self._width = args[0].shape[1]

    def _projected(self, module, args, output):
        if module.training:
            positions = args[0].shape[1]
            self.calls.append((positions if positions < self._width else 0, self._width, positions))

    @property
    def answer_only(self) -> list[bool]:
        return [keep > 0 and logits < width for keep, width, logits in self.calls]


class _NeedsFullLogits(ContinualPlugin):
    name = "needs_full_logits"
    needs_full_logits = True


def _rows(tokenizer, n: int = 8) -> list[dict]:
    data = tokenize_task(_ragged_task("first_color"), tokenizer, "train")
    return [data[i] for i in range(n)]


# ------------------------------------------------------------------------------------------------ the collator
def test_collator_padding_side_is_validated(tokenizer):
    with pytest.raises(OptionError, match="CausalLMCollator.padding_side"):
        CausalLMCollator(tokenizer, padding_side="top")


def test_collator_left_padding_lines_up_the_ends(tokenizer):
    rows = _rows(tokenizer)
    right = CausalLMCollator(tokenizer)(rows)
    left = CausalLMCollator(tokenizer, padding_side="left")(rows)
    assert "position_ids" not in right
    assert len({len(r["input_ids"]) for r in rows}) > 1  # the test needs padding
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        assert left["input_ids"][i, -n:].tolist() == r["input_ids"] == right["input_ids"][i, :n].tolist()
        assert left["labels"][i, -n:].tolist() == r["labels"]
        assert left["position_ids"][i, -n:].tolist() == list(range(n))
        assert left["attention_mask"][i].sum() == n
        assert (left["labels"][i, :-n] == -100).all()


@pytest.mark.parametrize("kind", ["gemma", "llama"])
def test_left_padding_scores_rows_like_right_padding(tokenizer, kind):
    model = _model(kind, tokenizer).eval()
    rows = _rows(tokenizer)
    right = CausalLMCollator(tokenizer)(rows)
    left = CausalLMCollator(tokenizer, padding_side="left")(rows)
    with torch.no_grad():
        r = model(input_ids=right["input_ids"], attention_mask=right["attention_mask"]).logits
        l_ = model(**{k: v for k, v in left.items() if k != "labels"}).logits
    expected = answer_cross_entropy(r, right["labels"], reduction="per_row_sum")
    got = answer_cross_entropy(l_, left["labels"], reduction="per_row_sum")
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------- loss and gradients
def _prepared(tmp_path, tokenizer, make_args, kind="gemma", task=None, callbacks=(), **overrides):
    """A trainer set up for the first task of a sequence (shared LoRA, its B matrices randomised so that every
    LoRA parameter has a gradient)."""
    model = _model(kind, tokenizer)
    values = dict(adapter_strategy="shared_lora", lora_dropout=0.0)
    values.update(overrides)
    trainer = ContinualTrainer(
        model=model, args=make_args(tmp_path, **values), processing_class=tokenizer, callbacks=list(callbacks)
    )
    trainer._prepare_task(task or _ragged_task("first_color"), 0)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return trainer, model


def _loss_and_grads(trainer, batches, num_items):
    model = trainer.model
    model.train()
    model.zero_grad()
    total = 0.0
    for batch in batches:
        loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=num_items)
        loss.backward()
        total += float(loss.detach())
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    return total, grads


@pytest.mark.parametrize("kind", ["gemma", "llama"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_answer_only_loss_and_grads_equal_full_logits(tmp_path, tokenizer, make_args, kind, smoothing):
    trainer, model = _prepared(tmp_path, tokenizer, make_args, kind, label_smoothing_factor=smoothing)
    assert trainer.data_collator.padding_side == "left"
    data = trainer.train_dataset
    rows = [{k: data[i][k] for k in ("input_ids", "attention_mask", "labels")} for i in range(12)]
    # two micro-batches of one accumulated step: each loss is normalised by the step's labelled-token count
    left = [trainer.data_collator(rows[:6]), trainer.data_collator(rows[6:])]
    right = [CausalLMCollator(tokenizer)(rows[:6]), CausalLMCollator(tokenizer)(rows[6:])]
    num_items = sum(int((b["labels"][:, 1:] != -100).sum()) for b in right)
    spy = _Spy(model)

    loss, grads = _loss_and_grads(trainer, left, num_items)
    assert spy.answer_only == [True, True]
    assert all(keep < width for keep, width, _ in spy.calls)
    trainer.data_collator = CausalLMCollator(tokenizer)  # the full path on right-padded rows: the anchor
    full_loss, full_grads = _loss_and_grads(trainer, right, num_items)
    assert spy.answer_only[2:] == [False, False]

    assert loss == pytest.approx(full_loss, abs=1e-5, rel=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, full_grads[name], atol=1e-5, rtol=1e-4, msg=name)
    # the mean over a micro-batch when no count is given (no accumulation normaliser)
    trainer.data_collator = CausalLMCollator(tokenizer, padding_side="left")
    one, _ = _loss_and_grads(trainer, left[:1], None)
    trainer.data_collator = CausalLMCollator(tokenizer)
    assert one == pytest.approx(_loss_and_grads(trainer, right[:1], None)[0], abs=1e-5, rel=1e-5)


def test_gradient_accumulation_step_equals_full_logits(tmp_path, tokenizer, make_args):
    """One SGD step (lr 1) accumulated over 2 micro-batches moves the LoRA weights by the gradient: the same
    with answer-only logits as with full logits and right padding."""
    after = {}
    for on in (True, False):
        trainer, _ = _prepared(
            tmp_path / str(on),
            tokenizer,
            make_args,
            answer_only_logits=on,
            max_steps=1,
            per_device_train_batch_size=4,
            gradient_accumulation_steps=2,
            optim="sgd",
            learning_rate=1.0,
            lr_scheduler_type="constant",
        )
        assert trainer.data_collator.padding_side == ("left" if on else "right")
        trainer.train()
        after[on] = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
        after[f"loss{on}"] = trainer.state.log_history[-1]["train_loss"]
    assert after["lossTrue"] == pytest.approx(after["lossFalse"], abs=1e-5, rel=1e-5)
    for name, value in after[True].items():
        torch.testing.assert_close(value, after[False][name], atol=1e-5, rtol=1e-4, msg=name)


# ------------------------------------------------------------------------------------------ when it applies
def _sequence_spy(tmp_path, tokenizer, make_args, callbacks=(), **overrides):
    from hf_adaptive.models import build_tiny_gemma

    model, _ = build_tiny_gemma(tokenizer, seed=0)
    spy = _Spy(model)
    values = dict(num_train_epochs=1, evaluate_unseen_tasks=False, continual_eval_limit=4)
    values.update(overrides)
    trainer = ContinualTrainer(
        model=model, args=make_args(tmp_path, **values), processing_class=tokenizer, callbacks=list(callbacks)
    )
    trainer.train_sequence([_ragged_task("first_color", n_train=16, n_eval=4)], evaluate_baseline=False)
    return trainer, spy


def test_train_sequence_takes_the_answer_only_path(tmp_path, tokenizer, make_args):
    _, spy = _sequence_spy(tmp_path, tokenizer, make_args)
    assert len(spy.calls) == 2  # 16 rows, batches of 8
    assert all(logits == keep < width for keep, width, logits in spy.calls)


@pytest.mark.parametrize("why", ["option_off", "plugin_needs_full_logits"])
def test_answer_only_path_is_off(tmp_path, tokenizer, make_args, why):
    if why == "option_off":
        trainer, spy = _sequence_spy(tmp_path, tokenizer, make_args, answer_only_logits=False)
    else:
        trainer, spy = _sequence_spy(tmp_path, tokenizer, make_args, callbacks=[_NeedsFullLogits()])
    assert spy.calls and not any(keep for keep, _, _ in spy.calls)
    assert trainer.data_collator.padding_side == "right"


def test_drop_in_train_is_exactly_trainer(tmp_path, tokenizer, make_args):
    """A plain `train()` on the user's own data (no plugins) never cuts the logits, whatever its collator."""
    from hf_adaptive.models import build_tiny_gemma

    rows = tokenize_task(_ragged_task("first_color", n_train=16), tokenizer, "train").remove_columns("task_name")
    for collator in (CausalLMCollator(tokenizer), CausalLMCollator(tokenizer, padding_side="left")):
        model, _ = build_tiny_gemma(tokenizer, seed=0)
        spy = _Spy(model)
        args = make_args(tmp_path / collator.padding_side, max_steps=2)
        trainer = ContinualTrainer(
            model=model, args=args, train_dataset=rows, data_collator=collator, processing_class=tokenizer
        )
        trainer.train()
        assert len(spy.calls) == 2 and not any(keep for keep, _, _ in spy.calls)
        batch = collator([rows[i] for i in range(8)])
        model.train()
        ours = trainer.compute_loss(model, dict(batch), num_items_in_batch=7)
        assert torch.equal(ours, Trainer.compute_loss(trainer, model, dict(batch), num_items_in_batch=7))


def test_generative_replay_needs_full_logits_only_with_its_lm_loss():
    from hf_adaptive.replay.generative import GenerativeReplayPlugin

    assert GenerativeReplayPlugin(lm_lambda=0.25).needs_full_logits
    assert not GenerativeReplayPlugin(lm_lambda=0.0).needs_full_logits
    assert not ContinualPlugin().needs_full_logits


def test_option_is_validated(tmp_path, make_args):
    with pytest.raises(OptionError, match="ContinualConfig.answer_only_logits"):
        make_args(tmp_path, answer_only_logits="yes")


# ------------------------------------------------------------------------------------------ a whole sequence
def test_sequence_results_match_with_and_without_answer_only(tmp_path, tokenizer, make_args, test_seed):
    """The same sequence with the option on and off: the same losses (to float tolerance) and accuracy matrix."""
    from hf_adaptive.models import build_tiny_gemma

    tasks = [_ragged_task("first_color", 48, 32, test_seed), _ragged_task("second_animal", 48, 32, test_seed)]
    results = {}
    for on in (True, False):
        model, _ = build_tiny_gemma(tokenizer, seed=test_seed)
        args = make_args(
            tmp_path / str(on), answer_only_logits=on, num_train_epochs=2, learning_rate=3e-3, seed=test_seed
        )
        trainer = ContinualTrainer(model=model, args=args, processing_class=tokenizer)
        results[on] = trainer.train_sequence(tasks, evaluate_baseline=False)
    on, off = results[True], results[False]
    assert on.extra["train_loss"] == pytest.approx(off.extra["train_loss"], rel=1e-4, abs=1e-5)
    # rank classification on 32 examples: at most one near-tie may flip under float noise
    for row_on, row_off in zip(on.matrix, off.matrix):
        assert row_on == pytest.approx(row_off, abs=1 / 32 + 1e-9, nan_ok=True)
