"""GammaGain: the signals, their normalization, the gain, and gamma-gated EWC."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from hf_adaptive.consolidation import EWCPlugin, GammaGain, NeuromodulationConfig, answer_token_signals, compute_fisher
from hf_adaptive.consolidation.neuromodulation import gradient_norm
from hf_adaptive.plugins import TaskContext
from hf_adaptive.tasks import tokenize_task


def test_answer_token_signals_by_hand():
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 3.0], [0.0, 0.0, 0.0]]])
    labels = torch.tensor([[-100, 0, 2]])  # positions 0 and 1 predict the answer tokens 0 and 2
    signals = answer_token_signals(logits, labels)
    p0 = torch.softmax(logits[0, 0], -1)
    p1 = torch.softmax(logits[0, 1], -1)
    nll = -(math.log(p0[0]) + math.log(p1[2])) / 2
    entropy = float(-(p0 * p0.log()).sum() - (p1 * p1.log()).sum()) / 2
    assert signals["nll"] == pytest.approx(nll, rel=1e-6)
    assert signals["entropy"] == pytest.approx(entropy, rel=1e-6)
    assert signals["accuracy"] == 1.0
    assert answer_token_signals(logits, torch.full((1, 3), -100)) is None


def test_gain_formula_by_hand():
    cfg = NeuromodulationConfig(gamma_gain_lambda=3.0, ema_beta=0.5, grad_warmup_steps=2)
    gain = GammaGain(cfg, vocab_size=3)
    assert gain.gain() == 1.0  # nothing observed yet
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 3.0]]])
    first = answer_token_signals(logits, torch.tensor([[-100, 0]]))
    second = answer_token_signals(logits, torch.tensor([[-100, 1]]))
    gain.observe_batch(logits, torch.tensor([[-100, 0]]))
    gain.observe_batch(logits, torch.tensor([[-100, 1]]))
    for norm in (4.0, 2.0, 1.0):
        gain.observe_grad_norm(norm)
    # bias-corrected EMA with beta 1/2: (0.25 x1 + 0.5 x2) / (1 - 0.25), (0.125 x1 + 0.25 x2 + 0.5 x3) / (1 - 0.125)
    ema = {k: (0.25 * first[k] + 0.5 * second[k]) / 0.75 for k in first}
    grad_ema = (0.125 * 4.0 + 0.25 * 2.0 + 0.5 * 1.0) / 0.875
    m = {
        "nll": math.exp(-ema["nll"]),
        "accuracy": ema["accuracy"],
        "entropy": 1 - ema["entropy"] / math.log(3),
        "grad_norm": 1 - grad_ema / ((4.0 + 2.0) / 2),
    }
    for k, v in gain.scores().items():
        assert v == pytest.approx(m[k], rel=1e-6), k
    assert gain.gain() == pytest.approx(3.0 * sum(m.values()) / 4, rel=1e-6)


def test_mastered_task_gets_a_larger_gain_than_a_guessed_one():
    vocab = 50
    labels = torch.tensor([[-100, -100, 7, 9]] * 4)
    confident = torch.full((4, 4, vocab), -10.0)
    confident[:, 1, 7] = 10.0
    confident[:, 2, 9] = 10.0
    mastered, guessed = GammaGain(), GammaGain()
    for step in range(10):
        mastered.observe_batch(confident, labels)
        mastered.observe_grad_norm(10.0 / (step + 1))
        guessed.observe_batch(torch.zeros(4, 4, vocab), labels)  # uniform predictions
        guessed.observe_grad_norm(5.0)
    assert mastered.gain() > 2.5 and guessed.gain() < 0.5
    assert guessed.scores()["entropy"] == pytest.approx(0.0, abs=1e-6)
    assert guessed.scores()["nll"] == pytest.approx(1 / vocab, rel=1e-4)


def test_weights_select_signals_and_state_round_trips():
    gain = GammaGain(NeuromodulationConfig(gamma_gain_lambda=2.0, signal_weights={"accuracy": 1.0}))
    logits = torch.zeros(1, 3, 5)
    logits[0, 0, 1] = 5.0
    gain.observe_batch(logits, torch.tensor([[-100, 1, 3]]))  # first answer token right, second wrong
    assert gain.gain() == pytest.approx(2.0 * 0.5)
    copy = GammaGain(gain.config)
    copy.load_state_dict(gain.state_dict())
    assert copy.gain() == gain.gain() and copy.scores() == gain.scores()
    gain.reset()
    assert gain.gain() == 1.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"gamma_gain_lambda": -1}, "NeuromodulationConfig.gamma_gain_lambda=-1"),
        ({"signal_weights": {"loss": 1.0}}, "NeuromodulationConfig.signal_weights"),
        ({"signal_weights": {"nll": 0.0}}, "at least one > 0"),
        ({"ema_beta": 1.0}, "NeuromodulationConfig.ema_beta=1.0"),
        ({"grad_warmup_steps": 0}, "NeuromodulationConfig.grad_warmup_steps=0"),
    ],
)
def test_bad_config_names_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NeuromodulationConfig(**kwargs)


def test_gradient_norm():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))
    a.grad = torch.tensor([3.0, 0.0])
    b.grad = torch.tensor([0.0, 4.0, 0.0])
    assert gradient_norm([a, b]) == pytest.approx(5.0)
    assert gradient_norm([torch.nn.Parameter(torch.zeros(1))]) is None


@pytest.mark.parametrize("bypass", [False, True])
def test_gamma_gated_ewc_scales_the_new_fisher(tiny_model, tokenizer, small_tasks, tiny_batch, bypass):
    task = small_tasks[0]
    plugin = EWCPlugin(ewc_lambda=1.0, fisher_samples=4, gamma_gated=True, bypass_gamma=bypass, progress_bar=False)
    context = TaskContext.build(task, 0, tokenizer)
    plugin.on_task_begin(None, context)
    tiny_model.train()
    outputs = tiny_model(**tiny_batch)
    outputs.loss.backward()
    assert plugin.loss_terms(None, tiny_model, tiny_batch, outputs) == []  # no Fisher yet, but signals observed
    plugin.on_pre_optimizer_step(None, None, None, model=tiny_model)
    tiny_model.zero_grad()
    plugin.on_task_end(SimpleNamespace(model=tiny_model), context)

    rows = tokenize_task(task, tokenizer).shuffle(seed=0).select(range(4))
    fisher = compute_fisher(tiny_model, rows, progress_bar=False).fisher
    expected_gain = 1.0
    if not bypass:
        reference = GammaGain()
        reference.observe_batch(outputs.logits, tiny_batch["labels"])
        reference.observe_grad_norm(1.0)  # one grad-norm step: warm-up mean == EMA, so its score is 0
        expected_gain = reference.gain()
        assert set(plugin.modulator.scores()) == {"nll", "accuracy", "entropy", "grad_norm"}
        assert plugin.modulator.scores()["grad_norm"] == 0.0
    else:
        assert plugin.modulator is None
    (entry,) = plugin.entries
    assert entry["gamma_gain"] == pytest.approx(expected_gain, rel=1e-6)
    assert bypass or abs(expected_gain - 1.0) > 1e-3  # the gate does change the Fisher
    for name, f in fisher.items():
        torch.testing.assert_close(entry["fisher"][name], expected_gain * f, rtol=1e-5, atol=1e-7)
