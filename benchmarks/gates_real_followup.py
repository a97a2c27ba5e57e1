"""What gates_real.py's stored run left out (issue 14), without re-running its 104 minutes: task accuracy after a
short LoRA with each strategy's heads, the REINFORCE and A2C gate controllers, and a second seed of its best
controller (PPO with the importance prior).

gates_real.py's run (`docs/results/gates_real.json`, the base) stores, per budget, the heads every strategy kept
(`kept`) with its validation and test loss. This script rebuilds the base's bench from its own settings (model, the
validation and test halves, batches, the stats batch) and checks it: the dense model's losses and each controller
start's validation loss must equal the stored ones within `TOLERANCE` (relative), or it stops and says which. Then
it runs parts, each stored on its own when it finishes (`<results>/<part>.json`, atomic, cl_real's code stamp: the
package files loaded, this script, gates_real.py and the scripts it imports, the base's settings and code version),
so a stopped run resumes at the next part:

* ``lora_<strategy>_<kept %>``: rank-classification accuracy on the test half after gates_real's short LoRA
  (`gates_real.lora_accuracy`: r=8 on q/k/v/o, `lora.steps` steps of 8 answer-labelled training rows, the base's
  seed) with the strategy's stored heads fixed: dense, every strategy of the base at every budget (random: its
  first seed's heads, as gates_real's own `--lora-accuracy` takes), michel_kv_groups;
* ``controller_<algorithm>[_prior]_best[_seed<k>]_<kept %>`` (`CONTROLLERS`): REINFORCE and A2C, and the base's
  PPO controller with the importance prior again with the controller seed `seed + k` (the base's plain PPO found
  the same gates at 75 and 50 % and worse at 25 %; one more seed of it did not fit the CPU time), each run as
  gates_real runs PPO (`gates_real.run_controller`: exactly k heads, `controller_steps` steps rewarded on the
  validation half, the best validated gates at the budget), from the base's best static ranking at that budget
  (lowest validation loss among magnitude, Michel, L0 and michel_iterated: the same start as the base's
  `controller_ppo_best`); each is followed by its ``lora_`` part.

Verdicts, per budget: on test loss, gates_real's rule (`gates_real.verdict`: beats / matches / loses the best static
baseline by the random seeds' standard deviation); on LoRA accuracy, the same rule with the accuracy's binomial
standard error on the test half (sqrt(p (1 - p) / n), ~6 points at 63 rows) as the band. The controller with a
second seed is also judged on the mean over its two seeds (the base's run and this one).

    python benchmarks/gates_real_followup.py [--max-parts N]   # every missing or stale part, then the report
    python benchmarks/gates_real_followup.py --plan            # the parts still to run, with the estimate
    python benchmarks/gates_real_followup.py --report          # docs/results/gates_real_followup.md|json only
    python benchmarks/gates_real_followup.py --quick --base B --out DIR   # on a `gates_real.py --quick` run

Cost on 2 cores (gates_real's estimates): loading ~0.5 min; a LoRA part ~1.1 min (24 steps + scoring), 23 of them;
a controller part ~12-14 min (40 steps of importance, entropy and 8 validation batches), 9 of them; ~150 min in
all (LoRA parts measured 1.8 min each in the real run).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, environment, write_results  # noqa: E402, I001  (first: sets the single-threaded, offline environment)
import torch  # noqa: E402

import cl_real  # noqa: E402
import compression  # noqa: E402
import gate_control  # noqa: E402
import gates_real as gr  # noqa: E402

NAME = "gates_real_followup"
RESULTS_DIR = RESULTS / NAME
BASE = RESULTS / f"{gr.NAME}.json"
SCRIPTS = (Path(__file__).resolve(), *gr.SCRIPTS)


@dataclass(frozen=True)
class ControllerSpec:
    """A controller run from the best static start: its algorithm, policy (`gates_real.PRIORS`) and the offset of its
    seed from the base's (0: the base's seed)."""

    algorithm: str
    prior: str = "none"
    seed_offset: int = 0

    @property
    def name(self) -> str:
        seed = f"_seed{self.seed_offset}" if self.seed_offset else ""
        return f"controller_{self.algorithm}{gr.PRIOR_SUFFIX[self.prior]}_best{seed}"

    @property
    def replicates(self) -> str | None:
        """The base's strategy this run repeats with another seed (None: a controller the base did not run)."""
        return f"controller_{self.algorithm}{gr.PRIOR_SUFFIX[self.prior]}_best" if self.seed_offset else None


#: the controllers the base run did not have (it ran PPO, plain and with the prior, on one seed): REINFORCE, A2C,
#: and the best of the base's controllers (PPO with the importance prior) with a second seed
CONTROLLERS = (
    ControllerSpec("reinforce"),
    ControllerSpec("a2c"),
    ControllerSpec("ppo", "importance", 1),
)
ALGORITHMS = tuple(dict.fromkeys(c.algorithm for c in CONTROLLERS if c.replicates is None))
#: relative tolerance of the bench check against the base's stored losses (other CPUs differ in the last bits)
TOLERANCE = 1e-4
#: unit costs (seconds on 2 threads) for the plan's estimate: a LoRA part as measured in the real run, a controller
#: step as gates_real estimates it
LORA_SECONDS, CONTROLLER_STEP_SECONDS = 108.0, 18.0


def percent(fraction: float) -> int:
    return round(100 * fraction)


def lora_part(strategy: str, fraction: float) -> str:
    return f"lora_{strategy}_{percent(fraction)}"


def _spec(controller: str | ControllerSpec) -> ControllerSpec:
    return controller if isinstance(controller, ControllerSpec) else ControllerSpec(controller)


def controller_name(controller: str | ControllerSpec) -> str:
    """The strategy name of a controller (an algorithm alone: its plain policy on the base's seed)."""
    return _spec(controller).name


def controller_part(controller: str | ControllerSpec, fraction: float) -> str:
    return f"{controller_name(controller)}_{percent(fraction)}"


def parts(base: dict[str, Any], controllers: tuple[ControllerSpec, ...] = CONTROLLERS) -> list[dict[str, Any]]:
    """Every part, in run order: the base's strategies' LoRA parts (dense first, then by budget), then per budget
    each new controller and its LoRA part."""
    out = []
    for row in base["results"]:
        out.append({"kind": "lora", "name": lora_part(row["strategy"], row["fraction"]), "row": row})
    for fraction in base["meta"]["settings"]["budgets"]:
        for spec in controllers:
            name = controller_part(spec, fraction)
            out.append({"kind": "controller", "name": name, "controller": spec, "fraction": fraction})
            out.append({"kind": "lora", "name": lora_part(spec.name, fraction), "after": name})
    return out


def code_version(base: dict[str, Any], part: str) -> cl_real.CodeVersion:
    settings = {**base["meta"]["settings"], "part": part, "base_code_version": base["meta"]["code_version"]}
    return cl_real.CodeVersion(settings, compression.PACKAGE, SCRIPTS)


def load_records(results_dir: Path) -> dict[str, dict[str, Any]]:
    if not results_dir.is_dir():
        return {}
    return {p.stem: json.loads(p.read_text()) for p in sorted(results_dir.glob("*.json"))}


def plan(base: dict[str, Any], records: dict[str, dict[str, Any]]) -> list[tuple[dict[str, Any], str]]:
    """The parts to run, each with why ('missing' or 'stale')."""
    todo = []
    for part in parts(base):
        record = records.get(part["name"])
        if record is None:
            todo.append((part, "missing"))
        elif not cl_real.is_current(record, code_version(base, part["name"])):
            todo.append((part, "stale"))
    return todo


def estimated_minutes(base: dict[str, Any], todo: list[tuple[dict[str, Any], str]]) -> float:
    steps = base["meta"]["settings"]["controller_steps"]
    seconds = sum(LORA_SECONDS if p["kind"] == "lora" else steps * CONTROLLER_STEP_SECONDS for p, _ in todo)
    return (gr.LOAD + seconds) / 60


# ---------------------------------------------------------------------------------------------------- the bench
def gates_from(kept: list[int], shape: tuple[int, int]) -> torch.Tensor:
    gates = torch.zeros(shape[0] * shape[1])
    gates[torch.tensor(kept, dtype=torch.long)] = 1.0
    return gates.view(*shape)


def _close(measured: float, stored: float) -> bool:
    return math.isclose(measured, stored, rel_tol=TOLERANCE)


def build_bench(base: dict[str, Any], data: Path) -> gr.Bench:
    """gates_real's bench from the base's settings (its `run` before the strategies), checked against the base's
    dense losses."""
    from hf_adaptive.models import gate_model
    from hf_adaptive.tasks import CausalLMCollator

    s = base["meta"]["settings"]
    torch.set_num_threads(s["threads"])
    model, tokenizer, tasks = gr.load_model(s, data)
    collate = CausalLMCollator(tokenizer)
    val_tasks, test_tasks = gr.split_halves(tasks, s["rows_per_task"])
    val_rows = gr.text_rows(val_tasks, tokenizer, s, "eval", whole_text=True)
    test_rows = gr.text_rows(test_tasks, tokenizer, s, "eval", whole_text=True)
    bs = s["batch_size"]
    bench = gr.Bench(
        s=s,
        model=model,
        gated=gate_model(model),
        tokenizer=tokenizer,
        tasks=tasks,
        test_tasks=test_tasks,
        val_batches=gate_control.batches(val_rows, collate, bs),
        test_batches=gate_control.batches(test_rows, collate, bs),
        stats_batches=[collate(val_rows[:: max(1, len(val_rows) // bs)][:bs])],
    )
    dense = bench.scored(torch.ones(*bench.shape))
    for key in ("val_loss", "test_loss"):
        if not _close(dense[key], base["dense"][key]):
            raise RuntimeError(
                f"the rebuilt bench is not the base run's: dense {key} {dense[key]:.6f} vs {base['dense'][key]:.6f} "
                f"stored (relative tolerance {TOLERANCE}); run gates_real.py again, or check --data"
            )
    return bench


def rows_at(base: dict[str, Any], fraction: float) -> list[dict[str, Any]]:
    return [r for r in base["results"] if r["fraction"] == fraction]


def run_controller_part(
    bench: gr.Bench, base: dict[str, Any], controller: str | ControllerSpec, fraction: float
) -> dict[str, Any]:
    """A controller from the best static ranking at `fraction`, as gates_real's `budget_rows` runs PPO."""
    from hf_adaptive.control.config import GateControllerConfig

    spec = _spec(controller)
    algorithm, seed = spec.algorithm, bench.s["seed"] + spec.seed_offset
    s, (L, H) = bench.s, bench.shape
    at = rows_at(base, fraction)
    k = at[0]["heads"]
    source = gr.best_static(at)
    start_row = next(r for r in at if r["strategy"] == source)
    start = gates_from(start_row["kept"], (L, H))
    measured = bench.scored(start, with_val=True)["val_loss"]
    if not _close(measured, start_row["val_loss"]):
        raise RuntimeError(
            f"{source}'s stored heads at {fraction} give validation loss {measured:.6f}, the base stored "
            f"{start_row['val_loss']:.6f}: the bench differs from the base run's"
        )
    cfg = GateControllerConfig(
        algorithm=algorithm, min_active_heads=k, max_active_heads=k, seed=seed, **s["controller"]
    )
    strength = s["prior_strength"] if spec.prior == "importance" else 0.0
    t = time.perf_counter()
    ctrl = gr.run_controller(
        bench.model, bench.gated, bench.val_batches, bench.stats_batches, cfg, s["controller_steps"], start, strength
    )
    best = min((pt for pt in ctrl.archive.points if pt.active_heads == k), key=lambda pt: pt.loss)
    gates = best.gates.view(L, H)
    seconds = round(time.perf_counter() - t, 1)
    row = {
        "strategy": spec.name,
        "fraction": fraction,
        "heads": k,
        "val_loss": best.loss,
        **bench.scored(gates, with_val=False),
        "kept": gr.kept_ids(gates),
        "best_step": best.step,
    }
    curve = [{key: r[key] for key in ("step", "loss", "reward", "active_heads")} for r in ctrl.log]
    run = {
        "strategy": row["strategy"],
        "algorithm": algorithm,
        "init": "best",
        "prior": spec.prior,
        "seed": seed,
        "replicates": spec.replicates,
        "start": source,
        "fraction": fraction,
        "heads": k,
        "seconds": seconds,
        "curve": curve,
        **gr.curve_summary(ctrl.log, k),
    }
    return {"row": row, "run": run}


def run_lora_part(bench: gr.Bench, kept: list[int], strategy: str, fraction: float) -> dict[str, Any]:
    train_rows = gr.text_rows(bench.tasks, bench.tokenizer, bench.s, "train", whole_text=False)
    t = time.perf_counter()
    acc = gr.lora_accuracy(
        bench.model, bench.gated, gates_from(kept, bench.shape), bench.tokenizer, train_rows, bench.test_tasks, bench.s
    )
    return {"strategy": strategy, "fraction": fraction, "heads": len(kept), **acc,
            "seconds": round(time.perf_counter() - t, 1)}  # fmt: skip


def run_parts(base: dict[str, Any], data: Path, results_dir: Path, max_parts: int | None) -> int:
    """Run the plan's parts in order (at most `max_parts`), storing each as it finishes; returns how many ran."""
    records = load_records(results_dir)
    todo = plan(base, records)[:max_parts]
    if not todo:
        return 0
    bench = build_bench(base, data)
    for part, why in todo:
        name = part["name"]
        print(f"=== {name} ({why})", flush=True)
        t = time.perf_counter()
        if part["kind"] == "controller":
            result = run_controller_part(bench, base, part["controller"], part["fraction"])
        elif "row" in part:
            row = part["row"]
            result = run_lora_part(bench, row["kept"], row["strategy"], row["fraction"])
        else:
            source = records.get(part["after"])
            if source is None:
                raise RuntimeError(f"{name} needs {part['after']}'s heads, which is not stored")
            row = source["row"]
            result = run_lora_part(bench, row["kept"], row["strategy"], row["fraction"])
        record = {"part": name, "kind": part["kind"], **result, "wall_seconds": time.perf_counter() - t,
                  "base_code_version": base["meta"]["code_version"], "environment": environment()}  # fmt: skip
        cl_real.write_stamped(results_dir / f"{name}.json", cl_real._json_safe(record), code_version(base, name))
        records[name] = record
        summary = record.get("accuracy", (record.get("row") or {}).get("test_loss"))
        print(f"    {name}: {summary} in {record['wall_seconds'] / 60:.1f} min", flush=True)
    return len(todo)


# -------------------------------------------------------------------------------------------------------- report
def _se(p: float, n: int) -> float:
    return math.sqrt(max(p * (1 - p), 1e-12) / n)


def _mean(values: list[float | None]) -> float | None:
    return None if any(v is None for v in values) else sum(values) / len(values)  # type: ignore[arg-type]


def _seed_means(
    rows: list[dict[str, Any]],
    seed: int,
    best: float,
    issue: float,
    spread: float,
    best_acc: dict[str, Any] | None,
    n_test: int,
) -> list[dict[str, Any]]:
    """Each base controller with a second seed at this budget: both seeds' test loss and LoRA accuracy, their means,
    and the means' verdicts by the same rules as one run's."""
    by_strategy = {r["strategy"]: r for r in rows}
    out = []
    for c in CONTROLLERS:
        if c.replicates is None or c.replicates not in by_strategy or c.name not in by_strategy:
            continue
        pair = [by_strategy[c.replicates], by_strategy[c.name]]
        loss = _mean([r["test_loss"] for r in pair])
        acc = _mean([r["lora_accuracy"] for r in pair])
        out.append(
            {
                "strategy": c.replicates,
                "seeds": [seed, seed + c.seed_offset],
                "test_loss": [r["test_loss"] for r in pair],
                "mean_test_loss": loss,
                "vs_best_static": gr.verdict(loss, best, spread),
                "vs_issue_static": gr.verdict(loss, issue, spread),
                "lora_accuracy": [r["lora_accuracy"] for r in pair],
                "mean_lora_accuracy": acc,
                "accuracy_vs_best_static": None
                if acc is None or best_acc is None
                else gr.verdict(-acc, -best_acc["lora_accuracy"], _se(best_acc["lora_accuracy"], n_test)),
            }
        )
    return out


def summarize(base: dict[str, Any], records: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per budget: every strategy's test loss and LoRA accuracy, the new controllers' rows and their verdicts."""
    current = {n: cl_real.is_current(r, code_version(base, n)) for n, r in records.items()}
    lora = {(r["strategy"], r["fraction"]): r for r in records.values() if r.get("kind") == "lora"}
    n_test = base["meta"]["test_rows"]
    budgets = []
    for verdict in base["verdicts"]:
        fraction = verdict["fraction"]
        rows = [dict(r) for r in rows_at(base, fraction)]
        new = [records[controller_part(c, fraction)] for c in CONTROLLERS if controller_part(c, fraction) in records]
        rows += [dict(r["row"]) for r in new]
        for r in rows:
            entry = lora.get((r["strategy"], fraction))
            r["lora_accuracy"] = None if entry is None else entry["accuracy"]
        best, issue, spread = (
            verdict["best_static_test_loss"],
            verdict["best_issue_static_test_loss"],
            verdict["random_std"],
        )
        loss_verdicts = {
            r["row"]["strategy"]: {
                "vs_best_static": gr.verdict(r["row"]["test_loss"], best, spread),
                "vs_issue_static": gr.verdict(r["row"]["test_loss"], issue, spread),
            }
            for r in new
        }
        static = [r for r in rows if r["strategy"] in gr.STATIC and r["lora_accuracy"] is not None]
        best_acc = max(static, key=lambda r: r["lora_accuracy"]) if static else None
        accuracy_verdicts = {}
        if best_acc is not None:
            band = _se(best_acc["lora_accuracy"], n_test)
            for r in rows:
                if r["strategy"].startswith("controller") and r["lora_accuracy"] is not None:
                    accuracy_verdicts[r["strategy"]] = gr.verdict(-r["lora_accuracy"], -best_acc["lora_accuracy"], band)
        seed_means = _seed_means(rows, base["meta"]["settings"]["seed"], best, issue, spread, best_acc, n_test)
        budgets.append(
            {
                "fraction": fraction,
                "heads": verdict["heads"],
                "rows": rows,
                "best_static": verdict["best_static"],
                "best_static_test_loss": best,
                "best_issue_static_test_loss": issue,
                "random_std": spread,
                "loss_verdicts": loss_verdicts,
                "best_static_accuracy": None if best_acc is None else {
                    "strategy": best_acc["strategy"], "accuracy": best_acc["lora_accuracy"],
                    "standard_error": _se(best_acc["lora_accuracy"], n_test)},
                "accuracy_verdicts": accuracy_verdicts,
                "seed_means": seed_means,
                "controller_runs": [r["run"] for r in new],
            }
        )  # fmt: skip
    dense = lora.get(("dense", 1.0))
    return {
        "base": {"code_version": base["meta"]["code_version"], "code_commit": base["meta"].get("code_commit"),
                 "dense": base["dense"], "test_rows": n_test},
        "dense_lora_accuracy": None if dense is None else dense["accuracy"],
        "budgets": budgets,
        "stale_parts": sorted(n for n, ok in current.items() if not ok),
        "todo": [{"part": p["name"], "why": why} for p, why in plan(base, records)],
    }  # fmt: skip


def _f(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def report_markdown(summary: dict[str, Any]) -> str:
    base = summary["base"]
    lines = [
        "# Head gates on SmolLM2: accuracy after a short LoRA, the REINFORCE / A2C controllers and PPO's second seed "
        "(issue 14)",
        "",
        f"Follow-up of gates_real.py's stored run (code version {base['code_version']}, commit {base['code_commit']}; "
        f"dense test loss {base['dense']['test_loss']:.4f}) by `benchmarks/gates_real_followup.py`: the same bench, "
        "rebuilt and checked against the stored losses. LoRA accuracy: rank classification on the test half "
        f"({base['test_rows']} rows) after gates_real's short LoRA with the heads fixed. Dense model after the same "
        f"LoRA: {_f(summary['dense_lora_accuracy'], 3)}.",
        "",
    ]
    for b in summary["budgets"]:
        lines += [f"## {percent(b['fraction'])} % of the heads kept ({b['heads']})", ""]
        lines += ["| strategy | val loss | test loss | LoRA accuracy |", "|---|---|---|---|"]
        for r in sorted(b["rows"], key=lambda r: r["test_loss"]):
            lines.append(
                f"| {r['strategy']} | {_f(r.get('val_loss'))} | {_f(r['test_loss'])} | {_f(r['lora_accuracy'], 3)} |"
            )
        lines.append("")
        for name, v in b["loss_verdicts"].items():
            lines.append(
                f"- {name}, test loss: {v['vs_best_static']} the best static baseline ({b['best_static']}), "
                f"{v['vs_issue_static']} the best of the issue's four (band: random std {b['random_std']:.3f})."
            )
        acc = b["best_static_accuracy"]
        if acc is not None:
            for name, v in b["accuracy_verdicts"].items():
                lines.append(
                    f"- {name}, LoRA accuracy: {v} the best static baseline's ({acc['strategy']} "
                    f"{acc['accuracy']:.3f}; band: its standard error {acc['standard_error']:.3f})."
                )
        for m in b.get("seed_means", []):
            acc = "" if m["mean_lora_accuracy"] is None else (
                f"; LoRA accuracy {m['mean_lora_accuracy']:.3f} [{m['lora_accuracy'][0]:.3f}, "
                f"{m['lora_accuracy'][1]:.3f}]: {m['accuracy_vs_best_static']} the best static baseline's"
            )  # fmt: skip
            lines.append(
                f"- {m['strategy']} over seeds {m['seeds']}: test loss {m['mean_test_loss']:.4f} "
                f"[{m['test_loss'][0]:.4f}, {m['test_loss'][1]:.4f}]: {m['vs_best_static']} the best static baseline "
                f"({b['best_static']}), {m['vs_issue_static']} the best of the issue's four{acc}."
            )
        for run in b["controller_runs"]:
            lines.append(
                f"- {run['strategy']}: start {run['start']} (val {run['start_val_loss']:.4f}), first action "
                f"{_f(run['first_action_val_loss'])}, best {run['best_val_loss']:.4f} at step {run['best_step']}; "
                f"reward first / last quarter {_f(run['first_quarter_reward'], 3)} / "
                f"{_f(run['last_quarter_reward'], 3)}; {run['seconds'] / 60:.1f} min."
            )
        lines.append("")
    if summary["stale_parts"]:
        lines += [f"Stale parts (made by other code): {summary['stale_parts']}.", ""]
    if summary["todo"]:
        lines += [f"Parts still to run: {len(summary['todo'])} (next: {summary['todo'][0]['part']}).", ""]
    return "\n".join(lines)


def merged_result(base: dict[str, Any], records: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The base's result with the new controllers' rows and runs added: what `gates_real.plot` draws, so the
    Pareto plot has every method (PPO from the base, REINFORCE, A2C and PPO's second seed from here) on one
    figure."""
    new = [records[name] for name in sorted(records) if records[name].get("kind") == "controller"]
    return {
        **base,
        "results": [*base["results"], *(r["row"] for r in new)],
        "controllers": [*base["controllers"], *(r["run"] for r in new)],
    }


def plot_accuracy(path: Path, summary: dict[str, Any]) -> None:
    """LoRA accuracy against the fraction of heads kept, per strategy, with each point's binomial standard error
    (the band the accuracy verdicts use) and the dense model's accuracy as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_test = summary["base"]["test_rows"]
    points: dict[str, list[tuple[float, float]]] = {}
    for b in summary["budgets"]:
        for r in b["rows"]:
            if r["lora_accuracy"] is not None:
                points.setdefault(r["strategy"], []).append((b["fraction"], r["lora_accuracy"]))
    fig, ax = plt.subplots(figsize=(7, 4.6))
    for name, pts in sorted(points.items()):
        pts.sort()
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        marker = "D" if name == "michel_kv_groups" else ("o" if name.startswith("controller") else "s")
        ax.errorbar(xs, ys, yerr=[_se(y, n_test) for y in ys], marker=marker, capsize=3, lw=1, label=name)
    if summary["dense_lora_accuracy"] is not None:
        ax.axhline(summary["dense_lora_accuracy"], color="k", ls="--", lw=1, label="dense")
    ax.set(xlabel="fraction of query heads kept", ylabel=f"accuracy after the short LoRA ({n_test} test rows)",
           title="Heads kept vs accuracy (bars: binomial standard error)")  # fmt: skip
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_report(base: dict[str, Any], results_dir: Path, out: Path) -> str:
    """The summary, its markdown and two plots: every method's test loss and the controllers' reward curves
    (`<name>_pareto.png`, gates_real's plot) and the LoRA accuracies (`<name>_accuracy.png`)."""
    records = load_records(results_dir)
    summary = summarize(base, records)
    pngs = {"pareto": f"{NAME}_pareto.png", "accuracy": f"{NAME}_accuracy.png"}
    gr.plot(Path(out) / pngs["pareto"], merged_result(base, records))
    plot_accuracy(Path(out) / pngs["accuracy"], summary)
    markdown = report_markdown(summary) + (
        f"\nPlots: [{pngs['pareto']}]({pngs['pareto']}) (test loss vs heads kept for every method, the base's PPO "
        f"and these controllers' reward and best validated loss per step), [{pngs['accuracy']}]({pngs['accuracy']}) "
        "(LoRA accuracy vs heads kept).\n"
    )
    write_results(NAME, cl_real._json_safe(summary), markdown, out=out)
    return markdown


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--plan", action="store_true", help="print the parts still to run and exit")
    mode.add_argument("--report", action="store_true", help="only rebuild the report from the stored parts")
    parser.add_argument("--quick", action="store_true", help="on a `gates_real.py --quick` base (needs --base, --out)")
    parser.add_argument("--base", type=Path, default=None, help=f"gates_real's result JSON (default {BASE})")
    parser.add_argument("--max-parts", type=int, default=None, help="run at most this many parts (>= 1)")
    parser.add_argument("--data", type=Path, default=compression.DEFAULT_DATA, help="cl_benchmark folder")
    parser.add_argument("--results", type=Path, default=None, help="folder of the per-part JSON files")
    parser.add_argument("--out", type=Path, default=None, help="folder of the report (md, json)")
    ns = parser.parse_args(argv)
    if ns.max_parts is not None and ns.max_parts < 1:
        parser.error(f"--max-parts={ns.max_parts} is not allowed: an integer >= 1")
    if ns.quick and (ns.base is None or ns.out is None):
        parser.error("--quick needs --base (a gates_real.py --quick result) and --out (outside docs/results)")
    if ns.quick and ns.out.resolve().is_relative_to(RESULTS.resolve()):
        parser.error(f"--out={ns.out} is not allowed with --quick: it is inside {RESULTS}")
    path = ns.base or BASE
    if not path.is_file():
        parser.error(f"--base={path} is not allowed: no such file (run benchmarks/gates_real.py first)")
    base = json.loads(path.read_text())
    if bool(base["meta"].get("quick")) != ns.quick:
        parser.error(
            f"--base={path} is not allowed: a {'quick' if base['meta'].get('quick') else 'real'} run "
            f"({'with' if base['meta'].get('quick') else 'without'} --quick only)"
        )
    results_dir = ns.results or (ns.out / NAME if ns.quick else RESULTS_DIR)
    out = ns.out or RESULTS
    if ns.plan:
        todo = plan(base, load_records(results_dir))
        print(f"{len(todo)} part(s) to run, ~{estimated_minutes(base, todo):.0f} min on 2 cores:")
        for part, why in todo:
            print(f"  {part['name']} ({why})")
        return 0
    if not ns.report:
        data = ns.data if not ns.quick else Path(tempfile.gettempdir())  # the quick model's tasks are built in
        run_parts(base, data, results_dir, ns.max_parts)
    print(build_report(base, results_dir, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
