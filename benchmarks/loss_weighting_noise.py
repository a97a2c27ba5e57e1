"""Can loss_weighting_real's grid tell its cells apart? The seed noise behind issue 14's loss-weighting target.

The goal reads "a learned weighting within 1 point of the best fixed weighting of a grid". The grid's best cell is
the best of 9 two-seed means, chosen on the test accuracy; if the cells differ no more than seed noise makes them,
that maximum sits above what any one weighting gives by chance alone (the winner's curse), and a 1-point tolerance
is measured against noise. This script measures it from the stored runs (no model is run):

* the pooled within-cell standard deviation of the average accuracy (the seed noise of one run) and the standard
  error of a cell's seed mean;
* a permutation test: the share of random reassignments of all the grid's runs to cells whose cell means spread
  at least as much as the grid's (a large share: the cells are not told apart);
* how far the best cell's mean is above the mean of the cells, against the excess the best of that many *equal*
  cells has by chance alone (E[max of k standard normals], simulated, times the standard error);
* each level of each factor (EWC lambda, replay alpha): the mean over its cells and seeds, with its standard error;
* every other arm (the learned ones of loss_weighting_real.py, the held-out ones of loss_weighting_heldout.py): its
  seed mean against the best cell and the mean of the cells, in points and in standard errors.

    python benchmarks/loss_weighting_noise.py     # docs/results/loss_weighting_noise.md / .json

Records read as stored, stale or not (their staleness is listed): the question is what the measured numbers can
resolve, not which code made them.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cl_real  # noqa: E402
import loss_weighting_real as lw  # noqa: E402
from common import RESULTS, write_results  # noqa: E402

NAME = "loss_weighting_noise"
HELDOUT_DIR = RESULTS / "loss_weighting_heldout"


def expected_max_of_normals(k: int, draws: int = 20_000, seed: int = 0) -> float:
    """E[max of k independent standard normals], by a seeded simulation (1.485 for k = 9)."""
    rng = random.Random(seed)
    return statistics.mean(max(rng.gauss(0.0, 1.0) for _ in range(k)) for _ in range(draws))


def grid_noise(cells: dict[str, list[float]], permutations: int = 10_000, seed: int = 0) -> dict[str, Any] | None:
    """Can the grid tell its cells apart? `cells`: cell -> its per-seed accuracies (every cell the same count).

    The pooled within-cell standard deviation (seed noise of one run) and the standard error of a cell's seed mean;
    how far the spread of the cell means is from that noise (permutation test: the share of random reassignments
    of all the runs to cells whose cell means spread at least as much as the grid's); and how much the best of the
    cells' means exceeds their common mean by chance alone when the cells are equal (E[max of k normals] x the
    standard error), against the excess measured."""
    counts = {len(v) for v in cells.values()}
    if len(cells) < 2 or len(counts) != 1 or counts.pop() < 2:
        return None
    n = len(next(iter(cells.values())))
    means = [statistics.mean(v) for v in cells.values()]
    within = math.sqrt(statistics.mean(statistics.variance(v) for v in cells.values()))
    observed = statistics.pvariance(means)
    pool = [x for v in cells.values() for x in v]
    rng = random.Random(seed)
    at_least = 0
    for _ in range(permutations):
        rng.shuffle(pool)
        shuffled = [statistics.mean(pool[i : i + n]) for i in range(0, len(pool), n)]
        at_least += statistics.pvariance(shuffled) >= observed - 1e-15
    standard_error = within / math.sqrt(n)
    return {
        "cells": len(cells),
        "seeds": n,
        "within_cell_sd": within,
        "seed_mean_se": standard_error,
        "cell_means_sd": statistics.stdev(means),
        "permutation_p": at_least / permutations,
        "best_minus_mean": max(means) - statistics.mean(means),
        "best_minus_mean_by_chance": expected_max_of_normals(len(cells)) * standard_error,
    }


def arms_by_seed(runs: dict[tuple[str, int], dict]) -> dict[str, dict[int, float]]:
    """method -> seed -> average accuracy, over the stored runs that have one."""
    out: dict[str, dict[int, float]] = {}
    for (method, seed), data in sorted(runs.items()):
        acc = (data.get("metrics") or {}).get("avg_acc")
        if acc is not None and math.isfinite(acc):
            out.setdefault(method, {})[seed] = acc
    return out


def analyse(reference: dict[tuple[str, int], dict], others: dict[tuple[str, int], dict]) -> dict[str, Any]:
    """The grid's noise, and every non-grid arm (learned, held-out) against its best cell and the mean of its cells."""
    grid_names = [n for n, arm in lw.build_arms(lw.REAL).items() if arm.weighting == "none"]
    by_arm = arms_by_seed(reference)
    seeds = list(lw.SEEDS)
    cells = {n: [by_arm[n][s] for s in seeds] for n in grid_names if all(s in by_arm.get(n, {}) for s in seeds)}
    noise = grid_noise(cells)
    means = {n: statistics.mean(v) for n, v in cells.items()}
    best = max(means, key=means.get) if means else None
    rows = []
    for name, accs in [*((n, v) for n, v in by_arm.items() if n not in grid_names), *arms_by_seed(others).items()]:
        mean = statistics.mean(accs.values())
        row: dict[str, Any] = {"arm": name, "seeds": sorted(accs), "avg_acc": [accs[s] for s in sorted(accs)]}
        row["mean_avg_acc"] = mean
        if best is not None and noise is not None:
            se = noise["within_cell_sd"] / math.sqrt(len(accs))
            row["vs_best_points"] = 100 * (mean - means[best])
            row["vs_grid_mean_points"] = 100 * (mean - statistics.mean(means.values()))
            row["vs_grid_mean_in_se"] = (mean - statistics.mean(means.values())) / se if se else None
        rows.append(row)
    arms = lw.build_arms(lw.REAL)
    margins: dict[str, dict[str, Any]] = {}
    for factor in ("ewc_lambda", "replay_alpha"):
        for level in sorted({getattr(arms[n], factor) for n in cells}):
            values = [x for n, v in cells.items() if getattr(arms[n], factor) == level for x in v]
            se = noise["within_cell_sd"] / math.sqrt(len(values)) if noise else None
            margins[f"{factor}={level:g}"] = {"runs": len(values), "mean": statistics.mean(values), "se": se}
    stale = sorted({m for (m, _), d in reference.items() if not cl_real.is_current(d, lw.code_version(lw.REAL))})
    return {
        "noise": noise,
        "cells": {n: {"avg_acc": v, "mean": means[n]} for n, v in cells.items()},
        "best_cell": best,
        "grid_mean": statistics.mean(means.values()) if means else None,
        "arms": rows,
        "margins": margins,
        "stale_reference_arms": stale,
    }


def report_markdown(summary: dict[str, Any]) -> str:
    noise = summary["noise"]
    lines = ["# The seed noise of the loss-weighting grid (issue 14)", ""]
    if noise is None:
        return "\n".join([*lines, "Not enough runs: every grid cell needs every seed.", ""])
    best = summary["best_cell"]
    lines += [
        f"From loss_weighting_real's stored runs: {noise['cells']} grid cells x {noise['seeds']} seeds.",
        "",
        f"- One run's seed noise (pooled within-cell sd of the average accuracy): "
        f"{100 * noise['within_cell_sd']:.1f} points; standard error of a cell's {noise['seeds']}-seed mean: "
        f"{100 * noise['seed_mean_se']:.1f} points.",
        f"- Spread of the cell means (sd): {100 * noise['cell_means_sd']:.1f} points. Permutation test (10 000 "
        f"random reassignments of the runs to cells): p = {noise['permutation_p']:.2f}, the share that spread at "
        "least as much.",
        f"- The best cell ({best}, {summary['cells'][best]['mean']:.3f}) is {100 * noise['best_minus_mean']:.1f} "
        f"points above the mean of the cells ({summary['grid_mean']:.3f}); the best of {noise['cells']} equal cells "
        f"is {100 * noise['best_minus_mean_by_chance']:.1f} points above it by chance alone.",
        "",
        "| arm | seeds | avg acc | vs best cell (points) | vs cells' mean (points) | same, in s.e. of its mean |",
        "|---|---|---|---|---|---|",
    ]
    for row in summary["arms"]:
        se = row.get("vs_grid_mean_in_se")
        lines.append(
            f"| {row['arm']} | {row['seeds']} | {cl_real.spread(row['avg_acc'])} | {row['vs_best_points']:+.1f} | "
            f"{row['vs_grid_mean_points']:+.1f} | {'n/a' if se is None else f'{se:+.2f}'} |"
        )
    lines += [
        "",
        "Each factor of the grid on its own (every cell and seed at that level; the standard error from the pooled "
        "seed noise; read after looking at the grid, so a post-hoc comparison):",
        "",
        "| level | runs | mean avg acc | standard error |",
        "|---|---|---|---|",
    ]
    for level, margin in summary["margins"].items():
        lines.append(f"| {level} | {margin['runs']} | {margin['mean']:.3f} | {100 * margin['se']:.1f} points |")
    lines += ["", "| grid cell | avg acc per seed | mean |", "|---|---|---|"]
    for name, cell in summary["cells"].items():
        lines.append(f"| {name} | {', '.join(f'{a:.3f}' for a in cell['avg_acc'])} | {cell['mean']:.3f} |")
    if summary["stale_reference_arms"]:
        lines += ["", f"Stale reference arms (made by other code, read as stored): {summary['stale_reference_arms']}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", type=Path, default=lw.RESULTS_DIR, help="loss_weighting_real's runs")
    parser.add_argument("--heldout", type=Path, default=HELDOUT_DIR, help="loss_weighting_heldout's runs")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder of the report (md, json)")
    ns = parser.parse_args(argv)
    summary = analyse(cl_real.load_results(ns.reference), cl_real.load_results(ns.heldout))
    markdown = report_markdown(summary)
    write_results(NAME, cl_real._json_safe(summary), markdown, out=ns.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
