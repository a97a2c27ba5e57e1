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
  optimizer buffer changes) and alpha <- clip(alpha * nan_backoff).

"Improvement" and "worsening" are judged on an EMA of the loss (noisy minibatch losses would flip the laws at every
step): improvement when the EMA beats its best value by `threshold` (relative) and by `noise_margin` standard
deviations of the EMA's own noise (so variance also raises the bar for speeding up), worsening when the EMA rises
by more than `threshold` (relative) since the previous observation, plateau otherwise.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # pragma: no cover
    from .freezing import Freezer

EVENTS = ("warmup", "improved", "worsened", "plateau", "skipped")


def _fail(cls: str, name: str, value: Any, allowed: str) -> None:
    raise ValueError(f"{cls}.{name}={value!r} is not allowed: {allowed}")


def _check_number(
    cls: str,
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    integer: bool = False,
) -> None:
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        _fail(cls, name, value, f"must be {kind}")
    if not math.isfinite(value):
        _fail(cls, name, value, "must be finite")
    if low is not None and (value <= low if low_open else value < low):
        _fail(cls, name, value, f"must be {'>' if low_open else '>='} {low}")
    if high is not None and (value >= high if high_open else value > high):
        _fail(cls, name, value, f"must be {'<' if high_open else '<='} {high}")


def _check_bounds(cls: str, name: str, value: Any, low: float, high: float) -> None:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        _fail(cls, name, value, "must be a pair (min, max)")
    lo, hi = value
    for v in (lo, hi):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < low or v > high:
            _fail(cls, name, value, f"both ends must be numbers in [{low}, {high}]")
    if lo > hi:
        _fail(cls, name, value, "min must be <= max")


@dataclass
class AdaptiveSchedulerConfig:
    """Gains of the adaptive laws. Defaults follow the design note: mild u=1.02 / d=0.8, small dither off."""

    lr_up: float = field(default=1.02, metadata={"help": "LR multiplier u > 1 on improvement (before damping)."})
    lr_down: float = field(
        default=0.8, metadata={"help": "LR multiplier d in (0, 1) after `patience` non-improvements."}
    )
    lr_bounds: tuple[float, float] = field(default=(1e-7, 1.0), metadata={"help": "Hard (min, max) of the LR."})
    variance_damping: float = field(
        default=10.0, metadata={"help": "lambda: an improvement multiplies the LR by 1 + (u-1)/(1 + lambda v)."}
    )
    window: int = field(default=10, metadata={"help": "Recent losses whose normalized variance is v."})
    ema_beta: float = field(default=0.9, metadata={"help": "EMA factor of the loss used to judge trends."})
    threshold: float = field(default=1e-3, metadata={"help": "Relative change of the loss EMA that counts."})
    noise_margin: float = field(
        default=1.0, metadata={"help": "An improvement must also exceed this many noise std's of the loss EMA."}
    )
    patience: int = field(default=5, metadata={"help": "Observations without improvement before the LR is cut."})
    cooldown: int = field(default=5, metadata={"help": "Observations after a cut (or NaN) without LR changes."})
    warmup: int = field(default=3, metadata={"help": "First observations that only fill the statistics."})
    nan_backoff: float = field(default=0.5, metadata={"help": "LR multiplier after a non-finite loss/gradient."})
    adapt_momentum: bool = field(default=True, metadata={"help": "Adapt SGD momentum / Adam beta1."})
    momentum_step: float = field(default=0.01, metadata={"help": "Additive change of the momentum per decision."})
    momentum_bounds: tuple[float, float] = field(default=(0.5, 0.95), metadata={"help": "(min, max) momentum."})
    consistency: int = field(default=3, metadata={"help": "Improvements in a row that raise the momentum."})
    noise_threshold: float = field(
        default=0.05, metadata={"help": "Normalized loss variance v above which the run counts as noisy."}
    )
    dither: bool = field(default=False, metadata={"help": "Add exploration noise to the parameters after a step."})
    sigma: float = field(default=1e-3, metadata={"help": "Initial relative dither strength."})
    sigma_bounds: tuple[float, float] = field(default=(1e-5, 1e-2), metadata={"help": "(min, max) of sigma."})
    sigma_up: float = field(default=1.5, metadata={"help": "Sigma multiplier on a plateau."})
    sigma_down: float = field(default=0.5, metadata={"help": "Sigma multiplier when unstable."})
    plateau_patience: int = field(default=5, metadata={"help": "Plateau observations in a row that raise sigma."})
    seed: int = field(default=0, metadata={"help": "Seed of the dither noise generator."})

    def __post_init__(self) -> None:
        c = type(self).__name__
        self.lr_bounds = tuple(self.lr_bounds)
        self.momentum_bounds = tuple(self.momentum_bounds)
        self.sigma_bounds = tuple(self.sigma_bounds)
        _check_number(c, "lr_up", self.lr_up, 1.0)
        _check_number(c, "lr_down", self.lr_down, 0.0, 1.0, low_open=True)
        _check_bounds(c, "lr_bounds", self.lr_bounds, 0.0, math.inf)
        if self.lr_bounds[0] <= 0:
            _fail(c, "lr_bounds", self.lr_bounds, "the minimum LR must be > 0")
        _check_number(c, "variance_damping", self.variance_damping, 0.0)
        _check_number(c, "window", self.window, 2, integer=True)
        _check_number(c, "ema_beta", self.ema_beta, 0.0, 1.0, high_open=True)
        _check_number(c, "threshold", self.threshold, 0.0)
        _check_number(c, "noise_margin", self.noise_margin, 0.0)
        _check_number(c, "patience", self.patience, 0, integer=True)
        _check_number(c, "cooldown", self.cooldown, 0, integer=True)
        _check_number(c, "warmup", self.warmup, 0, integer=True)
        _check_number(c, "nan_backoff", self.nan_backoff, 0.0, 1.0, low_open=True)
        _check_number(c, "momentum_step", self.momentum_step, 0.0, 1.0)
        _check_bounds(c, "momentum_bounds", self.momentum_bounds, 0.0, 0.9999)
        _check_number(c, "consistency", self.consistency, 1, integer=True)
        _check_number(c, "noise_threshold", self.noise_threshold, 0.0)
        _check_number(c, "sigma", self.sigma, 0.0)
        _check_bounds(c, "sigma_bounds", self.sigma_bounds, 0.0, 1.0)
        _check_number(c, "sigma_up", self.sigma_up, 1.0)
        _check_number(c, "sigma_down", self.sigma_down, 0.0, 1.0, low_open=True)
        _check_number(c, "plateau_patience", self.plateau_patience, 1, integer=True)
        _check_number(c, "seed", self.seed, integer=True)


@dataclass
class SchedulerSnapshot:
    """What one `step`/`observe` decided: the gains now in force and why."""

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
    ) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ValueError(
                f"AdaptiveScheduler.optimizer={type(optimizer).__name__!r} is not allowed: "
                "must be a torch.optim.Optimizer"
            )
        self.optimizer = optimizer
        self.config = config or AdaptiveSchedulerConfig()
        self.freezer = freezer
        cfg = self.config
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

    def apply_gains(self) -> None:
        """Write the current LR (scaled per group as at construction) and momentum into the optimizer's groups."""
        for group in self.optimizer.param_groups[len(self._base_lrs) :]:  # groups added later keep their LR ratio
            lr = float(group["lr"])
            self._base_lrs.append(lr * self._base_lrs[0] / self.lr if self.lr > 0 else lr)
            self._momentum_keys.append(_momentum_key(group))
        first = self._base_lrs[0]
        for group, base, key in zip(self.optimizer.param_groups, self._base_lrs, self._momentum_keys, strict=True):
            lr = self.lr * base / first if first > 0 and base != first else self.lr
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
            lr=self.lr,
            momentum=self.momentum,
            sigma=self.sigma,
            variance=self.variance() if variance is None else variance,
            event=event,
            skipped=skipped,
            reward=reward,
            frozen_fraction=frozen,
        )
        return self.last_snapshot

    def step(self, loss: float | torch.Tensor, reward: float | None = None) -> SchedulerSnapshot:
        """One full control step after `loss.backward()`: freeze/probe, optimizer step (or skip), dither, adapt."""
        loss_value = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
        ok = self.guard_gradients(loss_value)
        if ok:
            if self.freezer is not None:
                self.freezer.update()
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
        self._base_lrs = [float(v) for v in state["base_lrs"]]
        self.recent = deque((float(v) for v in state["recent"]), maxlen=self.config.window)
        self.generator.set_state(state["generator"].to(torch.uint8))
        if self.freezer is not None and "freezer" in state:
            self.freezer.load_state_dict(state["freezer"])
        self.apply_gains()
