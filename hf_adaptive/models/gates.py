"""One gate per attention head, applied without copying any model code.

transformers 5.x has no `head_mask`: every Gemma / Gemma 2 / Gemma 3 / Llama-family attention module computes
`o_proj(attn_output.reshape(*, num_heads * head_dim))`, whatever the attention kernel (eager, sdpa, flash).
A forward pre-hook on `o_proj` views that input as `(..., heads, head_dim)` and multiplies each head's slice by
its gate, so a gate of 0 removes the head's contribution exactly and gates of 1 leave the model bit-identical.
The hook follows `o_proj` if peft later wraps it in a LoRA layer (the LoRA path is gated too).

Gate modes:
  * ``fixed``: values set from outside (a controller, a pruning mask); a buffer, no gradient.
  * ``hard_concrete``: learnable L0 gates (Louizos et al., 2018), one `log_alpha` per head; stochastic in
    training, deterministic in eval; `expected_l0()` is the differentiable sparsity penalty, exposed to the
    trainer by `HeadGatePlugin` as a loss term, and `expected_gates()` the mean gate E[z] (a ranking of heads
    that accounts for the noise the gates were trained under, unlike the eval-mode gates, which saturate at 1).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

GATE_MODES = ("fixed", "hard_concrete")
_HC_BETA, _HC_GAMMA, _HC_ZETA = 2.0 / 3.0, -0.1, 1.1
_QUADRATURE: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


def _gauss_legendre(points: int) -> tuple[torch.Tensor, torch.Tensor]:
    if points not in _QUADRATURE:
        import numpy as np

        nodes, weights = np.polynomial.legendre.leggauss(points)
        _QUADRATURE[points] = (torch.from_numpy(nodes), torch.from_numpy(weights))
    return _QUADRATURE[points]


def hard_concrete_mean(log_alpha: torch.Tensor, points: int = 64) -> torch.Tensor:
    """E[z] of hard-concrete gates z = clamp(sigmoid((logit u + log_alpha) / beta) * (zeta - gamma) + gamma, 0, 1),
    u ~ U(0, 1), elementwise; deterministic and differentiable in `log_alpha`.

    Why this way: with t = logit u (standard logistic), z is 1 above t1 = beta * logit(s1) - log_alpha and 0
    below t0 = beta * logit(s0) - log_alpha (s0 = -gamma / (zeta - gamma), s1 = (1 - gamma) / (zeta - gamma)), so
    E[z] = P(t > t1) + integral over [t0, t1] of z(t) p(t) dt; in x = (t + log_alpha) / beta that interval is
    fixed, the integrand smooth, and Gauss-Legendre with `points` nodes is exact to rounding for any log_alpha.
    """
    if isinstance(points, bool) or not isinstance(points, int) or points < 2:
        raise ValueError(f"hard_concrete_mean: points={points!r} is not allowed: an integer >= 2")
    la = log_alpha.double()
    span = _HC_ZETA - _HC_GAMMA
    lo, hi = math.log(-_HC_GAMMA / _HC_ZETA), math.log((1 - _HC_GAMMA) / (_HC_ZETA - 1))  # logit(s0), logit(s1)
    nodes, weights = (v.to(la.device) for v in _gauss_legendre(points))
    x = (hi - lo) / 2 * nodes + (hi + lo) / 2  # logit of s over its open-gate range (0 < z < 1)
    t = _HC_BETA * x - la.unsqueeze(-1)
    density = torch.sigmoid(t) * torch.sigmoid(-t) * _HC_BETA  # logistic density of t, times dt/dx
    inner = ((torch.sigmoid(x) * span + _HC_GAMMA) * density * weights).sum(-1) * (hi - lo) / 2
    return (torch.sigmoid(la - _HC_BETA * hi) + inner).to(log_alpha.dtype)


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The self-attention modules (those with q/k/v/o projections), in layer order."""
    found = [
        m
        for m in model.modules()
        if all(hasattr(m, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")) and hasattr(m, "head_dim")
    ]
    if not found:
        raise ValueError(
            f"{type(model).__name__} has no attention modules with q_proj/k_proj/v_proj/o_proj and head_dim: "
            "GatedModel supports Gemma, Gemma 2, Gemma 3 and Llama-family models"
        )
    found.sort(key=lambda m: getattr(m, "layer_idx", 0))
    return found


def _linear_in_features(module: nn.Module) -> int:
    base = getattr(module, "base_layer", module)  # peft LoRA layers keep the original Linear as base_layer
    return int(base.in_features)


def head_counts(model: nn.Module) -> list[int]:
    """Number of query heads per layer (from the o_proj input width, so pruned models are read correctly)."""
    return [_linear_in_features(a.o_proj) // int(a.head_dim) for a in attention_modules(model)]


class GatedModel(nn.Module):
    """Per-head gates on a causal LM; attached as `model.head_gates` so the Trainer's optimizer sees them.

    `gates()` returns the (layers, heads) gate values used by the next forward. An optional `per_example`
    override of shape (batch, layers, heads) is used for head importance (one gradient per example).
    """

    def __init__(self, model: nn.Module, mode: str = "fixed", init_log_alpha: float = 3.0) -> None:
        super().__init__()
        if mode not in GATE_MODES:
            raise ValueError(f"GatedModel.mode={mode!r} is not allowed: one of {GATE_MODES}")
        counts = head_counts(model)
        if len(set(counts)) != 1:
            raise ValueError(
                f"GatedModel needs the same number of heads in every layer, got {counts}: gate before pruning"
            )
        self.mode = mode
        self.num_layers, self.num_heads = len(counts), counts[0]
        self.register_buffer("fixed_gates", torch.ones(self.num_layers, self.num_heads), persistent=True)
        init = torch.full((self.num_layers, self.num_heads), float(init_log_alpha))
        self.log_alpha = nn.Parameter(init, requires_grad=(mode == "hard_concrete"))
        self._per_example: torch.Tensor | None = None
        self._identity = mode == "fixed"  # fixed gates all at 1: the hook returns its input untouched
        self._current: torch.Tensor | None = None
        self._attns = attention_modules(model)
        self._hooked: list[nn.Module | None] = [None] * self.num_layers
        self._handles: list[Any] = [None] * self.num_layers
        self._attn_handles = [a.register_forward_pre_hook(self._make_attn_hook(i)) for i, a in enumerate(self._attns)]
        for i in range(self.num_layers):
            self._hook_o_proj(i)
        # once per forward of the whole model (never re-run by gradient checkpointing): sample / fetch the gates
        self._root_handle = model.register_forward_pre_hook(lambda module, args: self._refresh())
        object.__setattr__(self, "model", model)  # not a submodule of ourselves (we are a submodule of it)
        model.add_module("head_gates", self)
        self.to(next(model.parameters()).device)

    # ------------------------------------------------------------------ hooks
    def _hook_o_proj(self, i: int) -> None:
        o_proj = self._attns[i].o_proj
        if self._hooked[i] is o_proj:
            return
        if self._handles[i] is not None:
            self._handles[i].remove()
        self._handles[i] = o_proj.register_forward_pre_hook(self._make_o_hook(i))
        self._hooked[i] = o_proj

    def _refresh(self) -> None:
        """The gates every o_proj hook of the next forward applies (None: leave the input untouched)."""
        self._current = None if self._identity and self._per_example is None else self.gates()

    def _make_attn_hook(self, i: int):
        def hook(module: nn.Module, args: Any) -> None:
            self._hook_o_proj(i)  # o_proj may have been replaced by a peft LoRA layer since the last call

        return hook

    def _make_o_hook(self, i: int):
        def hook(module: nn.Module, args: tuple) -> tuple | None:
            g = self._current
            if g is None:
                return None
            x = args[0]
            shaped = x.view(*x.shape[:-1], self.num_heads, x.shape[-1] // self.num_heads)
            gi = g[..., i, :].to(x.dtype)
            if gi.dim() == 2:  # per-example gates (batch, heads) -> broadcast over the sequence
                gi = gi.view(gi.shape[0], *([1] * (x.dim() - 2)), self.num_heads)
            return ((shaped * gi.unsqueeze(-1)).view_as(x), *args[1:])

        return hook

    def remove(self) -> nn.Module:
        """Detach every hook and the `head_gates` submodule; returns the plain model."""
        for h in [*self._handles, *self._attn_handles, self._root_handle]:
            if h is not None:
                h.remove()
        self._handles = [None] * self.num_layers
        self._attn_handles = []
        if getattr(self.model, "head_gates", None) is self:
            del self.model._modules["head_gates"]
        return self.model

    # ------------------------------------------------------------------ gate values
    @property
    def per_example(self) -> torch.Tensor | None:
        """Optional (batch, layers, heads) gates overriding the others (one gradient per example)."""
        return self._per_example

    @per_example.setter
    def per_example(self, value: torch.Tensor | None) -> None:
        self._per_example = value
        self._refresh()

    def gates(self) -> torch.Tensor:
        """Gate values for the next forward: (layers, heads), or (batch, layers, heads) with `per_example`."""
        if self.per_example is not None:
            return self.per_example
        if self.mode == "fixed":
            return self.fixed_gates
        if self.training:
            u = torch.rand_like(self.log_alpha).clamp(1e-6, 1 - 1e-6)
            s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + self.log_alpha) / _HC_BETA)
        else:
            s = torch.sigmoid(self.log_alpha)
        return (s * (_HC_ZETA - _HC_GAMMA) + _HC_GAMMA).clamp(0.0, 1.0)

    def deterministic_gates(self) -> torch.Tensor:
        """The gates an eval-mode forward uses (no sampling), detached."""
        if self.mode == "fixed":
            return self.fixed_gates.detach().clone()
        s = torch.sigmoid(self.log_alpha.detach())
        return (s * (_HC_ZETA - _HC_GAMMA) + _HC_GAMMA).clamp(0.0, 1.0)

    def set_gates(self, values: torch.Tensor | Iterable) -> None:
        """Set fixed gate values (layers, heads); in hard-concrete mode, set log_alpha so eval gates match 0/1."""
        values = torch.as_tensor(values, dtype=torch.float32, device=self.fixed_gates.device)
        if values.shape != self.fixed_gates.shape:
            raise ValueError(
                f"GatedModel.set_gates: values of shape {tuple(values.shape)} is not allowed: "
                f"expected {tuple(self.fixed_gates.shape)} (layers, heads)"
            )
        if self.mode == "fixed":
            self.fixed_gates.copy_(values)
            self._identity = bool((values == 1).all())
            self._refresh()
        else:
            with torch.no_grad():
                self.log_alpha.copy_(torch.where(values > 0.5, 6.0, -6.0))

    def expected_gates(self) -> torch.Tensor:
        """E[z] of each gate (layers, heads), detached: the hard-concrete mean (`hard_concrete_mean`, the noise
        of training included); for fixed gates, their values. Not affected by `per_example` or train / eval."""
        if self.mode == "fixed":
            return self.fixed_gates.detach().clone()
        return hard_concrete_mean(self.log_alpha.detach())

    def expected_l0(self) -> torch.Tensor:
        """Differentiable expected number of non-zero gates (hard-concrete mode), divided by the head count."""
        if self.mode != "hard_concrete":
            return self.fixed_gates.new_zeros(())
        shift = _HC_BETA * math.log(-_HC_GAMMA / _HC_ZETA)
        return torch.sigmoid(self.log_alpha - shift).mean()

    def active_mask(self, threshold: float = 0.5) -> torch.Tensor:
        return self.deterministic_gates() > threshold

    def heads_to_prune(self, threshold: float = 0.5) -> dict[int, list[int]]:
        """{layer: [heads whose gate is <= threshold]}: the input of `pruning.prune_heads`."""
        mask = self.active_mask(threshold)
        return {i: [h for h in range(self.num_heads) if not mask[i, h]] for i in range(self.num_layers)}

    def forward(self, *args: Any, **kwargs: Any) -> Any:  # pragma: no cover - the gates are not called directly
        raise RuntimeError("GatedModel is applied through hooks: call the wrapped model")


def gate_model(model: nn.Module, mode: str = "fixed", **kwargs: Any) -> GatedModel:
    """Attach per-head gates to `model` (returns the existing gates if already attached, also under a wrapper)."""
    existing = next((m for m in model.modules() if isinstance(m, GatedModel)), None)
    if existing is not None:
        if existing.mode != mode:
            raise ValueError(f"gate_model: mode={mode!r} is not allowed: the model already has {existing.mode!r} gates")
        return existing
    return GatedModel(model, mode=mode, **kwargs)


def find_gates(model: nn.Module) -> GatedModel:
    """The `GatedModel` attached anywhere inside `model` (e.g. under a peft wrapper)."""
    for m in model.modules():
        if isinstance(m, GatedModel):
            return m
    raise ValueError(f"{type(model).__name__} has no head gates: call gate_model(model) first")
