"""`HeadGatePlugin` (plugin `head_l0`): the L0 penalty of hard-concrete gates as a loss term, its options."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from hf_adaptive.control.config import HEAD_L0_OPTIONS, GateConfig, HeadL0Config
from hf_adaptive.control.head_l0 import HeadGatePlugin
from hf_adaptive.models import build_tiny_gemma
from hf_adaptive.models.gates import find_gates, gate_model
from hf_adaptive.utils.validation import OptionError


def test_plugin_term_is_the_weighted_expected_l0(tiny_model, tiny_batch):
    gated = gate_model(tiny_model, mode="hard_concrete", init_log_alpha=0.0)
    plugin = HeadGatePlugin(weight=0.5)
    assert plugin.config == HeadL0Config(weight=0.5) and plugin.weight == 0.5
    (term,) = plugin.loss_terms(None, tiny_model, tiny_batch, None)
    assert term.name == "head_l0" and term.weight == 0.5
    torch.testing.assert_close(term.value, gated.expected_l0())
    term.value.backward()
    assert (gated.log_alpha.grad > 0).all()  # the penalty pushes every gate towards closing
    assert HeadGatePlugin(HeadL0Config(weight=0.25)).weight == 0.25
    assert HeadGatePlugin().weight == 0.01


def test_plugin_refuses_bad_options():
    with pytest.raises(OptionError, match=r"HeadL0Config\.weight=-1\.0"):
        HeadGatePlugin(weight=-1.0)
    with pytest.raises(TypeError, match="wieght"):
        HeadGatePlugin(wieght=0.1)
    with pytest.raises(OptionError, match=r"GateConfig\.mode='fixed'.*hard_concrete"):
        HeadGatePlugin(gate=GateConfig(mode="fixed"))


def test_from_config_attaches_hard_concrete_gates(tokenizer):
    model, _ = build_tiny_gemma(tokenizer, seed=0)
    options = SimpleNamespace(gate_l0_weight=0.3, gate_mode=None)
    plugin = HeadGatePlugin.from_config(options, model=model)
    assert plugin.weight == 0.3 and find_gates(model).mode == "hard_concrete"
    again = HeadGatePlugin.from_config(SimpleNamespace(gate_mode="hard_concrete"), model=model)
    assert again.weight == 0.01 and find_gates(model).mode == "hard_concrete"  # the existing gates are kept
    with pytest.raises(OptionError, match=r"SimpleNamespace\.gate_l0_weight=-0\.5"):
        HeadGatePlugin.from_config(SimpleNamespace(gate_l0_weight=-0.5), model=model)
    fixed, _ = build_tiny_gemma(tokenizer, seed=0)
    gate_model(fixed)
    with pytest.raises(ValueError, match="already has 'fixed' gates"):
        HeadGatePlugin.from_config(SimpleNamespace(), model=fixed)
    assert HeadGatePlugin.options == HEAD_L0_OPTIONS and HeadGatePlugin.needs_model


def test_plugin_checks_the_gates_at_train_begin(tiny_model):
    gate_model(tiny_model)
    with pytest.raises(ValueError, match="hard_concrete"):
        HeadGatePlugin().on_train_begin(None, None, None, model=tiny_model)


def test_l0_plugin_trains_gates_in_continual_trainer(tmp_path, tokenizer, small_tasks, test_seed):
    """Weight 5 on the L0 term, whose gradient on every log_alpha is positive: it outweighs the task's pull on the
    gates, so most gates close in a few Adam steps whatever the seed (the effect is large by construction)."""
    from hf_adaptive.config import ContinualConfig
    from hf_adaptive.tasks import CausalLMCollator, tokenize_task
    from hf_adaptive.trainer import ContinualTrainer

    model, _ = build_tiny_gemma(tokenizer, seed=test_seed)
    gated = gate_model(model, mode="hard_concrete", init_log_alpha=1.0)
    before = gated.log_alpha.detach().clone()
    args = ContinualConfig(
        output_dir=str(tmp_path),
        max_steps=5,
        per_device_train_batch_size=8,
        learning_rate=0.05,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        use_cpu=True,
        disable_tqdm=True,
        seed=test_seed,
    )
    rows = tokenize_task(small_tasks[0], tokenizer)
    trainer = ContinualTrainer(
        model=model,
        args=args,
        train_dataset=rows,
        data_collator=CausalLMCollator(tokenizer),
        callbacks=[HeadGatePlugin(weight=5.0)],
    )
    trainer.train()
    logged = [r["loss_head_l0"] for r in trainer.state.log_history if "loss_head_l0" in r]
    assert logged and logged[-1] < logged[0]  # the penalty closes gates
    assert (gated.log_alpha.detach() < before).float().mean() > 0.5, gated.log_alpha.detach() - before
