"""`AdaptiveScheduler`: training as a feedback loop over the optimizer's gains (LR, momentum, dither).

The optimizer (the "filter": SGD, AdamW, LAMB, Lookahead, ...) is left untouched; this controller only rewrites the
gains in its `param_groups` from scalar feedback (the loss and an optional reward), following the design note
"Theory of Adaptive Scheduling":

* learning rate  alpha <- clip(alpha * f),  f = 1 + (u - 1) / (1 + lambda * v) on improvement (the rise is damped by
  the normalized noise variance v of recent losses (see `variance`), so a noisy run climbs slowly), f = d after
  more than `patience` observations without improvement (worsening or stalled: "if improvement stalls, drop the LR
  once then hold"), then `cooldown` observations without any change;
* momentum       mu <- clip(mu + step) after `consistency` improvements in a row (or a rising reward),
                 mu <- clip(mu - step) when the losses are noisy (v > noise_threshold) or the reward falls;
                 SGD's `momentum` or Adam/LAMB's beta1;
* dither         sigma <- clip(sigma * sigma_up) after `plateau_patience` plateau observations,
                 sigma <- clip(sigma * sigma_down) when unstable (worsening or noisy); off by default. After each
                 optimizer step every trainable parameter gets N(0, (sigma * rms(p))^2) noise (relative to its scale);
* non-finite loss or gradients: the optimizer step is skipped (gradients set to None, so no parameter and no
  optimizer buffer changes) and alpha <- clip(alpha * nan_backoff);
* loss spike (a finite loss above `spike_ratio` x the loss EMA, from the second observation on, warm-up included):
  alpha <- clip(alpha * spike_backoff) at once, then `cooldown`. The patience rule alone waits `patience`
  observations and then cuts once per `cooldown`: on SmolLM2 at a 5x too large LR the loss jumped 3x above its EMA
  at step 3 and no cut could come before step 10 (benchmarks/scheduler_real.py). The spike enters the EMA, so a
  lasting level shift stops counting as a spike after a cut or two;
* anneal (optional, `anneal="cosine"` or `"linear"` over a horizon of observations): the LR in force is the law's
  alpha times the decay factor at the current observation, like the Trainer's cosine schedule; the law goes on
  adapting alpha underneath (a rise when the loss improves, cuts on stalls and spikes).

"Improvement" and "worsening" are judged on an EMA of the loss (noisy minibatch losses would flip the laws at every
step): improvement when the EMA beats its best value by `threshold` (relative) and by `noise_margin` standard
deviations of the EMA's own noise (so variance also raises the bar for speeding up), worsening when the EMA rises
by more than `threshold` (relative) since the previous observation, plateau otherwise.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..utils.validation import fail
from .config import AdaptiveSchedulerConfig

if TYPE_CHECKING:  # pragma: no cover
    from .freezing import Freezer

EVENTS = ("warmup", "improved", "worsened", "plateau", "skipped", "spike")


@dataclass
class SchedulerSnapshot:
    """What one `step`/`observe` decided: the gains now in force and why (`lr`: in force, i.e. the law's own LR
    `law_lr` times `anneal_factor`)."""

    step: int
    loss: float
    lr: float
    momentum: float | None
    sigma: float
    variance: float
    event: str
    skipped: bool = False
    reward: float | None = None
    frozen_fraction: float | None = None
    anneal_factor: float = 1.0
    law_lr: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _momentum_key(group: dict[str, Any]) -> str | None:
    """'momentum' for SGD-like groups that use it, 'betas' for Adam-like ones, None when there is nothing to adapt."""
    if "betas" in group:
        return "betas"
    if "momentum" in group and isinstance(group["momentum"], (int, float)) and group["momentum"] > 0:
        return "momentum"
    return None


class AdaptiveScheduler:
    """Adapts LR, momentum and dither of any `torch.optim.Optimizer` from the loss (and an optional reward).

    Standalone use (the scheduler owns the optimizer step, so a NaN can never reach the weights)::

        loss = model(**batch).loss
        loss.backward()
        snapshot = scheduler.step(loss)      # optimizer.step() (or skip) + dither + adaptation
        optimizer.zero_grad(set_to_none=True)

    Inside a `transformers.Trainer`, `AdaptiveSchedulerCallback` calls the pieces (`guard_gradients`,
    `apply_dither`, `observe`, `apply_gains`) at the right hooks.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        config: AdaptiveSchedulerConfig | None = None,
        freezer: Freezer | None = None,
        horizon: int | None = None,
    ) -> None:
        """`horizon`: observations the anneal spans when `config.anneal_steps` is None (the callback passes the
        Trainer's step count)."""
        if not isinstance(optimizer, torch.optim.Optimizer):
            fail("AdaptiveScheduler", "optimizer", type(optimizer).__name__, "must be a torch.optim.Optimizer")
        self.optimizer = optimizer
        self.config = config or AdaptiveSchedulerConfig()
        self.freezer = freezer
        cfg = self.config
        self.horizon = cfg.anneal_steps if cfg.anneal_steps is not None else horizon
        if cfg.anneal != "none":
            if self.horizon is None:
                fail(
                    "AdaptiveSchedulerConfig",
                    "anneal_steps",
                    None,
                    f"must be an integer >= 1 with anneal={cfg.anneal!r} when no horizon is given (the Trainer "
                    "callback passes its step count)",
                )
            if isinstance(self.horizon, bool) or not isinstance(self.horizon, int) or self.horizon < 1:
                fail("AdaptiveScheduler", "horizon", self.horizon, "must be an integer >= 1")
        groups = optimizer.param_groups
        self._base_lrs = [float(g["lr"]) for g in groups]
        self.lr = min(max(self._base_lrs[0], cfg.lr_bounds[0]), cfg.lr_bounds[1])
        self._momentum_keys = [_momentum_key(g) for g in groups]
        self.momentum = self._read_momentum()
        if self.momentum is not None and cfg.adapt_momentum:
            self.momentum = min(max(self.momentum, cfg.momentum_bounds[0]), cfg.momentum_bounds[1])
        self.sigma = min(max(cfg.sigma, cfg.sigma_bounds[0]), cfg.sigma_bounds[1]) if cfg.dither else 0.0
        self.num_steps = 0
        self.num_skipped = 0
        self.num_spikes = 0
        self.loss_ema: float | None = None
        self.best_ema: float | None = None
        self.last_reward: float | None = None
        self.recent: deque[float] = deque(maxlen=cfg.window)
        self.bad_count = 0
        self.improve_streak = 0
        self.plateau_count = 0
        self.cooldown_left = 0
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.last_snapshot: SchedulerSnapshot | None = None
        self.apply_gains()

    # ----------------------------------------------------------------------------------------- gains on the optimizer
    def _read_momentum(self) -> float | None:
        for group, key in zip(self.optimizer.param_groups, self._momentum_keys, strict=True):
            if key == "betas":
                return float(group["betas"][0])
            if key == "momentum":
                return float(group["momentum"])
        return None

    def anneal_factor(self) -> float:
        """The decay on top of the law's LR after `num_steps` observations: 1 without an anneal."""
        kind = self.config.anneal
        if kind == "none" or self.horizon is None:
            return 1.0
        progress = min(self.num_steps, self.horizon) / self.horizon
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - progress

    def lr_in_force(self) -> float:
        """The law's LR times the anneal factor, within `lr_bounds`: what the first param group trains with."""
        return self._clip_lr(self.lr * self.anneal_factor())

    def apply_gains(self) -> None:
        """Write the LR in force (scaled per group as at construction) and momentum into the optimizer's groups."""
        in_force = self.lr_in_force()
        for group in self.optimizer.param_groups[len(self._base_lrs) :]:  # groups added later keep their LR ratio
            lr = float(group["lr"])
            self._base_lrs.append(lr * self._base_lrs[0] / in_force if in_force > 0 else lr)
            self._momentum_keys.append(_momentum_key(group))
        first = self._base_lrs[0]
        for group, base, key in zip(self.optimizer.param_groups, self._base_lrs, self._momentum_keys, strict=True):
            lr = in_force * base / first if first > 0 and base != first else in_force
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
            if self.momentum is None or not self.config.adapt_momentum:
                continue
            if key == "betas":
                group["betas"] = (self.momentum, *tuple(group["betas"])[1:])
            elif key == "momentum":
                group["momentum"] = self.momentum

    def _clip_lr(self, lr: float) -> float:
        lo, hi = self.config.lr_bounds
        return min(max(lr, lo), hi)

    # ------------------------------------------------------------------------------------------------- step pieces
    def _params(self) -> list[torch.nn.Parameter]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    @torch.no_grad()
    def gradients_finite(self) -> bool:
        grads = [p.grad for p in self._params() if p.grad is not None]
        if not grads:
            return True
        norms = torch._foreach_norm(grads)
        return bool(torch.isfinite(torch.stack([n.float() for n in norms])).all())

    def guard_gradients(self, loss: float | torch.Tensor | None = None) -> bool:
        """True when the step may go ahead; otherwise drop all gradients (so `optimizer.step()` changes nothing)."""
        finite = (loss is None or math.isfinite(float(loss))) and self.gradients_finite()
        if not finite:
            self.optimizer.zero_grad(set_to_none=True)
        return finite

    @torch.no_grad()
    def apply_dither(self) -> None:
        """theta <- theta + sigma * rms(theta) * N(0, 1) on every trainable parameter that just got a gradient."""
        if not self.config.dither or self.sigma <= 0:
            return
        for p in self._params():
            if not p.requires_grad or p.grad is None:
                continue
            scale = p.detach().float().pow(2).mean().sqrt().clamp_min(1e-8).item() * self.sigma
            noise = torch.randn(p.shape, generator=self.generator, dtype=torch.float32).to(p.device, p.dtype)
            p.add_(noise, alpha=scale)

    def variance(self) -> float:
        """Noise variance of the recent losses over their squared mean (scale free).

        Estimated from successive differences, mean((l_t - l_{t-1})^2) / 2 (von Neumann), so a steady trend (a
        loss that simply goes down) does not count as noise; only step-to-step jitter does.
        """
        if len(self.recent) < 2:
            return 0.0
        values = torch.tensor(list(self.recent), dtype=torch.float64)
        mean = values.mean().item()
        return (values.diff().pow(2).mean().item() / 2) / (mean * mean + 1e-12)

    # -------------------------------------------------------------------------------------------------- the laws
    def observe(
        self, loss: float | torch.Tensor, reward: float | None = None, skipped: bool = False
    ) -> SchedulerSnapshot:
        """Update LR / momentum / sigma from one loss observation (the optimizer step itself is not taken here)."""
        cfg = self.config
        loss_value = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
        self.num_steps += 1
        if skipped or not math.isfinite(loss_value):
            self.num_skipped += 1
            self.lr = self._clip_lr(self.lr * cfg.nan_backoff)
            self.cooldown_left = cfg.cooldown
            self.improve_streak = 0
            return self._finish(loss_value, reward, "skipped", skipped=True)

        spike = cfg.spike_ratio > 0 and self.loss_ema is not None and loss_value > cfg.spike_ratio * self.loss_ema > 0
        self.recent.append(loss_value)
        previous = self.loss_ema
        self.loss_ema = loss_value if previous is None else cfg.ema_beta * previous + (1 - cfg.ema_beta) * loss_value
        variance = self.variance()
        reward_delta = None
        if reward is not None:
            reward = float(reward)
            if self.last_reward is not None and math.isfinite(reward):
                reward_delta = reward - self.last_reward
            if math.isfinite(reward):
                self.last_reward = reward

        if spike:  # no patience: the step that made it was too large; hold the regular law afterwards
            self.num_spikes += 1
            self.lr = self._clip_lr(self.lr * cfg.spike_backoff)
            self.cooldown_left = cfg.cooldown
            self.bad_count = 0
            self.improve_streak = 0
            self.plateau_count = 0
            return self._finish(loss_value, reward, "spike", variance=variance)

        if self.num_steps - self.num_skipped <= cfg.warmup or previous is None:
            self.best_ema = self.loss_ema if self.best_ema is None else min(self.best_ema, self.loss_ema)
            return self._finish(loss_value, reward, "warmup")

        scale = max(abs(previous), 1e-12)
        # an improvement must beat the relative threshold and the EMA's own noise (std of an EMA of white noise)
        noise = math.sqrt(variance) * max(abs(statistics.fmean(self.recent)), 1e-12)
        margin = max(
            cfg.threshold * max(abs(self.best_ema), 1e-12),
            cfg.noise_margin * noise * math.sqrt((1 - cfg.ema_beta) / (1 + cfg.ema_beta)),
        )
        if self.loss_ema < self.best_ema - margin:
            event = "improved"
        elif self.loss_ema - previous > cfg.threshold * scale:
            event = "worsened"
        else:
            event = "plateau"
        self.best_ema = min(self.best_ema, self.loss_ema)
        noisy = variance > cfg.noise_threshold

        # learning rate
        if self.cooldown_left > 0:  # hold: no change, and worsenings during the hold do not count
            self.cooldown_left -= 1
            self.bad_count = 0
        elif event == "improved":
            self.lr = self._clip_lr(self.lr * (1.0 + (cfg.lr_up - 1.0) / (1.0 + cfg.variance_damping * variance)))
            self.bad_count = 0
        else:  # worsened or stalled: ReduceLROnPlateau-like patience, then one cut and a hold
            self.bad_count += 1
            if self.bad_count > cfg.patience:
                self.lr = self._clip_lr(self.lr * cfg.lr_down)
                self.cooldown_left = cfg.cooldown
                self.bad_count = 0

        # momentum
        self.improve_streak = self.improve_streak + 1 if event == "improved" else 0
        if self.momentum is not None and cfg.adapt_momentum:
            lo, hi = cfg.momentum_bounds
            if noisy or (reward_delta is not None and reward_delta < 0):
                self.momentum = max(lo, self.momentum - cfg.momentum_step)
            elif self.improve_streak >= cfg.consistency or (reward_delta is not None and reward_delta > 0):
                self.momentum = min(hi, self.momentum + cfg.momentum_step)

        # exploration dither
        self.plateau_count = self.plateau_count + 1 if event == "plateau" else 0
        if cfg.dither:
            lo, hi = cfg.sigma_bounds
            if event == "worsened" or noisy:
                self.sigma = max(lo, self.sigma * cfg.sigma_down)
            elif self.plateau_count >= cfg.plateau_patience:
                self.sigma = min(hi, self.sigma * cfg.sigma_up)
                self.plateau_count = 0
        return self._finish(loss_value, reward, event, variance=variance)

    def _finish(
        self, loss: float, reward: float | None, event: str, skipped: bool = False, variance: float | None = None
    ) -> SchedulerSnapshot:
        self.apply_gains()
        frozen = self.freezer.frozen_fraction() if self.freezer is not None else None
        self.last_snapshot = SchedulerSnapshot(
            step=self.num_steps,
            loss=loss,
            lr=self.lr_in_force(),
            momentum=self.momentum,
            sigma=self.sigma,
            variance=self.variance() if variance is None else variance,
            event=event,
            skipped=skipped,
            reward=reward,
            frozen_fraction=frozen,
            anneal_factor=self.anneal_factor(),
            law_lr=self.lr,
        )
        return self.last_snapshot

    def step(self, loss: float | torch.Tensor, reward: float | None = None) -> SchedulerSnapshot:
        """One full control step after `loss.backward()`: freeze/probe, optimizer step (or skip), dither, adapt."""
        loss_value = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
        ok = self.guard_gradients(loss_value)
        if ok:
            if self.freezer is not None:
                self.freezer.update(self.optimizer)
            self.optimizer.step()
            self.apply_dither()
        return self.observe(loss_value, reward, skipped=not ok)

    # ------------------------------------------------------------------------------------------------ resumability
    def state_dict(self) -> dict[str, Any]:
        state = {
            "lr": self.lr,
            "momentum": self.momentum,
            "sigma": self.sigma,
            "num_steps": self.num_steps,
            "num_skipped": self.num_skipped,
            "num_spikes": self.num_spikes,
            "horizon": self.horizon,
            "loss_ema": self.loss_ema,
            "best_ema": self.best_ema,
            "last_reward": self.last_reward,
            "recent": list(self.recent),
            "bad_count": self.bad_count,
            "improve_streak": self.improve_streak,
            "plateau_count": self.plateau_count,
            "cooldown_left": self.cooldown_left,
            "base_lrs": list(self._base_lrs),
            "generator": self.generator.get_state(),
        }
        if self.freezer is not None:
            state["freezer"] = self.freezer.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in (
            "lr",
            "momentum",
            "sigma",
            "num_steps",
            "num_skipped",
            "loss_ema",
            "best_ema",
            "last_reward",
            "bad_count",
            "improve_streak",
            "plateau_count",
            "cooldown_left",
        ):
            setattr(self, key, state[key])
        self.num_spikes = int(state.get("num_spikes", 0))  # states saved before the spike rule have none
        if state.get("horizon") is not None:
            self.horizon = int(state["horizon"])
        self._base_lrs = [float(v) for v in state["base_lrs"]]
        self.recent = deque((float(v) for v in state["recent"]), maxlen=self.config.window)
        self.generator.set_state(state["generator"].to(torch.uint8))
        if self.freezer is not None and "freezer" in state:
            self.freezer.load_state_dict(state["freezer"])
        self.apply_gains()


__all__ = ["EVENTS", "AdaptiveScheduler", "AdaptiveSchedulerConfig", "SchedulerSnapshot"]
