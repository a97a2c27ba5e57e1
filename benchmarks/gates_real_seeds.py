"""The second seeds that gates_real_followup.py left out (issue 14 asks for 2 seeds where training is involved):
the short LoRA behind every head set's accuracy with a second LoRA seed, and REINFORCE and A2C with a second
controller seed.

gates_real_followup.py ran every LoRA with the base's seed (0) and REINFORCE / A2C with the base's controller seed,
once each. This script runs, on the same bench (`gates_real_followup.build_bench`, checked against the base's
stored losses), parts stored one by one (`<results>/<part>.json`, atomic, stamped with the package files loaded,
this script, the follow-up's and gates_real's scripts and the base's settings), so a stopped run resumes:

* ``check_lora_dense_100_seed0``: the dense model's LoRA with seed 0 again, to compare with the follow-up's stored
  accuracy (is the LoRA deterministic here, so that equal heads may share one measurement?);
* ``lora_<strategy>_<kept %>_seed1``: the LoRA with seed `seed + 1` (adapter init and batch order; the same rows)
  on every distinct head set of the base and the follow-up's controllers (strategies that kept the same heads,
  e.g. a controller that stayed at its start, share the part of the first of them);
* ``controller_<algorithm>_best_seed1_<kept %>`` for REINFORCE and A2C (`CONTROLLERS`; 25 % first, where their
  first seeds moved), from the same best static start as the follow-up's, then the LoRA on its heads with seeds 0
  and 1 (``lora_<controller>_<kept %>_seed<k>``; heads equal to a measured set take that set's accuracy).

Report, per budget: every strategy's LoRA accuracy (balanced, the metric of results.md, and plain) with both LoRA
seeds and their mean; each controller's mean over every controller seed and LoRA seed it has against the best
static strategy's 2-seed mean, by the follow-up's rule (`gates_real.verdict`, band: the binomial standard error
of that mean on the test half); the new controller seeds' test loss against the best static baseline (band: the
random seeds' standard deviation) alone and as a 2-seed mean.

    python benchmarks/gates_real_seeds.py [--max-parts N]   # every missing or stale part, then the report
    python benchmarks/gates_real_seeds.py --plan            # the parts still to run, with the estimate
    python benchmarks/gates_real_seeds.py --report          # docs/results/gates_real_seeds.md|json only
    python benchmarks/gates_real_seeds.py --quick --base B --followup D --out DIR   # on quick runs of both

Cost on 2 cores: a LoRA part ~1.8 min (21 distinct head sets and the check), a controller part 10-16 min (6);
~2 h in all.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, environment, write_results  # noqa: E402, I001  (first: sets the single-threaded, offline environment)

import cl_real  # noqa: E402
import compression  # noqa: E402
import gates_real_followup as fu  # noqa: E402

gr = fu.gr
NAME = "gates_real_seeds"
RESULTS_DIR = RESULTS / NAME
SCRIPTS = (Path(__file__).resolve(), *fu.SCRIPTS)
#: the second LoRA seed is the base's seed plus this
LORA_SEED_OFFSET = 1
#: the controllers the follow-up ran on one seed, now with the base's seed + 1
CONTROLLERS = (fu.ControllerSpec("reinforce", "none", 1), fu.ControllerSpec("a2c", "none", 1))
#: the follow-up's controllers with their second seed (the two of a pair are averaged in the report)
PAIRS = {c.replicates: c.name for c in (*fu.CONTROLLERS, *CONTROLLERS) if c.replicates}


def lora_name(strategy: str, fraction: float, seed_offset: int) -> str:
    return f"lora_{strategy}_{fu.percent(fraction)}_seed{seed_offset}"


CHECK = "check_lora_dense_100_seed0"


def measured_heads(base: dict[str, Any], followup: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Every (strategy, fraction, kept) whose seed-0 LoRA the follow-up measured: the base's rows, then the
    follow-up's controllers in name order."""
    rows = [{"strategy": r["strategy"], "fraction": r["fraction"], "kept": r["kept"]} for r in base["results"]]
    for name in sorted(followup):
        rec = followup[name]
        if rec.get("kind") == "controller":
            rows.append({k: rec["row"][k] for k in ("strategy", "fraction", "kept")})
    return rows


def head_sets(rows: list[dict[str, Any]]) -> dict[tuple[float, tuple[int, ...]], list[str]]:
    """Distinct head sets, each with the strategies that kept it (first one names its LoRA part)."""
    sets: dict[tuple[float, tuple[int, ...]], list[str]] = {}
    for r in rows:
        sets.setdefault((r["fraction"], tuple(sorted(r["kept"]))), []).append(r["strategy"])
    return sets


def parts(base: dict[str, Any], followup: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """In run order: the check, the second LoRA seed of every distinct head set, then per budget (smallest first)
    each new controller seed and its two LoRA parts."""
    dense = next(r for r in base["results"] if r["strategy"] == "dense")
    out = [{"kind": "lora", "name": CHECK, "kept": dense["kept"], "strategy": "dense", "fraction": 1.0, "offset": 0}]
    for (fraction, kept), holders in head_sets(measured_heads(base, followup)).items():
        name = lora_name(holders[0], fraction, LORA_SEED_OFFSET)
        out.append({"kind": "lora", "name": name, "kept": list(kept), "strategy": holders[0], "fraction": fraction,
                    "offset": LORA_SEED_OFFSET})  # fmt: skip
    for fraction in sorted(base["meta"]["settings"]["budgets"]):
        for spec in CONTROLLERS:
            name = fu.controller_part(spec, fraction)
            out.append({"kind": "controller", "name": name, "controller": spec, "fraction": fraction})
            for offset in (0, LORA_SEED_OFFSET):
                out.append({"kind": "lora", "name": lora_name(spec.name, fraction, offset), "after": name,
                            "strategy": spec.name, "fraction": fraction, "offset": offset})  # fmt: skip
    return out


def code_version(base: dict[str, Any], part: str) -> cl_real.CodeVersion:
    settings = {**base["meta"]["settings"], "part": part, "base_code_version": base["meta"]["code_version"],
                "lora_seed_offset": LORA_SEED_OFFSET}  # fmt: skip
    return cl_real.CodeVersion(settings, compression.PACKAGE, SCRIPTS)


def plan(base, followup, records) -> list[tuple[dict[str, Any], str]]:
    todo = []
    for part in parts(base, followup):
        record = records.get(part["name"])
        if record is None:
            todo.append((part, "missing"))
        elif not cl_real.is_current(record, code_version(base, part["name"])):
            todo.append((part, "stale"))
    return todo


def estimated_minutes(base: dict[str, Any], todo: list[tuple[dict[str, Any], str]]) -> float:
    steps = base["meta"]["settings"]["controller_steps"]
    per = {"lora": fu.LORA_SECONDS, "controller": steps * fu.CONTROLLER_STEP_SECONDS}
    return (gr.LOAD + sum(per[p["kind"]] for p, _ in todo)) / 60


def known_accuracy(
    kept: list[int], fraction: float, offset: int, base, followup, records
) -> tuple[str, dict[str, Any]] | None:
    """A stored LoRA measurement of the same heads with the same LoRA seed: (its part, its record)."""
    key = (fraction, tuple(sorted(kept)))
    for (f, k), holders in head_sets(measured_heads(base, followup)).items():
        if (f, k) != key:
            continue
        if offset == 0:
            name = fu.lora_part(holders[0], fraction)
            return (name, followup[name]) if name in followup else None
        name = lora_name(holders[0], fraction, offset)
        return (name, records[name]) if name in records else None
    return None


def run_lora(bench: gr.Bench, kept: list[int], offset: int) -> dict[str, Any]:
    """gates_real's short LoRA with the heads fixed and the LoRA seed `seed + offset` (the same training rows)."""
    train_rows = gr.text_rows(bench.tasks, bench.tokenizer, bench.s, "train", whole_text=False)
    s = {**bench.s, "seed": bench.s["seed"] + offset}
    t = time.perf_counter()
    acc = gr.lora_accuracy(
        bench.model, bench.gated, fu.gates_from(kept, bench.shape), bench.tokenizer, train_rows, bench.test_tasks, s
    )
    return {**acc, "lora_seed": s["seed"], "heads": len(kept), "seconds": round(time.perf_counter() - t, 1)}


def run_parts(base, followup, data: Path, results_dir: Path, max_parts: int | None) -> int:
    records = fu.load_records(results_dir)
    todo = plan(base, followup, records)[:max_parts]
    if not todo:
        return 0
    bench = fu.build_bench(base, data)
    for part, why in todo:
        name = part["name"]
        print(f"=== {name} ({why})", flush=True)
        t = time.perf_counter()
        if part["kind"] == "controller":
            result = fu.run_controller_part(bench, base, part["controller"], part["fraction"])
        else:
            kept = part.get("kept")
            if kept is None:
                source = records.get(part["after"])
                if source is None:
                    raise RuntimeError(f"{name} needs {part['after']}'s heads, which is not stored")
                kept = source["row"]["kept"]
            same = None if name == CHECK else known_accuracy(kept, part["fraction"], part["offset"], base, followup,
                                                              records)  # fmt: skip
            if same is None:
                result = run_lora(bench, kept, part["offset"])
            else:
                keys = ("accuracy", "balanced", "per_task")
                result = {**{k: same[1][k] for k in keys}, "same_heads_as": same[0], "heads": len(kept)}
            result = {"strategy": part["strategy"], "fraction": part["fraction"], "lora_seed_offset": part["offset"],
                      **result}  # fmt: skip
        record = {"part": name, "kind": part["kind"], **result, "wall_seconds": time.perf_counter() - t,
                  "base_code_version": base["meta"]["code_version"], "environment": environment()}  # fmt: skip
        cl_real.write_stamped(results_dir / f"{name}.json", cl_real._json_safe(record), code_version(base, name))
        records[name] = record
        summary = record.get("balanced", (record.get("row") or {}).get("test_loss"))
        print(f"    {name}: {summary} in {record['wall_seconds'] / 60:.1f} min", flush=True)
    return len(todo)


# -------------------------------------------------------------------------------------------------------- report
def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize(base, followup, records) -> dict[str, Any]:
    n_test = base["meta"]["test_rows"]
    rows = measured_heads(base, followup)
    test_loss = {(r["strategy"], r["fraction"]): r["test_loss"] for r in base["results"]}
    new = [records[n] for n in sorted(records) if records[n].get("kind") == "controller"]
    rows += [{k: rec["row"][k] for k in ("strategy", "fraction", "kept")} for rec in new]
    for rec in [*followup.values(), *new]:
        if rec.get("kind") == "controller":
            test_loss[(rec["row"]["strategy"], rec["row"]["fraction"])] = rec["row"]["test_loss"]
    sets = head_sets(rows)

    def lora(strategy: str, fraction: float, offset: int) -> dict[str, Any] | None:
        own = records.get(lora_name(strategy, fraction, offset))
        if own is not None:
            return own
        if offset == 0 and fu.lora_part(strategy, fraction) in followup:
            return followup[fu.lora_part(strategy, fraction)]
        kept = next(k for (f, k), holders in sets.items() if f == fraction and strategy in holders)
        return records.get(lora_name(sets[(fraction, kept)][0], fraction, offset))

    stored_dense = followup.get(fu.lora_part("dense", 1.0))
    check = records.get(CHECK)
    out: dict[str, Any] = {
        "check": None if check is None or stored_dense is None else {
            "stored": {k: stored_dense[k] for k in ("accuracy", "balanced")},
            "rerun": {k: check[k] for k in ("accuracy", "balanced")},
            "equal": all(abs(check[k] - stored_dense[k]) < 1e-9 for k in ("accuracy", "balanced"))},
        "test_rows": n_test,
        "budgets": [],
    }  # fmt: skip
    for v in base["verdicts"]:
        fraction = v["fraction"]
        strategies = list(dict.fromkeys(r["strategy"] for r in rows if r["fraction"] == fraction))
        table = []
        for strategy in strategies:
            seeds = [lora(strategy, fraction, o) for o in (0, LORA_SEED_OFFSET)]
            entry = {"strategy": strategy, "test_loss": test_loss.get((strategy, fraction))}
            for metric in ("balanced", "accuracy"):
                values = [None if s is None else s[metric] for s in seeds]
                entry[metric] = values
                entry[f"mean_{metric}"] = None if None in values else _mean(values)
            table.append(entry)
        by = {e["strategy"]: e for e in table}
        static = [e for e in table if e["strategy"] in gr.STATIC and e["mean_balanced"] is not None]
        best = max(static, key=lambda e: e["mean_balanced"]) if static else None
        groups = []
        for name in (s for s in strategies if s.startswith("controller") and s not in PAIRS.values()):
            members = [by[m] for m in (name, PAIRS.get(name)) if m in by]
            values = [x for m in members for x in m["balanced"] if x is not None]
            losses = [m["test_loss"] for m in members if m["test_loss"] is not None]
            mean, loss = _mean(values), _mean(losses)
            band = None if best is None else fu._se(best["mean_balanced"], n_test)
            groups.append({
                "controller": name, "members": [m["strategy"] for m in members], "balanced": values,
                "mean_balanced": mean, "test_loss": losses, "mean_test_loss": loss,
                "accuracy_verdict": None if mean is None or best is None
                else gr.verdict(-mean, -best["mean_balanced"], band),
                "loss_verdict": None if loss is None else gr.verdict(loss, v["best_static_test_loss"], v["random_std"]),
            })  # fmt: skip
        out["budgets"].append({
            "fraction": fraction, "heads": v["heads"], "rows": table,
            "best_static": None if best is None else {
                "strategy": best["strategy"], "mean_balanced": best["mean_balanced"],
                "standard_error": fu._se(best["mean_balanced"], n_test)},
            "best_static_test_loss": v["best_static_test_loss"], "best_static_loss_strategy": v["best_static"],
            "random_std": v["random_std"], "controllers": groups,
            "new_runs": [records[fu.controller_part(c, fraction)]["run"] for c in CONTROLLERS
                         if fu.controller_part(c, fraction) in records],
        })  # fmt: skip
    out["todo"] = [{"part": p["name"], "why": why} for p, why in plan(base, followup, records)]
    return out


def _f(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def report_markdown(summary: dict[str, Any]) -> str:
    lines = [
        "# Head gates on SmolLM2: second seeds of the LoRA accuracy and of REINFORCE / A2C (issue 14)",
        "",
        "`benchmarks/gates_real_seeds.py` on gates_real_followup's bench: the short LoRA with a second seed (adapter "
        f"init, batch order) on every distinct head set, and REINFORCE / A2C with a second controller seed. Test half: "
        f"{summary['test_rows']} rows. Accuracy: balanced (plain in brackets), LoRA seeds 0 / 1 and their mean.",
        "",
    ]
    check = summary["check"]
    if check is not None:
        lines += [
            f"Check: the dense model's seed-0 LoRA again gives balanced {check['rerun']['balanced']:.4f} "
            f"(accuracy {check['rerun']['accuracy']:.4f}), the follow-up stored {check['stored']['balanced']:.4f} "
            f"({check['stored']['accuracy']:.4f}): {'equal' if check['equal'] else 'NOT equal'}.",
            "",
        ]
    for b in summary["budgets"]:
        lines += [f"## {fu.percent(b['fraction'])} % of the heads kept ({b['heads']})", ""]
        lines += ["| strategy | test loss | LoRA seed 0 | LoRA seed 1 | mean |", "|---|---|---|---|---|"]
        for e in sorted(b["rows"], key=lambda e: -(e["mean_balanced"] or 0)):
            cells = [f"{_f(x)} ({_f(y)})" for x, y in zip(e["balanced"], e["accuracy"], strict=True)]
            mean = f"{_f(e['mean_balanced'])} ({_f(e['mean_accuracy'])})"
            lines.append(f"| {e['strategy']} | {_f(e['test_loss'], 4)} | {cells[0]} | {cells[1]} | {mean} |")
        lines.append("")
        best = b["best_static"]
        for g in b["controllers"]:
            acc = "" if best is None or g["mean_balanced"] is None else (
                f"balanced accuracy {g['mean_balanced']:.3f} over {len(g['balanced'])} runs "
                f"({', '.join(f'{x:.3f}' for x in g['balanced'])}): {g['accuracy_verdict']} the best static "
                f"strategy's 2-seed mean ({best['strategy']} {best['mean_balanced']:.3f}; band: its standard error "
                f"{best['standard_error']:.3f}); "
            )  # fmt: skip
            loss = "" if g["mean_test_loss"] is None else (
                f"test loss {g['mean_test_loss']:.4f} over {len(g['test_loss'])} controller seed(s): "
                f"{g['loss_verdict']} the best static baseline ({b['best_static_loss_strategy']} "
                f"{b['best_static_test_loss']:.4f}; band: random std {b['random_std']:.3f})"
            )  # fmt: skip
            lines.append(f"- {' + '.join(g['members'])}: {acc}{loss}.")
        for run in b["new_runs"]:
            lines.append(
                f"- {run['strategy']}: start {run['start']} (val {run['start_val_loss']:.4f}), first action "
                f"{_f(run['first_action_val_loss'], 4)}, best {run['best_val_loss']:.4f} at step {run['best_step']}; "
                f"reward first / last quarter {_f(run['first_quarter_reward'])} / {_f(run['last_quarter_reward'])}; "
                f"{run['seconds'] / 60:.1f} min."
            )
        lines.append("")
    if summary["todo"]:
        lines += [f"Parts still to run: {len(summary['todo'])} (next: {summary['todo'][0]['part']}).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--plan", action="store_true", help="print the parts still to run and exit")
    mode.add_argument("--report", action="store_true", help="only rebuild the report from the stored parts")
    parser.add_argument("--quick", action="store_true", help="on quick runs (needs --base, --followup, --out)")
    parser.add_argument("--base", type=Path, default=None, help=f"gates_real's result JSON (default {fu.BASE})")
    parser.add_argument("--followup", type=Path, default=None, help=f"the follow-up's parts (default {fu.RESULTS_DIR})")
    parser.add_argument("--max-parts", type=int, default=None, help="run at most this many parts (>= 1)")
    parser.add_argument("--data", type=Path, default=compression.DEFAULT_DATA, help="cl_benchmark folder")
    parser.add_argument("--out", type=Path, default=None, help="folder of the report and its parts' folder")
    ns = parser.parse_args(argv)
    if ns.max_parts is not None and ns.max_parts < 1:
        parser.error(f"--max-parts={ns.max_parts} is not allowed: an integer >= 1")
    if ns.quick and (ns.base is None or ns.followup is None or ns.out is None):
        parser.error("--quick needs --base, --followup (quick runs) and --out (outside docs/results)")
    if ns.quick and ns.out.resolve().is_relative_to(RESULTS.resolve()):
        parser.error(f"--out={ns.out} is not allowed with --quick: it is inside {RESULTS}")
    path, followup_dir = ns.base or fu.BASE, ns.followup or fu.RESULTS_DIR
    if not path.is_file():
        parser.error(f"--base={path} is not allowed: no such file (run benchmarks/gates_real.py first)")
    followup = fu.load_records(followup_dir)
    if not followup:
        parser.error(f"--followup={followup_dir} is not allowed: no parts there (run gates_real_followup.py first)")
    base = json.loads(path.read_text())
    if bool(base["meta"].get("quick")) != ns.quick:
        parser.error(f"--base={path} is not allowed: its quick flag differs from --quick's")
    out = ns.out or RESULTS
    results_dir = out / NAME
    if ns.plan:
        todo = plan(base, followup, fu.load_records(results_dir))
        print(f"{len(todo)} part(s) to run, ~{estimated_minutes(base, todo):.0f} min on 2 cores:")
        for part, why in todo:
            print(f"  {part['name']} ({why})")
        return 0
    if not ns.report:
        data = ns.data if not ns.quick else Path(tempfile.gettempdir())  # the quick model's tasks are built in
        run_parts(base, followup, data, results_dir, ns.max_parts)
    summary = summarize(base, followup, fu.load_records(results_dir))
    write_results(NAME, cl_real._json_safe(summary), report_markdown(summary), out=out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
