"""AdapterEarlyStoppingCallback with real Trainer runs on a tiny task."""

from __future__ import annotations

import pytest
import torch
from transformers import Trainer, TrainingArguments

from hf_adaptive.config import ContinualConfig
from hf_adaptive.plugins import TaskContext
from hf_adaptive.scheduling.config import EARLY_STOPPING_OPTIONS, EarlyStoppingConfig
from hf_adaptive.scheduling.early_stopping import AdapterEarlyStoppingCallback, validation_loss
from hf_adaptive.tasks import CausalLMCollator, task_accuracy, tokenize_task
from hf_adaptive.trainer import ContinualTrainer
from hf_adaptive.utils.io import load_state, save_state
from hf_adaptive.utils.options import build_config
from hf_adaptive.utils.params import trainable_parameters
from hf_adaptive.utils.validation import OptionError

COMMON = dict(
    per_device_train_batch_size=16,
    report_to=[],
    logging_strategy="no",
    use_cpu=True,
    disable_tqdm=True,
    seed=0,
    dataloader_num_workers=0,
)


def _trainer(model, tokenizer, task, callback, tmp_path, epochs, lr, cls=Trainer, args_cls=TrainingArguments, **kw):
    options = {**COMMON, "save_strategy": "no", **kw}
    args = args_cls(output_dir=str(tmp_path), num_train_epochs=epochs, learning_rate=lr, **options)
    return cls(
        model=model,
        args=args,
        train_dataset=tokenize_task(task, tokenizer),
        processing_class=tokenizer,
        data_collator=CausalLMCollator(tokenizer),
        callbacks=[callback],
    )


def test_stops_after_patience_epochs_without_improvement(tiny_model, tokenizer, small_tasks, tmp_path):
    task = small_tasks[0]
    callback = AdapterEarlyStoppingCallback(patience=3, min_epochs=1, task=task)
    output = _trainer(tiny_model, tokenizer, task, callback, tmp_path, epochs=8, lr=0.0).train()
    (report,) = callback.reports
    # learning rate 0: the accuracy never changes, so epoch 1 stays best and epochs 2-4 count as no improvement
    assert len(set(report["values"])) == 1
    counts = (report["epochs_run"], report["best_epoch"], report["epochs_planned"], report["epochs_saved"])
    assert counts == (4, 1, 8, 4)
    assert report["stopped_early"] and output.global_step == 4 * 4  # 64 rows / 16 per step
    assert report["seconds_saved_estimate"] == pytest.approx(4 * report["seconds_per_epoch"])


def test_min_epochs_delays_the_stop(tiny_model, tokenizer, small_tasks, tmp_path):
    task = small_tasks[0]
    callback = AdapterEarlyStoppingCallback(patience=1, min_epochs=5, task=task)
    _trainer(tiny_model, tokenizer, task, callback, tmp_path, epochs=8, lr=0.0).train()
    assert callback.reports[0]["epochs_run"] == 5 and callback.reports[0]["epochs_saved"] == 3


def test_restores_the_best_weights(tiny_model, tokenizer, small_tasks, tmp_path):
    """With an unreachable min_delta only epoch 1 counts as best: the weights after training are epoch 1's."""
    task = small_tasks[1]
    callback = AdapterEarlyStoppingCallback(metric="loss", patience=2, min_delta=1e9, task=task)
    _trainer(tiny_model, tokenizer, task, callback, tmp_path, epochs=5, lr=5e-3).train()
    (report,) = callback.reports
    assert report["epochs_run"] == 3 and report["best_epoch"] == 1 and report["restored_best"]
    assert report["values"][0] != report["values"][-1]  # training did move the weights
    assert validation_loss(tiny_model, tokenizer, task) == pytest.approx(report["values"][0], rel=1e-6)
    assert callback.best_weights == {}  # not carried into later checkpoints


def test_accuracy_run_learns_stops_on_the_plateau_and_ends_on_its_best_epoch(
    tokenizer, small_tasks, tmp_path, test_seed
):
    """A task that always answers the label the untrained model gets wrong: it is learned to 1.0 within a few
    epochs from any start (a constant answer), then the accuracy cannot improve: a plateau by construction."""
    from hf_adaptive.models import build_tiny_gemma
    from hf_adaptive.tasks import Task

    model, _ = build_tiny_gemma(tokenizer, seed=test_seed)
    prompts = small_tasks[0]

    def constant(label: int) -> Task:
        rows = {
            split: [{"text": r["text"], "label": label} for r in getattr(prompts, split)]
            for split in ("train_dataset", "eval_dataset")
        }
        return Task(name="constant", verbalizer=prompts.verbalizer, template=prompts.template, **rows)

    # for any weights the accuracies of the two constant tasks sum to 1: one of them starts at <= 0.5
    before = {label: task_accuracy(model, tokenizer, constant(label)) for label in (0, 1)}
    assert before[0] + before[1] == pytest.approx(1.0)
    label = min(before, key=before.get)
    task = constant(label)
    callback = AdapterEarlyStoppingCallback(patience=3, task=task)
    _trainer(model, tokenizer, task, callback, tmp_path, epochs=10, lr=3e-3, seed=test_seed).train()
    (report,) = callback.reports
    values = report["values"]
    assert report["best"] == 1.0 and before[label] <= 0.5  # it did learn the task
    assert report["best"] == values[report["best_epoch"] - 1] and max(values) == 1.0
    assert report["stopped_early"] and report["epochs_run"] == report["best_epoch"] + 3 < 10, values
    assert task_accuracy(model, tokenizer, task) == report["best"]


def test_resumes_its_counters_from_a_checkpoint(tokenizer, small_tasks, tmp_path):
    """Through ContinualTrainer's checkpoints: a run resumed after epoch 2 continues epochs 1-2's record.

    The metric is the validation loss, which changes every epoch: a resumed run that lost the record, or that
    continued from other weights, shows a different epoch-3 value (the accuracy of this short run stays at chance
    and would match whatever the weights were).
    """
    from hf_adaptive.models import build_tiny_gemma

    task = small_tasks[0]
    first = AdapterEarlyStoppingCallback(metric="loss", patience=10, task=task)
    model, _ = build_tiny_gemma(tokenizer, seed=0)
    options = dict(epochs=3, lr=3e-3, cls=ContinualTrainer, args_cls=ContinualConfig)
    _trainer(model, tokenizer, task, first, tmp_path, save_strategy="epoch", **options).train()
    checkpoint = tmp_path / "checkpoint-8"
    assert (checkpoint / "continual" / "early_stopping" / "state.json").is_file()
    expected = first.reports[0]["values"]
    assert len(set(expected)) == 3  # every epoch moved the weights

    second = AdapterEarlyStoppingCallback(metric="loss", patience=10, task=task)
    resumed_model, _ = build_tiny_gemma(tokenizer, seed=0)
    resumed = _trainer(resumed_model, tokenizer, task, second, tmp_path / "resumed", **options)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    (report,) = second.reports
    assert report["epochs_run"] == 3 and report["values"][:2] == expected[:2]  # restored from the checkpoint
    assert report["values"][2] == pytest.approx(expected[2], rel=1e-6, abs=0)  # epoch 3 from the same weights
    assert report["best_epoch"] == first.reports[0]["best_epoch"]
    assert report["best"] == pytest.approx(first.reports[0]["best"], rel=1e-6, abs=0)
    for (name, a), b in zip(model.named_parameters(), resumed_model.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=0, msg=name)


def test_in_a_task_sequence_every_task_gets_its_own_stop(tokenizer, small_tasks, tmp_path):
    from hf_adaptive.models import build_tiny_gemma

    model, _ = build_tiny_gemma(tokenizer, seed=0)
    callback = AdapterEarlyStoppingCallback(patience=1, min_epochs=2)  # the task comes from on_task_begin
    args = ContinualConfig(
        output_dir=str(tmp_path),
        num_train_epochs=6,
        learning_rate=0.0,
        save_results_plot=False,
        **{**COMMON, "save_strategy": "no"},
    )
    trainer = ContinualTrainer(model=model, args=args, processing_class=tokenizer, callbacks=[callback])
    trainer.train_sequence(small_tasks[:2], evaluate_baseline=False)
    assert [r["task"] for r in callback.reports] == [t.name for t in small_tasks[:2]]
    assert [(r["epochs_run"], r["epochs_saved"]) for r in callback.reports] == [(2, 4), (2, 4)]


def test_state_dict_round_trip(tiny_model, small_tasks, tmp_path):
    callback = AdapterEarlyStoppingCallback(task=small_tasks[0])
    callback.best, callback.best_epoch, callback.epochs_done, callback.wait = 0.75, 2, 3, 1
    callback.values = [0.5, 0.75, 0.7]
    callback.best_weights = {n: p.detach().clone() for n, p in trainable_parameters(tiny_model).items()}
    save_state(tmp_path / "es", callback.state_dict())
    restored = AdapterEarlyStoppingCallback(task=small_tasks[0])
    restored.load_state_dict(load_state(tmp_path / "es"))
    assert (
        restored.task_name,
        restored.best,
        restored.best_epoch,
        restored.epochs_done,
        restored.wait,
        restored.values,
    ) == (small_tasks[0].name, 0.75, 2, 3, 1, [0.5, 0.75, 0.7])
    assert all(torch.equal(restored.best_weights[n], t) for n, t in callback.best_weights.items())


def test_needs_a_task_with_a_plain_trainer(tiny_model, tokenizer, small_tasks, tmp_path):
    callback = AdapterEarlyStoppingCallback()
    trainer = _trainer(tiny_model, tokenizer, small_tasks[0], callback, tmp_path, epochs=1, lr=0.0)
    with pytest.raises(ValueError, match="AdapterEarlyStoppingCallback.task=None"):
        trainer.train()


def test_from_config_and_validation(tmp_path):
    args = ContinualConfig(
        output_dir=str(tmp_path),
        early_stopping_patience=5,
        early_stopping_metric="loss",
        early_stopping_min_epochs=2,
        early_stopping_min_delta=0.01,
        continual_eval_limit=16,
    )
    cb = AdapterEarlyStoppingCallback.from_config(args)
    assert (cb.patience, cb.metric, cb.min_epochs, cb.min_delta) == (5, "loss", 2, 0.01)
    assert cb.eval_limit is None  # left to the Trainer's continual_eval_limit, read when scoring
    args.early_stopping_patience = None  # refused, not silently 3 (tests/reliability/test_config_inputs.py)
    with pytest.raises(ValueError, match="ContinualConfig.early_stopping_patience=None"):
        AdapterEarlyStoppingCallback.from_config(args)
    for kwargs, match in (
        ({"metric": "f1"}, "metric='f1'"),
        ({"patience": 0}, "patience=0"),
        ({"min_epochs": -1}, "min_epochs=-1"),
        ({"min_delta": -0.1}, "min_delta=-0.1"),
        ({"restore_best": "yes"}, "restore_best='yes'"),
        ({"eval_limit": 0}, "eval_limit=0"),
    ):
        with pytest.raises(OptionError, match=f"EarlyStoppingConfig.{match}"):
            AdapterEarlyStoppingCallback(**kwargs)
    with pytest.raises(TypeError, match="nope"):
        AdapterEarlyStoppingCallback(nope=1)


def test_early_stopping_config_defaults_errors_and_option_names():
    from types import SimpleNamespace

    cfg = EarlyStoppingConfig()
    assert (cfg.metric, cfg.patience, cfg.min_epochs, cfg.min_delta, cfg.restore_best) == (
        "accuracy",
        3,
        1,
        0.001,
        True,
    )
    assert (cfg.eval_batch_size, cfg.eval_limit) == (None, None)
    (source,) = EARLY_STOPPING_OPTIONS
    assert set(source.names().values()) == {
        "early_stopping_metric",
        "early_stopping_patience",
        "early_stopping_min_epochs",
        "early_stopping_min_delta",
        "early_stopping_restore_best",
    }
    with pytest.raises(OptionError, match=r"^EarlyStoppingConfig\.patience=0 is not allowed"):
        EarlyStoppingConfig(patience=0)
    options = SimpleNamespace(early_stopping_patience=0, early_stopping_metric="loss")
    with pytest.raises(OptionError, match=r"^ContinualConfig\.early_stopping_patience=0 is not allowed"):
        build_config(source, options, owner="ContinualConfig")
    options.early_stopping_patience = 4
    assert build_config(source, options, owner="ContinualConfig") == EarlyStoppingConfig(metric="loss", patience=4)


def test_validation_loss_matches_the_former_cross_entropy(tiny_model, tokenizer, small_tasks):
    """`answer_cross_entropy` (log_softmax + gather) gives the numbers of the former `cross_entropy` code."""
    task = small_tasks[1]
    rows = tokenize_task(task, tokenizer, "eval")
    batch = CausalLMCollator(tokenizer)([rows[i] for i in range(len(rows))])
    with torch.no_grad():
        logits = tiny_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits, targets = logits[:, :-1].float(), batch["labels"][:, 1:]
    mask = targets != -100
    expected = float(torch.nn.functional.cross_entropy(logits[mask], targets[mask], reduction="sum")) / int(mask.sum())
    assert validation_loss(tiny_model, tokenizer, rows, batch_size=7) == pytest.approx(expected, rel=1e-6)
    assert validation_loss(tiny_model, tokenizer, task) == pytest.approx(expected, rel=1e-6)  # a Task: tokenized


def test_on_task_begin_scores_the_context_rows(tiny_model, tokenizer, small_tasks, monkeypatch):
    """In a task sequence the loss is scored on the trainer's tokenized eval rows: no second tokenization."""
    import hf_adaptive.tasks as tasks_module

    task = small_tasks[0]
    context = TaskContext.build(task, 0, tokenizer)
    callback = AdapterEarlyStoppingCallback(metric="loss")
    callback.on_task_begin(None, context)
    monkeypatch.setattr(tasks_module, "tokenize_task", lambda *a, **k: pytest.fail("tokenized again"))
    value = callback.evaluate(tiny_model, tokenizer)
    monkeypatch.undo()
    assert value == pytest.approx(validation_loss(tiny_model, tokenizer, context.eval_dataset), rel=1e-12)


def test_plain_trainer_loss_rows_follow_the_runs_eos_and_prompt_options(tiny_model, tokenizer, small_tasks):
    """Without a trainer's tokenized rows the callback tokenizes the eval split itself: with the run's
    `append_eos_token` and prompt options, so it scores what the run trains on."""
    from types import SimpleNamespace

    task = small_tasks[0]
    args = SimpleNamespace(append_eos_token=False, prompt_max_length=64, prompt_format="plain")
    callback = AdapterEarlyStoppingCallback(metric="loss", task=task)
    value = callback.evaluate(tiny_model, tokenizer, args)
    rows = tokenize_task(task, tokenizer, "eval", max_length=64, append_eos=False, prompt_format="plain")
    assert value == pytest.approx(validation_loss(tiny_model, tokenizer, rows), rel=1e-12)
    with_eos = validation_loss(tiny_model, tokenizer, task, max_length=64, prompt_format="plain")
    assert value != pytest.approx(with_eos, rel=1e-6)  # the eos target changes the loss: the option matters
    assert validation_loss(tiny_model, tokenizer, task, max_length=64, append_eos=False, prompt_format="plain") == (
        pytest.approx(value, rel=1e-12)
    )
    with pytest.raises(OptionError, match="validation_loss.tokenize_options"):
        validation_loss(tiny_model, tokenizer, rows, append_eos=False)  # rows are tokenized already
