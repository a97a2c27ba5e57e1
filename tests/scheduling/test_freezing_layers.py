"""Layer-prefix freezing: only a prefix of decoder layers freezes, autograd never enters it, Adam state is freed."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from hf_adaptive.scheduling import Freezer, FreezingConfig
from hf_adaptive.scheduling.freezing import find_decoder_layers, percentile
from hf_adaptive.utils.io import load_state, save_state


def _llama(tied: bool = True, layers: int = 4) -> LlamaForCausalLM:
    """A tiny GQA Llama (4 query heads over 2 KV heads)."""
    config = LlamaConfig(
        vocab_size=40,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 40, (3, 7), generator=gen)
    return {"input_ids": ids, "labels": ids.clone()}


class Stack(nn.Module):
    """Embedding -> residual layers x + g_i * lin_i(x) -> head; g_i = 0 gives layer i exactly zero gradient."""

    def __init__(self, n: int = 4):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(10, 8)
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(n))
        self.head = nn.Linear(8, 10)
        self.gains = [1.0] * n

    def get_input_embeddings(self):
        return self.embed

    def get_output_embeddings(self):
        return self.head

    def forward(self, ids):
        x = self.embed(ids)
        for gain, layer in zip(self.gains, self.layers):
            x = x + gain * layer(x)
        return self.head(x)


def _train(model, freezer, opt, steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        ids = torch.randint(0, 10, (4, 5), generator=gen)
        nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten()).backward()
        freezer.update(opt)
        opt.step()
        opt.zero_grad(set_to_none=True)


def test_units_are_the_decoder_layers_and_untied_embeddings_join_layer_zero():
    tied = Freezer(_llama(tied=True), FreezingConfig(granularity="layer"))
    assert [u.name for u in tied.units] == [f"model.layers.{i}" for i in range(4)]
    layer0 = sum(p.numel() for p in tied.model.model.layers[0].parameters())
    assert tied.units[0].numel == layer0  # the tied matrix trains through the head: not part of layer 0
    untied = Freezer(_llama(tied=False), FreezingConfig(granularity="layer"))
    assert untied.units[0].numel == layer0 + untied.model.model.embed_tokens.weight.numel()
    assert find_decoder_layers(untied.model)[0] == "model.layers"
    with pytest.raises(ValueError, match="granularity='layer' needs a list of decoder layers"):
        Freezer(nn.Sequential(nn.Linear(2, 2)), FreezingConfig(granularity="layer"))


def test_only_a_prefix_freezes():
    model = Stack()
    model.gains = [1.0, 0.0, 0.0, 1.0]  # layers 1 and 2 are quiet, but layer 0 is not: nothing may freeze
    cfg = FreezingConfig(granularity="layer", threshold=1e-6, warmup_steps=1, probe_every=0)
    freezer = Freezer(model, cfg)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    _train(model, freezer, opt, 3)
    assert freezer.frozen_names() == [] and freezer.frozen_layers() == 0
    model.gains = [0.0, 0.0, 0.0, 1.0]  # now layer 0 (with the untied embeddings) goes quiet too
    model.embed.requires_grad_(False)
    freezer = Freezer(model, cfg)
    _train(model, freezer, opt, 3)
    assert freezer.frozen_names() == ["layers.0", "layers.1", "layers.2"] and freezer.frozen_layers() == 3
    assert freezer.freeze_history() == {"layers.0": 2, "layers.1": 2, "layers.2": 2}
    assert model.layers[3].weight.requires_grad and model.head.weight.requires_grad


def _trainable_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("tied", [True, False])
def test_backward_stops_at_the_frozen_prefix_and_upper_gradients_are_unchanged(tied):
    """Gradients above the prefix equal full backprop's; a tied embedding keeps only its head-side gradient
    (full gradient minus the lookup's share, computed from d loss / d embeddings); the prefix builds no graph."""
    batch = _batch()
    full = _llama(tied)
    captured = {}
    full.model.embed_tokens.register_forward_hook(lambda m, a, out: captured.setdefault("emb", out))
    loss = full(**batch).loss
    (d_emb,) = torch.autograd.grad(loss, captured["emb"], retain_graph=True)
    loss.backward()
    reference = _trainable_grads(full)

    model = _llama(tied)
    freezer = Freezer(model, FreezingConfig(granularity="layer"))
    freezer.freeze_prefix(2)
    seen = {}
    for i in range(3):
        model.model.layers[i].register_forward_pre_hook(lambda m, args, i=i: seen.__setitem__(i, args[0].requires_grad))
    model(**batch).loss.backward()
    assert seen == {0: False, 1: False, 2: False}  # nothing below layer 2 is on the autograd graph
    grads = _trainable_grads(model)
    frozen = {n for n, p in model.named_parameters() if n.startswith(("model.layers.0.", "model.layers.1."))}
    assert not frozen & grads.keys()
    for name in reference.keys() - frozen - {"model.embed_tokens.weight"}:
        torch.testing.assert_close(grads[name], reference[name], rtol=1e-5, atol=1e-7)
    if tied:
        lookup = torch.zeros_like(full.model.embed_tokens.weight).index_add_(
            0, batch["input_ids"].flatten(), d_emb.flatten(0, 1)
        )
        expected = reference["model.embed_tokens.weight"] - lookup
        torch.testing.assert_close(grads["model.embed_tokens.weight"], expected, rtol=1e-4, atol=1e-6)
    else:
        assert "model.embed_tokens.weight" not in grads  # untied: frozen with layer 0
    freezer.release()
    model.zero_grad(set_to_none=True)
    seen.clear()
    model(**batch).loss.backward()
    assert seen[0] is True and torch.allclose(
        model.model.embed_tokens.weight.grad, reference["model.embed_tokens.weight"]
    )


def test_freezing_frees_the_optimizer_state_unless_asked_to_keep_it():
    for drop in (True, False):
        model = Stack()
        model.gains = [0.0, 0.0, 1.0, 1.0]
        cfg = FreezingConfig(
            granularity="layer", threshold=1e-6, warmup_steps=2, probe_every=0, drop_optimizer_state=drop
        )
        freezer = Freezer(model, cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        _train(model, freezer, opt, 2)  # warm-up: Adam has state for every parameter with a gradient
        kept = {id(p) for p in opt.state}
        assert id(model.layers[2].weight) in kept
        model.embed.requires_grad_(False)
        freezer = Freezer(model, cfg)
        freezer.steps = 5
        before = model.layers[0].weight.detach().clone()
        _train(model, freezer, opt, 2)
        assert freezer.frozen_layers() == 2
        frozen = [*model.layers[0].parameters(), *model.layers[1].parameters()]
        assert all((id(p) in {id(q) for q in opt.state}) != drop for p in frozen if id(p) in kept)
        assert torch.equal(model.layers[0].weight, before)  # AdamW with weight decay leaves a frozen layer alone


def test_layer_state_round_trip_restores_the_cut(tmp_path):
    model = _llama()
    cfg = FreezingConfig(granularity="layer")
    freezer = Freezer(model, cfg)
    freezer.freeze_prefix(3)
    save_state(tmp_path / "freezer", freezer.state_dict())
    fresh = _llama()
    restored = Freezer(fresh, cfg)
    restored.load_state_dict(load_state(tmp_path / "freezer"))
    assert restored.frozen_layers() == 3 and restored.freeze_history() == freezer.freeze_history()
    seen = []
    fresh.model.layers[3].register_forward_pre_hook(lambda m, args: seen.append(args[0].requires_grad))
    fresh(**_batch()).loss.backward()
    assert seen == [False] and fresh.model.layers[3].self_attn.q_proj.weight.grad is not None
    assert restored.manages(fresh) and not restored.manages(model)
    opt = torch.optim.AdamW(fresh.parameters())
    opt.step()  # no gradients yet: give every parameter Adam state by hand
    for p in fresh.parameters():
        opt.state[p]["exp_avg"] = torch.zeros_like(p)
    restored.freeze_prefix(4, opt)
    assert not any(id(p) in {id(q) for q in opt.state} for p in restored.units[3].params)
    assert id(restored.units[2].params[0]) in {id(q) for q in opt.state}  # frozen before the optimizer was known
    with pytest.raises(ValueError, match=r"Freezer.freeze_prefix count=5"):
        restored.freeze_prefix(5)


def test_change_mode_freezes_layers_whose_gradient_norm_stopped_moving():
    """AutoFreeze's criterion: with lr 0 and a fixed batch every gradient norm is constant (change 0), so the prefix
    freezes at the second reading, up to the cap; while layer 0's gradient keeps growing, nothing may freeze."""
    model = Stack()
    model.embed.requires_grad_(False)
    cfg = FreezingConfig(
        granularity="layer", threshold_mode="change", threshold=0.01, change_window=2, warmup_steps=0, probe_every=0
    )
    ids = torch.randint(0, 10, (4, 5), generator=torch.Generator().manual_seed(0))

    def step(freezer, opt):
        nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten()).backward()
        freezer.update(opt)
        opt.step()
        opt.zero_grad(set_to_none=True)

    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    moving = Freezer(model, cfg)
    for _ in range(8):
        model.gains[0] *= 1.5  # layer 0's gradient (and everything above it) keeps changing
        step(moving, opt)
    assert moving.frozen_layers() == 0 and moving.units[0].change > 0.01
    steady = Freezer(model, cfg)
    for i in range(4):
        step(steady, opt)
        assert steady.frozen_layers() == (0 if i < 3 else 3)  # readings at steps 2 and 4; cap 0.9 of 4 layers
    assert steady.units[0].change == 0.0 and steady.freeze_history() == {f"layers.{i}": 4 for i in range(3)}
    restored = Freezer(Stack(), cfg)
    restored.model.embed.requires_grad_(False)
    restored.load_state_dict(steady.state_dict())
    assert [u.change for u in restored.units] == [u.change for u in steady.units]
    assert [u.reference for u in restored.units] == [u.reference for u in steady.units]


def _drive(freezer: Freezer, norms: list[float]) -> None:
    """One step with hand-made gradients: layer i's gradient has norm `norms[i]` (ema_beta 0: the EMA is the norm)."""
    for unit, norm in zip(freezer.units, norms):
        for p in unit.params:
            p.grad = None if unit.frozen else torch.full_like(p, norm / (unit.numel**0.5))
    freezer.update()


def test_percentile_is_linear_interpolation_between_ranks():
    """Hand-computed: position (n - 1) q / 100 in the sorted values, interpolated linearly."""
    cases = [
        ([1.0, 2.0, 3.0, 4.0], 50.0, 2.5),
        ([0.0, 10.0], 25.0, 2.5),
        ([5.0, 1.0, 3.0], 100.0, 5.0),
        ([5.0, 1.0, 3.0], 0.0, 1.0),
        ([1.0, 2.0, 3.0, 4.0, 5.0], 90.0, 4.6),
        ([3.0, 1.0], 50.0, 2.0),
        ([4.0], 50.0, 4.0),
    ]
    for values, q, expected in cases:
        assert percentile(values, q) == pytest.approx(expected, rel=1e-12)


def test_percentile_mode_freezes_the_prefix_below_the_median_change_at_readings_only():
    """AutoFreeze's rule against a slow reference: at a reading, the prefix of layers whose relative change is at or
    below the median of the active layers' changes freezes; nothing is decided between readings; `change` mode with
    a 1 % threshold freezes nothing on the same gradients (every layer still moves)."""
    growth = [0.02, 0.03, 0.30, 0.04, 0.05, 0.50]  # per-step growth of each layer's gradient norm
    model = Stack(n=len(growth))
    model.embed.requires_grad_(False)
    common = {"granularity": "layer", "change_window": 2, "warmup_steps": 0, "probe_every": 0, "ema_beta": 0.0}
    auto = Freezer(model, FreezingConfig(threshold_mode="percentile", **common))
    fixed = Freezer(Stack(n=len(growth)), FreezingConfig(threshold_mode="change", threshold=0.01, **common))
    fixed.model.embed.requires_grad_(False)
    frozen_per_step = []
    for step in range(1, 9):
        norms = [(1 + g) ** step for g in growth]
        _drive(auto, norms)
        _drive(fixed, norms)
        frozen_per_step.append(auto.frozen_layers())
    # the first changes are known at the second reading (step 4): changes (1+g)^2 - 1, median of the six is between
    # 0.0609 (0.03) and 0.0816 (0.04): layers 0 and 1 are quiet, layer 2 (0.69) is not, so the prefix stops there
    changes = [(1 + g) ** 2 - 1 for g in growth]
    median = percentile(changes, 50.0)
    quiet = [c <= median for c in changes]
    expected_prefix = quiet.index(False)
    assert expected_prefix == 2
    assert frozen_per_step[:3] == [0, 0, 0] and frozen_per_step[3] == expected_prefix
    # later readings rank the four active layers: layer 2 (0.69) is above their median, so the prefix stays at 2
    assert frozen_per_step[3:] == [2] * 5
    assert auto.freeze_history() == {"layers.0": 4, "layers.1": 4}
    assert fixed.frozen_layers() == 0 and min(u.change for u in fixed.units) > 0.01
    restored = Freezer(Stack(n=len(growth)), FreezingConfig(threshold_mode="percentile", **common))
    restored.model.embed.requires_grad_(False)
    restored.load_state_dict(auto.state_dict())
    assert restored.frozen_layers() == 2 and [u.change for u in restored.units] == [u.change for u in auto.units]


def test_percentile_mode_at_percentile_zero_freezes_only_the_least_moving_prefix():
    model = Stack(n=4)
    model.embed.requires_grad_(False)
    cfg = FreezingConfig(
        granularity="layer", threshold_mode="percentile", percentile=0.0, change_window=1, warmup_steps=0,
        probe_every=0, ema_beta=0.0,
    )  # fmt: skip
    freezer = Freezer(model, cfg)
    for step in range(1, 4):
        _drive(freezer, [(1 + g) ** step for g in (0.01, 0.02, 0.03, 0.04)])
    # step 2: layer 0 has the smallest change (the 0th percentile) and freezes; step 3: layer 1 is then the smallest
    assert freezer.freeze_history() == {"layers.0": 2, "layers.1": 3}
