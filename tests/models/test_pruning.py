"""Physical head pruning: same outputs as the gated model with those gates at 0, GQA layouts, save/load."""

from __future__ import annotations

import copy
import itertools
import json
import random

import pytest
import torch

from hf_adaptive.models import build_tiny_gemma
from hf_adaptive.models.gated import attention_modules, gate_model, head_counts
from hf_adaptive.models.pruning import (
    LAYOUT_KEY,
    _plan,
    choose_plan,
    current_layout,
    load_pruned_model,
    plan_sizes,
    prune_heads,
    query_slots,
    save_pruned_model,
)


def _assert_same_logits(model, ref, ids: torch.Tensor, mask: torch.Tensor) -> None:
    """The pruned model computes what the gated reference computes, padded rows included."""
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=ids, attention_mask=mask).logits,
            ref(input_ids=ids, attention_mask=mask).logits,
            atol=2e-6,
            rtol=0,
        )


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
    _assert_same_logits(model, ref, ids, mask)


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
    # layer 0 keeps heads 1 (kv 0), 2, 3 (kv 1): groups of 1 and 2 -> kv 0's group padded to 2: slots [1, pad, 2, 3]
    assert a0.q_proj.out_features == 4 * 16 and a0.k_proj.out_features == 2 * 16 and a0.o_proj.in_features == 64
    assert a0.num_key_value_groups == 2
    # layer 1 keeps heads 0, 1 (kv 0): kv head 1 is gone entirely
    assert a1.q_proj.out_features == 32 and a1.k_proj.out_features == 16 and a1.v_proj.out_features == 16
    assert a1.num_key_value_groups == 2
    layout = getattr(model.config, LAYOUT_KEY)
    # (groups of 1 and 2: duplicating costs 3 q + 3 kv slots, padding 4 + 2, a tie: padding, fewer kv slots)
    assert layout["0"] == {"heads": [1, 2, 3], "kv_heads": [0, 1], "padding": [1], "zeroed": False}
    assert layout["1"] == {"heads": [0, 1], "kv_heads": [0], "padding": [], "zeroed": False}
    assert head_counts(model) == [4, 2]  # query slots, the padding slot included
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
    assert model.model.layers[0].self_attn.q_proj.weight.grad.shape == (64, 64)  # 3 heads + 1 padding slot


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_save_and_load_pruned_model(tmp_path, tokenizer, impl):
    model, _ = build_tiny_gemma(tokenizer, seed=8, attn_implementation=impl)
    model.eval()
    prune_heads(model, {0: [0], 1: [2, 3]})
    save_pruned_model(model, tmp_path)
    loaded = load_pruned_model(tmp_path, attn_implementation=impl)
    assert loaded.config._attn_implementation == impl
    assert head_counts(loaded) == [4, 2]  # layer 0: 3 heads and a padding slot
    assert loaded.model.layers[0].self_attn.num_key_value_groups == 2
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
    assert type(remote).__name__ == "PrunedCausalLM" and head_counts(remote) == [4, 2]
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


# ------------------------------------------------------------------------ GQA groups of 3 (SmolLM2's layout)
GQA_LAYERS, GQA_HEADS, GQA_KV, GQA_HD, GQA_HIDDEN = 2, 9, 3, 8, 36  # Llama: hidden % heads == 0


def _gqa_llama(seed: int = 0, impl: str = "sdpa"):
    """A tiny Llama with 9 query heads on 3 kv heads per layer (groups of 3), with non-zero attention biases."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64,
        hidden_size=GQA_HIDDEN,
        intermediate_size=64,
        num_hidden_layers=GQA_LAYERS,
        num_attention_heads=GQA_HEADS,
        num_key_value_heads=GQA_KV,
        head_dim=GQA_HD,
        attention_bias=True,
    )
    config._attn_implementation = impl
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).eval()
        with torch.no_grad():
            for attn in attention_modules(model):
                for p in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj):
                    p.bias.normal_()
    return model


def _gqa_reference(model, drop: dict[int, list[int]]):
    ref = copy.deepcopy(model)
    gates = torch.ones(GQA_LAYERS, GQA_HEADS)
    for layer, heads in drop.items():
        gates[layer, heads] = 0
    gate_model(ref).set_gates(gates)
    return ref.eval()


def _gqa_ids() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, 64, (3, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[2, -3:] = 0
    return ids, mask


def _kept_counts(drop: list[int]) -> list[int]:
    """Kept query heads of each kv group that keeps any (groups of 3, in order)."""
    group = GQA_HEADS // GQA_KV
    counts = [sum(1 for h in range(g * group, (g + 1) * group) if h not in drop) for g in range(GQA_KV)]
    return [c for c in counts if c]


def _brute_force_slots(counts: list[int]) -> tuple[int, int]:
    """(query slots, kv slots) of the cheaper exact layout, by counting the weights of each candidate slot by slot:
    duplicate = every group cut into chunks of the largest size dividing every group (one kv slot per chunk), pad =
    every group filled up to the largest group (one kv slot per group); ties to pad (fewer kv slots)."""
    chunk = max(g for g in range(1, max(counts) + 1) if all(c % g == 0 for c in counts))
    dup_q = dup_kv = 0
    for c in counts:
        for _ in range(c // chunk):
            dup_kv += 1
            dup_q += chunk
    pad_q = pad_kv = 0
    for _ in counts:
        pad_kv += 1
        pad_q += max(counts)
    hidden_x_hd = GQA_HIDDEN * GQA_HD

    def weights(nq: int, nkv: int) -> int:
        return hidden_x_hd * (nq + nq + nkv + nkv)  # q rows + o columns, k rows + v rows

    return (pad_q, pad_kv) if weights(pad_q, pad_kv) <= weights(dup_q, dup_kv) else (dup_q, dup_kv)


def _random_drops(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [sorted(rng.sample(range(GQA_HEADS), rng.randint(1, GQA_HEADS))) for _ in range(n)]


GQA_DROPS = [
    [0, 3, 4],  # groups of 2, 1, 3 kept heads (unequal: 6 + 6 slots either way, a tie: padded)
    [0, 1, 3],  # 1, 2, 3 in another order
    [0],  # 2, 3, 3: padding is cheaper (3 kv slots instead of 8)
    [0, 3],  # 2, 2, 3: padding
    [1, 2, 4, 5],  # 1, 1, 3: 5 q + 5 kv slots vs 9 + 3: duplicated
    [0, 1, 2],  # a whole group: 0, 3, 3
    [3, 4, 5, 6],  # a whole group and one more: 3, 0, 2 -> padding
    [0, 1, 2, 3, 4, 5, 6, 7],  # all but one
    list(range(9)),  # every head: one zeroed head
    *_random_drops(6, seed=0),
]


def _attention_weights(model) -> int:
    return sum(
        getattr(a, p).weight.numel() for a in attention_modules(model) for p in ("q_proj", "k_proj", "v_proj", "o_proj")
    )


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("drop", GQA_DROPS, ids=[",".join(map(str, d)) for d in GQA_DROPS])
def test_gqa_pruned_equals_gated_with_the_cheaper_layout(impl, drop):
    model = _gqa_llama(seed=len(drop), impl=impl)
    other = [h for h in range(GQA_HEADS) if h not in drop][:2]  # layer 1: a different, smaller drop
    pattern = {0: drop, 1: other}
    ref = _gqa_reference(model, pattern)
    prune_heads(model, pattern)
    ids, mask = _gqa_ids()
    _assert_same_logits(model, ref, ids, mask)
    layout = current_layout(model)
    want_weights = 0
    for layer, dropped in pattern.items():
        attn, entry = attention_modules(model)[layer], layout[str(layer)]
        counts = _kept_counts(dropped) if len(dropped) < GQA_HEADS else [1]
        nq, nkv = _brute_force_slots(counts)
        want_weights += 2 * GQA_HIDDEN * GQA_HD * (nq + nkv)
        assert (attn.q_proj.out_features, attn.k_proj.out_features) == (nq * GQA_HD, nkv * GQA_HD)
        assert attn.num_key_value_groups == nq // nkv
        assert len(entry["heads"]) + len(entry["padding"]) == nq and len(entry["kv_heads"]) == nkv
        kept = sorted(set(range(GQA_HEADS)) - set(dropped)) or [0]
        assert entry["heads"] == kept  # original ids, in order, never a padding slot
        if choose_plan(counts) == "pad":  # each kept kv head stored once
            assert nkv == len(counts) and entry["kv_heads"] == sorted(set(entry["kv_heads"]))
        else:
            assert not entry["padding"]
        # every query slot is served by the kv head of its own original group
        slots = query_slots(entry)
        assert all(h is None or h // 3 == entry["kv_heads"][j // (nq // nkv)] for j, h in enumerate(slots))
    assert _attention_weights(model) == want_weights


def test_padding_slots_have_zero_o_proj_columns_and_q_rows():
    model = _gqa_llama()
    prune_heads(model, {0: [0, 3]})  # kept 2, 2, 3 -> padded to 3 + 3 + 3
    entry = current_layout(model)["0"]
    assert entry["padding"] == [2, 5] and entry["kv_heads"] == [0, 1, 2] and entry["heads"] == [1, 2, 4, 5, 6, 7, 8]
    attn = attention_modules(model)[0]
    for j in entry["padding"]:
        cols = slice(j * GQA_HD, (j + 1) * GQA_HD)
        assert not attn.o_proj.weight[:, cols].any() and not attn.q_proj.weight[cols].any()
        assert not attn.q_proj.bias[cols].any()
    fresh = attention_modules(_gqa_llama())[0]  # kv rows: each kv head once, its original rows
    torch.testing.assert_close(attn.k_proj.weight, fresh.k_proj.weight)
    torch.testing.assert_close(attn.v_proj.bias, fresh.v_proj.bias)


def test_plan_chooser_against_brute_force_counts():
    """Every keep pattern of a layer with 3 groups of 3: the planned slots are the cheaper layout's."""
    entry = {"heads": list(range(9)), "kv_heads": [0, 1, 2], "padding": [], "zeroed": False}
    padded = 0
    for dropped in itertools.chain.from_iterable(itertools.combinations(range(9), k) for k in range(9)):
        counts = _kept_counts(list(dropped))
        plan = _plan(entry, set(dropped))
        nq, nkv = _brute_force_slots(counts)
        assert (len(plan["q_slots"]), len(plan["kv_slots"])) == (nq, nkv), dropped
        assert plan_sizes(counts)[choose_plan(counts)] == (nq, nkv)
        assert [plan["heads"], plan["padding"]] == [
            [h for h in range(9) if h not in dropped],
            [i for i, j in enumerate(plan["q_slots"]) if j is None],
        ]
        padded += bool(plan["padding"])
    assert padded > 0  # the padding plan is exercised
    with pytest.raises(ValueError, match="counts"):
        plan_sizes([2, 0])


@pytest.mark.parametrize("remote_code", [False, True])
def test_padded_model_saves_and_reloads(tmp_path, remote_code):
    from transformers import AutoModelForCausalLM

    model = _gqa_llama(seed=3)
    prune_heads(model, {0: [0, 3], 1: [0, 1, 2, 3]})  # layer 0 padded, layer 1: 0, 2, 3 -> padded
    assert all(current_layout(model)[str(i)]["padding"] for i in range(2))
    save_pruned_model(model, tmp_path, remote_code=remote_code)
    saved = json.loads((tmp_path / "config.json").read_text())[LAYOUT_KEY]
    assert saved["0"]["padding"] == [2, 5]
    ids, mask = _gqa_ids()
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
        loaded = load_pruned_model(tmp_path)
        assert torch.equal(loaded(input_ids=ids, attention_mask=mask).logits, want)
        if remote_code:
            remote = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True).eval()
            assert type(remote).__name__ == "PrunedCausalLM"
            assert torch.equal(remote(input_ids=ids, attention_mask=mask).logits, want)
    assert current_layout(loaded) == current_layout(model)


@pytest.mark.parametrize("seed", range(4))
def test_pruning_a_padded_model_again_uses_original_ids(seed):
    rng = random.Random(seed)
    first = {0: [0, 3], 1: [4]}  # both layers padded (2, 2, 3 and 3, 2, 3)
    second = {i: rng.sample([h for h in range(9) if h not in first[i]], rng.randint(1, 4)) for i in range(2)}
    union = {i: sorted(set(first[i]) | set(second[i])) for i in range(2)}
    a = _gqa_llama(seed=seed)
    ref = _gqa_reference(a, union)
    b = copy.deepcopy(a)
    prune_heads(a, first)
    assert current_layout(a)["0"]["padding"]
    prune_heads(a, second)
    prune_heads(b, union)
    ids, mask = _gqa_ids()
    with torch.no_grad():
        out = a(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(out, b(input_ids=ids, attention_mask=mask).logits, atol=2e-6, rtol=0)
        torch.testing.assert_close(out, ref(input_ids=ids, attention_mask=mask).logits, atol=2e-6, rtol=0)
    assert current_layout(a) == current_layout(b)
    assert _attention_weights(a) == _attention_weights(b)


def test_layout_without_padding_key_and_bad_padding():
    """A layout written before padding existed reads as no padding; a corrupt one is a clear error."""
    assert query_slots({"heads": [1, 2], "kv_heads": [0]}) == [1, 2]
    assert query_slots({"heads": [1, 2], "kv_heads": [0, 1], "padding": [1, 3]}) == [1, None, 2, None]
    with pytest.raises(ValueError, match=r"padding=\[4\] is not allowed"):
        query_slots({"heads": [1, 2, 3], "kv_heads": [0, 1], "padding": [4]})
    with pytest.raises(ValueError, match="kv_heads"):
        query_slots({"heads": [1, 2, 3], "kv_heads": [0, 1]})
