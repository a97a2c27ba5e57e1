"""The exact diagonal Fisher: vectorized == per-sample loop == a hand reference through the model's own loss."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from hf_adaptive.consolidation.fisher import (
    answer_nll,
    compute_fisher,
    fisher_norm,
    minibatch_fisher,
    sample_true_labels,
    trainable_parameters,
)
from hf_adaptive.tasks import tokenize_task

N_ROWS = 10


def _varied_rows(tokenizer, task, n: int = N_ROWS) -> list[dict]:
    """Rows of different lengths (prompt tokens dropped after BOS), so the vmap path has to pad."""
    rows = tokenize_task(task, tokenizer)
    out = []
    for i in range(n):
        row, k = rows[i], i % 4
        out.append(
            {
                "input_ids": row["input_ids"][:1] + row["input_ids"][1 + k :],
                "labels": row["labels"][:1] + row["labels"][1 + k :],
            }
        )
    assert len({len(r["input_ids"]) for r in out}) > 1
    return out


def _lora(model):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # peft starts B at zero, which would make every lora_A gradient zero
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.2, generator=torch.Generator().manual_seed(len(name)))
    return peft_model


def _assert_fisher_close(a: dict, b: dict, tol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=tol, atol=tol, msg=lambda m, n=name: f"{n}: {m}")
    diff = fisher_norm({n: a[n] - b[n] for n in a})
    assert diff <= tol * fisher_norm(b), (diff, fisher_norm(b))


def _reference_fisher(model, rows) -> dict[str, torch.Tensor]:
    """Slow and obvious: the model's own (token-mean) loss × answer tokens = summed NLL, one row at a time."""
    params = trainable_parameters(model)
    out = {n: torch.zeros_like(p) for n, p in params.items()}
    for row in rows:
        ids = torch.tensor([row["input_ids"]])
        labels = torch.tensor([row["labels"]])
        loss = model(input_ids=ids, labels=labels).loss * int((labels[0, 1:] != -100).sum())
        for (n, _), g in zip(params.items(), torch.autograd.grad(loss, list(params.values())), strict=True):
            out[n] += g.square() / len(rows)
    return out


@pytest.mark.parametrize("use_lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("fisher_type", ["empirical", "true"])
def test_vmap_equals_loop(tiny_model, tokenizer, small_tasks, fisher_type, use_lora):
    model = _lora(tiny_model) if use_lora else tiny_model
    rows = _varied_rows(tokenizer, small_tasks[0])
    fast = compute_fisher(model, rows, fisher_type=fisher_type, method="vmap", chunk_size=4, progress_bar=False)
    slow = compute_fisher(model, rows, fisher_type=fisher_type, method="loop", progress_bar=False)
    assert fast.method == "vmap" and slow.method == "loop"
    assert fast.num_samples == slow.num_samples == N_ROWS
    names = set(trainable_parameters(model))
    assert set(fast.fisher) == names
    if use_lora:
        assert all("lora_" in n for n in names) and len(names) == 8  # 2 layers × (q, v) × (A, B)
    assert fisher_norm(fast.fisher) > 0
    _assert_fisher_close(fast.fisher, slow.fisher)


def test_auto_chunk_size(tiny_model, tokenizer, small_tasks):
    from hf_adaptive.consolidation.fisher import auto_chunk_size

    n_params = sum(p.numel() for p in tiny_model.parameters())
    per_row = 4 * n_params + 12 * 13 * tiny_model.config.vocab_size
    assert auto_chunk_size(tiny_model, 13, max_chunk_bytes=10 * per_row) == 10
    assert auto_chunk_size(tiny_model, 13, max_chunk_bytes=per_row - 1) == 1
    assert auto_chunk_size(tiny_model, 13) == 512  # capped
    rows = _varied_rows(tokenizer, small_tasks[0])
    auto = compute_fisher(tiny_model, rows, progress_bar=False)  # chunk_size=None: all rows in one vmap call
    three = compute_fisher(tiny_model, rows, chunk_size=3, progress_bar=False, max_chunk_bytes=3 * per_row)
    _assert_fisher_close(auto.fisher, three.fisher)


def test_loop_equals_reference_through_model_loss(tiny_model, tokenizer, small_tasks):
    rows = _varied_rows(tokenizer, small_tasks[1], n=5)
    result = compute_fisher(tiny_model, rows, method="loop", progress_bar=False)
    _assert_fisher_close(result.fisher, _reference_fisher(tiny_model, rows))


def test_minibatch_of_one_is_the_exact_empirical_fisher(tiny_model, tokenizer, small_tasks):
    rows = _varied_rows(tokenizer, small_tasks[0], n=6)
    exact = compute_fisher(tiny_model, rows, method="loop", progress_bar=False).fisher
    _assert_fisher_close(minibatch_fisher(tiny_model, rows, batch_size=1), exact)
    approx = minibatch_fisher(tiny_model, rows, batch_size=6)  # one batch: the squared mean gradient, much smaller
    assert fisher_norm(approx) < 0.9 * fisher_norm(exact)


def test_true_fisher_samples_from_the_model(tiny_model, tokenizer, small_tasks):
    rows = _varied_rows(tokenizer, small_tasks[0])
    sampled = sample_true_labels(tiny_model, rows, seed=3)
    assert sample_true_labels(tiny_model, rows, seed=3, batch_size=3) == sampled  # seeded per row, not per batch
    assert sample_true_labels(tiny_model, rows[1:], seed=3, row_ids=range(1, len(rows))) == sampled[1:]
    changed = 0
    for row, new in zip(rows, sampled, strict=True):
        answer = [t for t, y in enumerate(row["labels"]) if y != -100]
        prompt = [t for t in range(len(row["labels"])) if t not in answer]
        assert [new["input_ids"][t] for t in prompt] == [row["input_ids"][t] for t in prompt]
        assert [new["labels"][t] for t in prompt] == [-100] * len(prompt)
        assert [new["labels"][t] for t in answer] == [new["input_ids"][t] for t in answer]
        changed += any(new["input_ids"][t] != row["input_ids"][t] for t in answer)
    assert changed > 0  # an untrained model does not reproduce the dataset answers
    true_f = compute_fisher(tiny_model, rows, fisher_type="true", progress_bar=False).fisher
    emp_f = compute_fisher(tiny_model, rows, fisher_type="empirical", progress_bar=False).fisher
    assert abs(fisher_norm(true_f) - fisher_norm(emp_f)) > 1e-3 * fisher_norm(emp_f)


def test_answer_nll_is_summed_over_answer_tokens():
    logits = torch.randn(2, 4, 7)
    labels = torch.tensor([[-100, -100, 3, 5], [-100, 1, -100, 6]])
    logp = torch.log_softmax(logits, -1)
    expected = torch.stack([-(logp[0, 1, 3] + logp[0, 2, 5]), -(logp[1, 0, 1] + logp[1, 2, 6])])
    torch.testing.assert_close(answer_nll(logits, labels), expected)


def test_answer_nll_is_the_shared_answer_loss_bit_for_bit():
    """answer_nll now calls `answer_cross_entropy(..., "per_row_sum")`: values and gradients equal the formula it
    had before (float32 log_softmax + gather, masked sum), exactly."""

    def before(logits, labels):
        logits = logits[:, :-1].float()
        targets = labels[:, 1:]
        mask = targets != -100
        logp = torch.log_softmax(logits, dim=-1).gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        return -(logp * mask).sum(-1)

    generator = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        logits = (3 * torch.randn(5, 9, 31, generator=generator)).to(dtype).requires_grad_()
        labels = torch.randint(0, 31, (5, 9), generator=generator)
        labels[:, :4] = -100
        old, new = before(logits, labels), answer_nll(logits, labels)
        assert torch.equal(old, new)
        (old_grad,) = torch.autograd.grad(old.sum(), logits)
        (new_grad,) = torch.autograd.grad(new.sum(), logits)
        assert torch.equal(old_grad, new_grad)


def test_modes_and_attention_are_restored(tiny_model, tokenizer, small_tasks):
    rows = _varied_rows(tokenizer, small_tasks[0], n=3)
    tiny_model.train()
    before = tiny_model.config._attn_implementation
    compute_fisher(tiny_model, rows, progress_bar=False)
    assert tiny_model.training and tiny_model.config._attn_implementation == before


class _NotVmappable(torch.nn.Module):
    """A forward with data-dependent Python control flow (`.item()`), which vmap cannot trace."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids):
        if float(input_ids.float().sum().item()) < 0:
            raise AssertionError
        return self.inner(input_ids=input_ids)


def test_vmap_failure_falls_back_to_the_loop(tiny_model, tokenizer, small_tasks):
    rows = _varied_rows(tokenizer, small_tasks[0], n=4)
    with pytest.warns(RuntimeWarning, match="per-sample loop"):
        result = compute_fisher(_NotVmappable(tiny_model), rows, method="vmap", progress_bar=False)
    assert result.method == "loop"
    expected = compute_fisher(tiny_model, rows, method="loop", progress_bar=False).fisher
    _assert_fisher_close({k.removeprefix("inner."): v for k, v in result.fisher.items()}, expected)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"fisher_type": "fisher"}, "compute_fisher.fisher_type='fisher'"),
        ({"method": "jvp"}, "compute_fisher.method"),
        ({"chunk_size": 0}, "compute_fisher.chunk_size=0"),
        ({"max_chunk_bytes": 0}, "compute_fisher.max_chunk_bytes=0"),
    ],
)
def test_bad_options_name_the_field(tiny_model, tokenizer, small_tasks, kwargs, match):
    with pytest.raises(ValueError, match=match):
        compute_fisher(tiny_model, _varied_rows(tokenizer, small_tasks[0], n=2), **kwargs)


def test_bad_rows(tiny_model):
    with pytest.raises(ValueError, match="empty"):
        compute_fisher(tiny_model, [])
    with pytest.raises(ValueError, match="input_ids"):
        compute_fisher(tiny_model, [{"text": "a"}])
    with pytest.raises(ValueError, match="attention_mask has zeros"):
        compute_fisher(tiny_model, [{"input_ids": [2, 5, 6], "labels": [-100, 5, 6], "attention_mask": [1, 1, 0]}])


# ---------------------------------------------------------------------------------------------- distributed
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, rows: list[dict], out_dir: str) -> None:
    from hf_adaptive.models import build_tiny_gemma

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from hf_adaptive.models import build_tokenizer

        model, _ = build_tiny_gemma(build_tokenizer(), seed=0)
        from safetensors.torch import save_file

        for fisher_type in ("empirical", "true"):
            result = compute_fisher(model, rows, fisher_type=fisher_type, progress_bar=False)
            save_file(
                {k: v.contiguous() for k, v in result.fisher.items()},
                os.path.join(out_dir, f"{fisher_type}{rank}.safetensors"),
            )
            with open(os.path.join(out_dir, f"{fisher_type}{rank}.count"), "w") as f:
                f.write(str(result.num_samples))
    finally:
        torch.distributed.destroy_process_group()


def test_fisher_is_summed_across_processes(tiny_model, tokenizer, small_tasks, tmp_path):
    """Two gloo processes, each with half of the rows, end with the single-process Fisher of all rows."""
    from safetensors.torch import load_file

    rows = _varied_rows(tokenizer, small_tasks[0], n=7)
    mp.start_processes(_worker, args=(2, _free_port(), rows, str(tmp_path)), nprocs=2, join=True, start_method="fork")
    for fisher_type in ("empirical", "true"):
        expected = compute_fisher(tiny_model, rows, fisher_type=fisher_type, progress_bar=False).fisher
        for rank in range(2):
            assert (tmp_path / f"{fisher_type}{rank}.count").read_text() == "7"
            _assert_fisher_close(load_file(str(tmp_path / f"{fisher_type}{rank}.safetensors")), expected)
