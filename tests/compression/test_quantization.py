"""Post-training quantization through torchao on the tiny Gemma: each scheme quantizes exactly what a plain-torch
reference quantization computes, keeps the logits within a stated tolerance of fp32, leaves the LM head and the
embeddings float unless asked, shrinks the Linear layers on disk by the scheme's ratio, saves and reloads to the
same logits; and the card / Hub push of a compressed model."""

from __future__ import annotations

import copy
import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_adaptive.compression.config import QuantizationConfig
from hf_adaptive.compression.hub import CompressedCardInfo, HubPushError, compressed_model_card, push_compressed
from hf_adaptive.compression.quantization import (
    INSTALL_HINT,
    MANIFEST_KEY,
    compression_manifest,
    linear_targets,
    load_quantized,
    model_size_bytes,
    module_bytes,
    quantize_model,
    quantized_linears,
    require_torchao,
    save_quantized,
    tensor_bytes,
    torchao_config,
)
from hf_adaptive.utils.validation import OptionError

pytest.importorskip("torchao")

SCHEMES = ("int8_weight_only", "int8_dynamic", "8da4w")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
EPS = torch.finfo(torch.float32).eps

#: stated tolerances against the fp32 model, on every real (non-padding) position of a batch of task prompts:
#: max |logit difference| / max |fp32 logit|. Measured on the tiny Gemma (seed 0): 4.7e-4 (int8 weight-only),
#: 8.2e-4 (int8 dynamic), 7.5e-3 (8da4w, group 32); the bounds leave 6-10x margin. The top-1 token must agree at
#: >= 99% of the positions (measured: 100%).
FP32_TOLERANCE = {"int8_weight_only": 5e-3, "int8_dynamic": 5e-3, "8da4w": 5e-2}
TOP1_AGREEMENT = 0.99
TASKS = ("first_color", "last_color", "has_cat")


# ------------------------------------------------------------------------------- the slow obvious reference
def fake_symmetric(weight: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Symmetric quantize-dequantize of each row's groups of `group` columns: scale = max|w| / ((qmax - qmin) / 2),
    q = clamp(round(w · (1 / scale)), qmin, qmax) (torchao's `choose_qparams_affine` / `quantize_affine`)."""
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    g = weight.detach().reshape(-1, group)
    scale = (g.abs().amax(dim=1, keepdim=True) / ((qmax - qmin) / 2)).clamp(min=EPS)
    return ((g * (1.0 / scale)).round().clamp(qmin, qmax) * scale).reshape(weight.shape)


def fake_tokens_asymmetric(x: torch.Tensor) -> torch.Tensor:
    """int8 asymmetric quantize-dequantize per token (last dim): the range [min(x, 0), max(x, 0)] on 256 levels."""
    flat = x.reshape(-1, x.shape[-1])
    lo, hi = flat.amin(dim=1, keepdim=True).clamp(max=0), flat.amax(dim=1, keepdim=True).clamp(min=0)
    scale = ((hi - lo) / 255).clamp(min=EPS)
    zero = (-128 - (lo / scale).round()).clamp(-128, 127)
    q = ((flat * (1.0 / scale)).round() + zero).clamp(-128, 127)
    return ((q - zero) * scale).reshape(x.shape)


def fake_tokens_symmetric(x: torch.Tensor) -> torch.Tensor:
    flat = x.reshape(-1, x.shape[-1])
    scale = (flat.abs().amax(dim=1, keepdim=True) / 127.5).clamp(min=EPS)
    return ((flat * (1.0 / scale)).round().clamp(-128, 127) * scale).reshape(x.shape)


def weight_bits_group(scheme: str, in_features: int, group_size: int = 32) -> tuple[int, int]:
    return (4, group_size) if scheme == "8da4w" else (8, in_features)


def activation_fake(scheme: str, qat_compatible: bool):
    if scheme == "int8_weight_only":
        return None
    return fake_tokens_asymmetric if scheme == "8da4w" or qat_compatible else fake_tokens_symmetric


def reference_model(model, scheme: str, qat_compatible: bool = False, include_lm_head: bool = False):
    """The float model with every targeted Linear's weight replaced by its quantize-dequantize and, for the dynamic
    schemes, its input quantize-dequantized per token by a forward pre-hook."""
    ref = copy.deepcopy(model)
    head = ref.get_output_embeddings()
    act = activation_fake(scheme, qat_compatible)
    for module in list(ref.modules()):
        if not isinstance(module, torch.nn.Linear) or (module is head and not include_lm_head):
            continue
        bits, group = weight_bits_group(scheme, module.in_features)
        module.weight = torch.nn.Parameter(fake_symmetric(module.weight, bits, group))
        if act is not None:
            module.register_forward_pre_hook(lambda mod, args, act=act: (act(args[0]),))
    return ref


def rel_max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def batch(tokenizer):
    from hf_adaptive.tasks import CausalLMCollator, builtin_suite, tokenize_task

    tasks = builtin_suite(list(TASKS), n_train=8, n_eval=8, seed=0)
    rows = [row for task in tasks for row in tokenize_task(task, tokenizer)]
    full = CausalLMCollator(tokenizer)(rows[:24])
    return {"input_ids": full["input_ids"], "attention_mask": full["attention_mask"]}


def logits(model, batch) -> torch.Tensor:
    """The logits of the real (non-padding) positions."""
    model.eval()
    with torch.no_grad():
        out = model(**batch).logits
    return out[batch["attention_mask"].bool()]


# ------------------------------------------------------------------------------------------------- options
def test_schemes_map_to_the_torchao_configs():
    from torchao.quantization import (
        Int8DynamicActivationInt8WeightConfig,
        Int8DynamicActivationIntxWeightConfig,
        Int8WeightOnlyConfig,
        IntxWeightOnlyConfig,
        PerAxis,
        PerGroup,
    )

    assert type(torchao_config("int8_weight_only")) is Int8WeightOnlyConfig
    dynamic = torchao_config("int8_dynamic")
    assert type(dynamic) is Int8DynamicActivationInt8WeightConfig and not dynamic.set_inductor_config
    w4 = torchao_config("8da4w", group_size=64)
    assert type(w4) is Int8DynamicActivationIntxWeightConfig
    assert (w4.weight_dtype, w4.weight_granularity) == (torch.int4, PerGroup(64))
    # the QAT-compatible forms: the base configs torchao's QATConfig can fake-quantize
    w8 = torchao_config("int8_weight_only", qat_compatible=True)
    assert type(w8) is IntxWeightOnlyConfig and (w8.weight_dtype, w8.granularity) == (torch.int8, PerAxis(0))
    d8 = torchao_config("int8_dynamic", qat_compatible=True)
    assert type(d8) is Int8DynamicActivationIntxWeightConfig
    assert (d8.weight_dtype, d8.weight_granularity) == (torch.int8, PerAxis(0))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("scheme", "int4_weight_only"),
        ("scheme", 8),
        ("group_size", 0),
        ("group_size", 16.0),
        ("group_size", True),
        ("include_lm_head", "yes"),
    ],
)
def test_every_bad_option_names_its_field(field, value):
    with pytest.raises(OptionError, match=rf"QuantizationConfig\.{field}=.* is not allowed"):
        QuantizationConfig(**{field: value})


def test_quantize_model_refuses_bad_input_naming_it(tiny_model):
    with pytest.raises(OptionError, match=r"QuantizationConfig\.scheme='int4' is not allowed: choose one of"):
        quantize_model(tiny_model, "int4")
    with pytest.raises(OptionError, match=r"quantize_model\.qat_compatible='yes' is not allowed"):
        quantize_model(tiny_model, "8da4w", qat_compatible="yes")
    # 8da4w groups input columns: 48 divides neither 64 (attention, gate/up) nor 128 (down_proj)
    with pytest.raises(
        OptionError, match=r"quantize_model\.group_size=48 is not allowed: 'model\.layers\.0\.self_attn"
    ):
        quantize_model(tiny_model, "8da4w", group_size=48)
    assert quantized_linears(tiny_model) == {}  # refused before anything changed


def test_a_model_with_lora_or_already_quantized_is_refused(tiny_model):
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(copy.deepcopy(tiny_model), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="carries LoRA adapters; merge them first"):
        quantize_model(lora, "int8_weight_only")
    quantize_model(tiny_model, "int8_weight_only")
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(tiny_model, "8da4w")


def test_missing_torchao_names_the_install_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)  # `import torchao` raises ImportError
    with pytest.raises(ImportError, match=rf"torchao >= 0\.18.*{re.escape(INSTALL_HINT)}"):
        require_torchao()


def test_the_modules_import_without_torchao():
    """torchao is imported inside the functions: the package (and its options) import without it."""
    code = (
        "import sys; sys.modules['torchao'] = None\n"
        "import hf_adaptive.compression.quantization, hf_adaptive.compression.qat, hf_adaptive.compression.hub\n"
        "from hf_adaptive.compression import QAT_OPTIONS\n"
        "print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


# ---------------------------------------------------------------------------------------------- numerics
@pytest.mark.parametrize("qat_compatible", [False, True])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_each_quantized_linear_computes_the_reference_quantization(tiny_model, scheme, qat_compatible):
    """Layer by layer, on random inputs of several scales: the torchao layer's output equals the float layer with the
    reference quantize-dequantize of its weight (and input, for the dynamic schemes)."""
    float_model = copy.deepcopy(tiny_model)
    quantize_model(tiny_model, scheme, qat_compatible=qat_compatible)
    act = activation_fake(scheme, qat_compatible)
    floats = dict(float_model.named_modules())
    gen = torch.Generator().manual_seed(0)
    for name, module in tiny_model.named_modules():
        if name not in quantized_linears(tiny_model):
            continue
        original = floats[name]
        x = torch.randn(3, 5, original.in_features, generator=gen) * torch.tensor([0.1, 1.0, 30.0]).reshape(3, 1, 1)
        bits, group = weight_bits_group(scheme, original.in_features)
        expected = torch.nn.functional.linear(
            x if act is None else act(x), fake_symmetric(original.weight, bits, group)
        )
        with torch.no_grad():
            got = module(x)
        assert rel_max_error(got, expected) <= 1e-5, name


@pytest.mark.parametrize("qat_compatible", [False, True])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_the_quantized_model_is_the_reference_model(tiny_model, batch, scheme, qat_compatible):
    """The whole model equals the reference model (float arithmetic on quantize-dequantized values). int8_dynamic
    (not QAT-compatible) multiplies int8 by int8 exactly, then rescales: a float rounding difference can move one
    activation across a rounding boundary in a later layer, so it is checked layer by layer above instead."""
    ref = logits(reference_model(tiny_model, scheme, qat_compatible), batch)
    got = logits(quantize_model(tiny_model, scheme, qat_compatible=qat_compatible), batch)
    if scheme == "int8_dynamic" and not qat_compatible:
        assert rel_max_error(got, ref) <= 1e-3
    else:
        assert rel_max_error(got, ref) <= 1e-5


@pytest.mark.parametrize("scheme", SCHEMES)
def test_logits_stay_within_the_stated_tolerance_of_fp32(tiny_model, batch, scheme):
    fp32 = logits(tiny_model, batch)
    got = logits(quantize_model(tiny_model, scheme), batch)
    error = rel_max_error(got, fp32)
    assert 1e-5 < error <= FP32_TOLERANCE[scheme]  # quantized (not a no-op), and within the stated bound
    assert float((got.argmax(-1) == fp32.argmax(-1)).float().mean()) >= TOP1_AGREEMENT


@pytest.mark.parametrize("scheme", SCHEMES)
def test_only_the_decoder_linears_are_quantized(tiny_model, scheme):
    embedding = tiny_model.get_input_embeddings().weight
    before = {n: p.detach().clone() for n, p in tiny_model.named_parameters()}
    quantize_model(tiny_model, scheme)
    expected_class = "IntxUnpackedToInt8Tensor" if scheme == "8da4w" else "Int8Tensor"
    names = {f"model.layers.{i}.{part}.{p}" for i in range(2) for part, ps in (("self_attn", PROJECTIONS[:4]),
             ("mlp", PROJECTIONS[4:])) for p in ps}  # fmt: skip
    assert quantized_linears(tiny_model) == {n: expected_class for n in names}
    # the LM head is still the (tied) float embedding, untouched; norms and embeddings unchanged
    assert tiny_model.lm_head.weight is tiny_model.get_input_embeddings().weight is embedding
    assert type(embedding) is torch.nn.Parameter
    for name, param in tiny_model.named_parameters():
        if not any(f".{p}." in name for p in PROJECTIONS):
            assert torch.equal(param, before[name]), name
    assert not any(p.requires_grad for n, p in tiny_model.named_parameters() if any(f".{q}." in n for q in PROJECTIONS))


def test_include_lm_head_unties_and_quantizes_the_head(tiny_model, batch, tmp_path):
    embedding = tiny_model.get_input_embeddings().weight.detach().clone()
    ref = logits(reference_model(tiny_model, "8da4w", include_lm_head=True), batch)
    quantize_model(tiny_model, "8da4w", include_lm_head=True)
    assert quantized_linears(tiny_model)["lm_head"] == "IntxUnpackedToInt8Tensor"
    assert torch.equal(tiny_model.get_input_embeddings().weight, embedding)  # the embeddings stay float
    assert tiny_model.config.tie_word_embeddings is False
    got = logits(tiny_model, batch)
    assert rel_max_error(got, ref) <= 1e-5
    save_quantized(tiny_model, tmp_path / "q")
    again = load_quantized(tmp_path / "q")
    assert again.lm_head.weight is not again.get_input_embeddings().weight
    assert torch.equal(logits(again, batch), got)


# ------------------------------------------------------------------------------------------------- on disk
def _linear_bytes_expected(scheme: str, out_features: int, in_features: int, group: int = 32) -> int:
    """int8 values (8da4w's 4-bit values too: torchao's portable layout stores them unpacked, one per byte) plus
    one float32 scale and one int8 zero point per row (int8) or per row and group (8da4w)."""
    groups = in_features // group if scheme == "8da4w" else 1
    return out_features * in_features + out_features * groups * (4 + 1)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_the_linear_layers_shrink_on_disk_by_the_schemes_ratio(tiny_model, tmp_path, scheme):
    tiny_model.save_pretrained(tmp_path / "fp32")
    quantize_model(tiny_model, scheme)
    save_quantized(tiny_model, tmp_path / "q")
    fp32, quantized = module_bytes(tmp_path / "fp32"), module_bytes(tmp_path / "q")
    modules = dict(tiny_model.named_modules())
    names = list(quantized_linears(tiny_model))
    for name in names:
        layer = modules[name]
        assert fp32[name] == 4 * layer.in_features * layer.out_features
        assert quantized[name] == _linear_bytes_expected(scheme, layer.out_features, layer.in_features), name
    ratio = sum(fp32[n] for n in names) / sum(quantized[n] for n in names)
    assert ratio == pytest.approx(3.75 if scheme != "8da4w" else 3.4, abs=0.12)  # ~4x less the scales' overhead
    # everything else is saved as it was (the embeddings, tied to the head, once; the norms)
    others = set(fp32) - set(names)
    assert {n: quantized[n] for n in others} == {n: fp32[n] for n in others}
    assert model_size_bytes(tmp_path / "q") < model_size_bytes(tmp_path / "fp32") / 2.5
    assert sum(tensor_bytes(tmp_path / "q").values()) < model_size_bytes(tmp_path / "q")


@pytest.mark.parametrize("scheme", SCHEMES)
def test_save_and_reload_give_the_same_logits(tiny_model, tokenizer, batch, tmp_path, scheme):
    got = logits(quantize_model(tiny_model, scheme), batch)
    save_quantized(tiny_model, tmp_path / "q", tokenizer)
    files = sorted(p.name for p in (tmp_path / "q").iterdir())
    assert "model.safetensors" in files and not [f for f in files if f.endswith((".bin", ".pt", ".pkl"))]
    assert not list(tmp_path.glob(".q.tmp"))  # the temporary folder was renamed
    saved = json.loads((tmp_path / "q" / "config.json").read_text())
    assert saved["quantization_config"]["quant_method"] == "torchao"
    record = saved[MANIFEST_KEY]
    assert (record["method"], record["scheme"], record["quantized_linears"]) == ("ptq", scheme, 14)
    assert record["skipped_linears"] == ["lm_head"]
    again = load_quantized(tmp_path / "q")
    assert quantized_linears(again) == quantized_linears(tiny_model)
    assert torch.equal(logits(again, batch), got)
    assert compression_manifest(again) == record


def test_load_checks_what_was_saved(tiny_model, tmp_path, caplog):
    tiny_model.save_pretrained(tmp_path / "float")
    with pytest.raises(ValueError, match="declares no torchao quantization"):
        load_quantized(tmp_path / "float")
    with pytest.raises(ValueError, match="carries no torchao quantizer"):
        save_quantized(tiny_model, tmp_path / "nope")
    quantize_model(tiny_model, "int8_weight_only")
    save_quantized(tiny_model, tmp_path / "q")
    config_file = tmp_path / "q" / "config.json"
    saved = json.loads(config_file.read_text())
    saved[MANIFEST_KEY]["quantized_linears"] = 13
    config_file.write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="reloaded 14 quantized Linear layers, the manifest records 13"):
        load_quantized(tmp_path / "q")
    saved[MANIFEST_KEY].update(quantized_linears=14, torchao_version="0.0.1")
    config_file.write_text(json.dumps(saved))
    with caplog.at_level("WARNING", logger="hf_adaptive.compression.quantization"):
        load_quantized(tmp_path / "q")
    assert "saved with torchao 0.0.1" in caplog.text


def test_evaluation_of_a_quantized_model_scores_every_task(tiny_model, tokenizer, tmp_path, make_args):
    """What a finished sequence measures: the accuracy on every task, fp32 and quantized (int8: the same answers)."""
    from hf_adaptive.tasks import builtin_suite
    from hf_adaptive.trainer import ContinualTrainer

    tasks = builtin_suite(list(TASKS), n_train=8, n_eval=16, seed=0)
    args = make_args(tmp_path, evaluate_unseen_tasks=True)
    trainer = ContinualTrainer(model=tiny_model, args=args, processing_class=tokenizer)
    fp32 = trainer.evaluate_tasks(tasks)
    quantize_model(trainer.model, "int8_weight_only")
    quantized = trainer.evaluate_tasks(tasks)
    assert len(quantized) == 3 and all(0.0 <= a <= 1.0 for a in quantized)
    assert max(abs(a - b) for a, b in zip(quantized, fp32)) <= 1 / 16


def test_linear_targets_skip_only_the_head(tiny_model):
    targets, skipped = linear_targets(tiny_model)
    assert skipped == ["lm_head"] and len(targets) == 14
    targets, skipped = linear_targets(tiny_model, include_lm_head=True)
    assert skipped == [] and targets[-1] == "lm_head"


# --------------------------------------------------------------------------------------------- model card
ACCURACY = {"first_color": 0.75, "last_color": 0.5, "has_cat": 1.0}
REFERENCE = {"first_color": 0.8125, "last_color": 0.5, "has_cat": 1.0}


def _front_matter(card: str) -> dict:
    import yaml

    _, front, _ = card.split("---\n", 2)
    return yaml.safe_load(front)


def test_the_card_states_method_scheme_bits_and_accuracy_per_task(tiny_model):
    quantize_model(tiny_model, "8da4w", group_size=64)
    info = CompressedCardInfo.from_model(
        tiny_model, ACCURACY, reference_accuracy=REFERENCE, base_model="tiny/gemma", size_bytes=1000,
        reference_size_bytes=4000,
    )  # fmt: skip
    card = compressed_model_card(info, "alice/tiny-8da4w")
    assert "post-training quantization" in card and "| scheme | `8da4w` |" in card
    assert "| weight bits | 4 |" in card and "| activation bits | 8 (dynamic, per token) |" in card
    assert "| group size | 64 |" in card and "| sparsity | - |" in card
    assert "| quantized Linear layers | 14 |" in card and "| layers kept in float | `lm_head` |" in card
    assert "0.250 of the float model's" in card
    assert "| first_color | 0.7500 | 0.8125 | -0.0625 |" in card
    assert "| last_color | 0.5000 | 0.5000 | +0.0000 |" in card
    assert "| **mean** | 0.7500 | 0.7708 | -0.0208 |" in card
    meta = _front_matter(card)
    assert meta["base_model"] == "tiny/gemma" and {"hf_adaptive", "ptq", "torchao", "8da4w"} <= set(meta["tags"])
    assert 'from_pretrained("alice/tiny-8da4w")' in card


def test_the_card_of_a_pruned_and_quantized_model_states_the_sparsity():
    info = CompressedCardInfo(ACCURACY, method="qat", scheme="int8_dynamic", sparsity=0.5)
    card = compressed_model_card(info, "alice/x")
    assert "quantization-aware training" in card and "pruned to sparsity 0.5000" in card
    assert "| sparsity | 0.5000 |" in card and "| weight bits | 8 |" in card and "| group size | - |" in card
    assert "| task | accuracy |" in card and "| **mean** | 0.7500 |" in card
    pruned = compressed_model_card(CompressedCardInfo(ACCURACY, method="pruning", sparsity=0.7), "alice/y")
    assert "gradual magnitude pruning" in pruned and "| weight bits | float (not quantized) |" in pruned
    assert "pruned" in _front_matter(pruned)["tags"]


def test_card_values_cannot_break_the_card():
    info = CompressedCardInfo(
        {"a|b\nc": 0.5}, method="ptq", scheme="int8_weight_only", base_model="x\nlicense: mit", description="`x`|y"
    )
    card = compressed_model_card(info, "alice/z")
    meta = _front_matter(card)
    assert meta["base_model"] == "x\nlicense: mit" and "license" not in meta
    assert "| a\\|b c | 0.5000 |" in card and "'x'\\|y" in card


@pytest.mark.parametrize(
    ("values", "match"),
    [
        (dict(accuracy={}), r"accuracy=\{\} is not allowed"),
        (dict(accuracy={"t": 1.5}), r"accuracy\['t'\]=1\.5 is not allowed"),
        (dict(accuracy={"t": float("nan")}), r"accuracy\['t'\]=nan is not allowed"),
        (dict(reference_accuracy={"other": 0.5}), r"reference_accuracy=\['other'\] is not allowed: must name the same"),
        (dict(method=None), r"method=None is not allowed"),
        (dict(method="distillation"), r"method='distillation' is not allowed"),
        (dict(scheme="int4"), r"scheme='int4' is not allowed"),
        (dict(method="pruning", scheme=None), r"sparsity=None is not allowed"),
        (dict(sparsity=1.2), r"sparsity=1\.2 is not allowed"),
        (dict(size_bytes=-1), r"size_bytes=-1 is not allowed"),
    ],
)
def test_card_info_refuses_bad_values(values, match):
    base = dict(accuracy={"t": 0.5}, method="ptq", scheme="8da4w")
    with pytest.raises(OptionError, match=rf"CompressedCardInfo\.{match}"):
        CompressedCardInfo(**{**base, **values})


# ---------------------------------------------------------------------------------------------------- Hub
@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A Hub-compatible server on 127.0.0.1 (tests/hub_server.py), the client online and its cache in tmp."""
    import huggingface_hub.constants as constants

    tests = Path(__file__).resolve().parents[1]
    monkeypatch.syspath_prepend(str(tests))
    from hub_server import HubServer

    with socket.socket() as probe:  # the loopback interface is there
        probe.bind(("127.0.0.1", 0))
    server = HubServer(tmp_path / "hub").start()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    yield server
    server.stop()


def test_push_to_a_hub_and_reload(hub, tiny_model, tokenizer, batch, tmp_path):
    from huggingface_hub import hf_hub_download, snapshot_download

    got = logits(quantize_model(tiny_model, "int8_dynamic"), batch)
    info = CompressedCardInfo.from_model(tiny_model, ACCURACY, reference_accuracy=REFERENCE)
    oid = push_compressed(tiny_model, "alice/tiny-int8", info, tokenizer=tokenizer, endpoint=hub.endpoint, token="t")
    assert len(oid) == 40 and sum(path.endswith("/commit/main") for _, path in hub.requests) == 1
    local = snapshot_download("alice/tiny-int8", endpoint=hub.endpoint, cache_dir=tmp_path / "cache")
    card = Path(local, "README.md").read_text()
    assert "| scheme | `int8_dynamic` |" in card and "| has_cat | 1.0000 | 1.0000 | +0.0000 |" in card
    model_files = [
        p for p in Path(local).iterdir() if p.name in ("model.safetensors", "config.json", "generation_config.json")
    ]
    assert f"| size on disk | {sum(p.stat().st_size for p in model_files):,} bytes" in card
    assert Path(local, "tokenizer.json").is_file()
    again = load_quantized(local)
    assert torch.equal(logits(again, batch), got)
    assert hf_hub_download("alice/tiny-int8", "config.json", endpoint=hub.endpoint, cache_dir=tmp_path / "c2")


def test_a_failed_push_is_a_hub_push_error_naming_the_step(hub, tiny_model):
    quantize_model(tiny_model, "int8_weight_only")
    info = CompressedCardInfo.from_model(tiny_model, ACCURACY)
    hub.fail = {"commit": 500}
    with pytest.raises(HubPushError, match=r"'alice/broken' .* failed while committing \d+ files \(HTTP 500\)"):
        push_compressed(tiny_model, "alice/broken", info, endpoint=hub.endpoint, token="t")
    with pytest.raises(ValueError, match=r"push_compressed\.timeout=0 is not allowed"):
        push_compressed(tiny_model, "alice/broken", info, endpoint=hub.endpoint, timeout=0)
