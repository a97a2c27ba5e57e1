"""Scoring every label of a classification example with one pass over its prompt (rank classification, fast).

The obvious way builds one row per (example, label) and takes a log-softmax over the whole vocabulary at every
position: the prompt runs once per label and almost all of the LM head's work is thrown away. Here each example is
one packed row: its prompt, then the label words' tokens (all but each word's last one, which is only predicted),
each word attending to the prompt and to its own earlier tokens only (a 4D attention mask) at the positions it
would have after the prompt. Logits are computed only at the answer positions (`logits_to_keep`). An example with
one-token labels costs exactly one forward over its prompt, whatever the number of labels.

Batches are sized by a token budget (tokens of all rows of a forward pass, and kept logit rows), so memory does not
grow with the number of labels or examples beyond that budget. Models whose forward takes no `logits_to_keep` or
`position_ids` are scored the slow way (`reference_label_scores`), which is also the tests' reference.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch

SCORINGS = ("sum", "mean")
#: kept logit rows allowed per forward pass, as a fraction of the token budget (a logit row holds `vocab` floats)
_LOGIT_ROWS_PER_TOKEN = 1 / 8


def _batches(
    costs: Sequence[int], per_row_extra: int, token_budget: int, max_rows: int | None = None
) -> list[list[int]]:
    """Indices grouped by cost so that `rows * (largest cost + per_row_extra) <= token_budget` (and <= max_rows)."""
    order = sorted(range(len(costs)), key=lambda i: costs[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        rows = len(current) + 1
        if current and (rows * (costs[i] + per_row_extra) > token_budget or (max_rows and rows > max_rows)):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def _check(prompts: Sequence[Sequence[int]], labels: Sequence[Sequence[int]], scoring: str) -> None:
    if scoring not in SCORINGS:
        raise ValueError(f"scoring={scoring!r} is not allowed: choose one of {list(SCORINGS)}")
    if not labels or any(len(ids) == 0 for ids in labels):
        raise ValueError("labels: every label needs at least one token")
    if any(len(ids) == 0 for ids in prompts):
        raise ValueError("prompts: every prompt needs at least one token")


def supports_packed_scoring(model: torch.nn.Module) -> bool:
    """Whether the model's forward takes `logits_to_keep` and `position_ids` (peft models: their base model)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = inspect.signature(base.forward).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()) and "logits_to_keep" not in params:
        return False
    return "logits_to_keep" in params and "position_ids" in params


class _LabelBlock:
    """The label words packed after a prompt: fed tokens, their offsets, and where each label token is predicted."""

    def __init__(self, labels: Sequence[Sequence[int]], device: torch.device) -> None:
        fed, segment, depth, kept_pos, kept_tok, kept_label = [], [], [], [], [], []
        for k, ids in enumerate(labels):
            kept_pos.append(0)  # the prompt's last position predicts every label's first token
            kept_tok.append(ids[0])
            kept_label.append(k)
            for j in range(len(ids) - 1):  # label token j is fed; its position predicts token j + 1
                fed.append(ids[j])
                segment.append(k + 1)
                depth.append(j)
                kept_pos.append(len(fed))
                kept_tok.append(ids[j + 1])
                kept_label.append(k)
        self.n_labels = len(labels)
        self.fed = torch.tensor(fed, dtype=torch.long, device=device)
        self.segment = torch.tensor(segment, dtype=torch.long, device=device)
        self.depth = torch.tensor(depth, dtype=torch.long, device=device)
        self.kept_pos = torch.tensor(kept_pos, dtype=torch.long, device=device)
        self.kept_tok = torch.tensor(kept_tok, dtype=torch.long, device=device)
        self.kept_label = torch.tensor(kept_label, dtype=torch.long, device=device)
        self.lengths = torch.tensor([len(ids) for ids in labels], dtype=torch.float32)

    def __len__(self) -> int:
        return len(self.fed)


def _packed_batch(
    prompts: list[Sequence[int]], block: _LabelBlock, pad_token_id: int, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids, position_ids and the additive 4D mask of left-padded prompts followed by the label block."""
    n, longest, extra = len(prompts), max(len(p) for p in prompts), len(block)
    width = longest + extra
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    input_ids = torch.full((n, width), pad_token_id, dtype=torch.long, device=device)
    for row, ids in enumerate(prompts):
        input_ids[row, longest - len(ids) : longest] = torch.tensor(list(ids), device=device)
    input_ids[:, longest:] = block.fed
    cols = torch.arange(width, device=device)
    is_prompt = (cols < longest) & (cols >= (longest - lengths).unsqueeze(-1))  # [n, width]
    segment = torch.where(is_prompt, 0, -1)  # -1: padding
    if extra:
        segment[:, longest:] = block.segment
    positions = torch.where(is_prompt, cols - (longest - lengths).unsqueeze(-1), 0)
    if extra:
        positions[:, longest:] = lengths.unsqueeze(-1) + block.depth
    q_seg, kv_seg = segment.unsqueeze(-1), segment.unsqueeze(-2)  # [n, width, 1], [n, 1, width]
    causal = cols.unsqueeze(-1) >= cols.unsqueeze(0)
    allowed = causal & (((kv_seg == 0) & (q_seg >= 0)) | ((kv_seg == q_seg) & (q_seg > 0)))
    allowed = allowed | torch.eye(width, dtype=torch.bool, device=device)  # padding rows attend to themselves
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, torch.finfo(dtype).min)
    return input_ids, positions, mask.unsqueeze(1)


@torch.no_grad()
def score_label_continuations(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    labels: Sequence[Sequence[int]],
    pad_token_id: int = 0,
    token_budget: int = 8192,
    scoring: str = "sum",
    max_rows: int | None = None,
) -> torch.Tensor:
    """`[len(prompts), len(labels)]` log-likelihoods of each label's tokens after each prompt.

    `scoring="sum"` sums the label tokens' log-probabilities (the likelihood of the whole label); `"mean"` divides
    by the label's token count, so that a label written with more tokens is not penalised for its length.
    `token_budget` bounds the tokens of one forward pass (prompts + packed label tokens of every row) and, at one
    eighth of it, the logit rows kept; `max_rows` caps the examples of one pass.
    """
    _check(prompts, labels, scoring)
    if not supports_packed_scoring(model):
        return reference_label_scores(model, prompts, labels, pad_token_id, token_budget, scoring)
    param = next(model.parameters())
    device = param.device
    dtype = param.dtype if param.dtype.is_floating_point else torch.float32
    block = _LabelBlock(labels, device)
    kept = len(block) + 1
    logit_rows = max(1, int(token_budget * _LOGIT_ROWS_PER_TOKEN) // kept)
    max_rows = min(max_rows or logit_rows, logit_rows)
    scores = torch.empty(len(prompts), block.n_labels)
    for batch in _batches([len(p) for p in prompts], len(block), token_budget, max_rows):
        input_ids, positions, mask = _packed_batch([prompts[i] for i in batch], block, pad_token_id, dtype, device)
        logits = model(
            input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=False, logits_to_keep=kept
        ).logits
        logp = torch.log_softmax(logits.float(), dim=-1)  # [B, kept, V]
        picked = logp[:, block.kept_pos, block.kept_tok]  # [B, label tokens]
        total = torch.zeros(len(batch), block.n_labels, device=device).index_add_(1, block.kept_label, picked)
        scores[torch.tensor(batch)] = total.cpu()
    if scoring == "mean":
        scores = scores / block.lengths.unsqueeze(0)
    return scores


@torch.no_grad()
def reference_label_scores(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    labels: Sequence[Sequence[int]],
    pad_token_id: int = 0,
    token_budget: int = 8192,
    scoring: str = "sum",
) -> torch.Tensor:
    """The slow, obvious way: one right-padded row per (prompt, label), full logits. Same result as the fast one."""
    _check(prompts, labels, scoring)
    device = next(model.parameters()).device
    pairs = [(i, k) for i in range(len(prompts)) for k in range(len(labels))]
    scores = torch.empty(len(prompts), len(labels))
    for batch in _batches([len(prompts[i]) + len(labels[k]) for i, k in pairs], 0, token_budget, None):
        rows = [list(prompts[pairs[r][0]]) + list(labels[pairs[r][1]]) for r in batch]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for row, tokens in enumerate(rows):
            ids[row, : len(tokens)] = torch.tensor(tokens)
            attention[row, : len(tokens)] = 1
        logp = torch.log_softmax(
            model(input_ids=ids.to(device), attention_mask=attention.to(device)).logits.float(), -1
        )
        for row, r in enumerate(batch):
            i, k = pairs[r]
            start = len(prompts[i])
            targets = torch.tensor(list(labels[k]), device=device)
            positions = torch.arange(start - 1, start - 1 + len(labels[k]), device=device)
            value = logp[row, positions, targets].sum()
            scores[i, k] = value / len(labels[k]) if scoring == "mean" else value
    return scores
