"""An RL controller that learns which attention heads to prune, keep or regrow from a scalar reward.

State (per head): its gate, its importance and attention entropy (each scaled by its maximum), its layer
position, a learned head embedding and its last K actions; (global): the active fraction, the budget and the
last K rewards. A small shared MLP scores the three actions of every head; a pooled value head estimates the
state value.

Budget through the action space: heads are decided one at a time in a random order, and before each decision
the actions that would make the budget unreachable are masked (`min_active <= active <= max_active`, at most
`max_changes` flips per step, unless more are needed to get back into the budget): an action is admissible iff
some completion of the remaining decisions still ends inside the budget, so at least one always is, and at an
exact budget (min = max) a prune is admissible while a later regrow can still balance it (head swaps).
The policy is therefore autoregressive over heads, but since the logits depend only on the state, the
log-probability of a whole action is a sum of masked log-softmaxes that is recomputed
exactly (and in one pass) from the stored order and masks, which is what PPO's ratio needs.

Algorithms (`GateControllerConfig.algorithm`):
  * ``reinforce``: Monte-Carlo returns over a rollout, advantage against the learned value baseline.
  * ``a2c``: n-step returns bootstrapped with the value of the next state.
  * ``ppo``: GAE advantages, several epochs of the clipped surrogate objective.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import asdict, fields
from typing import Any

import torch
from torch import nn

from .config import ALGORITHMS, GateControllerConfig
from .pareto import ParetoArchive
from .rewards import RewardTracker

__all__ = ["ALGORITHMS", "KEEP", "PRUNE", "REGROW", "GateController", "GateControllerConfig", "GatePolicy"]

PRUNE, KEEP, REGROW = 0, 1, 2


class GatePolicy(nn.Module):
    """Shared per-head MLP (3 action logits) and a pooled value head."""

    def __init__(self, num_heads_total: int, head_features: int, global_features: int, cfg: GateControllerConfig):
        super().__init__()
        self.embedding = nn.Embedding(num_heads_total, cfg.head_embedding) if cfg.head_embedding else None
        width = head_features + global_features + cfg.head_embedding
        self.body = nn.Sequential(
            nn.Linear(width, cfg.hidden_size), nn.Tanh(), nn.Linear(cfg.hidden_size, cfg.hidden_size), nn.Tanh()
        )
        self.logits = nn.Linear(cfg.hidden_size, 3)
        self.value = nn.Sequential(
            nn.Linear(cfg.hidden_size + global_features, cfg.hidden_size), nn.Tanh(), nn.Linear(cfg.hidden_size, 1)
        )
        with torch.no_grad():  # start near "keep everything": a fresh controller does not wreck the model
            self.logits.weight.mul_(0.1)
            self.logits.bias.copy_(torch.tensor([0.0, cfg.keep_bias, 0.0]))

    def forward(self, head_x: torch.Tensor, global_x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = head_x.shape[0]
        parts = [head_x, global_x.expand(n, -1)]
        if self.embedding is not None:
            parts.append(self.embedding.weight)
        h = self.body(torch.cat(parts, dim=-1))
        value = self.value(torch.cat([h.mean(0), global_x], dim=-1)).squeeze(-1)
        return self.logits(h), value


def _masked_logp(logits: torch.Tensor, order: torch.Tensor, masks: torch.Tensor, actions: torch.Tensor):
    """Sum of log-probs and entropies of the decisions taken in `order` under their masks."""
    lg = logits[order].masked_fill(~masks, -1e9)
    logp_all = torch.log_softmax(lg, dim=-1)
    logp = logp_all.gather(1, actions[:, None]).squeeze(1).sum()
    p = logp_all.exp()
    entropy = -(p * logp_all.masked_fill(~masks, 0.0)).sum()
    return logp, entropy


def _clone_tensors(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _clone_tensors(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clone_tensors(v) for v in obj]
    return obj


class GateController:
    """Proposes new head gates from statistics and learns from the rewards that follow (see the module doc)."""

    def __init__(self, num_layers: int, num_heads: int, config: GateControllerConfig | None = None) -> None:
        if num_layers < 1 or num_heads < 1:
            raise ValueError(
                f"GateController: num_layers={num_layers}, num_heads={num_heads} is not allowed: both >= 1"
            )
        self.config = cfg = config or GateControllerConfig()
        self.num_layers, self.num_heads = int(num_layers), int(num_heads)
        self.n = self.num_layers * self.num_heads
        self.min_active, self.max_active = self._budget(cfg)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            self.policy = self._make_policy(cfg)
        self.optimizer = torch.optim.Adam(self.policy.parameters(), lr=cfg.lr)
        self.gates = torch.ones(self.num_layers, self.num_heads)
        self.action_history: deque[torch.Tensor] = deque(maxlen=max(cfg.history, 1))
        self.reward_history: deque[float] = deque(maxlen=max(cfg.history, 1))
        self.buffer: list[dict[str, Any]] = []
        self.pending: dict[str, Any] | None = None
        self.archive = ParetoArchive(self.n)
        self.tracker = RewardTracker(cfg.efficiency_factor, cfg.reward_ema)
        self.log: list[dict[str, Any]] = []  # one JSON record per controller step
        self.steps = 0
        self.updates = 0
        self.adv_sq: float | None = None

    def _make_policy(self, cfg: GateControllerConfig) -> GatePolicy:
        """The policy network (built under the config's seed); a subclass may return a `GatePolicy` subclass."""
        return GatePolicy(self.n, 4 + 3 * cfg.history, 3 + cfg.history, cfg)

    def _budget(self, cfg: GateControllerConfig) -> tuple[int, int]:
        """[min_active, max_active] in heads: the integer counts where set, else the fractions of `n` (rounded
        inwards); refused when empty, above `n` or without any head."""
        n = self.n
        for name in ("min_active_heads", "max_active_heads"):
            value = getattr(cfg, name)
            if value is not None and value > n:
                raise ValueError(
                    f"GateControllerConfig.{name}={value!r} is not allowed: this controller has {n} heads "
                    f"({self.num_layers} layers x {self.num_heads}), so at most {n}"
                )
        if cfg.min_active_heads is not None:
            low, low_name = cfg.min_active_heads, f"min_active_heads={cfg.min_active_heads!r}"
        else:
            low = math.ceil(cfg.min_active_fraction * n - 1e-9)
            low_name = f"min_active_fraction={cfg.min_active_fraction!r} ({low} of {n} heads)"
        if cfg.max_active_heads is not None:
            high, field = cfg.max_active_heads, "max_active_heads"
        else:
            high, field = math.floor(cfg.max_active_fraction * n + 1e-9), "max_active_fraction"
        if high < max(low, 1):
            raise ValueError(
                f"GateControllerConfig.{field}={getattr(cfg, field)!r} is not allowed: it leaves {high} of {n} heads "
                f"(need >= 1 and >= the fewest kept, {low_name})"
            )
        return low, high

    def set_gates(self, gates: torch.Tensor | Any) -> None:
        """Start from `gates` (a warm start, e.g. a static ranking's top-k): the next `act()` decides from them.

        `gates`: 0/1 values, (num_layers, num_heads) or flat, with the active count inside the budget
        [min_active, max_active] (the policy's masks assume a feasible start). Refused while an action awaits its
        reward (`observe` / `feedback` first): the pending transition was taken from the gates it replaced.
        """
        if self.pending is not None:
            raise RuntimeError("GateController.set_gates called between act() and observe(): give the reward first")
        g = torch.as_tensor(gates).detach().to("cpu", torch.float32)
        if g.shape not in ((self.num_layers, self.num_heads), (self.n,)):
            raise ValueError(
                f"GateController.set_gates: gates of shape {tuple(g.shape)} is not allowed: "
                f"({self.num_layers}, {self.num_heads}) (layers, heads) or ({self.n},)"
            )
        bad = g[(g != 0) & (g != 1)]
        if bad.numel():
            raise ValueError(
                f"GateController.set_gates: gate values {sorted(set(bad.tolist()))[:5]} are not allowed: only 0 and 1"
            )
        active = int(g.sum())
        if not self.min_active <= active <= self.max_active:
            raise ValueError(
                f"GateController.set_gates: {active} active heads is not allowed: the budget is "
                f"[min_active, max_active] = [{self.min_active}, {self.max_active}] of {self.n} heads"
            )
        self.gates = g.reshape(self.num_layers, self.num_heads).clone()

    # ------------------------------------------------------------------ state
    def _state(
        self, importance: torch.Tensor | None, entropy: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        def scaled(x: torch.Tensor | None) -> torch.Tensor:
            if x is None:
                return torch.zeros(self.n)
            x = torch.as_tensor(x, dtype=torch.float32).reshape(-1)
            if x.numel() != self.n:
                raise ValueError(f"GateController: head statistics of {x.numel()} values is not allowed: need {self.n}")
            return x / x.abs().max().clamp(min=1e-12)

        layer_pos = torch.arange(self.num_layers, dtype=torch.float32).repeat_interleave(self.num_heads)
        layer_pos = layer_pos / max(self.num_layers - 1, 1)
        cols = [self.gates.reshape(-1), scaled(importance), scaled(entropy), layer_pos]
        k = self.config.history
        hist = list(self.action_history)[-k:] if k else []
        onehots = [nn.functional.one_hot(a, 3).float() for a in hist]
        onehots = [torch.zeros(self.n, 3)] * (k - len(onehots)) + onehots
        head_x = torch.cat([torch.stack(cols, 1), *onehots], 1) if k else torch.stack(cols, 1)
        rewards = list(self.reward_history)[-k:] if k else []
        rewards = [0.0] * (k - len(rewards)) + rewards
        glob = torch.tensor([float(self.gates.mean()), self.max_active / self.n, self.min_active / self.n, *rewards])
        return head_x, glob

    # ------------------------------------------------------------------ acting
    def _sample(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sequential masked sampling in a random order: (order, masks, actions in order, new gates)."""
        order = torch.randperm(self.n, generator=self.generator)
        active = (self.gates.reshape(-1) > 0.5).clone()
        a_count = int(active.sum())
        # max_changes yields to the head budget: a state outside the budget gets the flips it needs to reach it
        needed = max(0, a_count - self.max_active, self.min_active - a_count)
        budget = max(self.config.max_changes if self.config.max_changes is not None else self.n, needed)
        flips = 0
        undecided_active = a_count
        undecided_pruned = self.n - a_count
        probs = torch.softmax(logits.detach(), -1)
        masks = torch.zeros(self.n, 3, dtype=torch.bool)
        actions = torch.empty(self.n, dtype=torch.long)
        for t, j in enumerate(order.tolist()):
            # an action is admissible iff some completion of the remaining decisions still ends in the budget
            m = masks[t]
            left = budget - flips
            if active[j]:
                undecided_active -= 1
                m[PRUNE] = left >= 1 and self._feasible(a_count - 1, undecided_active, undecided_pruned, left - 1)
                m[KEEP] = self._feasible(a_count, undecided_active, undecided_pruned, left)
            else:
                undecided_pruned -= 1
                m[REGROW] = left >= 1 and self._feasible(a_count + 1, undecided_active, undecided_pruned, left - 1)
                m[KEEP] = self._feasible(a_count, undecided_active, undecided_pruned, left)
            if not m.any():  # pragma: no cover - impossible for a feasible start (see the module docstring)
                raise RuntimeError("GateController: no admissible action; the head budget is inconsistent")
            p = probs[j] * m
            a = int(torch.multinomial(p / p.sum(), 1, generator=self.generator))
            actions[t] = a
            if a == PRUNE:
                a_count, flips, active[j] = a_count - 1, flips + 1, False
            elif a == REGROW:
                a_count, flips, active[j] = a_count + 1, flips + 1, True
        return order, masks, actions, active.float().view(self.num_layers, self.num_heads)

    def _feasible(self, active: int, undecided_active: int, undecided_pruned: int, flips_left: int) -> bool:
        """Can the final active count still land in [min_active, max_active]? (Reachable: an integer interval.)"""
        lowest = active - min(undecided_active, flips_left)
        highest = active + min(undecided_pruned, flips_left)
        return lowest <= self.max_active and highest >= self.min_active

    def act(self, importance: torch.Tensor | None = None, entropy: torch.Tensor | None = None) -> torch.Tensor:
        """Choose the next gates (layers, heads) of 0/1 from the head statistics; learns first if a rollout is full."""
        if self.pending is not None:
            raise RuntimeError("GateController.act called twice without observe(reward) in between")
        head_x, glob = self._state(importance, entropy)
        if len(self.buffer) >= self.config.rollout_steps:
            self._update(head_x, glob)
        with torch.no_grad():
            logits, value = self.policy(head_x, glob)
        order, masks, actions, new_gates = self._sample(logits)
        logp, _ = _masked_logp(logits, order, masks, actions)
        per_head = torch.empty(self.n, dtype=torch.long)
        per_head[order] = actions
        self.pending = {
            "head_x": head_x,
            "glob": glob,
            "order": order,
            "masks": masks,
            "actions": actions,
            "logp": logp.detach(),
            "value": value.detach(),
            "per_head": per_head,
        }
        self.gates = new_gates
        self.steps += 1
        return new_gates.clone()

    def observe(self, reward: float) -> None:
        """The reward that followed the last `act`."""
        if self.pending is None:
            raise RuntimeError("GateController.observe called without a preceding act()")
        if not math.isfinite(reward):
            raise ValueError(f"GateController.observe: reward={reward!r} is not allowed: a finite number")
        self.pending["reward"] = float(reward)
        self.buffer.append(self.pending)
        self.action_history.append(self.pending["per_head"])
        self.reward_history.append(float(reward))
        self.pending = None

    def feedback(self, loss: float, step: int = -1, reference_loss: float | None = None) -> float | None:
        """Turn a validation loss measured under the current gates into a reward (and a Pareto point).

        `reference_loss`: the loss of the gates that served before the last action, on the same data as `loss`;
        the reward then compares the two (paired) instead of `loss` with the previous feedback's loss, so that on a
        stream a harder batch does not count as a worse action. Returns the smoothed reward given to the last
        action, or None when there is nothing to compare with (the very first loss, without a reference).
        """
        active = int((self.gates > 0.5).sum())
        self.archive.add(loss, active, self.gates, step)
        reward = self.tracker.observe(loss, 1.0 - active / self.n, reference_loss)
        if reward is not None and self.pending is not None:
            self.observe(reward)
        self.log.append(
            {
                "step": int(step),
                "loss": float(loss),
                "reward": reward,
                "active_heads": active,
                "gates": self.gates.reshape(-1).int().tolist(),
            }
        )
        return reward

    # ------------------------------------------------------------------ learning
    def _evaluate(self, tr: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits, value = self.policy(tr["head_x"], tr["glob"])
        logp, ent = _masked_logp(logits, tr["order"], tr["masks"], tr["actions"])
        return logp, ent, value

    def _update(
        self, next_head_x: torch.Tensor | None = None, next_glob: torch.Tensor | None = None
    ) -> dict[str, float]:
        """One learning step on the buffered transitions (called by `act` when a rollout is full)."""
        cfg = self.config
        buf, self.buffer = self.buffer, []
        if not buf:
            return {}
        rewards = torch.tensor([tr["reward"] for tr in buf])
        values = torch.stack([tr["value"] for tr in buf])
        bootstrap = torch.zeros(())
        if cfg.algorithm != "reinforce" and next_head_x is not None:
            with torch.no_grad():
                bootstrap = self.policy(next_head_x, next_glob)[1]
        n = len(buf)
        returns = torch.empty(n)
        advantages = torch.empty(n)
        running, gae = bootstrap, torch.zeros(())
        for t in reversed(range(n)):
            running = rewards[t] + cfg.gamma * running
            returns[t] = running
            next_v = values[t + 1] if t + 1 < n else bootstrap
            delta = rewards[t] + cfg.gamma * next_v - values[t]
            gae = delta + cfg.gamma * cfg.gae_lambda * gae
            advantages[t] = gae
        if cfg.algorithm == "ppo":
            returns = advantages + values
            if n > 1:
                advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
        epochs = cfg.ppo_epochs if cfg.algorithm == "ppo" else 1
        stats: dict[str, float] = {}
        for _ in range(epochs):
            pol_terms, val_terms, ent_terms = [], [], []
            for t, tr in enumerate(buf):
                logp, ent, value = self._evaluate(tr)
                if cfg.algorithm == "ppo":
                    ratio = torch.exp(logp - tr["logp"])
                    adv = advantages[t]
                    pol_terms.append(-torch.min(ratio * adv, ratio.clamp(1 - cfg.clip_eps, 1 + cfg.clip_eps) * adv))
                else:  # reinforce / a2c: advantage against the learned baseline, recomputed with the current critic
                    adv = (returns[t] - value).detach()
                    adv = adv / self._adv_scale(float(adv))
                    pol_terms.append(-logp * adv)
                val_terms.append((value - returns[t]) ** 2)
                ent_terms.append(ent / self.n)
            policy_loss = torch.stack(pol_terms).mean()
            value_loss = torch.stack(val_terms).mean()
            entropy = torch.stack(ent_terms).mean()
            loss = policy_loss + cfg.value_coef * value_loss - cfg.entropy_coef * entropy
            self.optimizer.zero_grad()
            loss.backward()
            if cfg.max_grad_norm > 0:
                nn.utils.clip_grad_norm_(self.policy.parameters(), cfg.max_grad_norm)
            self.optimizer.step()
            stats = {"policy_loss": policy_loss.item(), "value_loss": value_loss.item(), "entropy": entropy.item()}
        self.updates += 1
        return stats

    def _adv_scale(self, adv: float) -> float:
        """Running RMS of the advantages (decay 0.9): keeps the policy step size independent of the reward scale."""
        self.adv_sq = adv * adv if self.adv_sq is None else 0.9 * self.adv_sq + 0.1 * adv * adv
        return math.sqrt(self.adv_sq) + 1e-3

    # ------------------------------------------------------------------ Pareto
    def pick(self, preference: float) -> torch.Tensor:
        """Gates of the archived (loss, active heads) point chosen by `preference` (see `ParetoArchive.pick`)."""
        return self.archive.pick(preference).gates.view(self.num_layers, self.num_heads).clone()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly (tensors are copies: safetensors refuses shared storage)."""
        opt = self.optimizer.state_dict()
        opt_state = {"state": {str(k): v for k, v in opt["state"].items()}, "param_groups": opt["param_groups"]}
        return _clone_tensors(
            {
                "config": asdict(self.config),
                "shape": [self.num_layers, self.num_heads],
                "policy": dict(self.policy.state_dict()),
                "optimizer": opt_state,
                "gates": self.gates.clone(),
                "action_history": list(self.action_history),
                "reward_history": list(self.reward_history),
                "buffer": self.buffer,
                "pending": self.pending,
                "archive": self.archive.state_dict(),
                "tracker": self.tracker.state_dict(),
                "rng": self.generator.get_state(),
                "log": self.log,
                "steps": self.steps,
                "updates": self.updates,
                "adv_sq": self.adv_sq,
            }
        )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if list(state["shape"]) != [self.num_layers, self.num_heads]:
            raise ValueError(
                f"GateController.load_state_dict: saved shape {state['shape']} is not allowed: this "
                f"controller has {[self.num_layers, self.num_heads]}"
            )
        self._check_state(state)
        names = {f.name for f in fields(GateControllerConfig)}
        self.config = GateControllerConfig(**{k: v for k, v in state["config"].items() if k in names})
        self.min_active, self.max_active = self._budget(self.config)  # the saved budget, not the one built with
        self.policy.load_state_dict(state["policy"])
        opt = state["optimizer"]
        self.optimizer.load_state_dict(
            {"state": {int(k): v for k, v in opt["state"].items()}, "param_groups": opt["param_groups"]}
        )
        self.gates = state["gates"].clone().float()
        self.action_history = deque((a.long() for a in state["action_history"]), maxlen=self.action_history.maxlen)
        self.reward_history = deque((float(r) for r in state["reward_history"]), maxlen=self.reward_history.maxlen)
        self.buffer = [self._restore_transition(tr) for tr in state["buffer"]]
        self.pending = self._restore_transition(state["pending"]) if state["pending"] else None
        self.archive.load_state_dict(state["archive"])
        self.tracker.load_state_dict(state["tracker"])
        self.generator.set_state(state["rng"].to(torch.uint8))
        self.log = list(state["log"])
        self.steps, self.updates = int(state["steps"]), int(state["updates"])
        self.adv_sq = state["adv_sq"]

    def _check_state(self, state: dict[str, Any]) -> None:
        """Shapes and finiteness checked at load: a NaN policy or wrongly shaped gates otherwise load and fail
        (or act on NaN probabilities) only at the next `act()`."""
        from ..utils.io import StateLoadError, check_tensor

        check_tensor("GateController state gates", state["gates"], (self.num_layers, self.num_heads))
        own = self.policy.state_dict()
        missing = sorted(set(own) - set(state["policy"]))
        if missing:
            raise StateLoadError(f"GateController state policy lacks {missing[:3]} (of {len(own)} tensors)")
        for key, tensor in state["policy"].items():
            check_tensor(f"GateController state policy.{key}", tensor, own[key].shape if key in own else None)
        for key, value in state["optimizer"]["state"].items():
            for name, tensor in value.items():
                if isinstance(tensor, torch.Tensor):
                    check_tensor(f"GateController state optimizer.state.{key}.{name}", tensor)
        adv = state.get("adv_sq")
        if adv is not None and not (isinstance(adv, (int, float)) and math.isfinite(adv) and adv >= 0):
            raise StateLoadError(f"GateController state adv_sq={adv!r} is not allowed: expected a finite number >= 0")
        if not all(math.isfinite(float(r)) for r in state["reward_history"]):
            raise StateLoadError("GateController state reward_history holds NaN/inf, which is not allowed")

    @staticmethod
    def _restore_transition(tr: dict[str, Any]) -> dict[str, Any]:
        out = dict(tr)
        for k in ("order", "actions", "per_head"):
            out[k] = tr[k].long()
        out["masks"] = tr["masks"].bool()
        return out

    def save(self, directory: str) -> None:
        """Policy weights, optimizer, history, buffer, Pareto archive: safetensors + JSON."""
        from ..utils.io import save_state

        save_state(directory, self.state_dict())

    @classmethod
    def _for_state(cls, state: dict[str, Any], config: GateControllerConfig) -> GateController:
        """A controller built to receive `state` (a subclass reads its own extra entries here)."""
        return cls(*state["shape"], config)

    @classmethod
    def load(cls, directory: str) -> GateController:
        from ..utils.io import StateLoadError, load_state

        state = load_state(directory)
        names = {f.name for f in fields(GateControllerConfig)}
        try:
            config = GateControllerConfig(**{k: v for k, v in state["config"].items() if k in names})
            ctrl = cls._for_state(state, config)
            ctrl.load_state_dict(state)
        except (KeyError, ValueError, TypeError, RuntimeError) as err:  # StateLoadError is a ValueError
            detail = f"missing key {err}" if isinstance(err, KeyError) else f"{type(err).__name__}: {err}"
            raise StateLoadError(f"the gate controller saved in {directory} cannot be loaded: {detail}") from err
        return ctrl
