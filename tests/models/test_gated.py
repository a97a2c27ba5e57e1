"""Per-head gates: identity at 1, exact head removal at 0, peft, generate, hard-concrete, importance, entropy."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from hf_adaptive.models import build_tiny_gemma
from hf_adaptive.models.gates import GatedModel, attention_modules, find_gates, gate_model
from hf_adaptive.models.head_importance import attention_entropy, head_importance, o_proj_magnitude


def _ids(n: int = 3, t: int = 12, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, 60, (n, t), generator=g)


def _zero_head_columns(model: torch.nn.Module, layer: int, head: int) -> None:
    """Reference: remove a head by zeroing its o_proj input columns (base weight and any LoRA A)."""
    attn = attention_modules(model)[layer]
    hd = attn.head_dim
    cols = slice(head * hd, (head + 1) * hd)
    with torch.no_grad():
        o = attn.o_proj
        getattr(o, "base_layer", o).weight[:, cols] = 0
        for a in getattr(o, "lora_A", {}).values():
            a.weight[:, cols] = 0


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_all_ones_gates_are_identical_to_plain_model(tokenizer, impl):
    model, _ = build_tiny_gemma(tokenizer, seed=0, attn_implementation=impl)
    model.eval()
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
    gated = gate_model(model)
    gated.set_gates(torch.ones(2, 4))
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(out, ref)
    # the multiply path (not the identity short-cut) must also be exact at 1
    gated._identity = False
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, ref)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_all_ones_gates_identical_under_generate_with_kv_cache(tokenizer, impl):
    model, _ = build_tiny_gemma(tokenizer, seed=1, attn_implementation=impl)
    model.eval()
    ids = _ids(2, 5)
    kw = dict(
        max_new_tokens=8,
        do_sample=False,
        use_cache=True,
        output_scores=True,
        return_dict_in_generate=True,
        pad_token_id=0,
    )
    ref = model.generate(ids, **kw)
    gated = gate_model(model)
    gated._identity = False  # force the hook's multiply on every decoding step
    out = model.generate(ids, **kw)
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.scores, ref.scores, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_gate_zero_removes_head_exactly(tokenizer, impl):
    model, _ = build_tiny_gemma(tokenizer, seed=2, attn_implementation=impl)
    model.eval()
    reference = copy.deepcopy(model)
    _zero_head_columns(reference, 0, 1)
    _zero_head_columns(reference, 1, 3)
    gates = torch.ones(2, 4)
    gates[0, 1] = 0
    gates[1, 3] = 0
    gate_model(model).set_gates(gates)
    ids = _ids()
    with torch.no_grad():
        out, ref = model(ids).logits, reference(ids).logits
        plain = reference(ids).logits
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    # and the head did matter: the gated output differs from the ungated model
    gated_off = find_gates(model)
    gated_off.set_gates(torch.ones(2, 4))
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, plain, atol=1e-4)


def test_gate_zero_under_generate_matches_reference(tokenizer):
    model, _ = build_tiny_gemma(tokenizer, seed=3)
    model.eval()
    reference = copy.deepcopy(model)
    _zero_head_columns(reference, 1, 0)
    gates = torch.ones(2, 4)
    gates[1, 0] = 0
    gate_model(model).set_gates(gates)
    ids = _ids(2, 4)
    kw = dict(max_new_tokens=6, do_sample=False, output_scores=True, return_dict_in_generate=True, pad_token_id=0)
    out, ref = model.generate(ids, **kw), reference.generate(ids, **kw)
    assert torch.equal(out.sequences, ref.sequences)
    for a, b in zip(out.scores, ref.scores, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("gate_first", [False, True])
def test_gates_with_peft_lora_on_attention_projections(tokenizer, gate_first):
    from peft import LoraConfig, get_peft_model

    model, _ = build_tiny_gemma(tokenizer, seed=4)
    plain = copy.deepcopy(model)
    if gate_first:
        gated = gate_model(model)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False)
    torch.manual_seed(0)
    peft_model = get_peft_model(model, lora).eval()
    torch.manual_seed(0)
    reference = get_peft_model(plain, lora).eval()  # same LoRA weights, no gates
    if not gate_first:
        gated = gate_model(peft_model.base_model.model)
    assert find_gates(peft_model) is gated
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(peft_model(input_ids=ids).logits, reference(input_ids=ids).logits)
    gates = torch.ones(2, 4)
    gates[0, 2] = 0
    gated.set_gates(gates)
    _zero_head_columns(reference, 0, 2)
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-6, rtol=0)


def test_remove_restores_plain_model(tokenizer, tiny_model):
    tiny_model.eval()
    ids = _ids()
    with torch.no_grad():
        ref = tiny_model(ids).logits
    gated = gate_model(tiny_model)
    gated.set_gates(torch.zeros(2, 4))
    model = gated.remove()
    assert not hasattr(model, "head_gates")
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)


def test_set_gates_rejects_wrong_shape(tiny_model):
    with pytest.raises(ValueError, match="set_gates"):
        gate_model(tiny_model).set_gates(torch.ones(3, 4))
    with pytest.raises(ValueError, match="GatedModel.mode"):
        GatedModel(tiny_model, mode="soft")


def test_hard_concrete_gates_train_with_l0_penalty(tokenizer, tiny_model, tiny_batch):
    gated = gate_model(tiny_model, mode="hard_concrete", init_log_alpha=0.0)
    assert gated.log_alpha.requires_grad
    tiny_model.train()
    torch.manual_seed(0)
    g1, g2 = gated.gates(), gated.gates()
    assert ((g1 >= 0) & (g1 <= 1)).all() and not torch.equal(g1, g2)  # stochastic while training
    tiny_model.eval()
    assert torch.equal(gated.gates(), gated.gates())  # deterministic in eval
    # L0 penalty: the reference formula sigmoid(log_alpha - beta * log(-gamma / zeta)), mean over heads
    ref = torch.sigmoid(gated.log_alpha - (2 / 3) * torch.log(torch.tensor(0.1 / 1.1))).mean()
    torch.testing.assert_close(gated.expected_l0(), ref)
    gated.expected_l0().backward()
    assert (gated.log_alpha.grad > 0).all()  # the penalty pushes every gate towards closing
    # the task loss reaches the gates through the hook
    gated.log_alpha.grad = None
    tiny_model.train()
    tiny_model(**tiny_batch).loss.backward()
    assert gated.log_alpha.grad is not None and gated.log_alpha.grad.abs().sum() > 0


def test_hard_concrete_set_gates_gives_binary_eval_gates(tiny_model):
    gated = gate_model(tiny_model, mode="hard_concrete")
    target = torch.tensor([[1.0, 0, 1, 0], [0, 0, 1, 1]])
    gated.set_gates(target)
    tiny_model.eval()
    assert torch.equal(gated.deterministic_gates(), target)
    assert gated.heads_to_prune() == {0: [1, 3], 1: [0, 1]}


def test_head_importance_matches_per_example_reference(tiny_model, tiny_batch):
    gated = gate_model(tiny_model)
    gates = torch.ones(2, 4)
    gates[1, 1] = 0
    gated.set_gates(gates)
    batch = {k: v[:4] for k, v in tiny_batch.items()}
    imp = head_importance(tiny_model, [batch], normalize_layers=False)
    # slow reference: one example at a time (no padding), a (layers, heads) gate leaf, |grad| averaged
    from hf_adaptive.tasks.formatting import cross_entropy_per_row

    total = torch.zeros(2, 4)
    for i in range(4):
        n = int(batch["attention_mask"][i].sum())
        g = gates.clone().requires_grad_(True)
        gated.per_example = g.unsqueeze(0)
        logits = tiny_model(input_ids=batch["input_ids"][i : i + 1, :n]).logits
        loss = cross_entropy_per_row(logits, batch["labels"][i : i + 1, :n]).sum()
        (grad,) = torch.autograd.grad(loss, g)
        total += grad.abs()
        gated.per_example = None
    torch.testing.assert_close(imp, total / 4, atol=1e-5, rtol=1e-4)
    assert imp.abs().sum() > 0
    assert all(p.grad is None for p in tiny_model.parameters())  # model gradients untouched
    normed = head_importance(tiny_model, [batch])
    torch.testing.assert_close(normed.norm(dim=1), torch.ones(2))


def test_attention_entropy_matches_reference(tokenizer, tiny_model, tiny_batch):
    gate_model(tiny_model)
    batch = {k: v[:3] for k, v in tiny_batch.items()}
    ent = attention_entropy(tiny_model, [batch])
    assert tiny_model.config._attn_implementation == "sdpa"  # switched back
    eager, _ = build_tiny_gemma(tokenizer, seed=0, attn_implementation="eager")
    eager.eval()
    ref = torch.zeros(2, 4)
    count = 0
    with torch.no_grad():
        for i in range(3):
            n = int(batch["attention_mask"][i].sum())
            out = eager(input_ids=batch["input_ids"][i : i + 1, :n], output_attentions=True)
            for layer, att in enumerate(out.attentions):
                p = att[0]  # heads, q, k
                ref[layer] += -(p * torch.log(p.clamp(min=1e-12))).sum(-1).sum(-1)
            count += n
    torch.testing.assert_close(ent, ref / count, atol=1e-5, rtol=1e-4)


def test_o_proj_magnitude_reference(tiny_model):
    mag = o_proj_magnitude(tiny_model)
    w = tiny_model.model.layers[1].self_attn.o_proj.weight
    assert mag.shape == (2, 4)
    torch.testing.assert_close(mag[1, 2], w[:, 32:48].norm())


@pytest.mark.parametrize("family", ["llama", "gemma2", "gemma3"])
def test_other_families_gate_zero_matches_reference(family, family_model):
    model = family_model(family)
    reference = copy.deepcopy(model)
    _zero_head_columns(reference, 1, 1)
    gates = torch.ones(2, 4)
    gates[1, 1] = 0
    gate_model(model).set_gates(gates)
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, atol=1e-6, rtol=0)


def test_hard_concrete_sampled_once_per_forward_under_gradient_checkpointing(tokenizer, tiny_batch):
    grads = []
    for checkpointing in (False, True):
        model, _ = build_tiny_gemma(tokenizer, seed=0)
        gated = gate_model(model, mode="hard_concrete", init_log_alpha=0.0)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        torch.manual_seed(0)
        model(**tiny_batch).loss.backward()
        grads.append(gated.log_alpha.grad.clone())
    # the recomputation in backward must apply the same gates as the forward (one sample per model forward)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


def test_head_importance_loss_matches_the_former_cross_entropy(tiny_model, tiny_batch):
    """`head_importance` now scores with `answer_cross_entropy`: same per-example losses (and so gradients) as the
    former `F.cross_entropy(..., ignore_index=-100)` formula, to float32 rounding."""
    from hf_adaptive.tasks.losses import answer_cross_entropy

    with torch.no_grad():
        logits = tiny_model(input_ids=tiny_batch["input_ids"], attention_mask=tiny_batch["attention_mask"]).logits
    labels = tiny_batch["labels"]
    per_tok = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), labels[:, 1:], ignore_index=-100, reduction="none"
    )
    valid = (labels[:, 1:] != -100).float()
    former = (per_tok * valid).sum(1) / valid.sum(1).clamp(min=1)
    torch.testing.assert_close(answer_cross_entropy(logits, labels, reduction="per_row"), former, atol=1e-6, rtol=1e-6)


def test_gate_modes_of_the_options_match_the_gates():
    from hf_adaptive.control.config import GATE_MODES as OPTION_MODES
    from hf_adaptive.models.gates import GATE_MODES

    assert OPTION_MODES == GATE_MODES


def test_gate_model_finds_gates_under_a_wrapper(tiny_model):
    gated = gate_model(tiny_model)
    wrapper = torch.nn.ModuleDict({"inner": tiny_model})
    assert gate_model(wrapper) is gated
    with pytest.raises(ValueError, match="already has 'fixed' gates"):
        gate_model(wrapper, mode="hard_concrete")


def test_models_does_not_import_plugins_or_capabilities():
    import subprocess
    import sys

    code = (
        "import sys, hf_adaptive.models; "
        "bad = [m for m in sys.modules if m.startswith(('hf_adaptive.plugins', 'hf_adaptive.trainer', "
        "'hf_adaptive.config', 'hf_adaptive.registry', 'hf_adaptive.control', 'hf_adaptive.experts', "
        "'hf_adaptive.replay', 'hf_adaptive.consolidation', 'hf_adaptive.scheduling'))]; print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


# ------------------------------------------------------------------------------------- expected gate values
def _hc_sample(log_alpha: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Hard-concrete samples written out from Louizos et al. (2018): stretch the binary concrete, then clamp."""
    beta, gamma, zeta = 2 / 3, -0.1, 1.1
    s = torch.sigmoid((torch.log(u) - torch.log(1 - u) + log_alpha) / beta)
    return torch.clamp(s * (zeta - gamma) + gamma, 0, 1)


def _hard_concrete_gates(tiny_model, values: torch.Tensor) -> GatedModel:
    gated = gate_model(tiny_model, mode="hard_concrete")
    with torch.no_grad():
        gated.log_alpha.copy_(values.view_as(gated.log_alpha))
    return gated


def test_expected_gates_match_a_monte_carlo_estimate(tiny_model):
    """E[z] against the mean of many samples (fixed generator), within 5 standard errors of that mean; the samples
    come from the formula written out and from the gates' own training-mode sampling."""
    gated = _hard_concrete_gates(tiny_model, torch.linspace(-3, 3, 8))
    expected = gated.expected_gates()
    assert expected.shape == (2, 4) and not expected.requires_grad
    n = 40000
    u = torch.rand(n, 2, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64).clamp(1e-12, 1 - 1e-12)
    z = _hc_sample(gated.log_alpha.detach().double(), u)
    se = z.std(0) / n**0.5
    assert ((expected.double() - z.mean(0)).abs() <= 5 * se + 1e-6).all(), (expected, z.mean(0), se)
    gated.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        own = torch.stack([gated.gates().detach() for _ in range(n)])
    assert ((expected - own.mean(0)).abs() <= 5 * own.std(0) / n**0.5 + 1e-5).all()


def test_expected_gates_against_slow_quadrature_and_their_limits(tiny_model):
    """Against the midpoint rule over u with many points (the obvious reference), at 0 / 1 in the limits, strictly
    increasing in log_alpha in between, and between P(z = 1) and P(z > 0) (`expected_l0`'s per-gate term)."""
    from hf_adaptive.models.gates import hard_concrete_mean

    la = torch.linspace(-8, 8, 161, dtype=torch.float64)
    n = 200000
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    reference = _hc_sample(la[:, None], u[None, :]).mean(-1)
    fast = hard_concrete_mean(la)
    torch.testing.assert_close(fast, reference, atol=1e-7, rtol=0)
    assert (fast.diff() > 0).all()
    extremes = hard_concrete_mean(torch.tensor([-60.0, -30.0, 30.0, 60.0]))
    torch.testing.assert_close(extremes, torch.tensor([0.0, 0.0, 1.0, 1.0]), atol=1e-9, rtol=0)
    shift = 2 / 3 * math.log(0.1 / 1.1)
    p_open = torch.sigmoid(la - shift)  # P(z > 0)
    p_one = torch.sigmoid(la - 2 / 3 * math.log(1.1 / 0.1))  # P(z = 1)
    assert (p_one <= fast).all() and (fast <= p_open).all()
    gated = _hard_concrete_gates(tiny_model, la[::20][:8].float())
    torch.testing.assert_close(gated.expected_l0(), p_open[::20][:8].mean().float())  # the same P(z > 0)
    with pytest.raises(ValueError, match="points=1 is not allowed"):
        hard_concrete_mean(la, points=1)


def test_expected_gates_of_fixed_gates_are_their_values(tiny_model):
    gated = gate_model(tiny_model)
    values = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 1.0, 1.0]])
    gated.set_gates(values)
    assert torch.equal(gated.expected_gates(), values)
    gated.expected_gates().zero_()  # a copy: the gates are untouched
    assert torch.equal(gated.fixed_gates, values)
