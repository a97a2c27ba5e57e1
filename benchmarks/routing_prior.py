"""Why cl_real's routed run made one expert per task, and what the router's `normalize_prior` trades (issue 13's
"expert routing with fewer experts", issue 14's router).

cl_real.py's expert-routing run created an expert for each of its 5 tasks (SST-2 -> IMDB -> MNLI -> WiC -> BoolQA),
so it matched one LoRA per task without using fewer experts. The signatures are taken on the backbone with the
adapters switched off, so the run's decisions depend only on the rows, the order and the router; this script
replays them without training anything (`routing_real.run_stream`, teacher-forced):

1. **Real signatures**: SmolLM2-135M, cl_real's 5 tasks in its order, then a recurrence of SST-2 and IMDB and three
   related or new tasks (RTE, CB after MNLI; QQP) (`STREAM`), 16 rows per signature as cl_real's routed run uses
   (`signature_n_examples=16`). Standardisation against the signatures seen so far needs a population: at IMDB's
   decision the router has seen only SST-2's two signatures, so the running mean *is* SST-2's direction and
   IMDB's standardised cosine to it is low (0.26 in the run). The prior (`normalize_prior`, pseudo-observations of
   "no normalisation") decides how much of that degenerate early mean is used. Swept: `PRIORS`.
2. **Synthetic counter-case**: unrelated tasks whose raw signatures share a dominant component (raw cosine ≈ 0.98,
   as measured on pretrained backbones in routing_quality.md; the same generator as the router's unit test), seen
   twice each. A larger prior leans towards raw cosine early in a sequence, which there reuses unrelated experts.

Correct, as in routing_real.py: reuse of the task's own expert on a recurrence, no reuse on a first appearance.
`family-correct` also counts the reuse of a same-family expert on a first appearance as right (IMDB reusing SST-2's
sentiment expert): whether such a reuse costs accuracy is what the plugin's checked reuse (`verify_reuse`) measures
in a live run. `experts (cl_real's 5)`: experts the router would make for cl_real's sequence (reuse adds none).

3. **Live** (`--live`): cl_real's routed run (`expert_routing`, its recipe and seed 0) with the router's prior at
   `LIVE_PRIOR`, through `cl_real.run_one`: experts trained, every reuse checked (`verify_reuse`: the old tasks of
   the reused expert re-measured with the trained fork, rolled back beyond the tolerance). It answers what the
   teacher-forced replay cannot: whether the related-task reuse keeps the accuracy of one LoRA per task with fewer
   experts. Stored as `docs/results/routing_prior/live_prior<k>_seed<s>.json` with cl_real's code-version stamp, and
   compared in the report with cl_real's stored `expert_routing` and `lora_per_task` runs (read from
   docs/results/cl_real/, made by their own code version, named there).

    python benchmarks/routing_prior.py            # SmolLM2 (signatures cached), docs/results/routing_prior.{md,json}
    python benchmarks/routing_prior.py --live     # + the live routed run (if missing or stale), then the report
    python benchmarks/routing_prior.py --smoke --out DIR   # tiny Gemma, 4 rows per signature (--live: 2 tasks)

Cost: 20 signatures (query and profile per occurrence), ~25 s each on 2 quiet cores; cached in
`$HF_ADAPTIVE_CACHE/routing_prior/` (keyed by model, stream, rows and the signature settings), so a rerun only
routes (seconds). The live run: cl_real's routed run took 10-14 min of training on quiet cores for one LoRA per
task; a checked reuse adds the old tasks' evaluation with the fork (~1 min): ~15 min.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cl_real  # noqa: E402
import routing_real as rr  # noqa: E402
import torch  # noqa: E402
from common import RESULTS, write_results  # noqa: E402

from hf_adaptive.experts import Router, RouterConfig, SignatureConfig, TaskSignature  # noqa: E402

NAME = "routing_prior"
#: cl_real's sequence first (TASKS of cl_real.py), then recurrences and related / new tasks
STREAM = ["SST-2", "IMDB", "MNLI", "WiC", "BoolQA", "SST-2", "IMDB", "RTE", "CB", "QQP"]
CL_REAL_TASKS = 5
SMOKE_STREAM = ["SST-2", "IMDB", "MNLI", "SST-2", "RTE"]
PRIORS = (0.5, 1.0, 1.5, 2.0, 3.0)
DEFAULT_PRIOR = RouterConfig(dim=1).normalize_prior
PARTS = ("text", "gradient", "context")
EXAMPLES, SMOKE_EXAMPLES = 16, 4
#: the live run's prior: the smallest of `PRIORS` at which IMDB reuses SST-2's expert with no reuse across families
#: on the real signatures (routing_prior.md); chosen from the teacher-forced replay, before the live run
LIVE_PRIOR = 2.0
LIVE_DIR = RESULTS / NAME
#: this file and what it imports (the live run's code version: cl_real.py's manifests)
SCRIPTS = (Path(__file__).resolve(), Path(rr.__file__).resolve(), *cl_real.SCRIPTS)


def family_correct(step: dict[str, Any], family: dict[str, str] = rr.FAMILY) -> bool:
    """Right by task, or a first appearance reusing an expert of a task of its own family."""
    if step["correct"]:
        return True
    return bool(step["truth"] == "new" and step["action"] == "reuse" and step["wrong_reuse_in_family"])


def experts_made(steps: list[dict[str, Any]]) -> int:
    """Experts the router's own decisions would leave (a reuse adds none)."""
    return sum(s["action"] != "reuse" for s in steps)


def sweep(sigs: rr.Signatures, priors: tuple[float, ...] = PRIORS) -> list[dict[str, Any]]:
    """The default router (threshold rule, cosine, standardised, reuse 0.5 / fork 0.3) at each prior."""
    rows = []
    for k in priors:
        run = rr.run_stream(sigs, PARTS, {"decision": "threshold"}, normalize={"normalize_prior": k})
        steps = run["steps"]
        first = steps[: min(CL_REAL_TASKS, len(steps))]
        rows.append(
            {
                "prior": k,
                "correct": run["correct"],
                "family_correct": sum(family_correct(s) for s in steps) / len(steps),
                "wrong_reuses": run["wrong_reuses"],
                "wrong_reuses_in_family": run["wrong_reuses_in_family"],
                "wrong_reuses_across_families": run["wrong_reuses"] - run["wrong_reuses_in_family"],
                "experts_cl_real": experts_made(first),
                "decisions": [
                    {
                        "task": s["task"],
                        "occurrence": s["occurrence"],
                        "action": s["action"],
                        "expert": s["expert"],
                        "best_score": s["best_score"],
                    }
                    for s in steps
                ],
            }
        )
    return rows


def synthetic_signatures(n_tasks: int = 8, per_task: int = 2, seed: int = 0) -> dict[int, list[torch.Tensor]]:
    """Unit signatures of unrelated tasks sharing one dominant direction (raw cosine ≈ 0.98 between tasks); the
    generator of tests/experts/test_expert_router.py's `signatures_with_a_common_component`."""
    gen = torch.Generator().manual_seed(seed)
    common = torch.nn.functional.normalize(torch.randn(64, generator=gen), dim=0)
    centres = torch.randn(n_tasks, 64, generator=gen) * 0.02
    return {
        t: [
            torch.nn.functional.normalize(common + centres[t] + 0.004 * torch.randn(64, generator=gen), dim=0)
            for _ in range(per_task)
        ]
        for t in range(n_tasks)
    }


def synthetic_sweep(priors: tuple[float, ...] = PRIORS) -> list[dict[str, Any]]:
    """8 unrelated tasks seen twice (first all, then all again) at each prior: share correct, wrong reuses."""
    sigs = synthetic_signatures()
    rows = []
    for k in priors:
        router = Router(RouterConfig(dim=64, normalize_prior=k))
        correct, wrong = [], 0
        for t, occurrence in [(t, 0) for t in range(8)] + [(t, 1) for t in range(8)]:
            q = sigs[t][occurrence]
            d = router.route(q)
            right = (d.action == "reuse" and d.expert == f"t{t}") if occurrence else d.action != "reuse"
            wrong += int(d.action == "reuse" and not right)
            correct.append(right)
            router.record_decision(d, new_expert=None if occurrence else f"t{t}", query=q)
            if not occurrence:
                router.add_expert(f"t{t}", q)
        rows.append({"prior": k, "correct": sum(correct) / len(correct), "wrong_reuses": wrong})
    return rows


def live_method(prior: float) -> tuple[str, cl_real.Method]:
    """cl_real's `expert_routing` with the router's `normalize_prior` at `prior`: (its name, the method)."""
    base = cl_real.METHODS["expert_routing"]
    return f"expert_routing_prior{prior:g}", dataclasses.replace(
        base, options={**base.options, "router_normalize_prior": prior}
    )


@contextlib.contextmanager
def cl_real_knows(name: str, method: cl_real.Method) -> Iterator[None]:
    """For the duration, `cl_real.METHODS` also holds `name` (cl_real's `run_one` looks methods up there)."""
    saved = cl_real.METHODS
    cl_real.METHODS = {**saved, name: method}
    try:
        yield
    finally:
        cl_real.METHODS = saved


def live_version(settings: dict[str, Any], name: str, method: cl_real.Method) -> cl_real.CodeVersion:
    stamped = {**settings, "method": name, "options": method.options}
    return cl_real.CodeVersion(stamped, scripts=SCRIPTS)


def live_run(
    prior: float, seed: int, data: Path, results_dir: Path, smoke: bool = False
) -> tuple[dict[str, Any], bool]:
    """The live routed run at `prior` (run and stored unless a current record exists): (record, ran now)."""
    name, method = live_method(prior)
    settings = cl_real.SMOKE_SETTINGS if smoke else cl_real.SETTINGS
    version = live_version(settings, name, method)
    runs = cl_real.load_results(results_dir)
    record = runs.get((name, seed))
    if record is not None and cl_real.is_current(record, version):
        return record, False
    with cl_real_knows(name, method):
        record = cl_real.run_one(name, seed, settings, data, smoke=smoke)
    cl_real.save_run(results_dir, record, version)
    return record, True


def summarize_routed(record: dict[str, Any] | None) -> dict[str, Any] | None:
    """Average accuracy, BWT, experts, the decisions and each checked reuse's outcome of a routed cl_real record."""
    if record is None:
        return None
    extra = record.get("extra") or {}
    decisions = extra.get("routing_decisions") or []
    experts = sorted(set((extra.get("task_experts") or {}).values()))
    return {
        "method": record.get("method"),
        "seed": record.get("seed"),
        "avg_acc": record["metrics"].get("avg_acc"),
        "bwt": record["metrics"].get("bwt"),
        "final_row": record["matrix"][-1],
        "task_names": record["task_names"],
        "experts": len(experts) if experts else None,
        "decisions": [
            {
                k: d.get(k)
                for k in ("task", "action", "source", "score", "success", "rolled_back", "old_task_accuracy")
                if k in d
            }
            for d in decisions
        ],
        "wall_minutes": record["wall_seconds"] / 60,
        "code_version": record.get("code_version"),
    }


def reference_runs(cl_real_dir: Path, seed: int = 0) -> dict[str, dict[str, Any] | None]:
    """cl_real's stored runs to compare with (as they are: their own code version is in each record)."""
    runs = cl_real.load_results(cl_real_dir)
    out = {}
    for method in ("expert_routing", "lora_per_task"):
        record = runs.get((method, seed))
        out[method] = None if record is None else summarize_routed(record) | {"experts": cl_real.adapter_count(record)}
    return out


def cache_path(cache: Path, key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache / f"signatures_{digest}.pt"


def signatures(stream_names: list[str], data: Path, examples: int, smoke: bool, cache: Path) -> tuple:
    """(Signatures, seconds spent computing them: 0 when cached)."""
    stream = rr.build_stream(stream_names, seed=0, passes=1)
    cfg = SignatureConfig(n_examples=examples, batch_size=min(16, examples))
    key = {"smoke": smoke, "stream": stream_names, "examples": examples, "config": dataclasses.asdict(cfg)}
    path = cache_path(cache, key)
    if path.exists():
        stored = torch.load(path, weights_only=True)
        return rr.Signatures(stream, stored["query"], stored["profile"]), 0.0
    start = time.perf_counter()
    tasks = rr.load_occurrences(stream, data, examples)
    model, tokenizer = rr.load_backbone(smoke, tasks, seed=0)
    sigs, _ = rr.compute_signatures(tasks, stream, TaskSignature(model, tokenizer, cfg))
    seconds = time.perf_counter() - start
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"query": sigs.query, "profile": sigs.profile, "key": key}, tmp)
    os.replace(tmp, path)
    return sigs, seconds


def _f(x: float | None) -> str:
    return "—" if x is None else f"{x:.3f}"


def report_markdown(result: dict[str, Any]) -> str:
    meta = result["meta"]
    cl_real_first = meta["stream"][:CL_REAL_TASKS] == STREAM[:CL_REAL_TASKS]
    prefix = f" (cl_real's {CL_REAL_TASKS} tasks first, in its order)" if cl_real_first else ""
    lines = [
        f"# The router's normalisation prior on {meta['model']} signatures (`benchmarks/routing_prior.py`)",
        "",
        f"Stream: {', '.join(meta['stream'])}{prefix}; {meta['examples']} rows per signature; the default router "
        "(threshold rule, cosine, standardised, reuse >= 0.5, fork >= 0.3) at each `normalize_prior` (default "
        f"{meta['default_prior']}). Teacher-forced: no expert is trained.",
        "",
        "| prior | correct | family-correct | wrong reuses (in family / across) | experts for cl_real's 5 tasks | "
        "IMDB's score vs SST-2 | decisions |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in result["real"]:
        imdb = next((d for d in row["decisions"] if d["task"] == "IMDB" and d["occurrence"] == 0), None)
        decisions = ", ".join(
            f"{d['task']}@{d['occurrence']}→{d['action']}"
            + (f" {d['expert'].removeprefix('expert_')}" if d["action"] != "create" and d["expert"] else "")
            + ("" if d["best_score"] is None else f" ({d['best_score']:.2f})")
            for d in row["decisions"]
        )
        lines.append(
            f"| {row['prior']} | {_f(row['correct'])} | {_f(row['family_correct'])} | {row['wrong_reuses']} "
            f"({row['wrong_reuses_in_family']} / {row['wrong_reuses_across_families']}) | {row['experts_cl_real']} "
            f"| {_f(imdb['best_score'] if imdb else None)} | {decisions} |"
        )
    lines += [
        "",
        "Synthetic counter-case: 8 unrelated tasks with a dominant shared component (raw cosine ≈ 0.98), each seen "
        "twice (16 decisions).",
        "",
        "| prior | correct | wrong reuses |",
        "|---|---|---|",
    ]
    lines += [f"| {r['prior']} | {_f(r['correct'])} | {r['wrong_reuses']} |" for r in result["synthetic"]]
    lines += ["", "## Live: cl_real's routed run with the prior at " + f"{LIVE_PRIOR:g}", ""]
    live = result.get("live")
    if live is None:
        lines.append("Not run yet (`--live`).")
    else:
        lines += [
            "| run | avg acc | BWT | experts | final accuracy per task | wall (min) |",
            "|---|---|---|---|---|---|",
        ]
        rows = [(f"prior {live['prior']:g} (live{'' if live['current'] else ', STALE'})", live)]
        rows += [(f"cl_real `{name}` (its own code version)", r) for name, r in result["reference"].items() if r]
        for label, r in rows:
            per_task = ", ".join(f"{t} {a:.2f}" for t, a in zip(r["task_names"], r["final_row"]))
            lines.append(
                f"| {label} | {_f(r['avg_acc'])} | {_f(r['bwt'])} | {r['experts']} | {per_task} | "
                f"{r['wall_minutes']:.1f} |"
            )
        lines += ["", "Decisions of the live run:", ""]
        for d in live["decisions"]:
            text = f"- {d['task']}: {d['action']}"
            if d.get("source"):
                text += f" {d['source']}"
            if d.get("score") is not None:
                text += f" (score {d['score']:.2f})"
            if "success" in d:
                kept = "kept" if d["success"] else "rolled back"
                old = ", ".join(
                    f"{t} {v['before']:.2f} -> {v['after']:.2f}" for t, v in (d.get("old_task_accuracy") or {}).items()
                )
                text += f"; checked reuse {kept} ({old})"
            lines.append(text)
    lines += [
        "",
        f"Signatures computed in {meta['signature_seconds']:.1f} s (0: from the cache), wall {meta['wall_seconds']:.1f}"
        f" s on {meta['threads']} thread(s).",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny Gemma, short stream (never into docs/results)")
    parser.add_argument("--data", type=Path, default=rr.DEFAULT_DATA, help="the CL benchmark folder")
    parser.add_argument("--out", type=Path, default=None, help="folder of routing_prior.md|json")
    parser.add_argument("--cache", type=Path, default=None, help="signature cache (default $HF_ADAPTIVE_CACHE)")
    parser.add_argument("--live", action="store_true", help=f"also the live routed run at prior {LIVE_PRIOR}")
    parser.add_argument("--live-results", type=Path, default=None, help=f"folder of the live runs ({LIVE_DIR})")
    args = parser.parse_args(argv)
    threads = 1 if args.smoke else 2
    torch.set_num_threads(threads)
    out = args.out or (Path(tempfile.mkdtemp(prefix="routing_prior_smoke_")) if args.smoke else RESULTS)
    cache = args.cache or Path(os.environ.get("HF_ADAPTIVE_CACHE", Path.home() / ".cache" / "hf_adaptive"))
    cache = cache / NAME
    wall = time.perf_counter()
    names = SMOKE_STREAM if args.smoke else STREAM
    examples = SMOKE_EXAMPLES if args.smoke else EXAMPLES
    sigs, seconds = signatures(names, args.data, examples, args.smoke, cache)
    result = {
        "meta": {
            "model": "tiny" if args.smoke else rr.MODEL,
            "stream": names,
            "examples": examples,
            "default_prior": DEFAULT_PRIOR,
            "signature_seconds": seconds,
            "threads": threads,
        },
        "real": sweep(sigs),
        "synthetic": synthetic_sweep(),
    }
    live_dir = args.live_results or (out / NAME if args.smoke else LIVE_DIR)
    if args.live:
        live_run(LIVE_PRIOR, 0, args.data, live_dir, smoke=args.smoke)
    stored = cl_real.load_results(live_dir) if live_dir.exists() else {}
    name, method = live_method(LIVE_PRIOR)
    settings = cl_real.SMOKE_SETTINGS if args.smoke else cl_real.SETTINGS
    live = stored.get((name, 0))
    result["live"] = None
    if live is not None:
        current = cl_real.is_current(live, live_version(settings, name, method))
        result["live"] = {**summarize_routed(live), "prior": LIVE_PRIOR, "current": current}
    result["reference"] = {} if args.smoke else reference_runs(cl_real.RESULTS_DIR)
    result["meta"]["wall_seconds"] = time.perf_counter() - wall
    write_results(NAME, result, report_markdown(result), out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
