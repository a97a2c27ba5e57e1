"""The example scripts run as a user would run them (shortened)."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_user_sequence_runs_lists_of_dicts_with_ewc_and_replay_from_the_config(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["user_sequence.py", "--output_dir", str(tmp_path), "--epochs", "1"])
    runpy.run_path(str(EXAMPLES / "user_sequence.py"), run_name="__main__")
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["task_names"] == ["starts_with_animal", "has_red", "ends_with_color"]
    assert len(results["matrix"]) == 3 and all(len(row) == 3 for row in results["matrix"])
