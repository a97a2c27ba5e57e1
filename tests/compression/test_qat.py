"""`QATPlugin` on the tiny Gemma: after `prepare` the decoder's Linear layers fake-quantize (the forward is the
reference quantize-dequantize, gradients flow straight through), after `convert` they are really quantized with the
same scheme and the logits equal the fake-quantized forward; the plugin acts on the tasks it is told to, through a
`ContinualTrainer.train_sequence` run; options are validated; the state round-trips."""

from __future__ import annotations

import copy
import dataclasses
import json
from types import SimpleNamespace

import pytest
import torch
from transformers import TrainingArguments

from hf_adaptive.compression.config import QAT_OPTIONS, QuantizationAwareTrainingConfig
from hf_adaptive.compression.qat import QATPlugin, fake_quantized_linears
from hf_adaptive.compression.quantization import (
    MANIFEST_KEY,
    compression_manifest,
    load_quantized,
    quantize_model,
    quantized_linears,
    save_quantized,
)
from hf_adaptive.plugins import ContinualPlugin
from hf_adaptive.utils.io import StateLoadError, load_state, save_state
from hf_adaptive.utils.options import build_config, check_unique_options, options_dataclass
from hf_adaptive.utils.validation import OptionError

pytest.importorskip("torchao")

EPS = torch.finfo(torch.float32).eps
SCHEMES = ("int8_weight_only", "int8_dynamic", "8da4w")
#: max |converted logit - fake-quantized logit| / max |logit| (measured: 0, the same arithmetic)
CONVERT_TOLERANCE = 1e-5


# ------------------------------------------------------------------------------------ reference fake quantization
class _STE(torch.autograd.Function):
    """Forward: the quantize-dequantized value; backward: the identity (straight-through)."""

    @staticmethod
    def forward(ctx, x, fake):
        return fake

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def fake_symmetric(w: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    g = w.detach().reshape(-1, group)
    scale = (g.abs().amax(dim=1, keepdim=True) / ((qmax - qmin) / 2)).clamp(min=EPS)
    return ((g * (1.0 / scale)).round().clamp(qmin, qmax) * scale).reshape(w.shape)


def fake_tokens(x: torch.Tensor) -> torch.Tensor:
    flat = x.detach().reshape(-1, x.shape[-1])
    lo, hi = flat.amin(dim=1, keepdim=True).clamp(max=0), flat.amax(dim=1, keepdim=True).clamp(min=0)
    scale = ((hi - lo) / 255).clamp(min=EPS)
    zero = (-128 - (lo / scale).round()).clamp(-128, 127)
    return ((((flat * (1.0 / scale)).round() + zero).clamp(-128, 127) - zero) * scale).reshape(x.shape)


class _Reference(torch.nn.Module):
    """A Linear computing F.linear(STE(fq(x)), STE(fq(W))) with the float layer's own parameters."""

    def __init__(self, linear: torch.nn.Linear, scheme: str, group_size: int = 32) -> None:
        super().__init__()
        self.linear, self.scheme = linear, scheme
        self.bits, self.group = (4, group_size) if scheme == "8da4w" else (8, linear.in_features)

    def forward(self, x):
        w = self.linear.weight
        w = _STE.apply(w, fake_symmetric(w, self.bits, self.group))
        if self.scheme != "int8_weight_only":
            x = _STE.apply(x, fake_tokens(x))
        return torch.nn.functional.linear(x, w, self.linear.bias)


def reference_model(model, scheme: str):
    ref = copy.deepcopy(model)
    head = ref.get_output_embeddings()
    for module in list(ref.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear) and child is not head:
                setattr(module, child_name, _Reference(child, scheme))
    return ref


def rel_max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _bind(plugin: QATPlugin, model, **trainer) -> QATPlugin:
    plugin.bind(SimpleNamespace(model=model, **trainer))  # what the plugin reads of a trainer
    return plugin


@pytest.fixture
def batch(tiny_batch):
    return {k: tiny_batch[k] for k in ("input_ids", "attention_mask", "labels")}


def _logits(model, batch):
    model.eval()
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return out[batch["attention_mask"].bool()]


# ------------------------------------------------------------------------------------------------------ options
def test_defaults_and_option_names():
    config = QuantizationAwareTrainingConfig()
    assert (config.scheme, config.group_size, config.include_lm_head) == ("8da4w", 32, False)
    assert (config.tasks, config.recovery_steps, config.convert_at_end) == ("last", 50, True)
    names = QAT_OPTIONS[0].names()
    assert names == {f: f"qat_{f}" for f in ("scheme", "group_size", "include_lm_head", "tasks", "recovery_steps",
                                             "convert_at_end")}  # fmt: skip
    # no other plugin's option and no TrainingArguments field has one of these names
    from hf_adaptive.registry import all_option_sources

    reserved = [f.name for f in dataclasses.fields(TrainingArguments)]
    check_unique_options([*all_option_sources(), *QAT_OPTIONS], reserved=reserved)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("scheme", "int4_weight_only"),
        ("group_size", 0),
        ("group_size", "32"),
        ("include_lm_head", 1),
        ("tasks", "first"),
        ("tasks", None),
        ("recovery_steps", 0),
        ("recovery_steps", 2.5),
        ("convert_at_end", "true"),
    ],
)
def test_every_bad_option_names_its_field(field, value):
    with pytest.raises(OptionError, match=rf"QuantizationAwareTrainingConfig\.{field}=.* is not allowed"):
        QuantizationAwareTrainingConfig(**{field: value})


def test_the_options_parse_as_flags():
    from transformers import HfArgumentParser

    mixin = options_dataclass("QATOptions", QAT_OPTIONS)
    flags = ["--qat_scheme", "int8_dynamic", "--qat_tasks", "recovery", "--qat_recovery_steps", "7"]
    flags += ["--qat_convert_at_end", "false", "--qat_group_size", "64"]
    (parsed,) = HfArgumentParser(mixin).parse_args_into_dataclasses(flags)
    config = build_config(QAT_OPTIONS[0], parsed, owner="ContinualConfig")
    assert (config.scheme, config.tasks, config.recovery_steps) == ("int8_dynamic", "recovery", 7)
    assert (config.convert_at_end, config.group_size, config.include_lm_head) == (False, 64, False)


def test_from_config_reads_the_prefixed_options():
    plugin = QATPlugin.from_config(SimpleNamespace(qat_scheme="int8_weight_only", qat_tasks="all"))
    assert (plugin.config.scheme, plugin.config.tasks) == ("int8_weight_only", "all")
    with pytest.raises(OptionError, match=r"SimpleNamespace\.qat_tasks='first' is not allowed: choose one of"):
        QATPlugin.from_config(SimpleNamespace(qat_tasks="first"))


def test_the_options_reach_the_plugin_through_a_composed_config():
    """What the registry would do: `ContinualConfig`'s options composed with the existing plugins' (simulated: the
    config class is composed here from every registry source plus QAT_OPTIONS)."""
    from hf_adaptive.registry import all_option_sources

    composed = options_dataclass("Composed", [*all_option_sources(), *QAT_OPTIONS])
    values = {
        "qat_scheme": "int8_dynamic",
        "qat_group_size": 64,
        "qat_include_lm_head": True,
        "qat_tasks": "recovery",
        "qat_recovery_steps": 7,
        "qat_convert_at_end": False,
    }
    default = composed()
    assert all(getattr(default, k) != v for k, v in values.items())
    plugin = QATPlugin.from_config(composed(**values))
    assert {f"qat_{k}": v for k, v in dataclasses.asdict(plugin.config).items()} == values


# ---------------------------------------------------------------------------------------------- prepare / convert
@pytest.mark.parametrize("scheme", SCHEMES)
def test_prepare_fake_quantizes_the_decoder_linears(tiny_model, batch, scheme):
    float_model = copy.deepcopy(tiny_model)
    params = dict(tiny_model.named_parameters())
    keys = set(tiny_model.state_dict())
    plugin = _bind(QATPlugin(scheme=scheme), tiny_model)
    plugin.prepare()
    fake = fake_quantized_linears(tiny_model)
    assert len(fake) == 14 and "lm_head" not in fake
    assert (
        type(tiny_model.lm_head) is torch.nn.Linear and tiny_model.lm_head.weight is params["model.embed_tokens.weight"]
    )
    # the same Parameter objects, the same state-dict keys: optimizer and checkpoints are unchanged
    assert all(p is params[n] for n, p in tiny_model.named_parameters()) and set(tiny_model.state_dict()) == keys
    assert plugin.prepare() is tiny_model and fake_quantized_linears(tiny_model) == fake  # idempotent
    # the forward: the reference quantize-dequantize, which differs from fp32 by quantization noise
    fq, ref, fp32 = (
        _logits(tiny_model, batch),
        _logits(reference_model(float_model, scheme), batch),
        _logits(float_model, batch),
    )
    assert rel_max_error(fq, ref) <= 1e-5
    assert rel_max_error(fq, fp32) > 1e-5


def _group_max(weight: torch.Tensor, group: int) -> torch.Tensor:
    """True at the element of largest |w| of every group (the one that sets the group's scale)."""
    flat = weight.detach().reshape(-1, group)
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[torch.arange(flat.shape[0]), flat.abs().argmax(dim=1)] = True
    return mask.reshape(weight.shape)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_gradients_flow_straight_through(tiny_model, batch, scheme):
    """The gradient of every weight equals the straight-through reference's (rounding passes the gradient as is),
    except at the element of largest |w| of each group: it sets the scale, and torchao's clamp (and scale) also
    shape its gradient."""
    reference = reference_model(tiny_model, scheme)
    _bind(QATPlugin(scheme=scheme), tiny_model).prepare()
    tiny_model.train()
    reference.train()
    tiny_model(**batch).loss.backward()
    reference(**batch).loss.backward()
    ref_grads = dict(reference.named_parameters())
    for name, param in tiny_model.named_parameters():
        quantized = "_proj." in name
        got, expected = param.grad, ref_grads[name.replace(".weight", ".linear.weight") if quantized else name].grad
        assert got is not None and bool(torch.isfinite(got).all()) and float(got.abs().sum()) > 0, name
        same = torch.isclose(got, expected, rtol=1e-4, atol=1e-7)
        if quantized:
            group = 32 if scheme == "8da4w" else param.shape[1]
            at_max = _group_max(param, group)
            assert bool(same[~at_max].all()), name
        else:
            assert bool(same.all()), name


@pytest.mark.parametrize("scheme", SCHEMES)
def test_convert_gives_real_quantized_weights_that_compute_the_fake_forward(tiny_model, batch, tmp_path, scheme):
    plugin = _bind(QATPlugin(scheme=scheme), tiny_model)
    plugin.prepare()
    with torch.no_grad():  # move off the initial weights, as training would
        for p in tiny_model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.01)
    trained = copy.deepcopy(tiny_model)
    fq = _logits(tiny_model, batch)
    plugin.convert()
    expected_class = "IntxUnpackedToInt8Tensor"  # QAT converts with the Intx family (QATConfig's base configs)
    names = fake_quantized_linears(trained)
    assert quantized_linears(tiny_model) == {n: expected_class for n in names} and not fake_quantized_linears(
        tiny_model
    )
    assert rel_max_error(_logits(tiny_model, batch), fq) <= CONVERT_TOLERANCE
    # the same model as post-training quantization of the trained weights with the QAT-compatible config
    ptq = copy.deepcopy(trained)
    for module_name in names:  # the trained float model: the fake layers swapped back to float Linear
        parent, _, child = module_name.rpartition(".")
        owner = ptq.get_submodule(parent)
        setattr(owner, child, getattr(owner, child).to_linear())
    quantize_model(ptq, scheme, qat_compatible=True)
    assert torch.equal(_logits(ptq, batch), _logits(tiny_model, batch))
    record = compression_manifest(tiny_model)
    assert (record["method"], record["scheme"], record["quantized_linears"], record["qat_compatible"]) == (
        "qat",
        scheme,
        14,
        True,
    )
    assert plugin.converted and plugin.report()["converted"]
    with pytest.raises(ValueError, match="already converted"):
        plugin.prepare()
    # saves and reloads like a quantize_model result
    save_quantized(tiny_model, tmp_path / "q")
    assert torch.equal(_logits(load_quantized(tmp_path / "q"), batch), _logits(tiny_model, batch))


def test_convert_needs_a_prepared_model_and_lora_is_refused(tiny_model):
    with pytest.raises(ValueError, match="nothing to convert"):
        _bind(QATPlugin(), tiny_model).convert()
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(copy.deepcopy(tiny_model), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="LoRA adapters; merge them first"):
        _bind(QATPlugin(), lora).prepare()
    with pytest.raises(OptionError, match=r"QATPlugin\.group_size=48 is not allowed: 'model\.layers\.0\."):
        _bind(QATPlugin(group_size=48), tiny_model).prepare()


def test_include_lm_head_fake_quantizes_the_tied_head_and_unties_it_at_convert(tiny_model, batch, tmp_path):
    embedding = tiny_model.get_input_embeddings().weight
    plugin = _bind(QATPlugin(include_lm_head=True), tiny_model)
    plugin.prepare()
    assert "lm_head" in fake_quantized_linears(tiny_model)
    assert tiny_model.lm_head.weight is embedding  # still one trained weight while fake-quantized
    fq = _logits(tiny_model, batch)
    plugin.convert()
    assert quantized_linears(tiny_model)["lm_head"] == "IntxUnpackedToInt8Tensor"
    assert tiny_model.get_input_embeddings().weight is embedding and type(embedding) is torch.nn.Parameter
    assert tiny_model.config.tie_word_embeddings is False
    assert rel_max_error(_logits(tiny_model, batch), fq) <= CONVERT_TOLERANCE
    save_quantized(tiny_model, tmp_path / "q")
    assert torch.equal(_logits(load_quantized(tmp_path / "q"), batch), _logits(tiny_model, batch))


# ------------------------------------------------------------------------------------------------------- schedule
def _run_train(plugin, model, max_steps, task=None, tasks=None, start=0):
    """The hooks one `train()` calls, in the Trainer's order, with a global step that starts at `start`."""
    trainer = plugin.trainer
    trainer.current_task_index, trainer.tasks = task, tasks
    trainer.current_task = None if task is None else f"task{task}"
    state = SimpleNamespace(global_step=start, max_steps=max_steps)
    trainer.state = state
    plugin.on_train_begin(None, state, None, model=model)
    prepared = []
    for _ in range(start, max_steps):
        plugin.on_step_begin(None, state, None, model=model)
        prepared.append(bool(fake_quantized_linears(model)))
        state.global_step += 1
        plugin.on_step_end(None, state, None, model=model)
    plugin.on_train_end(None, state, None, model=model)
    if task is not None:
        plugin.on_task_end(trainer, None)
    return prepared


@pytest.mark.parametrize(
    ("tasks", "expected_task0", "expected_task1", "prepared_at"),
    [
        ("last", [False] * 4, [True] * 4, {"task": 1, "step": 0}),
        ("all", [True] * 4, [True] * 4, {"task": 0, "step": 0}),
        ("recovery", [False] * 4, [False, True, True, True], {"task": 1, "step": 1}),
    ],
)
def test_the_plugin_acts_on_the_tasks_it_is_told(tiny_model, tasks, expected_task0, expected_task1, prepared_at):
    plugin = _bind(QATPlugin(tasks=tasks, recovery_steps=3), tiny_model)
    stream = ["a", "b"]
    assert _run_train(plugin, tiny_model, 4, task=0, tasks=stream) == expected_task0
    assert not quantized_linears(tiny_model)  # nothing converted after the first task
    assert _run_train(plugin, tiny_model, 4, task=1, tasks=stream) == expected_task1
    assert plugin.converted and len(quantized_linears(tiny_model)) == 14
    report = plugin.report()
    assert report["prepared_at"] == prepared_at
    assert report["fake_quant_steps"] == sum(expected_task0) + sum(expected_task1)
    with pytest.raises(ValueError, match="cannot train again"):
        _run_train(plugin, tiny_model, 4, task=1, tasks=stream)


def test_a_plain_train_is_the_last_task_and_convert_at_end_can_be_off(tiny_model):
    plugin = _bind(QATPlugin(convert_at_end=False), tiny_model)
    assert _run_train(plugin, tiny_model, 3) == [True] * 3
    assert not plugin.converted and len(fake_quantized_linears(tiny_model)) == 14
    plugin.convert()
    assert plugin.converted and len(quantized_linears(tiny_model)) == 14


def test_recovery_longer_than_the_task_covers_the_whole_task(tiny_model, caplog):
    plugin = _bind(QATPlugin(tasks="recovery", recovery_steps=10), tiny_model)
    with caplog.at_level("WARNING", logger="hf_adaptive.compression.qat"):
        assert _run_train(plugin, tiny_model, 3) == [True] * 3
    assert "recovery_steps=10 >= the 3 steps" in caplog.text


# ---------------------------------------------------------------------------------------------------------- state
def test_state_round_trip_and_resume(tiny_model, tmp_path):
    """The state survives save / load; a resumed run (its model rebuilt in float) is fake-quantized again at the
    next train() of a task the plugin acts on, with the counters continued."""
    plugin = _bind(QATPlugin(tasks="all"), tiny_model)
    _run_train(plugin, tiny_model, 3, task=0, tasks=["a", "b"])
    save_state(tmp_path / "qat", plugin.state_dict())
    state = load_state(tmp_path / "qat")
    assert state == plugin.state_dict() and json.loads((tmp_path / "qat" / "state.json").read_text())

    fresh = copy.deepcopy(tiny_model)
    for parent in [m for m in fresh.modules()]:  # the resumed process builds the model in float
        for name, child in list(parent.named_children()):
            if type(child).__name__ == "FakeQuantizedLinear":
                setattr(parent, name, child.to_linear())
    assert not fake_quantized_linears(fresh)
    resumed = _bind(QATPlugin(tasks="all"), fresh)
    resumed.load_state_dict(state)
    assert resumed.report() == plugin.report()
    _run_train(resumed, fresh, 3, task=1, tasks=["a", "b"])
    assert resumed.converted and resumed.fake_quant_steps == 6 and resumed.prepared_at == {"task": 0, "step": 0}


def test_loading_a_state_of_another_scheme_or_damaged_is_refused(tiny_model):
    state = QATPlugin().state_dict()
    with pytest.raises(OptionError, match=r"QATPlugin\.scheme='int8_dynamic' is not allowed: the saved state was"):
        QATPlugin(scheme="int8_dynamic").load_state_dict(state)
    with pytest.raises(OptionError, match=r"QATPlugin\.group_size=64 is not allowed"):
        QATPlugin(group_size=64).load_state_dict(state)
    for key, value in (("fake_quant_steps", -1), ("converted", "no"), ("prepared_at", [0]), ("modules", "q_proj")):
        with pytest.raises(StateLoadError, match=rf"QATPlugin state {key}="):
            QATPlugin().load_state_dict({**state, key: value})


# ------------------------------------------------------------------------------------------------ a task sequence
def test_a_task_sequence_trains_the_last_task_fake_quantized_and_ends_quantized(
    tiny_model, tokenizer, tmp_path, make_args
):
    from hf_adaptive.tasks import builtin_suite
    from hf_adaptive.trainer import ContinualTrainer

    class Watch(ContinualPlugin):  # records, per step, whether the model fake-quantizes
        name = "watch"

        def __init__(self):
            self.steps: list[bool] = []
            self.evaluated: list[int] = []

        def on_step_end(self, args, state, control, model=None, **kwargs):
            self.steps.append(bool(fake_quantized_linears(model)))

        def on_task_end(self, trainer, context):
            self.evaluated.append(len(quantized_linears(trainer.model)))

    tasks = builtin_suite(["first_color", "has_cat"], n_train=16, n_eval=8, seed=0)
    args = make_args(tmp_path, evaluate_unseen_tasks=False, save_results_plot=False, save_strategy="epoch")
    plugin, watch = QATPlugin(scheme="8da4w", tasks="last"), Watch()
    trainer = ContinualTrainer(model=tiny_model, args=args, processing_class=tokenizer, callbacks=[plugin, watch])
    result = trainer.train_sequence(tasks, evaluate_baseline=False)

    assert watch.steps == [False, False, True, True]  # 16 rows / batch 8 per task: task 2 fake-quantized
    assert watch.evaluated == [0, 14]  # the last row of the matrix scores the quantized model
    assert all(0.0 <= a <= 1.0 for a in result.matrix[1])
    report = result.extra["qat"]
    assert report["converted"] and report["fake_quant_steps"] == 2 and report["prepared_at"] == {"task": 1, "step": 0}
    assert len(quantized_linears(trainer.model)) == 14
    # the end-of-task snapshot holds the quantized model in torchao's safetensors format, and reloads to it
    (snapshot,) = [p for p in tmp_path.iterdir() if p.is_dir() and p.name.startswith("snapshot")]
    saved = json.loads((snapshot / "config.json").read_text())
    assert saved["quantization_config"]["quant_method"] == "torchao" and saved[MANIFEST_KEY]["method"] == "qat"
    batch = tokenizer(["the first color is red"], return_tensors="pt")
    again = load_quantized(snapshot)
    trainer.model.eval()
    with torch.no_grad():
        assert torch.equal(again(**batch).logits, trainer.model(**batch).logits)
    assert load_state(snapshot / "continual" / "qat")["converted"] is True


def test_with_gradual_pruning_the_zeros_are_made_permanent_before_the_conversion(
    tiny_model, tokenizer, tmp_path, make_args
):
    """In a sequence QAT converts at the end of the last task, after every callback's on_train_end: pruning (listed
    after it) makes its zeros permanent on the float weights first, and they quantize to exact zeros."""
    from hf_adaptive.compression.gradual_pruning import GradualPruningPlugin
    from hf_adaptive.tasks import builtin_suite
    from hf_adaptive.trainer import ContinualTrainer

    tasks = builtin_suite(["first_color"], n_train=16, n_eval=8, seed=0)
    args = make_args(tmp_path, evaluate_unseen_tasks=False, save_results_plot=False)
    pruning = GradualPruningPlugin(final_sparsity=0.5, begin_step=0, num_updates=1, frequency=1)
    qat = QATPlugin(scheme="int8_weight_only")
    trainer = ContinualTrainer(model=tiny_model, args=args, processing_class=tokenizer, callbacks=[qat, pruning])
    trainer.train_sequence(tasks, evaluate_baseline=False)
    assert qat.converted and pruning.permanent
    modules = dict(trainer.model.named_modules())
    for name in quantized_linears(trainer.model):
        zeros = float((modules[name].weight.dequantize() == 0).float().mean())
        assert zeros >= 0.5, name
