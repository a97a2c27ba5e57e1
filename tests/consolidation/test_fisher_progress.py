"""The Fisher estimate (minutes on a 30-layer model) shows a progress bar over its rows, off when asked."""

from __future__ import annotations

from hf_adaptive.consolidation.fisher import compute_fisher
from hf_adaptive.tasks import tokenize_task


def test_the_fisher_shows_a_bar_over_its_rows(tiny_model, tokenizer, small_tasks, capsys):
    rows = list(tokenize_task(small_tasks[0], tokenizer))[:6]
    compute_fisher(tiny_model, rows, chunk_size=3, desc="Fisher of first_color")
    err = capsys.readouterr().err
    assert "Fisher of first_color (empirical)" in err and "/6" in err
    compute_fisher(tiny_model, rows, chunk_size=3, desc="Fisher of first_color", progress_bar=False)
    assert "Fisher of first_color" not in capsys.readouterr().err
