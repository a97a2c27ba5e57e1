"""benchmarks/loss_weighting_heldout.py: the verdict against loss_weighting_real's stored runs (hand-made, no model),
the plugin's hand-over to `run_arm` (and back), and the whole `--quick` run on a tiny model over made-up data."""

from __future__ import annotations

import json

import pytest
from benchmark_loader import load_benchmark
from test_loss_weighting_real import _write_task


@pytest.fixture(scope="module")
def hw():
    yield from load_benchmark("loss_weighting_heldout")


def _record(method, seed, acc, stamp):
    """A stored run as the scripts write it; `stamp`: a code version's `stamp()` (computed once: it hashes files)."""
    return {
        "method": method,
        "seed": seed,
        "metrics": {"avg_acc": acc, "bwt": 0.0, "forgetting": 0.0},
        "wall_seconds": 60.0,
        **stamp,
    }


def test_verdict_against_the_best_median_and_default_cells(hw):
    lw = hw.lw
    ref_stamp = lw.code_version(lw.REAL).stamp()
    runs = {}
    for i, name in enumerate(lw.build_arms(lw.REAL)):
        if name in lw.LEARNED:
            continue
        for seed in (0, 1):
            runs[(name, seed)] = _record(name, seed, 0.60 + 0.01 * i, ref_stamp)
    assert max(runs.values(), key=lambda r: r["metrics"]["avg_acc"])["method"] == "ewc1000_replay1"  # 0.68
    reference = hw.reference_summary(runs, lw.REAL)
    stamp = hw.code_version("heldout_alignment", lw.REAL).stamp()
    runs = {
        ("heldout_alignment", 0): _record("heldout_alignment", 0, 0.675, stamp),
        ("heldout_alignment", 1): _record("heldout_alignment", 1, 0.665, stamp),
    }
    arm = hw.compare(runs, reference, "heldout_alignment", lw.REAL)
    verdict = arm["verdict"]
    assert verdict["difference_points"] == pytest.approx(-1.0) and verdict["met"] and verdict["all_seeds"]
    assert verdict["vs_median_points"] == pytest.approx(100 * (0.67 - 0.64))
    assert verdict["vs_default_points"] == pytest.approx(100 * (0.67 - 0.65))  # ewc100_replay1, the 6th cell
    assert arm["stale"] == [False, False] and arm["settings"]["hypergradient"] == "alignment"
    # a run of the other arm is stale for this arm's version (other plugin settings)
    assert hw.compare({("heldout", 0): _record("heldout", 0, 0.6, stamp)}, reference, "heldout", lw.REAL)["stale"] == [
        True
    ]
    runs[("heldout_alignment", 1)]["metrics"]["avg_acc"] = 0.664
    assert not hw.compare(runs, reference, "heldout_alignment", lw.REAL)["verdict"]["met"]  # 1.1 points below
    del runs[("heldout_alignment", 1)]
    partial = hw.compare(runs, reference, "heldout_alignment", lw.REAL)
    assert not partial["verdict"]["all_seeds"]
    markdown = hw.report_markdown({"reference": reference, "arms": [partial]}, lw.REAL)
    assert "provisional" in markdown and "heldout_alignment (alignment)" in markdown


def test_the_plugin_is_added_to_the_built_plugins_and_the_registry_is_restored(hw, make_args, tmp_path):
    import hf_adaptive.registry as registry

    original = registry.build_plugins
    args = make_args(tmp_path, seed=3)
    with hw.with_heldout_weighting({"holdout_rows": 5, "lr": 0.2}) as built:
        plugins = registry.build_plugins(["replay"], args)
    assert registry.build_plugins is original
    assert [p.name for p in plugins] == ["replay", "heldout_weighting"] and built == plugins[1:]
    assert (built[0].config.holdout_rows, built[0].config.lr, built[0].config.seed) == (5, 0.2, 3)


def test_quick_run_end_to_end(hw, tmp_path, capsys):
    data, out = tmp_path / "data", tmp_path / "quick"
    _write_task(data, "SST-2", ["Good", "Bad"], pair=False)
    _write_task(data, "WiC", ["True", "False"], pair=True)
    with pytest.raises(SystemExit):
        hw.main(["--quick", "--out", str(hw.RESULTS / "heldout_quick_should_not_exist")])
    assert "is not allowed with --quick" in capsys.readouterr().err
    assert hw.main(["--quick", "--data", str(data), "--out", str(out)]) == 0
    for arm, mode in (("heldout", "first_order"), ("heldout_alignment", "alignment")):
        record = json.loads((out / "runs" / f"{arm}_seed0.json").read_text())
        assert record["task_names"] == ["SST-2", "WiC"] and record["total_steps"] == 6  # (16 - 4) rows, batches of 4
        assert record["plugins"] == ["ewc", "replay", "heldout_weighting"]
        assert record["heldout_weighting"]["settings"]["hypergradient"] == mode
        assert "hf_adaptive/weighting/heldout.py" in record["code_files"]
        assert "benchmarks/loss_weighting_heldout.py" in record["code_files"]
        per_task = record["heldout_weighting"]["per_task"]
        assert [row["updates"] for row in per_task] == [0, 3]  # nothing to weigh during the first task
        final = record["heldout_weighting"]["final"]
        assert set(final) == {"ewc", "replay"} and max(abs(w - 1.0) for w in final.values()) > 1e-3
    assert hw.plan(hw.cl_real.load_results(out / "runs"), hw.lw.QUICK) == []
    markdown = (out / "loss_weighting_heldout.md").read_text()
    assert "| heldout_alignment (alignment), seeds [0] |" in markdown
    assert "- heldout: not measured yet." in markdown
