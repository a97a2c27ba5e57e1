"""`DistillationPlugin` on the tiny Gemma: options, teachers (previous task, base, explicit), state, and runs
through `ContinualTrainer` (answer-only logits on and off, a two-task sequence)."""

from __future__ import annotations

import copy
import logging
import math
from types import SimpleNamespace

import pytest
import torch

from hf_adaptive.adapters import lora_config
from hf_adaptive.distillation.config import DISTILLATION_OPTIONS, DistillationConfig
from hf_adaptive.distillation.plugin import DistillationPlugin
from hf_adaptive.plugins import ContinualPlugin, TaskContext
from hf_adaptive.tasks import CausalLMCollator, Task, builtin_suite, tokenize_task
from hf_adaptive.trainer import ContinualTrainer
from hf_adaptive.utils.io import StateLoadError, load_state, save_state
from hf_adaptive.utils.options import build_config, options_dataclass
from hf_adaptive.utils.validation import OptionError


def _ragged_task(name: str, n_train: int = 16, n_eval: int = 8) -> Task:
    """A built-in task whose inputs keep their first 2 to 7 words: rows of different lengths (padding matters)."""
    from datasets import Dataset

    base = builtin_suite([name], n_train=n_train, n_eval=n_eval, seed=0)[0]

    def cut(data):
        return Dataset.from_list(
            [{"text": " ".join(r["text"].split()[: 2 + i % 6]), "label": r["label"]} for i, r in enumerate(data)]
        )

    return Task(name, cut(base.train_dataset), cut(base.eval_dataset), base.verbalizer, base.template)


@pytest.fixture(scope="module")
def batch(tokenizer):
    """6 ragged rows, right padded (the plugins' own collator)."""
    data = tokenize_task(_ragged_task("first_color"), tokenizer, "train")
    rows = [{k: data[i][k] for k in ("input_ids", "attention_mask", "labels")} for i in range(6)]
    out = CausalLMCollator(tokenizer)(rows)
    assert int((out["attention_mask"] == 0).sum()) > 0
    return out


def _model_inputs(batch):
    return {k: v for k, v in batch.items() if k != "labels"}


@torch.no_grad()
def _logits(model, batch):
    model.eval()
    return model(**_model_inputs(batch)).logits


@torch.no_grad()
def _perturb(model, names=None, scale=0.05, seed=3):
    """Move the (named, else trainable) weights: what training a task does."""
    generator = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if (names is None and p.requires_grad) or (names is not None and name in names):
            p.add_(torch.randn(p.shape, generator=generator) * scale)


def _peft(model, adapter="default"):
    from peft import get_peft_model

    peft_model = get_peft_model(model, lora_config(init_lora_weights=False), adapter_name=adapter)
    return peft_model


def _stand_in(model):
    return SimpleNamespace(model=model)


def _end_task(plugin, model):
    plugin.on_task_end(_stand_in(model), None)


# --------------------------------------------------------------------------------------------------- options
@pytest.mark.parametrize(
    "values,field",
    [
        ({"distill_lambda": -1.0}, "distill_lambda"),
        ({"distill_lambda": float("nan")}, "distill_lambda"),
        ({"distill_lambda": "1"}, "distill_lambda"),
        ({"divergence": "kl"}, "divergence"),
        ({"divergence": "jsd", "beta": 1.5}, "beta"),
        ({"divergence": "jsd", "beta": -0.1}, "beta"),
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -2.0}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"positions": "all"}, "positions"),
        ({"teacher": "self"}, "teacher"),
        ({"teacher": True}, "teacher"),
        ({"feature_layers": [-1]}, "feature_layers"),
        ({"feature_layers": [0, 0]}, "feature_layers"),
        ({"feature_layers": ["0"]}, "feature_layers"),
        ({"feature_layers": [True]}, "feature_layers"),
        ({"feature_layers": "0"}, "feature_layers"),
        ({"feature_lambda": -0.5}, "feature_lambda"),
        ({"feature_layers": [1], "feature_lambda": 0.0}, "feature_lambda"),
    ],
)
def test_every_bad_option_is_refused_naming_its_field(values, field):
    with pytest.raises(OptionError, match=rf"DistillationConfig\.{field}=") as info:
        DistillationConfig(**values)
    assert info.value.field == field


def test_beta_set_for_a_kl_divergence_is_ignored_with_a_warning(caplog):
    """Not an error: every option can be set on its own (the registry's option audit sets one at a time)."""
    with caplog.at_level(logging.WARNING, logger="hf_adaptive.distillation.plugin"):
        plugin = DistillationPlugin(divergence="reverse_kl", beta=0.9)
    assert plugin.config.trl_beta == 1.0
    assert "beta=0.9 is ignored with divergence='reverse_kl'" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hf_adaptive.distillation.plugin"):
        DistillationPlugin(divergence="jsd", beta=0.9)
        DistillationPlugin(divergence="forward_kl")
    assert "ignored" not in caplog.text


def test_option_refusals_that_compare_two_fields_name_both():
    with pytest.raises(OptionError, match=r"DistillationConfig\.feature_layers=\[0\]"):
        DistillationConfig(feature_layers=[0], feature_lambda=0)


def test_options_are_offered_under_the_distill_prefix_and_restated_under_their_option_names():
    (source,) = DISTILLATION_OPTIONS
    assert set(source.names().values()) == {
        "distill_lambda",
        "distill_divergence",
        "distill_beta",
        "distill_temperature",
        "distill_positions",
        "distill_teacher",
        "distill_feature_layers",
        "distill_feature_lambda",
    }
    options = options_dataclass("Options", DISTILLATION_OPTIONS)()
    assert options.distill_feature_layers == [] and options.distill_lambda == 1.0
    options.distill_temperature = 0
    with pytest.raises(OptionError, match=r"ContinualConfig\.distill_temperature=0"):
        build_config(source, options, owner="ContinualConfig")
    plugin = DistillationPlugin.from_config(
        SimpleNamespace(distill_feature_layers=[1, 0], distill_divergence="jsd", distill_beta=0.2)
    )
    assert plugin.config.feature_layers == (0, 1) and plugin.config.trl_beta == 0.2


def test_option_values_are_normalised():
    config = DistillationConfig(distill_lambda=2, feature_layers=1, temperature=3)
    assert config.feature_layers == (1,) and isinstance(config.distill_lambda, float)
    assert isinstance(config.temperature, float)
    assert DistillationPlugin(positions="sequence").needs_full_logits
    assert not DistillationPlugin().needs_full_logits
    assert DistillationPlugin(feature_layers=(0,)).term_names == ("distillation", "distillation_features")
    assert DistillationPlugin(distill_lambda=0, feature_layers=(0,)).term_names == ("distillation_features",)
    assert not DistillationPlugin(distill_lambda=0).enabled


def test_a_feature_layer_beyond_the_model_is_refused(tiny_model):
    plugin = DistillationPlugin(feature_layers=(0, 5))
    with pytest.raises(OptionError, match=r"DistillationConfig\.feature_layers=\[0, 5\].*< 2"):
        plugin.on_task_begin(_stand_in(tiny_model), None)


# ------------------------------------------------------------------------------------------ explicit teacher
def test_a_teacher_with_another_vocabulary_is_refused(tiny_model, tokenizer):
    from transformers import GemmaForCausalLM

    from hf_adaptive.models.tiny import tiny_gemma_config

    other = GemmaForCausalLM(tiny_gemma_config(len(tokenizer) + 8))
    plugin = DistillationPlugin(teacher=other)
    size = len(tokenizer)
    with pytest.raises(ValueError, match=rf"teacher's vocabulary has {size + 8} tokens and the model's has {size}"):
        plugin.bind(_stand_in(tiny_model))
    with pytest.raises(ValueError, match=rf"has {size + 8} tokens and the model's has {size}"):
        DistillationPlugin(teacher=other).on_task_begin(_stand_in(tiny_model), None)
    with pytest.raises(OptionError, match=r"DistillationConfig\.teacher='google/gemma-2b'"):
        DistillationPlugin(teacher="google/gemma-2b")  # a string is the option
    with pytest.raises(OptionError, match=r"DistillationPlugin\.teacher='int' is not allowed: a teacher model"):
        DistillationPlugin(teacher=3)
    assert DistillationPlugin(teacher="base").teacher_kind == "base"
    assert DistillationPlugin(DistillationConfig(teacher="base"), teacher=other).teacher_kind == "model"


def test_explicit_teacher_term_equals_the_divergence_from_that_model(tokenizer, batch):
    from hf_adaptive.distillation.losses import distillation_loss, position_mask
    from hf_adaptive.models import build_tiny_gemma

    student, _ = build_tiny_gemma(tokenizer, seed=0)
    teacher, _ = build_tiny_gemma(tokenizer, seed=1)
    reference = copy.deepcopy(teacher)
    plugin = DistillationPlugin(DistillationConfig(temperature=2.0), teacher=teacher)
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    assert plugin.has_teacher()  # from the first task on
    student.train()
    outputs = student(**batch)
    (term,) = plugin.loss_terms(_stand_in(student), student, batch, outputs)
    mask = position_mask("answer", batch["labels"].shape[1], labels=batch["labels"])
    expected = distillation_loss(outputs.logits, _logits(reference, batch), mask, 0.0, 2.0)
    assert term.name == "distillation" and term.weight == 1.0
    torch.testing.assert_close(term.value, expected)
    assert float(term.value.detach()) > 0
    term.value.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in student.parameters())


# ------------------------------------------------------------------------------------- previous-task teacher
def test_no_term_on_the_first_task(tiny_model, batch):
    plugin = DistillationPlugin(feature_layers=(1,))
    plugin.on_task_begin(_stand_in(tiny_model), None)
    tiny_model.train()
    outputs = tiny_model(**batch)
    assert not plugin.has_teacher()
    assert plugin.loss_terms(_stand_in(tiny_model), tiny_model, batch, outputs) == []


def test_previous_task_teacher_of_a_full_model_is_the_model_at_the_task_end(tiny_model, batch, caplog):
    model = tiny_model
    at_end = copy.deepcopy(model)
    expected = _logits(at_end, batch)
    plugin = DistillationPlugin()
    with caplog.at_level(logging.WARNING, logger="hf_adaptive.distillation.plugin"):
        _end_task(plugin, model)
    assert "frozen copy of all its weights" in caplog.text
    assert plugin.snapshot_kind == "full" and plugin.tasks_seen == 1
    params = dict(model.named_parameters())
    assert set(plugin.snapshot) == set(params)
    for name, tensor in plugin.snapshot.items():
        assert torch.equal(tensor, params[name].detach()) and tensor.data_ptr() != params[name].data_ptr()

    _perturb(model)  # the next task trains
    moved = {n: p.detach().clone() for n, p in model.named_parameters()}
    teacher_logits, _ = plugin.teacher_forward(model, batch)
    torch.testing.assert_close(teacher_logits, expected)
    assert not torch.allclose(_logits(model, batch), expected, atol=1e-4)  # the student moved
    for name, p in model.named_parameters():  # the teacher's forward wrote nothing into the model
        assert torch.equal(p, moved[name])
    for name, tensor in plugin.snapshot.items():
        assert torch.equal(tensor, at_end.get_parameter(name))


def test_previous_task_teacher_of_a_lora_model_copies_only_the_adapters(tokenizer, batch):
    from hf_adaptive.models import build_tiny_gemma

    model = _peft(build_tiny_gemma(tokenizer, seed=0)[0])
    expected = _logits(copy.deepcopy(model), batch)
    plugin = DistillationPlugin()
    _end_task(plugin, model)
    assert plugin.snapshot_kind == "adapters" and plugin.snapshot_adapter == "default"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(plugin.snapshot) == trainable and all("lora_" in n for n in trainable)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    assert 0 < plugin.snapshot_bytes() < weights / 10

    _perturb(model)
    teacher_logits, _ = plugin.teacher_forward(model, batch)
    torch.testing.assert_close(teacher_logits, expected)
    assert not torch.allclose(_logits(model, batch), expected, atol=1e-4)


def test_previous_task_teacher_runs_the_previous_expert_under_lora_per_task(tokenizer, batch):
    """One adapter per task: the teacher of task 2 is the base with task 1's expert, whatever trains now."""
    from hf_adaptive.models import build_tiny_gemma

    model = _peft(build_tiny_gemma(tokenizer, seed=0)[0], adapter="expert_a")
    expected = _logits(copy.deepcopy(model), batch)
    plugin = DistillationPlugin()
    _end_task(plugin, model)
    assert plugin.snapshot_adapter == "expert_a"
    model.add_adapter("expert_b", lora_config(init_lora_weights=False))
    model.set_adapter("expert_b")
    plugin.on_task_begin(_stand_in(model), None)  # adds expert_b's (inactive for the teacher) tensors
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    assert any(v for n, v in flags.items() if "expert_b" in n) and not any(
        v for n, v in flags.items() if "expert_a" in n
    )
    _perturb(model)
    teacher_logits, _ = plugin.teacher_forward(model, batch)
    torch.testing.assert_close(teacher_logits, expected)
    assert model.active_adapter == "expert_b"
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_base_teacher_is_the_model_with_its_adapters_disabled(tokenizer, batch):
    from hf_adaptive.models import build_tiny_gemma

    base = build_tiny_gemma(tokenizer, seed=0)[0]
    expected = _logits(copy.deepcopy(base), batch)
    model = _peft(base)
    assert not torch.allclose(_logits(model, batch), expected, atol=1e-4)  # the adapters change the outputs
    plugin = DistillationPlugin(teacher="base")
    plugin.on_task_begin(_stand_in(model), None)
    assert plugin.has_teacher() and plugin.snapshot == {}
    teacher_logits, _ = plugin.teacher_forward(model, batch)
    torch.testing.assert_close(teacher_logits, expected)
    with torch.no_grad(), model.disable_adapter():
        torch.testing.assert_close(teacher_logits, model(**_model_inputs(batch)).logits)
    _end_task(plugin, model)
    assert plugin.snapshot == {}  # nothing is copied for the base teacher


def test_base_teacher_needs_adapters(tiny_model):
    with pytest.raises(OptionError, match=r"DistillationConfig\.teacher='base'.*no LoRA adapters"):
        DistillationPlugin(teacher="base").on_task_begin(_stand_in(tiny_model), None)


@pytest.mark.parametrize("teacher", ["previous_task", "base"])
def test_the_teacher_forward_leaves_the_students_gradients_exact(tokenizer, batch, teacher):
    """The loss through the plugin has the gradient of the same loss against fixed, separately computed teacher
    logits and hidden states: nothing of the teacher's forward leaks into the student's graph."""
    from hf_adaptive.distillation.losses import distillation_loss, feature_loss, position_mask
    from hf_adaptive.models import build_tiny_gemma

    base = build_tiny_gemma(tokenizer, seed=0)[0]
    reference_base = copy.deepcopy(base)
    model = _peft(base)
    plugin = DistillationPlugin(DistillationConfig(teacher=teacher, divergence="jsd", feature_layers=(1,)))
    if teacher == "previous_task":
        reference = copy.deepcopy(model)
        _end_task(plugin, model)
        _perturb(model)
    else:
        reference = reference_base
    plugin.on_task_begin(_stand_in(model), None)
    model.train()
    outputs = model(**batch)
    terms = plugin.loss_terms(_stand_in(model), model, batch, outputs)
    assert [t.name for t in terms] == ["distillation", "distillation_features"]
    grads = torch.autograd.grad(sum(t.value for t in terms), [p for p in model.parameters() if p.requires_grad])

    captured = {}
    hook = reference.get_submodule("model.layers.1" if teacher == "base" else "base_model.model.model.layers.1")
    handle = hook.register_forward_hook(lambda m, a, out: captured.update(out=out))
    teacher_logits = _logits(reference, batch)
    handle.remove()
    model.train()
    student_hidden = {}
    handle = model.base_model.model.model.layers[1].register_forward_hook(
        lambda m, a, out: student_hidden.update(out=out)
    )
    outputs = model(**batch)
    handle.remove()
    mask = position_mask("answer", batch["labels"].shape[1], labels=batch["labels"])
    expected = distillation_loss(outputs.logits, teacher_logits, mask, 0.5) + feature_loss(
        student_hidden["out"], captured["out"], mask
    )
    expected_grads = torch.autograd.grad(expected, [p for p in model.parameters() if p.requires_grad])
    torch.testing.assert_close(sum(t.value for t in terms).detach(), expected.detach())
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert float(expected.detach()) > 0


def test_the_feature_term_reads_the_students_own_forward(tiny_model, batch):
    """Another training forward between the trainer's and `loss_terms` (another plugin's) is not mistaken for it."""
    plugin = DistillationPlugin(DistillationConfig(distill_lambda=0.0, feature_layers=(0,)))
    _end_task(plugin, tiny_model)
    plugin.on_task_begin(_stand_in(tiny_model), None)
    tiny_model.train()
    outputs = tiny_model(**batch)
    tiny_model(input_ids=batch["input_ids"][:2, :5])  # e.g. a replay forward
    (term,) = plugin.loss_terms(_stand_in(tiny_model), tiny_model, batch, outputs)
    assert term.name == "distillation_features" and float(term.value.detach()) == 0.0  # the teacher is this very model
    tiny_model(input_ids=batch["input_ids"][:2, :5])
    with pytest.raises(RuntimeError, match="were not recorded"):
        plugin.loss_terms(_stand_in(tiny_model), tiny_model, batch, outputs)


# ----------------------------------------------------------------------------------------------------- state
def test_state_round_trip_distills_from_the_same_teacher(tokenizer, batch, tmp_path):
    from hf_adaptive.models import build_tiny_gemma

    model = _peft(build_tiny_gemma(tokenizer, seed=0)[0])
    expected = _logits(copy.deepcopy(model), batch)
    plugin = DistillationPlugin()
    _end_task(plugin, model)
    _end_task(plugin, model)
    _perturb(model)
    save_state(tmp_path / "distillation", plugin.state_dict())

    restored = DistillationPlugin()
    restored.bind(_stand_in(model))
    restored.load_state_dict(load_state(tmp_path / "distillation"))
    assert restored.tasks_seen == 2 and restored.snapshot_adapter == "default"
    assert restored.snapshot_kind == "adapters" and set(restored.snapshot) == set(plugin.snapshot)
    for name, tensor in plugin.snapshot.items():
        assert torch.equal(restored.snapshot[name], tensor)
    teacher_logits, _ = restored.teacher_forward(model, batch)
    torch.testing.assert_close(teacher_logits, expected)


def test_loaded_state_is_checked(tiny_model, tokenizer):
    from hf_adaptive.models import build_tiny_gemma

    plugin = DistillationPlugin()
    _end_task(plugin, tiny_model)
    state = plugin.state_dict()
    name = "model.layers.0.self_attn.q_proj.weight"

    bad = {**state, "snapshot": {**state["snapshot"], name: torch.zeros(3, 3)}}
    loader = DistillationPlugin()
    loader.bind(_stand_in(tiny_model))
    with pytest.raises(StateLoadError, match=rf"snapshot\['{name}'\]\.shape=\(3, 3\) is not allowed"):
        loader.load_state_dict(bad)
    with pytest.raises(OptionError, match=r"DistillationPlugin\.teacher='base'.*written with teacher 'previous_task'"):
        DistillationPlugin(teacher="base").load_state_dict(state)
    with pytest.raises(StateLoadError, match="tasks_seen=-1"):
        DistillationPlugin().load_state_dict({**state, "tasks_seen": -1})
    with pytest.raises(StateLoadError, match="no teacher snapshot"):
        DistillationPlugin().load_state_dict({**state, "snapshot": {}})
    with pytest.raises(StateLoadError, match="NaN"):
        DistillationPlugin().load_state_dict({**state, "snapshot": {name: torch.full((2,), math.nan)}})

    # names the model has not got yet (saved from a peft model, loaded before peft wraps it): checked at first use
    peft_state = DistillationPlugin()
    _end_task(peft_state, _peft(build_tiny_gemma(tokenizer, seed=0)[0]))
    later = DistillationPlugin()
    later.bind(_stand_in(tiny_model))
    later.load_state_dict(peft_state.state_dict())
    with pytest.raises(StateLoadError, match="names no parameter of the model"):
        later.teacher_forward(tiny_model, {"input_ids": torch.tensor([[2, 5, 6]])})


# ------------------------------------------------------------------------------------------ through the trainer
def _prepared_trainer(tmp_path, tokenizer, make_args, plugin, **overrides):
    from hf_adaptive.models import build_tiny_gemma

    model, _ = build_tiny_gemma(tokenizer, seed=0)
    values = dict(adapter_strategy="shared_lora", lora_dropout=0.0)
    values.update(overrides)
    trainer = ContinualTrainer(
        model=model, args=make_args(tmp_path, **values), processing_class=tokenizer, callbacks=[plugin]
    )
    trainer._prepare_task(_ragged_task("first_color"), 0)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    plugin.on_task_begin(trainer, trainer.task_context)
    return trainer


def _terms_and_grads(trainer, plugin, rows):
    """One `compute_loss` on the trainer's own collation of `rows`: the logged terms, the trainable parameters'
    gradients, and how many logit columns the plugin saw out of how many input columns."""
    batch = trainer.data_collator(rows)
    model = trainer.model
    model.train()
    model.zero_grad()
    seen = []
    original = plugin.loss_terms
    plugin.loss_terms = lambda t, m, inputs, outputs: (
        seen.append(outputs.logits.shape[1]) or original(t, m, inputs, outputs)
    )
    trainer._term_sums.clear()
    trainer._term_counts.clear()
    try:
        trainer.compute_loss(model, dict(batch)).backward()
    finally:
        del plugin.loss_terms
    terms = {n: float(v) for n, v in trainer._term_sums.items()}
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return terms, grads, seen[0], batch["input_ids"].shape[1]


def test_answer_only_logits_on_and_off_give_the_same_terms(tmp_path, tokenizer, make_args):
    """The teacher runs on the inputs the model got (`logits_to_keep` and cut labels included): with answer-only
    logits (left padding, the last k columns) the terms and gradients equal those of full logits (right padding)."""
    results = {}
    for on in (True, False):
        config = DistillationConfig(teacher="base", divergence="jsd", temperature=2.0, feature_layers=(0, 1))
        plugin = DistillationPlugin(config)
        trainer = _prepared_trainer(tmp_path / str(on), tokenizer, make_args, plugin, answer_only_logits=on)
        assert trainer._answer_only_wanted(trainer.model) == on
        assert trainer.data_collator.padding_side == ("left" if on else "right")
        data = trainer.train_dataset
        rows = [{k: data[i][k] for k in ("input_ids", "attention_mask", "labels")} for i in range(8)]
        results[on] = _terms_and_grads(trainer, plugin, rows)

    (terms, grads, columns, width), (full_terms, full_grads, full_columns, full_width) = results[True], results[False]
    assert columns < width and full_columns == full_width  # the plugin saw cut logits, then whole ones
    assert set(terms) == {"task", "distillation", "distillation_features"} == set(full_terms)
    for name, value in terms.items():
        assert value == pytest.approx(full_terms[name], rel=1e-5, abs=1e-6), name
        assert value > 0
    for name, grad in grads.items():
        torch.testing.assert_close(grad, full_grads[name], atol=1e-6, rtol=1e-4, msg=name)


def test_sequence_positions_turn_answer_only_logits_off(tmp_path, tokenizer, make_args):
    plugin = DistillationPlugin(DistillationConfig(teacher="base", positions="sequence"))
    trainer = _prepared_trainer(tmp_path, tokenizer, make_args, plugin)
    assert not trainer._answer_only_wanted(trainer.model)
    assert trainer.data_collator.padding_side == "right"


class _Probe(ContinualPlugin):
    """Placed before the distillation plugin: at every task end, the trainable weights, the distillation
    plugin's teacher snapshot (still the previous task's) and the task's training logs."""

    name = "probe"

    def __init__(self, distillation: DistillationPlugin) -> None:
        self.distillation = distillation
        self.weights: list[dict[str, torch.Tensor]] = []
        self.snapshots: list[dict[str, torch.Tensor]] = []
        self.logs: list[list[dict]] = []

    def on_task_end(self, trainer, context: TaskContext) -> None:
        model = trainer.model
        self.weights.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
        self.snapshots.append({n: t.clone() for n, t in self.distillation.snapshot.items()})
        self.logs.append([dict(log) for log in trainer.state.log_history if "loss" in log])


@pytest.mark.parametrize("strategy", ["shared_lora", "full"])
def test_two_task_sequence_distills_from_the_first_task(tmp_path, tokenizer, make_args, strategy):
    from hf_adaptive.models import build_tiny_gemma

    tasks = builtin_suite(["first_color", "last_color"], n_train=16, n_eval=8, seed=0)
    args = make_args(
        tmp_path,
        learning_rate=5e-3,
        adapter_strategy=strategy,
        lora_dropout=0.0,
        evaluate_unseen_tasks=False,
        save_results_plot=False,
        save_strategy="steps",  # end-of-task snapshots (read below) follow the save settings
        save_steps=10_000,
    )
    plugin = DistillationPlugin(DistillationConfig(distill_lambda=0.5, feature_layers=(1,), feature_lambda=2.0))
    probe = _Probe(plugin)
    model, _ = build_tiny_gemma(tokenizer, seed=0)
    trainer = ContinualTrainer(model=model, args=args, processing_class=tokenizer, callbacks=[probe, plugin])
    result = trainer.train_sequence(tasks, evaluate_baseline=False)

    assert len(result.matrix) == 2 and plugin.tasks_seen == 2
    first, second = probe.logs
    assert len(first) == 2 and len(second) == 2  # 16 rows / batch 8
    assert not any("loss_distillation" in log or "loss_distillation_features" in log for log in first)
    # the first step of task 2 starts from its teacher: nothing to distill yet; then the model moves away from it
    assert second[0]["loss_distillation"] == pytest.approx(0.0, abs=1e-7)
    assert second[0]["loss_distillation_features"] == pytest.approx(0.0, abs=1e-7)
    assert all(log["loss_distillation"] > 0 and log["weight_distillation"] == 0.5 for log in second[1:])
    last = second[-1]  # the terms enter the training loss with their weights
    total = last["loss_task"] + 0.5 * last["loss_distillation"] + 2.0 * last["loss_distillation_features"]
    assert last["loss"] == pytest.approx(total, rel=1e-5)
    assert all("loss_distillation_features" in log and log["weight_distillation_features"] == 2.0 for log in second)
    # the teacher of task 2 is the model at the end of task 1 and did not follow task 2's training
    assert probe.snapshots[0] == {}
    teacher = probe.snapshots[1]
    end_of_first, end_of_second = probe.weights
    assert set(end_of_first) <= set(teacher)
    for name, value in end_of_first.items():
        assert torch.equal(teacher[name], value), name
    assert any(not torch.equal(end_of_second[n], end_of_first[n]) for n in end_of_first)
    if strategy == "shared_lora":
        assert plugin.snapshot_kind == "adapters" and all("lora_" in n for n in teacher)
    else:
        assert plugin.snapshot_kind == "full"
    # the end-of-task snapshot holds the teacher: a restored plugin has the newest one
    saved = next(tmp_path.glob("**/continual/distillation"))
    restored = DistillationPlugin(DistillationConfig(distill_lambda=0.5, feature_layers=(1,), feature_lambda=2.0))
    restored.load_state_dict(load_state(saved))
    assert restored.tasks_seen == 2 and set(restored.snapshot) == set(plugin.snapshot)
    for name, tensor in plugin.snapshot.items():
        assert torch.equal(restored.snapshot[name], tensor.cpu())
    assert result.extra["distillation_teacher"] == "previous_task"
    assert result.extra["distillation_snapshot_bytes"] == plugin.snapshot_bytes() > 0
