"""Scoring every label of a classification example with one pass over its prompt (rank classification, fast).

The obvious way builds one row per (example, label) and takes a log-softmax over the whole vocabulary at every
position: the prompt is run once per label and almost all of the LM head's work is thrown away. Here the prompt
runs once (left-padded, logits kept at its last position only), its key/value cache is repeated once per label,
and only the label tokens run against it. Batches are sized by a token budget, so memory does not grow with the
number of labels or the prompt length beyond that budget.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

LABEL_SCORINGS = ("sum", "mean")


def _batches(lengths: Sequence[int], per_row_extra: int, token_budget: int) -> list[list[int]]:
    """Indices grouped by prompt length so that `rows * (longest prompt + per_row_extra) <= token_budget`."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        cost = (len(current) + 1) * (lengths[i] + per_row_extra)  # sorted: lengths[i] is the longest so far
        if current and cost > token_budget:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


@torch.no_grad()
def score_label_continuations(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    labels: Sequence[Sequence[int]],
    pad_token_id: int = 0,
    token_budget: int = 4096,
    scoring: str = "sum",
) -> torch.Tensor:
    """`[len(prompts), len(labels)]` log-likelihoods of each label's tokens after each prompt.

    `scoring="sum"` sums the label tokens' log-probabilities (the likelihood of the whole label); `"mean"` divides
    by the label's token count, so that a label written with more tokens is not penalised for its length.
    `token_budget` bounds the tokens of one forward pass (prompt tokens + label tokens of all labels).
    """
    if scoring not in LABEL_SCORINGS:
        raise ValueError(f"scoring={scoring!r} is not allowed: choose one of {list(LABEL_SCORINGS)}")
    if not labels or any(len(ids) == 0 for ids in labels):
        raise ValueError("labels: every label needs at least one token")
    if any(len(ids) == 0 for ids in prompts):
        raise ValueError("prompts: every prompt needs at least one token")
    device = next(model.parameters()).device
    n_labels, longest_label = len(labels), max(len(ids) for ids in labels)
    label_ids = torch.full((n_labels, longest_label), pad_token_id, dtype=torch.long)
    label_mask = torch.zeros((n_labels, longest_label), dtype=torch.long)
    for k, ids in enumerate(labels):
        label_ids[k, : len(ids)] = torch.tensor(list(ids))
        label_mask[k, : len(ids)] = 1
    label_ids, label_mask = label_ids.to(device), label_mask.to(device)
    label_lengths = label_mask.sum(-1).float()

    scores = torch.empty(len(prompts), n_labels)
    lengths = [len(p) for p in prompts]
    for batch in _batches(lengths, n_labels * longest_label, token_budget):
        width = max(lengths[i] for i in batch)
        input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):  # left padding: every prompt ends at the last column
            input_ids[row, width - lengths[i] :] = torch.tensor(list(prompts[i]))
            attention[row, width - lengths[i] :] = 1
        input_ids, attention = input_ids.to(device), attention.to(device)
        positions = (attention.cumsum(-1) - 1).clamp_min(0)
        out = model(
            input_ids=input_ids, attention_mask=attention, position_ids=positions, use_cache=True, logits_to_keep=1
        )
        first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)[:, label_ids[:, 0]]  # [B, K]
        total = first.clone()
        if longest_label > 1:
            cache = out.past_key_values
            cache.batch_repeat_interleave(n_labels)
            step_ids = label_ids[:, :-1].repeat(len(batch), 1)  # [B*K, L-1]: label tokens fed in
            step_mask = label_mask[:, :-1].repeat(len(batch), 1)
            mask = torch.cat([attention.repeat_interleave(n_labels, dim=0), step_mask], dim=-1)
            start = attention.sum(-1).repeat_interleave(n_labels).unsqueeze(-1)
            step_positions = start + torch.arange(longest_label - 1, device=device).unsqueeze(0)
            logits = model(
                input_ids=step_ids,
                attention_mask=mask,
                position_ids=step_positions,
                past_key_values=cache,
                use_cache=True,
            ).logits.float()
            targets = label_ids[:, 1:].repeat(len(batch), 1)
            logp = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            rest = (logp * label_mask[:, 1:].repeat(len(batch), 1)).sum(-1).view(len(batch), n_labels)
            total = total + rest
            del cache, logits, logp
        if scoring == "mean":
            total = total / label_lengths.unsqueeze(0)
        scores[torch.tensor(batch)] = total.cpu()
    return scores
