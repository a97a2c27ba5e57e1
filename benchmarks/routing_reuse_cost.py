"""Does a wrong in-family reuse cost accuracy? (issue 14: "no wrong reuse that costs accuracy")

routing_real.py's stream on SmolLM2 made 2 wrong decisions of 48, both a related task's expert reused on a task's
first appearance: CB reused MNLI's expert and IMDB reused SST-2's. routing_real trains nothing, so it cannot say
whether those reuses cost accuracy. This script trains them. Per case (`CASES`: a source task, then the related task
the router reused its expert for), cl_real's routed recipe (`expert_routing`: SmolLM2, cl_real's rows, budgets and
options), with the router's decision for the second task forced by its thresholds (`ARMS`):

* ``create``: a fresh expert for the second task (the right decision): reuse and fork thresholds at 1.0, which no
  score of a different task's signature reaches;
* ``fork``: a copy of the source's expert, trained as the second task's own (fork threshold -1, reuse 1.0);
* ``reuse``: the source's expert reused, checked as the router does by default (`verify_reuse`): a fork of it is
  trained on the second task and merged back only if the source task loses at most `router_tolerance` (0.05) with
  it on the router's rows; else it is kept as the second task's own expert (then the run is a fork);
* ``reuse_unchecked``: the source's expert itself trained on the second task (`router_verify_reuse=False`): what a
  wrong reuse costs when nothing guards it.

Measured per run: the accuracy matrix (each task with its own expert), the final accuracy of both tasks, their
average, the experts made, and for a reuse whether it was kept and the source's accuracy before and after (the
plugin's `routing_decisions`). Verdict per case: a reuse "costs accuracy" when its final two-task average, paired
with create's by seed, is lower on average over the seeds by more than `COST_POINTS` (1 point). One run's noise is
larger than that (cl_real's seeds differ by 2-4 points; CB's eval split has 56 rows: one row is 1.8 points), so the
per-seed differences are given beside it.

    python benchmarks/routing_reuse_cost.py --case CASE --arm ARM --seed K   # one run (~5 min on 2 cores)
    python benchmarks/routing_reuse_cost.py --all [--max-runs N]  # every missing or stale run (own processes)
    python benchmarks/routing_reuse_cost.py --plan                 # what --all would run
    python benchmarks/routing_reuse_cost.py --report               # docs/results/routing_reuse_cost.md|json
    python benchmarks/routing_reuse_cost.py --smoke --out DIR      # the pipeline on a tiny Gemma (2 x 16 rows)

Each run is stored as `docs/results/routing_reuse_cost/<case>_<arm>_seed<k>.json` (atomic, cl_real's code-version
stamp: the manifest of every file the run loaded, this script and the settings).
"""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cl_real  # noqa: E402
import routing_prior  # noqa: E402
from common import RESULTS, write_results  # noqa: E402

NAME = "routing_reuse_cost"
RESULTS_DIR = RESULTS / NAME
SCRIPTS = (Path(__file__).resolve(), Path(routing_prior.__file__).resolve(), *cl_real.SCRIPTS)
#: case -> (source task, the related task that reused its expert in routing_real's stream); smoke: the test data's
CASES: dict[str, tuple[str, str]] = {"cb_after_mnli": ("MNLI", "CB"), "imdb_after_sst2": ("SST-2", "IMDB")}
SMOKE_CASES: dict[str, tuple[str, str]] = {"cb_after_mnli": ("MNLI", "RTE"), "imdb_after_sst2": ("SST-2", "IMDB")}
#: arm -> router options forcing the second task's decision (the first task always creates: no expert exists yet)
ARMS: dict[str, dict[str, Any]] = {
    "create": {"router_reuse_threshold": 1.0, "router_fork_threshold": 1.0},
    "reuse": {"router_reuse_threshold": -1.0, "router_fork_threshold": -1.0, "router_verify_reuse": True},
    "reuse_unchecked": {"router_reuse_threshold": -1.0, "router_fork_threshold": -1.0, "router_verify_reuse": False},
    "fork": {"router_reuse_threshold": 1.0, "router_fork_threshold": -1.0},
}
SEEDS = (0, 1)
SMOKE_SEEDS = (0,)
#: a reuse costs accuracy when its two-task average is below create's by more than this, seed-paired, in points
COST_POINTS = 1.0


def run_name(case: str, arm: str) -> str:
    return f"{case}_{arm}"


def method(arm: str) -> cl_real.Method:
    """cl_real's `expert_routing` with the decision forced by `ARMS[arm]` (nothing else changed)."""
    base = cl_real.METHODS["expert_routing"]
    return dataclasses.replace(base, options={**base.options, **ARMS[arm]})


def settings_for(case: str, smoke: bool = False) -> dict[str, Any]:
    settings = cl_real.SMOKE_SETTINGS if smoke else cl_real.SETTINGS
    return {**settings, "tasks": list((SMOKE_CASES if smoke else CASES)[case])}


def code_version(case: str, arm: str, smoke: bool = False) -> cl_real.CodeVersion:
    stamped = {**settings_for(case, smoke), "method": run_name(case, arm), "options": method(arm).options}
    return cl_real.CodeVersion(stamped, scripts=SCRIPTS)


def run_and_save(case: str, arm: str, seed: int, data: Path, results_dir: Path, smoke: bool = False) -> Path:
    name = run_name(case, arm)
    version = code_version(case, arm, smoke)
    print(f"--- {name} seed {seed} (whole package {version})", flush=True)
    with routing_prior.cl_real_knows(name, method(arm)):
        record = cl_real.run_one(name, seed, settings_for(case, smoke), data, smoke=smoke)
    record.update(case=case, arm=arm)
    path = cl_real.save_run(results_dir, record, version)
    row = summarize_run(record)
    print(
        f"    final {row['final']} avg {cl_real._fmt(row['avg_acc'])} experts {row['experts']} "
        f"decision {row['decision']} wall {record['wall_seconds'] / 60:.1f} min -> {path}",
        flush=True,
    )
    return path


def plan(runs: dict[tuple[str, int], dict], smoke: bool = False) -> list[tuple[tuple[str, str, int], str]]:
    """The runs `--all` would do, in order (a case's seed 0 in every arm, then its seed 1; CB's case first)."""
    todo = []
    for case in CASES:
        for seed in SMOKE_SEEDS if smoke else SEEDS:
            for arm in ARMS:
                status = cl_real.run_status(runs, (run_name(case, arm), seed), code_version(case, arm, smoke))
                if status != "current":
                    todo.append(((case, arm, seed), status))
    return todo


def run_all(data: Path, results_dir: Path, max_runs: int | None, smoke: bool = False) -> int:
    failed = 0
    todo = plan(cl_real.load_results(results_dir), smoke)
    for (case, arm, seed), why in todo[:max_runs]:
        print(f"=== {case} {arm} seed {seed} ({why})", flush=True)
        if smoke:  # in this process: seconds, and a test can see it
            run_and_save(case, arm, seed, data, results_dir, smoke=True)
            continue
        command = [sys.executable, str(Path(__file__).resolve()), "--case", case, "--arm", arm, "--seed", str(seed)]
        command += ["--data", str(data), "--results", str(results_dir)]
        if subprocess.run(command, check=False).returncode != 0:
            print(f"    {case} {arm} seed {seed} failed; continuing", flush=True)
            failed += 1
    return 1 if failed else 0


# -------------------------------------------------------------------------------------------------------- report
def summarize_run(record: dict[str, Any]) -> dict[str, Any]:
    """One run: the final accuracy per task, their average, the experts and the second task's decision."""
    extra = record.get("extra") or {}
    decisions = extra.get("routing_decisions") or []
    second = decisions[-1] if len(decisions) >= 2 else {}
    final = dict(zip(record["task_names"], record["matrix"][-1], strict=True))
    return {
        "seed": record["seed"],
        "final": final,
        "avg_acc": record["metrics"].get("avg_acc"),
        "bwt": record["metrics"].get("bwt"),
        "experts": len(set((extra.get("task_experts") or {}).values())) or None,
        "decision": second.get("action"),
        "kept": None if second.get("action") != "reuse" else bool(second.get("success")),
        "rolled_back": second.get("rolled_back"),
        "source_accuracy": second.get("old_task_accuracy") or {},
        "wall_minutes": record["wall_seconds"] / 60,
    }


def summarize(runs: dict[tuple[str, int], dict], smoke: bool = False) -> dict[str, Any]:
    """Per case: each arm's runs (with staleness) and each reuse arm's seed-paired cost against create."""
    cases = {}
    for case in CASES:
        arms = {}
        for arm in ARMS:
            version = code_version(case, arm, smoke)
            done = sorted((s, d) for (m, s), d in runs.items() if m == run_name(case, arm))
            arms[arm] = {
                "runs": [summarize_run(d) for _, d in done],
                "stale": [not cl_real.is_current(d, version) for _, d in done],
            }
        create = {r["seed"]: r["avg_acc"] for r in arms["create"]["runs"]}
        for arm, entry in arms.items():
            if arm == "create":
                continue
            diffs = {
                r["seed"]: 100 * (r["avg_acc"] - create[r["seed"]])
                for r in entry["runs"]
                if r["seed"] in create and r["avg_acc"] is not None and create[r["seed"]] is not None
            }
            mean = cl_real._mean(list(diffs.values()))
            entry["vs_create_points"] = diffs
            entry["vs_create_mean_points"] = mean
            entry["costs_accuracy"] = None if mean is None else mean < -COST_POINTS
            entry["all_seeds"] = sorted(diffs) == list(SMOKE_SEEDS if smoke else SEEDS)
        cases[case] = {"tasks": list((SMOKE_CASES if smoke else CASES)[case]), "arms": arms}
    todo = [{"case": c, "arm": a, "seed": s, "why": why} for (c, a, s), why in plan(runs, smoke)]
    return {"cases": cases, "cost_points": COST_POINTS, "todo": todo}


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def report_markdown(summary: dict[str, Any]) -> str:
    lines = [
        "# Does a wrong in-family reuse cost accuracy? (issue 14)",
        "",
        "cl_real's routed recipe (SmolLM2-135M, 256 train / 100 eval rows per task, LoRA r=8 on q/k/v/o, 1 epoch), "
        "two tasks per run, the router's decision for the second forced (`benchmarks/routing_reuse_cost.py`). "
        "Final accuracy: the accuracy matrix's last row, each task evaluated with its own expert. "
        f"A reuse costs accuracy when its two-task average is below create's by more than {COST_POINTS:g} point, "
        "paired by seed and averaged over the seeds.",
        "",
    ]
    for case, entry in summary["cases"].items():
        source, target = entry["tasks"]
        lines += [f"## {target} after {source} (`{case}`)", ""]
        lines += [
            f"| arm | seed | decision | {source} final | {target} final | average | vs create | experts | "
            f"{source} before -> after (the check) | min |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for arm, a in entry["arms"].items():
            for row, stale in zip(a["runs"], a["stale"], strict=True):
                diff = a.get("vs_create_points", {}).get(row["seed"])
                check = "; ".join(
                    f"{_pct(v.get('before'))} -> {_pct(v.get('after'))}" for v in row["source_accuracy"].values()
                )
                outcome = "" if row["kept"] is None else (" (kept)" if row["kept"] else " (rolled back: a fork)")
                lines.append(
                    f"| {arm}{' (stale)' if stale else ''} | {row['seed']} | {row['decision']}{outcome} | "
                    f"{_pct(row['final'].get(source))} | {_pct(row['final'].get(target))} | {_pct(row['avg_acc'])} | "
                    f"{'' if diff is None else f'{diff:+.1f}'} | {row['experts']} | {check} | "
                    f"{row['wall_minutes']:.1f} |"
                )
        lines += ["", "Verdicts:", ""]
        for arm, a in entry["arms"].items():
            if arm == "create":
                continue
            mean = a.get("vs_create_mean_points")
            if mean is None:
                lines.append(f"- {arm}: not measured yet.")
                continue
            partial = "" if a["all_seeds"] else " (provisional: not every seed has run)"
            per_seed = ", ".join(f"seed {s}: {d:+.1f}" for s, d in sorted(a["vs_create_points"].items()))
            said = "costs accuracy" if a["costs_accuracy"] else "no cost beyond 1 point"
            lines.append(f"- {arm}{partial}: **{said}** ({mean:+.1f} points vs create; {per_seed}).")
        lines.append("")
    if summary["todo"]:
        lines.append(f"Runs still to do: {len(summary['todo'])} ({summary['todo'][0]['case']} first).")
    return "\n".join(lines) + "\n"


def build_report(results_dir: Path, out: Path, smoke: bool = False) -> str:
    summary = summarize(cl_real.load_results(results_dir), smoke)
    markdown = report_markdown(summary)
    write_results(NAME, cl_real._json_safe(summary), markdown, out=out)
    return markdown


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--case", choices=list(CASES), default=None, help="run this case once (with --arm, --seed)")
    mode.add_argument("--all", action="store_true", help="run every missing or stale run, then the report")
    mode.add_argument("--plan", action="store_true", help="print what --all would run and exit")
    mode.add_argument("--report", action="store_true", help="only rebuild the report from the stored runs")
    mode.add_argument("--smoke", action="store_true", help="every run on a tiny Gemma, into a temporary folder")
    parser.add_argument("--arm", choices=list(ARMS), default=None, help="with --case")
    parser.add_argument("--seed", type=int, choices=list(SEEDS), default=0, help="with --case")
    parser.add_argument("--max-runs", type=int, default=None, help="with --all: stop after this many runs")
    parser.add_argument("--data", type=Path, default=cl_real.DEFAULT_DATA, help="the CL benchmark folder")
    parser.add_argument("--results", type=Path, default=None, help="folder of the per-run JSON files")
    parser.add_argument("--out", type=Path, default=None, help="folder of the report (md, json)")
    ns = parser.parse_args(argv)
    if not (ns.case or ns.all or ns.plan or ns.report or ns.smoke):
        parser.error("give one of --case CASE --arm ARM [--seed K], --all, --plan, --report or --smoke")
    if (ns.case is None) != (ns.arm is None):
        parser.error("--case and --arm go together")
    if ns.max_runs is not None and (not ns.all or ns.max_runs < 1):
        parser.error(f"--max-runs {ns.max_runs}: allowed only with --all, and >= 1")
    if ns.smoke:
        base = ns.out or Path(tempfile.mkdtemp(prefix=f"{NAME}_smoke_"))
        if base.resolve().is_relative_to(RESULTS.resolve()):
            parser.error(f"--out {base} is not allowed with --smoke: it is inside {RESULTS}")
        results_dir, out = ns.results or base / "runs", base
    else:
        results_dir, out = ns.results or RESULTS_DIR, ns.out or RESULTS
    if ns.case:
        run_and_save(ns.case, ns.arm, ns.seed, ns.data, results_dir)
        return 0
    if ns.plan:
        todo = plan(cl_real.load_results(results_dir))
        print(f"{len(todo)} run(s) to do (of {len(CASES) * len(ARMS) * len(SEEDS)}):")
        for (case, arm, seed), why in todo:
            print(f"  {case} {arm} seed {seed} ({why})")
        return 0
    status = 0
    if ns.all or ns.smoke:
        status = run_all(ns.data, results_dir, ns.max_runs, smoke=ns.smoke)
    print(build_report(results_dir, out, smoke=ns.smoke))
    return status


if __name__ == "__main__":
    sys.exit(main())
