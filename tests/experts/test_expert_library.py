"""ExpertLibrary on real peft adapters over the tiny Gemma."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from hf_adaptive.experts import ExpertLibrary, Router, RouterConfig


def _randomize(library: ExpertLibrary, name: str, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in library.model.named_parameters():
            if f".{name}." in n and "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def _deltas(library: ExpertLibrary, name: str) -> dict[str, torch.Tensor]:
    """ΔW = B·A·scaling of every LoRA layer of `name`, computed by hand (the slow, obvious reference)."""
    out = {}
    for mod_name, mod in library.model.named_modules():
        if hasattr(mod, "lora_A") and name in mod.lora_A:
            out[mod_name] = mod.lora_B[name].weight @ mod.lora_A[name].weight * mod.scaling[name]
    return out


def _logits(library: ExpertLibrary, ids: torch.Tensor) -> torch.Tensor:
    library.model.eval()
    with torch.no_grad():
        return library.model(input_ids=ids).logits


@pytest.fixture
def ids():
    return torch.randint(4, 60, (2, 9), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def library(tiny_model):
    lib = ExpertLibrary(tiny_model, experiment_id="exp1", base_model_name="tiny-gemma")
    lib.create("expert_x", task_id="first_color")
    _randomize(lib, "expert_x", 1)
    lib.create("expert_y", task_id="has_cat")
    _randomize(lib, "expert_y", 2)
    return lib


def test_create_tags_and_activate(library, ids):
    assert library.names == ["expert_x", "expert_y"]
    assert library.experts["expert_x"].task_id == "first_color"
    assert library.experts["expert_x"].experiment_id == "exp1"
    library.activate("expert_x")
    assert library.active == ["expert_x"]
    trainable = {n for n, p in library.model.named_parameters() if p.requires_grad}
    assert trainable and all(".expert_x." in n for n in trainable)
    x = _logits(library, ids)
    library.activate("expert_y")
    assert not torch.allclose(x, _logits(library, ids))
    with library.disable_adapters():
        base = _logits(library, ids)
    assert not torch.allclose(x, base)


def test_bad_names_are_refused(library):
    with pytest.raises(ValueError, match="an expert with that name exists"):
        library.create("expert_x")
    with pytest.raises(ValueError, match="ExpertLibrary.name='bad name'"):
        library.create("bad name")
    with pytest.raises(KeyError, match="unknown expert"):
        library.activate("nope")


def test_fork_copies_weights_and_stays_independent(library, ids):
    library.fork("expert_x", "expert_z", task_id="last_color")
    assert library.experts["expert_z"].parent == "expert_x"
    dx, dz = _deltas(library, "expert_x"), _deltas(library, "expert_z")
    assert dx.keys() == dz.keys()
    for k in dx:
        torch.testing.assert_close(dx[k], dz[k])
    assert library.active == ["expert_z"]
    _randomize(library, "expert_z", 7)
    for k, v in _deltas(library, "expert_x").items():
        torch.testing.assert_close(v, dx[k])  # the source did not move


@pytest.mark.parametrize("combination_type", ["cat", "svd"])
def test_merge_of_one_adapter_with_weight_one_returns_it(library, ids, combination_type):
    library.merge(["expert_x"], "merged", weights=[1.0], combination_type=combination_type)
    ref, got = _deltas(library, "expert_x"), _deltas(library, "merged")
    assert ref.keys() == got.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], atol=1e-5, rtol=1e-4)
    library.activate("expert_x")
    x = _logits(library, ids)
    library.activate("merged")
    torch.testing.assert_close(_logits(library, ids), x, atol=1e-5, rtol=1e-4)
    assert library.experts["merged"].merged_from == ["expert_x"]


def test_cat_merge_is_the_weighted_sum_of_updates(library):
    library.merge(["expert_x", "expert_y"], "mix", weights=[0.3, 0.7], combination_type="cat")
    dx, dy, dm = _deltas(library, "expert_x"), _deltas(library, "expert_y"), _deltas(library, "mix")
    for k in dm:
        torch.testing.assert_close(dm[k], 0.3 * dx[k] + 0.7 * dy[k], atol=1e-5, rtol=1e-4)


def test_merge_validation(library):
    with pytest.raises(ValueError, match="combination_type='linear'"):
        library.merge(["expert_x"], "m", combination_type="linear")
    with pytest.raises(ValueError, match="one weight per source"):
        library.merge(["expert_x", "expert_y"], "m", weights=[1.0])


def test_compose_adds_the_updates(library, ids):
    library.compose(["expert_x", "expert_y"])
    assert library.active == ["expert_x", "expert_y"]
    both = _logits(library, ids)
    library.merge(["expert_x", "expert_y"], "sum", weights=[1.0, 1.0], combination_type="cat")
    library.activate("sum")
    torch.testing.assert_close(_logits(library, ids), both, atol=1e-5, rtol=1e-4)


def test_delete_and_prune(library):
    router = Router(RouterConfig(dim=4))
    library.router = router
    for n in library.names:
        router.add_expert(n, torch.randn(4))
    library.create("expert_unused", activate=False)
    router.add_expert("expert_unused", torch.randn(4))
    dropped = library.prune(min_uses=1)
    assert dropped == ["expert_unused"]
    assert "expert_unused" not in library and "expert_unused" not in router
    assert not any(".expert_unused." in n for n, _ in library.model.named_parameters())
    library.delete("expert_x")
    assert library.names == ["expert_y"]
    with pytest.raises(ValueError, match="last expert"):
        library.delete("expert_y")


def test_save_load_round_trip_and_plain_peft(library, ids, tmp_path, tokenizer):
    from peft import PeftModel

    from hf_adaptive.models import build_tiny_gemma

    library.set_metrics("expert_x", accuracy=0.75)
    library.router = Router(RouterConfig(dim=4))
    library.router.add_expert("expert_x", torch.tensor([1.0, 0, 0, 0]))
    expected = {}
    for n in library.names:
        library.activate(n)
        expected[n] = _logits(library, ids)
    library.save(tmp_path / "lib")
    assert (tmp_path / "lib" / "experts" / "expert_x" / "adapter_model.safetensors").is_file()

    loaded = ExpertLibrary.load(tmp_path / "lib", build_tiny_gemma(tokenizer, seed=0)[0])
    assert loaded.names == library.names
    assert loaded.experts["expert_x"].metrics == {"accuracy": 0.75}
    assert loaded.experts["expert_y"].task_id == "has_cat"
    assert loaded.router is not None and loaded.router.names == ["expert_x"]
    for n in library.names:
        loaded.activate(n)
        torch.testing.assert_close(_logits(loaded, ids), expected[n])
        # every expert folder is a standard peft adapter
        plain = PeftModel.from_pretrained(build_tiny_gemma(tokenizer, seed=0)[0], str(tmp_path / "lib" / "experts" / n))
        plain.eval()
        with torch.no_grad():
            torch.testing.assert_close(plain(input_ids=ids).logits, expected[n])


def test_save_drops_deleted_experts(library, tmp_path):
    library.save(tmp_path / "lib")
    library.delete("expert_y")
    library.save(tmp_path / "lib")
    assert sorted(p.name for p in (tmp_path / "lib" / "experts").iterdir()) == ["expert_x"]


def test_quantized_tiny_default_by_name_is_refused():
    with pytest.raises(ValueError, match="quantization='4bit' is not allowed for the embedded tiny-gemma: save it"):
        ExpertLibrary.from_base("tiny-gemma", quantization="4bit")


needs_bnb = pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is None, reason="the QLoRA path needs bitsandbytes (CPU or CUDA)"
)


def _bnb_linear(quantization: str) -> type:
    import bitsandbytes as bnb

    return bnb.nn.Linear4bit if quantization == "4bit" else bnb.nn.Linear8bitLt


def _on(batch: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    device = next(model.parameters()).device
    return {k: v.to(device) for k, v in batch.items()}


@needs_bnb
@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_quantized_backbone_trains_a_lora_expert(tiny_gemma_dir, tiny_batch, quantization):
    library, tok = ExpertLibrary.from_base(tiny_gemma_dir, quantization=quantization)
    assert tok.pad_token_id is not None
    library.create("expert_q", task_id="first_color")
    assert library.active == ["expert_q"]
    lora_layers = [m for m in library.model.modules() if hasattr(m, "lora_A") and "expert_q" in m.lora_A]
    assert len(lora_layers) == 4  # q_proj and v_proj of both layers
    for layer in lora_layers:
        assert isinstance(layer.base_layer, _bnb_linear(quantization))
        if quantization == "4bit":
            # bfloat16 compute on CUDA; on CPU bfloat16 is slow or unsupported, so float32
            on_cuda = layer.base_layer.weight.device.type == "cuda"
            assert layer.base_layer.compute_dtype == (torch.bfloat16 if on_cuda else torch.float32)
            assert layer.base_layer.weight.quant_type == "nf4"
        else:
            assert layer.base_layer.weight.dtype == torch.int8
    trainable = {n for n, p in library.model.named_parameters() if p.requires_grad}
    assert trainable and all(".expert_q." in n and "lora_" in n for n in trainable)
    frozen = {n: p.detach().clone() for n, p in library.model.named_parameters() if not p.requires_grad}

    batch = _on(tiny_batch, library.model)
    params = [p for p in library.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    library.model.train()
    losses = []
    for step in range(6):
        loss = library.model(**batch).loss
        loss.backward()
        if step == 0:  # B starts at 0, so the first gradient reaches B only, through the quantized base
            grads_b = [p.grad for n, p in library.model.named_parameters() if "lora_B" in n and p.requires_grad]
            assert grads_b and all(g is not None and g.abs().sum() > 0 for g in grads_b)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.2, losses
    for n, p in library.model.named_parameters():
        if n in frozen:
            assert torch.equal(p.detach(), frozen[n]), f"{n} moved"


@needs_bnb
@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_quantized_library_round_trips_onto_a_fresh_quantized_base(tiny_gemma_dir, tmp_path, ids, quantization):
    from hf_adaptive.models import load_model_and_tokenizer

    library, _ = ExpertLibrary.from_base(tiny_gemma_dir, quantization=quantization)
    library.create("expert_q")
    _randomize(library, "expert_q", 3)
    ids = ids.to(next(library.model.parameters()).device)
    expected = _logits(library, ids)
    with library.disable_adapters():
        assert not torch.allclose(_logits(library, ids), expected)
    library.save(tmp_path / "lib")

    base, _ = load_model_and_tokenizer(tiny_gemma_dir, quantization=quantization)
    loaded = ExpertLibrary.load(tmp_path / "lib", base)
    assert loaded.names == ["expert_q"] and loaded.base_model_name == tiny_gemma_dir
    layer = next(m for m in loaded.model.modules() if hasattr(m, "lora_A"))
    assert isinstance(layer.base_layer, _bnb_linear(quantization))
    torch.testing.assert_close(_logits(loaded, ids), expected)


def test_a_peft_model_with_a_default_adapter_becomes_a_library(tokenizer, tmp_path, ids):
    from peft import LoraConfig, get_peft_model

    from hf_adaptive.models import build_tiny_gemma

    model = get_peft_model(build_tiny_gemma(tokenizer, seed=0)[0], LoraConfig(r=4, target_modules=["q_proj"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    lib = ExpertLibrary(model, experiment_id="e")
    assert lib.names == ["default"]
    expected = _logits(lib, ids)
    lib.save(tmp_path / "lib")
    back = ExpertLibrary.load(tmp_path / "lib", build_tiny_gemma(tokenizer, seed=0)[0])
    assert back.names == ["default"]
    torch.testing.assert_close(_logits(back, ids), expected)
