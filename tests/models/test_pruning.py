"""Physical head pruning: same outputs as the gated model with those gates at 0, GQA layouts, save/load."""

from __future__ import annotations

import copy

import pytest
import torch

from hf_adaptive.models import build_tiny_gemma
from hf_adaptive.models.gated import attention_modules, gate_model, head_counts
from hf_adaptive.models.pruning import LAYOUT_KEY, current_layout, load_pruned_model, prune_heads, save_pruned_model


def _ids(n: int = 3, t: int = 10) -> torch.Tensor:
    return torch.randint(4, 60, (n, t), generator=torch.Generator().manual_seed(0))


def _gated_reference(model, prune: dict[int, list[int]]):
    """The unpruned model with the pruned heads' gates at 0."""
    ref = copy.deepcopy(model)
    gates = torch.ones(2, 4)
    for layer, heads in prune.items():
        gates[layer, heads] = 0
    gate_model(ref).set_gates(gates)
    return ref.eval()


PATTERNS = [
    {0: [0], 1: [2, 3]},  # layer 0: uneven groups (2 + 1 heads -> kv head duplicated); layer 1: a whole kv group
    {0: [1, 3], 1: [0]},  # one head from each group in layer 0
    {0: [0, 1, 2, 3]},  # every head of a layer
    {1: [0, 1, 2]},  # one head left
]


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_pruned_equals_gated(tokenizer, impl, pattern):
    model, _ = build_tiny_gemma(tokenizer, seed=5, attn_implementation=impl)
    model.eval()
    ref = _gated_reference(model, pattern)
    prune_heads(model, pattern)
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[1, -4:] = 0
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=ids, attention_mask=mask).logits,
            ref(input_ids=ids, attention_mask=mask).logits,
            atol=2e-6,
            rtol=0,
        )


def test_pruned_generate_equals_gated_generate(tokenizer):
    model, _ = build_tiny_gemma(tokenizer, seed=6)
    model.eval()
    pattern = {0: [0], 1: [2, 3]}
    ref = _gated_reference(model, pattern)
    prune_heads(model, pattern)
    kw = dict(max_new_tokens=8, do_sample=False, output_scores=True, return_dict_in_generate=True, pad_token_id=0)
    ids = _ids(2, 4)
    out, expected = model.generate(ids, **kw), ref.generate(ids, **kw)
    assert torch.equal(out.sequences, expected.sequences)
    for a, b in zip(out.scores, expected.scores, strict=True):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=0)


def test_bookkeeping_and_layout(tokenizer):
    model, _ = build_tiny_gemma(tokenizer, seed=0)
    prune_heads(model, {0: [0], 1: [2, 3]})
    a0, a1 = attention_modules(model)
    # layer 0 keeps heads 1 (kv 0), 2, 3 (kv 1): groups of 1 and 2 -> gcd 1 -> kv heads [0, 1, 1]
    assert a0.q_proj.out_features == 3 * 16 and a0.k_proj.out_features == 3 * 16 and a0.o_proj.in_features == 48
    assert a0.num_key_value_groups == 1
    # layer 1 keeps heads 0, 1 (kv 0): kv head 1 is gone entirely
    assert a1.q_proj.out_features == 32 and a1.k_proj.out_features == 16 and a1.v_proj.out_features == 16
    assert a1.num_key_value_groups == 2
    layout = getattr(model.config, LAYOUT_KEY)
    assert layout["0"] == {"heads": [1, 2, 3], "kv_heads": [0, 1, 1], "zeroed": False}
    assert layout["1"] == {"heads": [0, 1], "kv_heads": [0], "zeroed": False}
    assert head_counts(model) == [3, 2]
    assert current_layout(model) == layout
    # weights: layer 1 q rows of heads 0-1 are the original rows 0..31
    fresh, _ = build_tiny_gemma(tokenizer, seed=0)
    torch.testing.assert_close(a1.q_proj.weight, fresh.model.layers[1].self_attn.q_proj.weight[:32])
    torch.testing.assert_close(a1.k_proj.weight, fresh.model.layers[1].self_attn.k_proj.weight[:16])


def test_pruning_twice_equals_pruning_once(tokenizer):
    a, _ = build_tiny_gemma(tokenizer, seed=7)
    b = copy.deepcopy(a)
    prune_heads(a, {0: [0], 1: [3]})
    prune_heads(a, {0: [2], 1: [1, 0]})  # original ids, after a first prune
    prune_heads(b, {0: [0, 2], 1: [0, 1, 3]})
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(a.eval()(ids).logits, b.eval()(ids).logits, atol=1e-6, rtol=0)
    assert current_layout(a) == current_layout(b)


def test_prune_rejects_bad_ids_and_lora(tokenizer, tiny_model):
    with pytest.raises(ValueError, match="layer"):
        prune_heads(tiny_model, {5: [0]})
    with pytest.raises(ValueError, match="heads"):
        prune_heads(tiny_model, {0: [4]})
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(tiny_model, LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="merge_and_unload"):
        prune_heads(peft_model, {0: [0]})


def test_pruned_model_trains(tokenizer, tiny_batch):
    model, _ = build_tiny_gemma(tokenizer, seed=0)
    prune_heads(model, {0: [1], 1: [0, 1]})
    model.train()
    model(**tiny_batch).loss.backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad.shape == (48, 64)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_save_and_load_pruned_model(tmp_path, tokenizer, impl):
    model, _ = build_tiny_gemma(tokenizer, seed=8, attn_implementation=impl)
    model.eval()
    prune_heads(model, {0: [0], 1: [2, 3]})
    save_pruned_model(model, tmp_path)
    loaded = load_pruned_model(tmp_path, attn_implementation=impl)
    assert loaded.config._attn_implementation == impl
    assert head_counts(loaded) == [3, 2]
    assert loaded.model.layers[0].self_attn.num_key_value_groups == 1
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()  # ties restored
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    # the stock class cannot rebuild per-layer head counts: it refuses the mismatched shapes
    from transformers import AutoModelForCausalLM

    with pytest.raises(RuntimeError, match="mismatch"):
        AutoModelForCausalLM.from_pretrained(tmp_path)
    # ... while the self-contained modeling file saved next to the weights does (no hf_adaptive import in it)
    assert "hf_adaptive" not in (tmp_path / "modeling_pruned_heads.py").read_text().split('"""', 2)[2]
    remote = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True, attn_implementation=impl).eval()
    assert type(remote).__name__ == "PrunedCausalLM" and head_counts(remote) == [3, 2]
    with torch.no_grad():
        assert torch.equal(remote(ids).logits, model(ids).logits)


def test_save_refuses_gated_model(tmp_path, tiny_model):
    gate_model(tiny_model)
    with pytest.raises(ValueError, match="head gates"):
        save_pruned_model(tiny_model, tmp_path)


def test_save_without_remote_code(tmp_path, tokenizer):
    model, _ = build_tiny_gemma(tokenizer, seed=9)
    prune_heads(model, {1: [1]})
    save_pruned_model(model, tmp_path, remote_code=False)
    assert not (tmp_path / "modeling_pruned_heads.py").exists()
    assert not hasattr(model.config, "auto_map")
    loaded = load_pruned_model(tmp_path)
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model.eval()(ids).logits)


def test_load_requires_layout(tmp_path, tiny_model):
    tiny_model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=LAYOUT_KEY):
        load_pruned_model(tmp_path)


def test_prune_llama_with_mqa():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=8,
        attention_bias=True,
    )
    config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # non-zero biases, so that bias slicing is checked too
        for attn in attention_modules(model):
            for p in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj):
                p.bias.normal_()
    ref = _gated_reference(model, {0: [1, 2], 1: [3]})
    prune_heads(model, {0: [1, 2], 1: [3]})
    assert [a.k_proj.out_features for a in attention_modules(model)] == [8, 8]
    assert [a.num_key_value_groups for a in attention_modules(model)] == [2, 3]
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, atol=2e-6, rtol=0)


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_prune_gemma2_and_gemma3(family, family_model):
    model = family_model(family)
    ref = _gated_reference(model, {0: [0, 1], 1: [3]})
    prune_heads(model, {0: [0, 1], 1: [3]})
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, atol=2e-6, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flash attention needs a CUDA GPU")
def test_gates_and_pruning_with_flash_attention(tokenizer):
    pytest.importorskip("flash_attn")
    model, _ = build_tiny_gemma(tokenizer, seed=0, attn_implementation="flash_attention_2")
    model = model.to("cuda", torch.bfloat16).eval()
    ids = _ids().cuda()
    ref = _gated_reference(model, {0: [1]})
    prune_heads(model, {0: [1]})
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits.float(), ref(ids).logits.float(), atol=2e-2, rtol=0)
