"""Diagonal Fisher information over the trainable parameters of a causal LM, computed exactly per sample.

What is computed
    F_p = (1/N) Σ_i (∂ℓ_i/∂θ_p)²  for every trainable parameter p (``requires_grad=True``: all weights in
    full fine-tuning, only the adapter weights of a peft LoRA model), over N rows.

The per-sample loss ℓ_i
    ℓ_i = − Σ_{t ∈ answer(i)} log p(y_t | y_<t): the *summed* NLL of the row's answer tokens (labels ≠ -100,
    the rows of `tokenize_task`). Summing (not averaging over tokens) makes ℓ_i the negative log-likelihood of
    the whole answer sequence, so F is the Fisher of the model's sequence distribution p(answer | prompt)
    and the "true" Fisher has its textbook meaning; it also does not depend on how long an answer is.

Fisher types
    * ``"empirical"``: y = the dataset answer.
    * ``"true"``: y is sampled from the model itself, token by token at the answer positions
      (ancestral sampling, the same number of answer tokens as in the row), with one seeded generator per
      row, so every method, chunk size and process split sees the same sampled rows.

Methods
    * ``"vmap"`` (fast path): per-sample gradients of the whole chunk at once with
      ``torch.func.vmap(grad(loss))`` over ``functional_call``; rows are sorted by length and processed
      ``chunk_size`` at a time (memory ≈ chunk_size × trainable-parameter bytes + activations; the default
      ``chunk_size=None`` takes as many rows as fit in ``max_chunk_bytes`` of float32 per-sample gradients
      and logits — by default 1 GiB on CPU and a quarter of the free memory of a CUDA device — because every
      vmap call costs a fixed dispatch time on top of its rows, ~20 ms on CPU). Rows are
      right-padded and the forward runs without an attention mask: with causal attention a real token never
      sees the padding after it, so the answer log-likelihoods are exactly those of the unpadded row.
      Attention runs in eager mode while vmapping (sdpa has no batching rule for its backward and falls back
      to a slow loop); the model's setting is restored afterwards.
    * ``"loop"`` (reference and automatic fallback when vmap fails): one unpadded row at a time through the
      model's ordinary forward and ``torch.autograd.grad``.

Under ``torch.distributed`` every process takes rows ``rank::world_size``, and the squared-gradient sums and
the row counts are summed with ``all_reduce`` before dividing, so every process ends with the same Fisher.

``minibatch_fisher`` is the common cheap approximation (square of the gradient of a minibatch's mean loss),
kept for comparison in ``benchmarks/fisher.py``; it is biased (≈ F/B + (mean gradient)² for batch size B).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.func import functional_call, grad, vmap
from tqdm.auto import tqdm

from ..tasks.losses import IGNORE_INDEX, answer_cross_entropy
from ..utils.validation import check_choice, check_number
from .config import FISHER_METHODS, FISHER_TYPES

logger = logging.getLogger(__name__)

DEFAULT_MAX_CHUNK_BYTES = 1 << 30  # per vmap call on CPU; on CUDA a quarter of the free memory


@dataclass
class FisherResult:
    """A diagonal Fisher (float32, one tensor per trainable parameter name) and how it was obtained."""

    fisher: dict[str, torch.Tensor]
    num_samples: int
    method: str
    fisher_type: str


@dataclass
class _Example:
    input_ids: torch.Tensor  # [L] long
    labels: torch.Tensor  # [L] long, IGNORE_INDEX on prompt tokens


def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The parameters the Fisher covers: those with ``requires_grad=True``, by name."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def _to_examples(rows: Any) -> list[_Example]:
    """Unpadded (input_ids, labels) tensors from rows of `tokenize_task` (dicts, or a `datasets.Dataset`)."""
    examples = []
    for i, row in enumerate(rows):
        if "input_ids" not in row or "labels" not in row:
            raise ValueError(
                f"rows[{i}] must have 'input_ids' and 'labels' (rows of tokenize_task), got keys {sorted(row)}"
            )
        ids = torch.as_tensor(row["input_ids"], dtype=torch.long).flatten()
        labels = torch.as_tensor(row["labels"], dtype=torch.long).flatten()
        if ids.shape != labels.shape or ids.numel() < 2:
            raise ValueError(
                f"rows[{i}]: input_ids and labels must have the same length >= 2, got {ids.numel()} and "
                f"{labels.numel()}"
            )
        mask = row.get("attention_mask")
        if mask is not None and not bool(torch.as_tensor(mask).bool().all()):
            raise ValueError(
                f"rows[{i}].attention_mask has zeros: the Fisher takes unpadded rows (as from tokenize_task)"
            )
        examples.append(_Example(ids, labels))
    if not examples:
        raise ValueError("rows is empty: the Fisher needs at least one row")
    return examples


def answer_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL of the labelled tokens of each row: logits [B, L, V], labels [B, L] -> [B]
    (`answer_cross_entropy` per row, summed over the answer tokens: the sequence NLL the Fisher differentiates)."""
    return answer_cross_entropy(logits, labels, reduction="per_row_sum")


def _pad(examples: Sequence[_Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(e.input_ids.numel() for e in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, : e.input_ids.numel()] = e.input_ids
        labels[i, : e.labels.numel()] = e.labels
    return ids, labels


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _pad_id(model: torch.nn.Module) -> int:
    pad = getattr(getattr(model, "config", None), "pad_token_id", None)
    return int(pad) if pad is not None else 0


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """No dropout while the Fisher is measured; the previous mode is restored."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextlib.contextmanager
def attention_implementation(model: torch.nn.Module, implementation: str | None) -> Iterator[None]:
    """Temporarily switch `config._attn_implementation` (read at every forward by transformers models)."""
    config = getattr(model, "config", None)
    if implementation is None or config is None or not hasattr(config, "_attn_implementation"):
        yield
        return
    previous = config._attn_implementation
    config._attn_implementation = implementation
    try:
        yield
    finally:
        config._attn_implementation = previous


def _row_generator(seed: int, row_id: int) -> torch.Generator:
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + int(row_id)) % (2**63))


@torch.no_grad()
def sample_true_labels(
    model: torch.nn.Module,
    rows: Any,
    seed: int = 0,
    batch_size: int = 16,
    pad_id: int | None = None,
    row_ids: Sequence[int] | None = None,
) -> list[dict[str, list[int]]]:
    """Rows whose answer tokens are replaced by ancestral samples from the model (for the "true" Fisher).

    Answer positions are filled left to right; position t is drawn from p(· | tokens < t) including the
    tokens already sampled. Every row draws from its own CPU generator seeded by (`seed`, its `row_ids`
    entry; default its position), so the samples do not depend on `batch_size`, on the device, or on how
    rows are split across processes.
    """
    examples = _to_examples(rows)
    row_ids = list(range(len(examples))) if row_ids is None else list(row_ids)
    if len(row_ids) != len(examples):
        raise ValueError(f"sample_true_labels.row_ids has {len(row_ids)} entries for {len(examples)} rows")
    pad_id = _pad_id(model) if pad_id is None else pad_id
    device = _model_device(model)
    out: list[dict[str, list[int]]] = []
    with eval_mode(model):
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            generators = [_row_generator(seed, r) for r in row_ids[start : start + batch_size]]
            ids, labels = _pad(chunk, pad_id)
            positions = [[int(t) for t in torch.nonzero(e.labels != IGNORE_INDEX).flatten() if t >= 1] for e in chunk]
            for k in range(max((len(p) for p in positions), default=0)):
                logits = model(input_ids=ids.to(device)).logits
                for r, pos in enumerate(positions):
                    if k < len(pos):
                        t = pos[k]
                        probs = torch.softmax(logits[r, t - 1].float(), dim=-1).cpu()
                        token = int(torch.multinomial(probs, 1, generator=generators[r]))
                        ids[r, t] = token
                        labels[r, t] = token
            for r, e in enumerate(chunk):
                n = e.input_ids.numel()
                out.append({"input_ids": ids[r, :n].tolist(), "labels": labels[r, :n].tolist()})
    return out


def _dist_info() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _squared_grad_sums_loop(
    model: torch.nn.Module, examples: Sequence[_Example], names: list[str], bar: tqdm
) -> dict[str, torch.Tensor]:
    params = trainable_parameters(model)
    plist = [params[n] for n in names]
    device = _model_device(model)
    sums = {n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in zip(names, plist, strict=True)}
    for e in examples:
        logits = model(input_ids=e.input_ids.unsqueeze(0).to(device)).logits
        loss = answer_nll(logits, e.labels.unsqueeze(0).to(device)).sum()
        grads = torch.autograd.grad(loss, plist, allow_unused=True)
        for n, g in zip(names, grads, strict=True):
            if g is not None:
                sums[n] += g.detach().float().square()
        bar.update(1)
    return sums


def _squared_grad_sums_vmap(
    model: torch.nn.Module,
    examples: Sequence[_Example],
    names: list[str],
    chunk_size: int,
    attn_implementation: str | None,
    bar: tqdm,
) -> dict[str, torch.Tensor]:
    params = {n: p.detach() for n, p in trainable_parameters(model).items()}
    device = _model_device(model)
    pad_id = _pad_id(model)
    sums = {n: torch.zeros(params[n].shape, dtype=torch.float32, device=params[n].device) for n in names}

    def loss_fn(p: dict[str, torch.Tensor], ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = functional_call(model, p, (), {"input_ids": ids.unsqueeze(0)}).logits
        return answer_nll(logits, labels.unsqueeze(0)).sum()

    per_sample_grads = vmap(grad(loss_fn), in_dims=(None, 0, 0))
    order = sorted(range(len(examples)), key=lambda i: examples[i].input_ids.numel())  # little padding per chunk
    with attention_implementation(model, attn_implementation):
        for start in range(0, len(order), chunk_size):
            chunk = [examples[i] for i in order[start : start + chunk_size]]
            ids, labels = _pad(chunk, pad_id)
            grads = per_sample_grads(params, ids.to(device), labels.to(device))
            for n in names:
                sums[n] += grads[n].float().square().sum(0)
            del grads
            bar.update(len(chunk))
    return sums


def auto_chunk_size(
    model: torch.nn.Module, max_length: int = 1, max_chunk_bytes: int | None = None, cap: int = 512
) -> int:
    """Rows per vmap call whose float32 per-sample gradients and logits fit in `max_chunk_bytes` (1 ... `cap`).

    Per row: 4 bytes per trainable parameter (its gradient) + 3 float32 copies of the [max_length, vocab]
    logits (logits, log-softmax, their gradient); activations of the layers are not counted.
    `max_chunk_bytes=None`: a quarter of the free memory of the model's CUDA device, else 1 GiB.
    """
    if max_chunk_bytes is None:
        device = _model_device(model)
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            max_chunk_bytes = max(int(free) // 4, 1)
        else:
            max_chunk_bytes = DEFAULT_MAX_CHUNK_BYTES
    vocab = getattr(getattr(model, "config", None), "vocab_size", None) or 0
    per_row = 4 * sum(p.numel() for p in trainable_parameters(model).values()) + 12 * int(max_length) * int(vocab)
    return max(1, min(cap, max_chunk_bytes // max(per_row, 1)))


def compute_fisher(
    model: torch.nn.Module,
    rows: Any,
    *,
    fisher_type: str = "empirical",
    method: str = "vmap",
    chunk_size: int | None = None,
    seed: int = 0,
    attn_implementation: str | None = "eager",
    progress_bar: bool = True,
    desc: str = "Fisher",
    max_chunk_bytes: int | None = None,
) -> FisherResult:
    """Exact diagonal Fisher of `model` over `rows` (see the module docstring for the definition).

    `rows`: rows of `tokenize_task` (input_ids, labels; unpadded). `method`: "vmap" (falls back to "loop"
    with a warning if vmap fails) or "loop". `attn_implementation`: attention used while vmapping (None keeps
    the model's). Returns float32 tensors on the parameters' devices.
    """
    check_choice("compute_fisher", "fisher_type", fisher_type, FISHER_TYPES)
    check_choice("compute_fisher", "method", method, FISHER_METHODS)
    check_number("compute_fisher", "chunk_size", chunk_size, low=1, integer=True, optional=True)
    check_number("compute_fisher", "max_chunk_bytes", max_chunk_bytes, low=1, integer=True, optional=True)
    examples = _to_examples(rows)
    names = list(trainable_parameters(model))
    if not names:
        raise ValueError("model has no trainable parameters (requires_grad=True): nothing to compute a Fisher for")
    if chunk_size is None:
        chunk_size = auto_chunk_size(model, max(e.input_ids.numel() for e in examples), max_chunk_bytes)

    rank, world = _dist_info()
    row_ids = list(range(rank, len(examples), world))
    examples = examples[rank::world]
    with eval_mode(model):
        if fisher_type == "true" and examples:
            sampled = sample_true_labels(
                model,
                [{"input_ids": e.input_ids, "labels": e.labels} for e in examples],
                seed=seed,
                batch_size=chunk_size,
                row_ids=row_ids,
            )
            examples = _to_examples(sampled)
        used = method
        bar = tqdm(
            total=len(examples), desc=f"{desc} ({fisher_type})", disable=not progress_bar or rank != 0, leave=False
        )
        try:
            if method == "vmap" and examples:
                try:
                    sums = _squared_grad_sums_vmap(model, examples, names, chunk_size, attn_implementation, bar)
                except Exception as err:  # vmap cannot handle every model: fall back to the exact loop
                    warnings.warn(
                        f"vectorized Fisher failed ({type(err).__name__}: {err}); using the per-sample loop",
                        RuntimeWarning,
                        stacklevel=2,
                    )
                    used = "loop"
                    bar.reset(total=len(examples))
                    sums = _squared_grad_sums_loop(model, examples, names, bar)
            else:
                sums = _squared_grad_sums_loop(model, examples, names, bar)
        finally:
            bar.close()

    device = _model_device(model)
    count = torch.tensor(float(len(examples)), device=device)
    if world > 1:
        for n in names:
            torch.distributed.all_reduce(sums[n], op=torch.distributed.ReduceOp.SUM)
        torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.SUM)
    total = int(count.item())
    if total == 0:
        raise ValueError("no rows reached any process: the Fisher needs at least one row")
    fisher = {n: s / total for n, s in sums.items()}
    return FisherResult(fisher=fisher, num_samples=total, method=used, fisher_type=fisher_type)


def minibatch_fisher(model: torch.nn.Module, rows: Any, batch_size: int = 8) -> dict[str, torch.Tensor]:
    """The cheap approximation: mean over minibatches of (∇ mean-over-rows loss)², one backward per batch.

    Same per-row loss as `compute_fisher`. Not an estimate of F: it is ≈ F / B plus the squared mean
    gradient; shown in `benchmarks/fisher.py` for comparison only.
    """
    check_number("minibatch_fisher", "batch_size", batch_size, low=1, integer=True)
    examples = _to_examples(rows)
    params = trainable_parameters(model)
    names, plist = list(params), list(params.values())
    device = _model_device(model)
    sums = {n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in params.items()}
    n_batches = 0
    with eval_mode(model):
        for start in range(0, len(examples), batch_size):
            ids, labels = _pad(examples[start : start + batch_size], _pad_id(model))
            loss = answer_nll(model(input_ids=ids.to(device)).logits, labels.to(device)).mean()
            for n, g in zip(names, torch.autograd.grad(loss, plist, allow_unused=True), strict=True):
                if g is not None:
                    sums[n] += g.float().square()
            n_batches += 1
    return {n: s / n_batches for n, s in sums.items()}


def fisher_norm(fisher: Mapping[str, torch.Tensor]) -> float:
    """Frobenius norm over all entries (for relative errors between two Fishers)."""
    return float(torch.sqrt(sum(f.double().square().sum() for f in fisher.values())))


__all__ = [
    "FISHER_METHODS",
    "FISHER_TYPES",
    "FisherResult",
    "answer_nll",
    "attention_implementation",
    "auto_chunk_size",
    "compute_fisher",
    "fisher_norm",
    "minibatch_fisher",
    "sample_true_labels",
    "trainable_parameters",
]
