"""`FeatureReplayPlugin`: a compressive memory of the backbone's features per old task, and feature distillation.

What a "feature" is: the last hidden state (after the final norm, `outputs.hidden_states[-1]`) at the *answer
position* of a row, i.e. at the last prompt token, whose next-token prediction is the answer. It is the
representation the label decision is read from, so keeping it stable keeps old tasks' decisions stable.

At the end of each task, `samples_per_task` training rows of the task (a seeded sample stratified by label of
the rows the trainer tokenized, `_common.context_rows`; a distillation loss, so label smoothing does not apply)
go through the model once, in eval mode under `torch.no_grad` (no copy of the model is made).
The memory keeps, per task:

* the rows' prompt tokens (int32; the features depend only on them, the model being causal);
* ``prototypes``: the mean feature of each class (label) present, ``[n_classes, hidden]``;
* ``centroids``: k-means centroids of each class's features (`k_per_class` per class, sklearn's `KMeans`,
  seeded; with k = 1 they are the class means), ``[K, hidden]`` with ``centroid_class``;
* a per-row distillation target, depending on `target`:
    - ``"features"`` (exact): the row's feature itself; the loss is ``mean((f_θ(x) − f*(x))²)`` over the
      sampled rows and feature dimensions;
    - ``"prototypes"`` (compressive): the row's squared distances to its task's K centroids, divided by
      ``hidden``; the loss is ``mean((d(f_θ(x), C) − d*(x))²)``. This keeps each row's position relative to
      the stored class prototypes; since ``‖f − c₁‖² − ‖f − c₀‖²`` is linear in ``f`` along ``c₁ − c₀``, it
      pins the class-discriminative directions at K floats per row instead of ``hidden``.

Both losses are exactly 0 for the model the memory was taken from (without dropout) and have a gradient that
reaches every parameter the features depend on. What it does not protect: the output head. With tied
embeddings (Gemma) the label words' rows move while a new task trains, so old decisions can change even with
features kept; pair it with exact replay or EWC (for example replay_alpha=0.2 with feature_replay_alpha=0.1).
At each training step `batch_size` stored rows (all old tasks together) are drawn and one extra forward runs
on them; the term is ``LossTerm("feature_replay", loss, weight=feature_replay_alpha)``.

Memory bound, per stored row of ``L`` prompt tokens: ``4 L`` bytes of tokens plus ``hidden × 4`` bytes
(``"features"``, float32; 2 with ``feature_dtype=torch.bfloat16``) or ``K × 4`` bytes (``"prototypes"``); per
task ``(n_classes + K) × hidden × 4`` bytes of prototypes and centroids. Tiny Gemma on the built-in suite
(L = 11, hidden 64, 2 classes, K = 2): 300 bytes/row exact, 52 bytes/row compressive; Gemma-2B (hidden 2048):
8236 / 52 bytes per row. At most `samples_per_task` rows per task and, when `max_rows` is set
(`replay_buffer_size` in `from_config`), at most `max_rows` rows in all: when a task arrives every task keeps
an equal share (a seeded uniform subset of its rows; its prototypes and centroids stay those of all its rows).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from ..plugins import ContinualPlugin, LossTerm, TaskContext
from ..utils.options import OptionSource
from ..utils.validation import fail
from ._common import (
    ConfigValue,
    answer_positions,
    config_sharing_replay_options,
    configure,
    context_rows,
    model_device,
)
from .config import FEATURE_REPLAY_OPTIONS, FEATURE_REPLAY_SOURCE, FEATURE_TARGETS, FeatureReplayConfig

__all__ = [
    "FEATURE_TARGETS",
    "FeatureReplayPlugin",
    "class_centroids",
    "class_prototypes",
    "extract_features",
    "last_token_features",
    "prompt_tokens",
]


def prompt_tokens(rows: Sequence[dict[str, Any]]) -> list[list[int]]:
    """Each row's tokens up to and including its answer position (the last prompt token)."""
    out = []
    for r in rows:
        labels = torch.as_tensor(r["labels"]).view(1, -1)
        pos = int(answer_positions(labels)[0])
        out.append(list(r["input_ids"])[: pos + 1])
    return out


def _pad(prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = torch.as_tensor(list(p), dtype=torch.long)
        mask[i, : len(p)] = 1
    return ids.to(device), mask.to(device)


def last_token_features(model: torch.nn.Module, prompts: Sequence[Sequence[int]], pad_id: int) -> torch.Tensor:
    """``[n, hidden]`` last hidden states at the last token of each (right-padded) prompt, in the graph."""
    ids, mask = _pad(prompts, pad_id, model_device(model))
    hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
    last = mask.sum(dim=1) - 1
    return hidden[torch.arange(len(prompts), device=hidden.device), last]


@torch.no_grad()
def extract_features(
    model: torch.nn.Module, prompts: Sequence[Sequence[int]], pad_id: int, batch_size: int = 64
) -> torch.Tensor:
    """`last_token_features` in eval mode without gradients, batched; float32 on the CPU."""
    was_training = model.training
    model.eval()
    try:
        chunks = [
            last_token_features(model, prompts[i : i + batch_size], pad_id).float().cpu()
            for i in range(0, len(prompts), batch_size)
        ]
    finally:
        model.train(was_training)
    return torch.cat(chunks)


def class_prototypes(features: torch.Tensor, classes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean feature per class present: ``(prototypes [C, hidden], class ids [C])``, classes ascending."""
    present = torch.unique(classes)
    protos = torch.stack([features[classes == c].mean(dim=0) for c in present])
    return protos, present


def class_centroids(
    features: torch.Tensor, classes: torch.Tensor, k_per_class: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means centroids of each class's features (sklearn `KMeans`, seeded): ``(centroids [K, hidden], class [K])``."""
    cents, owner = [], []
    for c in torch.unique(classes).tolist():
        feats = features[classes == c]
        k = min(k_per_class, len(feats))
        if k == 1:
            cents.append(feats.mean(dim=0, keepdim=True))
        else:
            from sklearn.cluster import KMeans

            km = KMeans(n_clusters=k, n_init=4, random_state=seed).fit(feats.double().numpy())
            cents.append(torch.as_tensor(km.cluster_centers_, dtype=torch.float32))
        owner += [c] * k
    return torch.cat(cents), torch.tensor(owner, dtype=torch.long)


def centroid_distances(features: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Squared distances ``[n, K]`` of each feature to each centroid, divided by the feature size."""
    diff = features.float().unsqueeze(1) - centroids.to(features.device).unsqueeze(0)
    return diff.pow(2).sum(-1) / features.shape[-1]


class FeatureReplayPlugin(ContinualPlugin):
    """Feature distillation toward a compressive memory of old tasks' answer-position features.

    Args:
        config: a `FeatureReplayConfig` (None: its defaults); keyword `overrides` replace single fields of it:
        alpha: weight of the distillation loss (`feature_replay_alpha`), in [0, 1].
        samples_per_task: training rows of each task that the prototypes are computed from and kept in memory.
        max_rows: the most rows kept over all tasks (None: no cap beyond `samples_per_task` per task;
            `replay_buffer_size` in `from_config`).
        target: ``"features"`` (exact stored features) or ``"prototypes"`` (distances to k-means centroids).
        k_per_class: k-means centroids per class.
        batch_size: stored rows distilled per training step (`replay_batch_size`).
        seed: seed of k-means and of the row sampling (the run's `seed` in `from_config`).
        feature_dtype: dtype the exact features are stored in: ``"float32"`` (default), ``"float16"`` or
            ``"bfloat16"`` (`feature_replay_dtype`; a `torch.dtype` is accepted too). `plugin.feature_dtype`
            is the `torch.dtype`.
    """

    name = "feature_replay"
    options: ClassVar[tuple[OptionSource, ...]] = FEATURE_REPLAY_OPTIONS

    alpha = ConfigValue()
    samples_per_task = ConfigValue()
    max_rows = ConfigValue()
    target = ConfigValue()
    k_per_class = ConfigValue()
    batch_size = ConfigValue()
    seed = ConfigValue()

    def __init__(self, config: FeatureReplayConfig | None = None, **overrides: Any) -> None:
        if isinstance(overrides.get("feature_dtype"), torch.dtype):  # torch.bfloat16 -> "bfloat16"
            overrides["feature_dtype"] = str(overrides["feature_dtype"]).removeprefix("torch.")
        self.config = configure(FeatureReplayConfig, config, overrides, "FeatureReplayPlugin")
        self.generator = torch.Generator().manual_seed(self.seed)
        #: per task name: prompts (list of token lists), classes, prototypes, prototype_classes, centroids,
        #: centroid_class, targets
        self.memory: dict[str, dict[str, Any]] = {}

    @property
    def feature_dtype(self) -> torch.dtype:
        return getattr(torch, self.config.feature_dtype)

    @classmethod
    def from_config(cls, config: Any, model: torch.nn.Module | None = None, **overrides: Any) -> FeatureReplayPlugin:
        """From the `feature_replay_*` options, `replay_buffer_size` (as `max_rows`) and `replay_batch_size`
        (shared with exact replay, validated under their own names) and the run's `seed`."""
        own = config_sharing_replay_options(
            config, FEATURE_REPLAY_SOURCE, max_rows="buffer_size", batch_size="batch_size"
        )
        return cls(own, **overrides)

    # ------------------------------------------------------------------ memory
    def on_task_end(self, trainer: Any, context: TaskContext) -> None:
        rows = context_rows(context, self.samples_per_task, seed=self.seed)
        classes = torch.tensor([r["label"] for r in rows], dtype=torch.long)
        pad_id = context.tokenizer.pad_token_id or 0
        self.remember(trainer.model, context.task.name, prompt_tokens(rows), classes, pad_id)

    def remember(
        self, model: torch.nn.Module, name: str, prompts: list[list[int]], classes: torch.Tensor, pad_id: int
    ) -> None:
        """Compute and store the memory of one task from its rows' prompts and class labels."""
        feats = extract_features(model, prompts, pad_id)
        protos, proto_cls = class_prototypes(feats, classes)
        cents, cent_cls = class_centroids(feats, classes, self.k_per_class, self.seed)
        target = feats.to(self.feature_dtype) if self.target == "features" else centroid_distances(feats, cents)
        self.memory[name] = {
            "prompts": prompts,
            "pad_id": pad_id,
            "classes": classes,
            "prototypes": protos,
            "prototype_classes": proto_cls,
            "centroids": cents,
            "centroid_class": cent_cls,
            "targets": target,
        }
        self._enforce_cap()

    def _enforce_cap(self) -> None:
        """Shrink every task to its equal share of `max_rows` (the first `max_rows mod T` tasks get one more)."""
        if self.max_rows is None:
            return
        names = list(self.memory)
        base, extra = divmod(self.max_rows, len(names))
        for j, name in enumerate(names):
            mem, keep = self.memory[name], base + (1 if j < extra else 0)
            if len(mem["prompts"]) <= keep:
                continue
            idx = torch.randperm(len(mem["prompts"]), generator=self.generator)[:keep].sort().values
            mem["prompts"] = [mem["prompts"][i] for i in idx.tolist()]
            mem["classes"], mem["targets"] = mem["classes"][idx], mem["targets"][idx]

    def nbytes_per_row(self, name: str) -> int:
        """Bytes stored per row of task `name` (tokens + target), excluding the per-task prototypes."""
        mem = self.memory[name]
        tokens = 4 * sum(len(p) for p in mem["prompts"]) / len(mem["prompts"])
        return int(round(tokens + mem["targets"][0].numel() * mem["targets"].element_size()))

    # ------------------------------------------------------------------ loss
    def distillation_loss(self, model: torch.nn.Module, picks: Sequence[tuple[str, int]]) -> torch.Tensor:
        """The loss over the stored rows `picks` (``(task, row index)``), averaged over rows."""
        total = torch.zeros((), device=model_device(model))
        for name in dict.fromkeys(t for t, _ in picks):
            mem = self.memory[name]
            idx = [i for t, i in picks if t == name]
            feats = last_token_features(model, [mem["prompts"][i] for i in idx], mem["pad_id"]).float()
            target = mem["targets"][idx].to(feats.device).float()
            current = feats if self.target == "features" else centroid_distances(feats, mem["centroids"])
            total = total + (current - target).pow(2).mean(dim=-1).sum()
        return total / len(picks)

    def sample(self, k: int) -> list[tuple[str, int]]:
        pool = [(name, i) for name, mem in self.memory.items() for i in range(len(mem["prompts"]))]
        picks = torch.randperm(len(pool), generator=self.generator)[: min(k, len(pool))].tolist()
        return [pool[i] for i in picks]

    def loss_terms(self, trainer: Any, model: torch.nn.Module, inputs: dict[str, Any], outputs: Any) -> list[LossTerm]:
        if self.alpha == 0 or not self.memory or not model.training:
            return []
        loss = self.distillation_loss(model, self.sample(self.batch_size))
        return [LossTerm(self.name, loss, weight=self.alpha)]

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        tasks = {}
        for name, mem in self.memory.items():
            lengths = torch.tensor([len(p) for p in mem["prompts"]], dtype=torch.int64)
            flat = torch.tensor([t for p in mem["prompts"] for t in p], dtype=torch.int32)
            tasks[name] = {k: v for k, v in mem.items() if k != "prompts"} | {
                "prompt_lengths": lengths,
                "prompt_ids": flat,
            }
        return {
            "target": self.target,
            "generator_state": self.generator.get_state(),
            "order": list(self.memory),
            "tasks": tasks,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["target"] != self.target:
            fail("FeatureReplayPlugin", "target", self.target, f"the saved memory was built with {state['target']!r}")
        self.generator.set_state(state["generator_state"].to(torch.uint8).cpu())
        self.memory = {}
        for name in state["order"]:
            mem = dict(state["tasks"][name])
            lengths, flat = mem.pop("prompt_lengths").tolist(), mem.pop("prompt_ids").tolist()
            prompts, offset = [], 0
            for n in lengths:
                prompts.append(flat[offset : offset + n])
                offset += n
            mem["prompts"] = prompts
            mem["pad_id"] = int(mem["pad_id"])
            self.memory[name] = mem
