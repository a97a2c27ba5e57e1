"""benchmarks/meta_init.py: each finished seed is stored with its code version and reused by a later call (a run
stopped between seeds resumes at the next one); a record lacking a requested start, or made by other settings, is
run again. Tiny `--quick` mode (seconds)."""

from __future__ import annotations

import json

import pytest
from benchmark_loader import load_benchmark


@pytest.fixture(scope="module")
def mi():
    yield from load_benchmark("meta_init")


def test_seed_records_are_stored_and_reused(mi, tmp_path, monkeypatch):
    mi.main(["--quick", "--out", str(tmp_path), "--seeds", "0", "--starts", "fresh", "reptile"])
    record = json.loads((tmp_path / "meta_init" / "seed0.json").read_text())
    assert set(record["starts"]) == {"fresh", "reptile"}
    assert record["code_files"] and record["code_version"] and record["wall_s"] > 0
    first = json.loads((tmp_path / "meta_init.json").read_text())

    def no_run(*args, **kwargs):
        raise AssertionError("a current stored seed was run again")

    monkeypatch.setattr(mi, "run_seed", no_run)
    mi.main(["--quick", "--out", str(tmp_path), "--seeds", "0", "--starts", "fresh"])  # a subset: reused
    again = json.loads((tmp_path / "meta_init.json").read_text())
    assert again["runs"][0]["starts"]["fresh"] == first["runs"][0]["starts"]["fresh"]
    assert "reptile" not in again["runs"][0]["starts"]
    with pytest.raises(AssertionError, match="run again"):  # a start the record lacks: run again
        mi.main(["--quick", "--out", str(tmp_path), "--seeds", "0", "--starts", "fresh", "fork"])
    with pytest.raises(AssertionError, match="run again"):  # other settings: stale
        mi.main(["--quick", "--out", str(tmp_path), "--seeds", "0", "--starts", "fresh", "--target", "0.6"])


def test_real_mode_runs_on_both_cores(mi):
    assert mi.SETTINGS["real"]["threads"] == 2 and mi.SETTINGS["tiny"]["threads"] == 1
