"""benchmarks/gates_stream_seed.py: gates_stream's run with another controllers' seed: only the seed changes in the
settings, its command line refuses seed 0 and quick numbers in docs/results, and a `--quick` run writes its three
files, says which seed made them and stores that seed."""

from __future__ import annotations

import json

import pytest
from benchmark_loader import load_benchmark


@pytest.fixture(scope="module")
def gss():
    yield from load_benchmark("gates_stream_seed")


def test_settings_change_the_seed_and_nothing_else(gss):
    for quick, base in ((False, gss.gates_stream.SETTINGS), (True, gss.gates_stream.QUICK_SETTINGS)):
        s = gss.settings(3, quick)
        assert s["seed"] == 3 and base["seed"] == 0
        assert {k: v for k, v in s.items() if k != "seed"} == {k: v for k, v in base.items() if k != "seed"}
        assert s["data_seed"] == base["data_seed"]  # the same stream


def test_command_line_refuses_seed_zero_and_quick_results_in_docs(gss, tmp_path):
    with pytest.raises(SystemExit):
        gss.parse_args(["--seed", "0", "--quick"])
    with pytest.raises(SystemExit):
        gss.parse_args(["--seed", "1", "--quick", "--out", str(gss.RESULTS / "gates_stream_seeds")])
    with pytest.raises(SystemExit):
        gss.parse_args(["--seed", "1", "--data", str(tmp_path / "missing")])
    assert gss.parse_args(["--seed", "2", "--quick"]).seed == 2


def test_quick_run_writes_its_files_with_its_seed(gss, tmp_path):
    assert gss.main(["--seed", "1", "--quick", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "gates_stream_seed1.json").read_text())
    md = (tmp_path / "gates_stream_seed1.md").read_text()
    assert (tmp_path / "gates_stream_seed1_tracking.png").stat().st_size > 0
    assert result["meta"]["settings"]["seed"] == 1 and result["meta"]["quick"]
    title, note = md.split("\n\n")[:2]
    assert title.startswith("# ") and note.startswith("Controllers' seed 1")
