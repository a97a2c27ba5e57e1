"""Routing latency of `Router.route` for 10 ... 100 000 experts on the CPU.

For each library size N and signature dimension d, it times (medians over interleaved repetitions):

* `route`: the full decision (exact matrix search + top-k + decision rule) with the cosine, linear and MLP scorers;
* `search`: the bare nearest-expert search (`profiles @ q` + `topk`), the floor `route` builds on;
* `loop`: a naive per-expert Python loop of cosine similarities (the baseline; only up to 1 000 experts);
* `faiss`: the same route with a faiss `IndexFlatIP` (exact) when faiss is installed;
* `hnsw`: the same route with a faiss HNSW graph (approximate; `recall@1` = share of 100 queries near a random
  expert's profile, cosine ≈ 0.9 as for a recurring task, whose best expert is the exact search's best).

Every router standardises queries and profiles (the default `normalize="standardize"`), so the timed route
includes that. d = 198 is the default signature for any backbone (text projected to 128 + 64 sketch + 6 context);
d = 2118 a Gemma-2B-sized one without the text projection (`text_dim=None`: 2048 + 64 + 6).
Target: < 1 ms per decision at 10 000 experts. Writes docs/results/router.md|json.

    python benchmarks/router.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hf_adaptive.experts import Router, RouterConfig, faiss_available  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"


def _time(fn, reps: int) -> float:
    """Median seconds of one call over `reps` calls (after a warm-up call)."""
    fn()
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def _loop_baseline(names: list[str], profiles: list[torch.Tensor], q: torch.Tensor) -> str:
    best, best_s = None, -2.0
    for n, p in zip(names, profiles, strict=True):
        s = float(torch.dot(p, q) / (p.norm() * q.norm()))
        if s > best_s:
            best, best_s = n, s
    return best


def bench(n: int, dim: int, reps: int, rounds: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    profiles = torch.randn(n, dim, generator=gen)
    names = [f"e{i}" for i in range(n)]
    queries = [torch.randn(dim, generator=gen) for _ in range(8)]
    routers = {}
    for scorer in ("cosine", "linear", "mlp"):
        r = Router(RouterConfig(dim=dim, scorer=scorer, decision="threshold", top_k=8))
        r.add_experts(names, profiles)
        # an unfitted learned scorer routes by cosine: time the re-ranking path (its cost does not depend on the
        # weights, only on top_k and d)
        r.scorer_fitted = scorer != "cosine"
        routers[scorer] = r
    build_s = {}
    if faiss_available():
        for key, ann_min in (("faiss", n + 1), ("hnsw", 1)):
            r = Router(RouterConfig(dim=dim, index="faiss", top_k=8, ann_min_experts=ann_min))
            r.add_experts(names, profiles)
            t0 = time.perf_counter()
            r.route(queries[0])  # builds the index
            build_s[key] = time.perf_counter() - t0
            routers[key] = r
    search_router = routers["cosine"]
    rows_list = [p.clone() for p in profiles] if n <= 1000 else None
    timings: dict[str, list[float]] = {k: [] for k in [*routers, "search"] + (["loop"] if rows_list else [])}
    i = 0
    for _ in range(rounds):  # interleave: every variant once per round, medians over rounds
        q = queries[i % len(queries)]
        i += 1
        for key, r in routers.items():
            timings[key].append(_time(lambda r=r, q=q: r.route(q), reps))
        timings["search"].append(_time(lambda q=q: search_router.nearest(q), reps))
        if rows_list is not None:
            timings["loop"].append(_time(lambda q=q: _loop_baseline(names, rows_list, q), max(1, reps // 10)))
    med = {k: statistics.median(v) * 1e3 for k, v in timings.items()}
    out = {"experts": n, "dim": dim, **{f"{k}_ms": v for k, v in med.items()}}
    if "hnsw" in routers:
        # a routed query lies near the profile of its expert (a recurring task): profile + noise at cosine ≈ 0.9
        picks = torch.randint(0, n, (100,), generator=gen)
        tests = []
        for i in picks.tolist():
            p = profiles[i] / profiles[i].norm()
            noise = torch.randn(dim, generator=gen)
            tests.append(p + 0.48 * noise / noise.norm())
        hits = [routers["hnsw"].nearest(q, k=1)[0] == routers["cosine"].nearest(q, k=1)[0] for q in tests]
        out["hnsw_recall@1"] = sum(hits) / len(hits)
        out["hnsw_build_s"] = build_s["hnsw"]
    if "loop_ms" in out:
        out["speedup_vs_loop"] = out["loop_ms"] / out["cosine_ms"]
    out["route_over_search"] = out["cosine_ms"] / out["search_ms"]
    return out


TARGET_MS = 1.0  # the target: < 1 ms per routing decision at 10 000 experts


def verdicts(rows: list[dict]) -> list[str]:
    """The conclusions, each computed from the measured rows (nothing here is asserted ahead of the numbers)."""
    out = []
    for r in (r for r in rows if r["experts"] == 10000):
        exact = r["cosine_ms"]
        sentence = (
            f"At 10 000 experts, d={r['dim']}: exact search {exact:.3f} ms per decision, "
            f"{'under' if exact < TARGET_MS else 'over'} the {TARGET_MS:g} ms target"
        )
        if "hnsw_ms" in r:
            hnsw = r["hnsw_ms"]
            sentence += (
                f"; HNSW {hnsw:.3f} ms ({'under' if hnsw < TARGET_MS else 'over'} the target, "
                f"{'faster' if hnsw < exact else 'not faster'} than exact) at recall@1 {r['hnsw_recall@1']:.2f}"
            )
        out.append(sentence + ".")
    for scorer in ("linear", "mlp"):
        ratios = [r[f"{scorer}_ms"] / r["cosine_ms"] for r in rows]
        out.append(
            f"The {scorer} scorer (re-ranking the top 8) costs {min(ratios):.2f}x to {max(ratios):.2f}x the cosine "
            "route over the grid."
        )
    pairs = [r for r in rows if "loop_ms" in r]
    if pairs:
        speedups = [r["speedup_vs_loop"] for r in pairs]
        out.append(
            f"Against the per-expert Python loop (up to 1 000 experts) the matrix route is {min(speedups):.1f}x to "
            f"{max(speedups):.1f}x faster."
        )
    grow = sorted((r for r in rows if r["dim"] == rows[0]["dim"]), key=lambda r: r["experts"])
    if len(grow) >= 2:
        small, large = grow[0], grow[-1]
        out.append(
            f"From {small['experts']} to {large['experts']} experts (d={small['dim']}) the exact route goes from "
            f"{small['cosine_ms']:.3f} to {large['cosine_ms']:.3f} ms "
            f"({large['cosine_ms'] / small['cosine_ms']:.1f}x for {large['experts'] // small['experts']}x experts)."
        )
    over = [r for r in rows if r["cosine_ms"] >= TARGET_MS]
    if over:
        where = ", ".join(f"{r['experts']} experts at d={r['dim']}" for r in over)
        out.append(
            f'Exact search is over the target at {where}: there `RouterConfig(index="faiss")` switches to an HNSW '
            "graph from `ann_min_experts` (4096) experts on"
            + (" (see the hnsw columns)." if any("hnsw_ms" in r for r in rows) else " (faiss is not installed here).")
        )
    else:
        out.append("Exact search is under the target everywhere on the grid.")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (seconds instead of a minute)")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    reps, rounds = (5, 3) if args.quick else (20, 7)
    grid = [
        (10, 198),
        (1000, 198),
        (10000, 198),
        (100000, 198),
        (10, 2118),
        (1000, 2118),
        (10000, 2118),
    ]
    rows = []
    for n, dim in grid:
        row = bench(n, dim, reps if n < 100000 else max(3, reps // 4), rounds)
        rows.append(row)
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)

    meta = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "faiss": faiss_available(),
        "quick": args.quick,
        "target": "< 1 ms per routing decision at 10 000 experts",
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "router.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    cols = ["cosine_ms", "linear_ms", "mlp_ms", "search_ms", "loop_ms", "speedup_vs_loop"]
    if meta["faiss"]:
        cols[4:4] = ["faiss_ms", "hnsw_ms", "hnsw_recall@1", "hnsw_build_s"]
    lines = [
        "# Router latency",
        "",
        f"Median milliseconds per routing decision (`Router.route`, exact matrix search, top-8, threshold rule) on "
        f"{meta['threads']} CPU thread(s), torch {meta['torch']}{', quick run' if args.quick else ''}. "
        "`search` is the bare `profiles @ q` + `topk`; `loop` a per-expert Python loop (baseline, up to 1 000 "
        "experts); variants interleaved, medians over rounds. faiss installed: " + str(meta["faiss"]) + ".",
        "",
        "| experts | dim | " + " | ".join(cols) + " |",
        "|---|---|" + "---|" * len(cols),
    ]
    for r in rows:
        cells = [f"{r[c]:.4f}" if c in r else "-" for c in cols]
        lines.append(f"| {r['experts']} | {r['dim']} | " + " | ".join(cells) + " |")
    lines += ["", *verdicts(rows)]
    (RESULTS / "router.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
