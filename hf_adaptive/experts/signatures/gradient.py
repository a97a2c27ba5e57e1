"""The gradient part: a sketch of the gradient that a few examples of the task produce on chosen parameters of
the backbone (adapters disabled), projected to `sketch_dim` by a fixed-seed random projection (Gaussian, generated
in chunks so it never materialises the whole matrix) or a count sketch.

Two groups, each divided by its L2 norm so that neither dominates by its size, then sketched and summed: the
parameters `layer_names`, and (when `input_embeddings` is on) the gradient with respect to the input embedding of
every token, summed per token id. On a pretrained backbone the second carries most of the task identity (which
words push towards which answer; docs/results/routing_quality.md); on a random one the attention gradient does.
`requires_grad` flags are restored afterwards.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from ...tasks.losses import IGNORE_INDEX, answer_cross_entropy
from ...utils.validation import fail
from ..config import SignatureConfig
from .backbone import backbone_only, base_of, normalise_name
from .projection import count_sketch, gaussian_project, l2, project_rows

#: pseudo-layer of `SignatureConfig.layers`: the gradient with respect to the input embeddings of the tokens seen,
#: summed per token id (the input-side part of the embedding matrix's gradient; sparse: only rows of seen tokens)
INPUT_EMBEDDINGS = "input_embeddings"


class GradientSketch:
    """Batches of training rows -> a `sketch_dim` vector."""

    def __init__(self, model: torch.nn.Module, config: SignatureConfig) -> None:
        self.model, self.config = model, config
        requested = config.layers
        self.input_embeddings = requested is None or INPUT_EMBEDDINGS in requested
        named = None if requested is None else [n for n in requested if n != INPUT_EMBEDDINGS]
        self.layer_names = [] if named == [] else self._resolve_layers(named)

    @property
    def dim(self) -> int:
        return self.config.sketch_dim

    def named_parameters(self) -> dict[str, torch.nn.Parameter]:
        return {
            normalise_name(n): p
            for n, p in base_of(self.model).named_parameters()
            if "lora_" not in n and "modules_to_save" not in n
        }

    def _resolve_layers(self, layers: list[str] | None) -> list[str]:
        params = self.named_parameters()
        if layers is None:
            n_layers = getattr(getattr(self.model, "config", None), "num_hidden_layers", None)
            wanted = [n for n in params if "self_attn" in n and n.endswith(".weight")]
            if n_layers is not None:
                last = [n for n in wanted if f"layers.{n_layers - 1}." in n]
                wanted = last or wanted
            if not wanted:
                wanted = [n for n in params if n.endswith(".weight")][-2:]
            return wanted
        resolved: list[str] = []
        for name in layers:
            name = normalise_name(name)
            if name in params:
                resolved.append(name)
                continue
            under = [n for n in params if n.startswith(name + ".")]
            if not under:
                sample = ", ".join(list(params)[:6])
                fail(
                    "SignatureConfig",
                    "layers",
                    self.config.layers,
                    f"entry {name!r} names no parameter or module of the backbone (parameters look like: "
                    f"{sample}, ...)",
                )
            resolved.extend(under)
        return list(dict.fromkeys(resolved))

    def __call__(self, batches: Iterable[dict[str, torch.Tensor]]) -> torch.Tensor:
        """Sketch of the mean answer-loss gradient over the labelled tokens of `batches` (backbone only)."""
        params = self.named_parameters()
        chosen = [params[n] for n in self.layer_names]
        saved = [p.requires_grad for p in chosen]
        grads = [torch.zeros_like(p, dtype=torch.float32) for p in chosen]
        token_ids: list[torch.Tensor] = []
        token_grads: list[torch.Tensor] = []
        captured: list[torch.Tensor] = []

        def capture(module: torch.nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
            leaf = output.detach().requires_grad_(True)
            captured.append(leaf)
            return leaf

        embeddings = base_of(self.model).get_input_embeddings()
        hook = embeddings.register_forward_hook(capture) if self.input_embeddings else None
        n_tokens = 0
        try:
            for p in chosen:
                p.requires_grad_(True)
            with backbone_only(self.model):
                for batch in batches:
                    captured.clear()
                    labels = batch["labels"]
                    out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                    loss_sum = answer_cross_entropy(out.logits, labels, reduction="sum")
                    step = torch.autograd.grad(loss_sum, chosen + captured[:1], allow_unused=True)
                    for acc, g in zip(grads, step[: len(chosen)], strict=True):
                        if g is not None:
                            acc += g.float()
                    if captured:
                        keep = batch["attention_mask"].bool()
                        token_ids.append(batch["input_ids"][keep].cpu())
                        token_grads.append(step[-1][keep].float().cpu())
                    n_tokens += int((labels[:, 1:] != IGNORE_INDEX).sum())
        finally:
            if hook is not None:
                hook.remove()
            for p, flag in zip(chosen, saved, strict=True):
                p.requires_grad_(flag)
        cfg = self.config
        sketch = torch.zeros(cfg.sketch_dim)
        if chosen:
            flat = torch.cat([g.flatten() for g in grads]) / max(n_tokens, 1)
            project = gaussian_project if cfg.sketch_method == "gaussian" else count_sketch
            sketch += project(l2(flat), cfg.sketch_dim, cfg.seed)
        if token_ids:
            ids = torch.cat(token_ids)
            unique, inverse = torch.unique(ids, return_inverse=True)
            per_token = torch.zeros(unique.numel(), token_grads[0].size(-1), dtype=torch.float64)
            per_token.index_add_(0, inverse, torch.cat(token_grads).double())
            sketch += project_rows(l2(per_token), unique, cfg.sketch_dim, cfg.seed, cfg.sketch_method)
        return sketch
