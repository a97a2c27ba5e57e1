"""`HeadGatePlugin` (plugin `head_l0`): the L0 sparsity penalty of hard-concrete head gates as a trainer loss term.

The gates are `hf_adaptive.models.gate_model(model, mode="hard_concrete")`; their expected number of open gates
(`GatedModel.expected_l0`, differentiable) is added to the loss with weight `gate_l0_weight` and logged as
`loss_head_l0`. Enabled by name, the plugin attaches hard-concrete gates to a model that has none.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..models.gates import find_gates, gate_model
from ..plugins import ContinualPlugin, LossTerm
from ..utils.validation import OptionError
from .config import HEAD_L0_OPTIONS, GateConfig, HeadL0Config, with_overrides


class HeadGatePlugin(ContinualPlugin):
    """The L0 sparsity penalty of hard-concrete gates as a trainer loss term (`loss_head_l0` in the logs).

    `HeadGatePlugin(weight=0.5)` or `HeadGatePlugin(HeadL0Config(weight=0.5))`; with `model=` (as the registry
    builds it) hard-concrete gates are attached to a model without gates.
    """

    name = "head_l0"
    options = HEAD_L0_OPTIONS
    needs_model = True

    def __init__(
        self,
        config: HeadL0Config | None = None,
        gate: GateConfig | None = None,
        *,
        model: nn.Module | None = None,
        **overrides: Any,
    ) -> None:
        self.config = with_overrides(config, HeadL0Config, overrides, type(self).__name__)
        self.gate = gate if gate is not None else GateConfig()
        if self.gate.mode not in (None, "hard_concrete"):
            raise OptionError(
                type(self.gate).__name__,
                "mode",
                self.gate.mode,
                "head_l0 trains hard-concrete gates: 'hard_concrete', or None (the plugin attaches them)",
            )
        if model is not None:
            gate_model(model, mode="hard_concrete")  # the existing gates when attached already (any other kind: error)

    @property
    def weight(self) -> float:
        return float(self.config.weight)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None and find_gates(model).mode != "hard_concrete":
            raise ValueError("HeadGatePlugin needs hard_concrete gates: gate_model(model, mode='hard_concrete')")

    def loss_terms(self, trainer, model, inputs, outputs) -> list[LossTerm]:
        return [LossTerm(self.name, find_gates(model).expected_l0(), self.weight)]
