"""Compare the quick benchmarks' results of two trees (before / after a refactor), number by number.

Every leaf of every `docs/results/<name>.json` the quick runs wrote is compared; leaves that measure time (step
times, latencies, speed-ups, ratios of times) or describe the machine are listed apart, since they change from run
to run on a shared CPU whatever the code. Writes `docs/results/<out>.md` and `.json` in this tree.

    python benchmarks/compare_quick.py BEFORE_TREE AFTER_TREE [--out refactor_quick_comparison]
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402

NAMES = [
    "cl_quality_quick",
    "fisher",
    "freezing",
    "gate_control",
    "lr_robustness",
    "overhead",
    "pruning",
    "router",
    "routing_quality",
]
#: path components of leaves that measure time or the machine, not what the code computes
TIMING = re.compile(
    r"(time|second|latency|speed|ratio|_ms$|^ms|ms_|throughput|elapsed|wall|environment|code_version|"
    r"step|median|overhead|per_s|tokens_per|load|cpu|threads|machine|python|torch|transformers|_s$|build|"
    r"over_search)",
    re.I,
)


def leaves(obj, path=()):
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield from leaves(value, (*path, str(key)))
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            yield from leaves(value, (*path, str(i)))
    else:
        yield path, obj


REL_TOL = 1e-6


def same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or a == b
    return a == b


def close(a, b) -> bool:
    """Equal up to float rounding (a different summation order of the same quantity)."""
    numbers = (int, float)
    if isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool) and not isinstance(b, bool):
        return math.isclose(a, b, rel_tol=REL_TOL, abs_tol=1e-9)
    return same(a, b)


def compare(before: Path, after: Path, name: str) -> dict:
    a = dict(leaves(json.loads((before / "docs" / "results" / f"{name}.json").read_text())))
    b = dict(leaves(json.loads((after / "docs" / "results" / f"{name}.json").read_text())))
    timing = {p for p in set(a) | set(b) if any(TIMING.search(part) for part in p)}
    quality = (set(a) | set(b)) - timing
    missing = sorted(p for p in quality if p not in a or p not in b)
    rounding = sorted(p for p in quality - set(missing) if not same(a[p], b[p]) and close(a[p], b[p]))
    differ = sorted(p for p in quality - set(missing) if not close(a[p], b[p])) + missing
    return {
        "compared": len(quality),
        "equal": len(quality) - len(differ) - len(rounding),
        "equal_within_rounding": len(rounding),
        "max_relative_difference": max((abs(a[p] - b[p]) / max(abs(a[p]), 1e-12) for p in rounding), default=0.0),
        "timing_leaves_skipped": len(timing),
        "differ": [{"path": "/".join(p), "before": a.get(p), "after": b.get(p)} for p in differ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--out", default="refactor_quick_comparison")
    parser.add_argument("--title", default="Quick benchmarks before and after the architecture v2 refactor")
    args = parser.parse_args()
    results = {name: compare(args.before, args.after, name) for name in NAMES}
    lines = [
        f"# {args.title} (`benchmarks/compare_quick.py`)",
        "",
        "Each quick benchmark (`--quick`) was run on the tree before and on the tree after, on the same machine, one "
        "after the other; every number of its JSON output is compared. Timing leaves (step times, latencies, "
        "speed-ups, machine description) are not compared: they vary between runs of the same code.",
        "",
        f"| benchmark | numbers compared | equal | equal within rel. {REL_TOL:g} (largest) | differ | "
        "timing leaves skipped |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['compared']} | {r['equal']} | {r['equal_within_rounding']} "
            f"({r['max_relative_difference']:.1e}) | {len(r['differ'])} | {r['timing_leaves_skipped']} |"
        )
    for name, r in results.items():
        if r["differ"]:
            lines += ["", f"Differences in `{name}` (first 20):", ""]
            lines += [f"- `{d['path']}`: {d['before']!r} -> {d['after']!r}" for d in r["differ"][:20]]
    write_results(args.out, {"results": results}, "\n".join(lines))


if __name__ == "__main__":
    main()
