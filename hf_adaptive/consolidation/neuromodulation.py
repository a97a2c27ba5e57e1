"""Neuromodulation: a `gamma_gain` that says how firmly the task just learned should be consolidated.

Gamma-gated EWC multiplies the Fisher of a finished task by `gamma_gain` before it is accumulated, so a
task the model ended up mastering (confident, accurate, settled) is protected more than one it barely
learned, whose Fisher would otherwise pin the weights to a poor solution.

Signals (tracked over the task's training steps as bias-corrected exponential moving averages,
EMA_n = Σ_i (1-β) β^(n-i) x_i / (1 - β^n) with β = `ema_beta`, so the first steps of a task do not dominate;
all measured on the answer tokens only, i.e. the positions whose label is not -100):
    * NLL       mean next-token negative log-likelihood of the answer tokens (nats);
    * accuracy  fraction of answer tokens whose argmax prediction is the label;
    * entropy   mean entropy of the predictive distribution at the answer positions (nats);
    * grad norm L2 norm of the gradient of the trainable parameters at each optimizer step (as the
      optimizer sees it, i.e. after the Trainer's clipping to `max_grad_norm`).

Normalization (each signal becomes a "mastery" score in [0, 1], 1 = fully consolidated):
    * m_nll  = exp(-NLL)                      geometric-mean probability of the answer tokens;
    * m_acc  = accuracy;
    * m_ent  = 1 - entropy / log(V)           V = vocabulary size, log V the largest possible entropy;
    * m_grad = clamp(1 - g_end / g_start, 0, 1)  g_start = mean norm of the task's first `grad_warmup_steps`
      steps, g_end = the EMA at task end: how much the gradient has settled (0 = not at all or grew).

    score      = Σ_k w_k m_k / Σ_k w_k        weights `signal_weights` (nll, accuracy, grad_norm, entropy),
                                              over the signals that were observed (a missing one is skipped)
    gamma_gain = gamma_gain_lambda · score    in [0, gamma_gain_lambda]; 1.0 when no signal was observed.

The gain is a weighted combination of normalized NLL, accuracy, gradient norm and entropy, scaled by
`gamma_gain_lambda` (default 3.0); the normalizations above are this package's choice, each a
bounded, scale-free map so that no signal dominates by its units.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..tasks.losses import IGNORE_INDEX
from .config import SIGNALS, NeuromodulationConfig


@torch.no_grad()
def answer_token_signals(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float] | None:
    """Mean NLL, accuracy and predictive entropy over the answer tokens of a batch (None if it has none).

    logits [B, L, V] and labels [B, L] of a causal LM (position t predicts token t+1).
    """
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    if not bool(mask.any()):
        return None
    picked = logits[:, :-1][mask].float()  # only answer positions: [N, V]
    target = targets[mask]
    logp = torch.log_softmax(picked, dim=-1)
    nll = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    accuracy = (picked.argmax(-1) == target).float()
    return {"nll": float(nll.mean()), "accuracy": float(accuracy.mean()), "entropy": float(entropy.mean())}


def gradient_norm(parameters: Any) -> float | None:
    """L2 norm over the `.grad` of the given parameters (None if none has a gradient)."""
    norms = [torch.linalg.vector_norm(p.grad.detach(), dtype=torch.float32) for p in parameters if p.grad is not None]
    if not norms:
        return None
    return float(torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms])))


class GammaGain:
    """Tracks the training signals of one task and turns them into `gamma_gain` (see the module docstring)."""

    def __init__(self, config: NeuromodulationConfig | None = None, vocab_size: int | None = None) -> None:
        self.config = config or NeuromodulationConfig()
        self.vocab_size = vocab_size
        self.reset()

    def reset(self) -> None:
        """Forget the signals (at the start of every task)."""
        self.raw_ema: dict[str, float] = {}
        self.steps: dict[str, int] = dict.fromkeys(SIGNALS, 0)
        self.grad_start_sum = 0.0

    def _update(self, name: str, value: float) -> None:
        if not math.isfinite(value):
            return
        beta = self.config.ema_beta
        self.raw_ema[name] = beta * self.raw_ema.get(name, 0.0) + (1 - beta) * value
        self.steps[name] += 1

    @property
    def ema(self) -> dict[str, float]:
        """The bias-corrected moving average of every observed signal."""
        beta = self.config.ema_beta
        return {k: v / (1 - beta ** self.steps[k]) for k, v in self.raw_ema.items() if self.steps[k] > 0}

    def observe_batch(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Record NLL, accuracy and entropy of one training batch."""
        if self.vocab_size is None:
            self.vocab_size = int(logits.shape[-1])
        signals = answer_token_signals(logits.detach(), labels)
        if signals is not None:
            for name, value in signals.items():
                self._update(name, value)

    def observe_grad_norm(self, norm: float | None) -> None:
        """Record the gradient norm of one optimizer step."""
        if norm is None or not math.isfinite(norm):
            return
        if self.steps["grad_norm"] < self.config.grad_warmup_steps:
            self.grad_start_sum += norm
        self._update("grad_norm", norm)

    def scores(self) -> dict[str, float]:
        """The normalized mastery score m_k in [0, 1] of every observed signal."""
        out: dict[str, float] = {}
        ema = self.ema
        if "nll" in ema:
            out["nll"] = math.exp(-ema["nll"])
        if "accuracy" in ema:
            out["accuracy"] = min(max(ema["accuracy"], 0.0), 1.0)
        if "entropy" in ema and self.vocab_size and self.vocab_size > 1:
            out["entropy"] = min(max(1.0 - ema["entropy"] / math.log(self.vocab_size), 0.0), 1.0)
        if "grad_norm" in ema:
            start = self.grad_start_sum / min(self.steps["grad_norm"], self.config.grad_warmup_steps)
            out["grad_norm"] = min(max(1.0 - ema["grad_norm"] / start, 0.0), 1.0) if start > 0 else 1.0
        return out

    def gain(self) -> float:
        """`gamma_gain_lambda` × the weighted mean of the scores; 1.0 when nothing was observed."""
        scores = self.scores()
        weights = {k: float(self.config.signal_weights.get(k, 0.0)) for k in scores}
        total = sum(weights.values())
        if total <= 0:
            return 1.0
        return float(self.config.gamma_gain_lambda) * sum(weights[k] * scores[k] for k in scores) / total

    def state_dict(self) -> dict[str, Any]:
        return {
            "raw_ema": dict(self.raw_ema),
            "steps": dict(self.steps),
            "grad_start_sum": self.grad_start_sum,
            "vocab_size": self.vocab_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.raw_ema = {k: float(v) for k, v in state.get("raw_ema", {}).items()}
        self.steps = {**dict.fromkeys(SIGNALS, 0), **{k: int(v) for k, v in state.get("steps", {}).items()}}
        self.grad_start_sum = float(state.get("grad_start_sum", 0.0))
        self.vocab_size = state.get("vocab_size", self.vocab_size)


__all__ = ["SIGNALS", "GammaGain", "NeuromodulationConfig", "answer_token_signals", "gradient_norm"]
