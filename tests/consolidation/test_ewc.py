"""EWCPlugin: the penalty and its gradient against a hand computation, online decay, state round trip."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from hf_adaptive.consolidation import EWCConfig, EWCPlugin, NeuromodulationConfig, compute_fisher, trainable_parameters
from hf_adaptive.plugins import LossTerm, TaskContext
from hf_adaptive.tasks import tokenize_task
from hf_adaptive.utils.io import load_state, save_state


def _random_like(params: dict, seed: int, scale: float = 1.0, positive: bool = False) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, p in params.items():
        t = torch.randn(p.shape, generator=g) * scale
        out[name] = t.abs() if positive else t
    return out


def _hand_penalty(model, entries, lam):
    """(λ/2) Σ_t Σ_p F_t,p (θ_p − θ*_t,p)², element by element in float64."""
    params = dict(model.named_parameters())
    total = 0.0
    for fisher, anchor in entries:
        for name, f in fisher.items():
            diff = params[name].detach().double() - anchor[name].double()
            total += float((f.double() * diff * diff).sum())
    return 0.5 * lam * total


def _stand_in_trainer(model):
    return SimpleNamespace(model=model)  # no tokenizer: the plugin reads the rows of the task context


def test_penalty_and_gradient_equal_hand_computation(tiny_model):
    params = trainable_parameters(tiny_model)
    lam = 7.5
    plugin = EWCPlugin(ewc_lambda=lam, progress_bar=False)
    entries = []
    for task in range(2):  # separate mode: one term per task
        fisher = _random_like(params, seed=10 + task, positive=True)
        noise = _random_like(params, 20 + task)
        anchor = {n: p.detach() + 0.01 * noise[n] for n, p in params.items()}
        plugin.consolidate(f"t{task}", fisher, anchor)
        entries.append((fisher, anchor))
    assert len(plugin.entries) == 2

    tiny_model.train()
    (term,) = plugin.loss_terms(None, tiny_model, {}, None)
    assert isinstance(term, LossTerm) and term.name == "ewc" and term.weight == 1.0
    expected = _hand_penalty(tiny_model, entries, lam)
    assert expected > 0
    assert float(term.value.detach()) == pytest.approx(expected, rel=1e-5)

    grads = torch.autograd.grad(term.value, list(params.values()))
    for (name, p), g in zip(params.items(), grads, strict=True):
        hand = lam * sum(f[name] * (p.detach() - a[name]) for f, a in entries)  # d/dθ (λ/2) F (θ-θ*)² = λ F (θ-θ*)
        torch.testing.assert_close(g, hand, rtol=1e-5, atol=1e-7)


def test_no_term_before_the_first_task_and_when_disabled(tiny_model):
    plugin = EWCPlugin(ewc_lambda=1.0)
    assert plugin.loss_terms(None, tiny_model, {}, None) == []
    disabled = EWCPlugin(ewc_lambda=0.0)
    params = trainable_parameters(tiny_model)
    disabled.consolidate("t", _random_like(params, 1, positive=True), {n: p.detach() + 1 for n, p in params.items()})
    assert not disabled.enabled and disabled.loss_terms(None, tiny_model, {}, None) == []


def test_penalty_covers_only_parameters_trainable_now(tiny_model):
    params = trainable_parameters(tiny_model)
    plugin = EWCPlugin(ewc_lambda=2.0)
    fisher = _random_like(params, 1, positive=True)
    anchor = {n: p.detach() + 0.1 for n, p in params.items()}
    plugin.consolidate("t", fisher, anchor)
    frozen = "model.embed_tokens.weight"
    tiny_model.get_parameter(frozen).requires_grad_(False)
    plugin.on_task_begin(None, None)  # the trainable set changes at task boundaries
    value = plugin.penalty(tiny_model)
    expected = _hand_penalty(tiny_model, [({n: f for n, f in fisher.items() if n != frozen}, anchor)], 2.0)
    assert float(value.detach()) == pytest.approx(expected, rel=1e-5)


def test_online_mode_decays_and_accumulates(tiny_model):
    params = trainable_parameters(tiny_model)
    names = list(params)
    gamma = 0.3
    plugin = EWCPlugin(ewc_lambda=1.0, mode="online", gamma=gamma)
    f1, f2 = _random_like(params, 1, positive=True), _random_like(params, 2, positive=True)
    a1 = {n: p.detach() + 0.5 for n, p in params.items()}
    a2 = {n: p.detach() - 0.25 for n, p in params.items()}
    plugin.consolidate("t1", f1, a1)
    only_new = {n: f2[n] for n in names[1:]}  # the first parameter was not trainable in task 2
    plugin.consolidate("t2", only_new, a2, gain=2.0)
    assert len(plugin.entries) == 1
    running = plugin.entries[0]
    torch.testing.assert_close(running["fisher"][names[0]], gamma * f1[names[0]])
    torch.testing.assert_close(running["anchor"][names[0]], a1[names[0]])  # untouched parameter keeps its anchor
    for n in names[1:]:
        torch.testing.assert_close(running["fisher"][n], gamma * f1[n] + 2.0 * f2[n])
        torch.testing.assert_close(running["anchor"][n], a2[n])
    expected = _hand_penalty(tiny_model, [(running["fisher"], running["anchor"])], 1.0)
    assert float(plugin.penalty(tiny_model).detach()) == pytest.approx(expected, rel=1e-5)


def test_separate_mode_keeps_every_task_and_gain_scales(tiny_model):
    params = trainable_parameters(tiny_model)
    plugin = EWCPlugin(ewc_lambda=1.0, mode="separate", gamma=0.1)  # gamma is ignored in separate mode
    f = _random_like(params, 3, positive=True)
    plugin.consolidate("a", f, {n: p.detach() for n, p in params.items()})
    plugin.consolidate("b", f, {n: p.detach() for n, p in params.items()}, gain=0.5)
    assert [e["task"] for e in plugin.entries] == ["a", "b"]
    for n in params:
        torch.testing.assert_close(plugin.entries[0]["fisher"][n], f[n])
        torch.testing.assert_close(plugin.entries[1]["fisher"][n], 0.5 * f[n])


def test_on_task_end_measures_the_fisher_of_the_task(tiny_model, tokenizer, small_tasks):
    task = small_tasks[0]
    plugin = EWCPlugin(ewc_lambda=3.0, fisher_samples=6, fisher_chunk_size=4, seed=5, progress_bar=False)
    context = TaskContext.build(task, 0, tokenizer)
    plugin.on_task_begin(None, context)
    plugin.on_task_end(_stand_in_trainer(tiny_model), context)
    rows = tokenize_task(task, tokenizer).shuffle(seed=5).select(range(6))
    expected = compute_fisher(tiny_model, rows, method="loop", progress_bar=False).fisher
    (entry,) = plugin.entries
    assert entry["task"] == task.name and entry["gamma_gain"] == 1.0
    for name, p in trainable_parameters(tiny_model).items():
        torch.testing.assert_close(entry["fisher"][name], expected[name], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(entry["anchor"][name], p.detach())
    assert plugin.history[0]["fisher_samples"] == 6 and plugin.history[0]["fisher_method"] == "vmap"
    # right at the anchor the penalty is zero; moving away makes it grow
    assert float(plugin.penalty(tiny_model).detach()) == 0.0
    with torch.no_grad():
        for p in tiny_model.parameters():
            p.add_(0.01)
    assert float(plugin.penalty(tiny_model).detach()) > 0


@pytest.mark.parametrize("mode", ["separate", "online"])
def test_state_dict_round_trip_restores_fisher_and_anchors(tiny_model, tmp_path, mode):
    params = trainable_parameters(tiny_model)
    plugin = EWCPlugin(ewc_lambda=4.0, mode=mode, gamma=0.5, gamma_gated=True)
    plugin.modulator.observe_grad_norm(2.0)
    for t in range(2):
        anchor = {n: p.detach() + 0.1 * (t + 1) for n, p in params.items()}
        plugin.consolidate(f"t{t}", _random_like(params, t, positive=True), anchor, gain=1.5)
    save_state(tmp_path / "ewc", plugin.state_dict())
    assert (tmp_path / "ewc" / "tensors.safetensors").is_file()

    restored = EWCPlugin(ewc_lambda=4.0, mode=mode, gamma=0.5, gamma_gated=True)
    restored.load_state_dict(load_state(tmp_path / "ewc"))
    assert len(restored.entries) == len(plugin.entries) == (2 if mode == "separate" else 1)
    for old, new in zip(plugin.entries, restored.entries, strict=True):
        assert new["task"] == old["task"] and new["gamma_gain"] == old["gamma_gain"]
        for key in ("fisher", "anchor"):
            assert new[key].keys() == old[key].keys()
            for n in old[key]:
                assert torch.equal(new[key][n], old[key][n])
    assert restored.modulator.state_dict() == plugin.modulator.state_dict()
    expected = float(plugin.penalty(tiny_model).detach())
    assert float(restored.penalty(tiny_model).detach()) == pytest.approx(expected, rel=1e-6)

    with pytest.raises(ValueError, match="EWCPlugin.mode"):
        EWCPlugin(mode="online" if mode == "separate" else "separate").load_state_dict(load_state(tmp_path / "ewc"))


def test_from_config_maps_the_options():
    """Every option (under its historic `ContinualConfig` name) reaches the plugin; seed and progress bar follow the
    TrainingArguments `seed` and `disable_tqdm`."""
    args = SimpleNamespace(
        ewc_lambda=250.0,
        ewc_mode="online",
        ewc_gamma=0.9,
        fisher_samples=25,
        fisher_type="true",
        fisher_chunk_size=4,
        fisher_method="loop",
        fisher_normalization="mean",
        gamma_gated_ewc=True,
        gamma_gain_lambda=2.0,
        neuromod_ema_beta=0.5,
        neuromod_grad_warmup_steps=3,
        ewc_fixed_lambda_bypass_gamma=False,
        seed=7,
        disable_tqdm=True,
    )
    plugin = EWCPlugin.from_config(args)
    fields = (
        plugin.ewc_lambda,
        plugin.mode,
        plugin.gamma,
        plugin.fisher_samples,
        plugin.fisher_type,
        plugin.fisher_chunk_size,
        plugin.fisher_method,
        plugin.fisher_normalization,
        plugin.seed,
        plugin.progress_bar,
    )
    assert fields == (250.0, "online", 0.9, 25, "true", 4, "loop", "mean", 7, False)
    assert plugin.uses_gamma_gain and plugin.modulator.config.gamma_gain_lambda == 2.0
    assert (plugin.modulator.config.ema_beta, plugin.modulator.config.grad_warmup_steps) == (0.5, 3)
    args.ewc_fixed_lambda_bypass_gamma = True
    assert not EWCPlugin.from_config(args).uses_gamma_gain


def test_enabled_by_name_with_no_option_it_penalizes(tiny_model):
    """Defaults live once, in EWCConfig: built from a config with no EWC option, EWC is on (λ = 1), not a no-op."""
    plugin = EWCPlugin.from_config(SimpleNamespace())
    assert plugin.config == EWCConfig() and plugin.ewc_lambda == 1.0 and plugin.enabled
    assert plugin.neuromodulation == NeuromodulationConfig() and plugin.modulator is None
    params = trainable_parameters(tiny_model)
    plugin.consolidate("t", _random_like(params, 1, positive=True), {n: p.detach() + 0.1 for n, p in params.items()})
    (term,) = plugin.loss_terms(None, tiny_model, {}, None)
    assert float(term.value.detach()) > 0


def test_constructor_takes_a_config_and_keyword_overrides():
    config = EWCConfig(ewc_lambda=3.0, mode="online")
    plugin = EWCPlugin(config, fisher_samples=9)
    assert (plugin.ewc_lambda, plugin.mode, plugin.fisher_samples) == (3.0, "online", 9)
    assert config.fisher_samples == 50  # the given config is not modified
    with pytest.raises(TypeError, match="not_an_option"):
        EWCPlugin(not_an_option=1)
    gated = EWCPlugin(gamma_gated=True, neuromodulation=NeuromodulationConfig(gamma_gain_lambda=0.5))
    assert gated.modulator.config.gamma_gain_lambda == 0.5


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"ewc_lambda": -1.0}, "EWCConfig.ewc_lambda=-1.0"),
        ({"mode": "offline"}, "EWCConfig.mode='offline'"),
        ({"gamma": 1.5}, "EWCConfig.gamma=1.5"),
        ({"fisher_samples": 0}, "EWCConfig.fisher_samples=0"),
        ({"fisher_type": "x"}, "EWCConfig.fisher_type"),
        ({"fisher_method": "x"}, "EWCConfig.fisher_method"),
    ],
)
def test_bad_options_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EWCPlugin(**kwargs)


def test_fisher_normalization_scales_each_task_to_unit_max_or_mean():
    import torch

    from hf_adaptive.consolidation import EWCPlugin

    fisher = {"a": torch.tensor([1e-6, 4e-6]), "b": torch.tensor([[2e-6]])}
    anchor = {"a": torch.zeros(2), "b": torch.zeros(1, 1)}
    for mode, expected in (("max", 4e-6), ("mean", 7e-6 / 3), ("none", 1.0)):
        plugin = EWCPlugin(ewc_lambda=2.0, fisher_normalization=mode)
        plugin.consolidate("t", fisher, anchor, gain=0.5)
        stored = plugin.entries[0]["fisher"]
        torch.testing.assert_close(stored["a"], 0.5 * fisher["a"] / expected)
        torch.testing.assert_close(stored["b"], 0.5 * fisher["b"] / expected)
    with pytest.raises(ValueError, match="EWCConfig.fisher_normalization='l2'"):
        EWCPlugin(fisher_normalization="l2")
