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


def test_quantized_backbone_is_guarded():
    with pytest.raises(ValueError, match="quantization"):
        ExpertLibrary.from_base("tiny-gemma", quantization="4bit")


@pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is None or not torch.cuda.is_available(),
    reason="the 4-bit QLoRA path needs bitsandbytes and a CUDA GPU",
)
def test_quantized_backbone_qlora():  # pragma: no cover - GPU only
    library, _ = ExpertLibrary.from_base("hf-internal-testing/tiny-random-GemmaForCausalLM", quantization="4bit")
    library.create("expert_q")
    assert library.active == ["expert_q"]


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
