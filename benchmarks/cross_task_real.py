"""Learning across tasks on the real model (issue 15): O-LoRA, OSF, LwF, UPGrad and Reptile-initialised experts,
each alone and with replay, against EWC + replay and joint training on cl_real.py's benchmark.

The issue asks for "one table on the real benchmark: each method alone and its best combination with replay, average
accuracy, BWT, wall time, 2 seeds, next to EWC + replay and joint training", measured "on the real benchmark
(`benchmarks/cl_real.py`, SmolLM2, same sequence and budgets) against the best existing method (EWC + replay)".
This script is that measurement, built on cl_real.py (imported, not copied): its recipe (`cl_real.SETTINGS`:
SmolLM2-135M, SST-2 -> IMDB -> MNLI -> WiC -> BoolQA, shared LoRA r=8 on q,k,v,o, lr 2e-3, 256 train / 100 eval rows
per task, 1 epoch, 2 threads), its `Method`, its `run_one` (the same trainer set-up, timings and record), its code
version stamps (`CodeVersion`: the manifest of every package file a run loaded, this file, cl_real.py, common.py and
the settings; a stale run is re-run) and its report helpers. Each method below changes only its own options.
cl_real's `run_one` looks methods up in `cl_real.METHODS` (and scales them for `--smoke` by `cl_real.SMOKE_OPTIONS`):
`cl_real_knows` adds this script's methods to both for the duration of a run, restoring them after, so cl_real.py
itself is untouched.

Methods (`METHODS`; options from each mechanism's documented defaults and help, nothing tuned on the eval sets; the
why of each choice is in the comments at `OLORA`, `OSF`, `DISTILLATION`, `GRAD_AGGREGATION`, `META_INIT`):

* `olora`: O-LoRA (`olora` plugin): a fresh LoRA per task (the recipe's LoRA shape), the finished ones merged and
  frozen, an orthogonality loss between the new LoRA's A and the earlier ones' (lambda_1 0.5);
* `osf`: `adapter_strategy: osf` (peft's orthogonal subspace fine-tuning): the top singular directions of each q,k,v,o
  matrix frozen (50 % of them for the first task, +10 % per task up to 90 %), the rest trained orthogonal to them;
* `distillation`: Learning without Forgetting (`distillation` plugin): the teacher is the model at the previous
  task's end (a snapshot of the LoRA tensors), forward KL at the answer positions, weight 1, temperature 1;
* `grad_aggregation`: UPGrad (`grad_aggregation` plugin, torchjd) between the current task's loss and replay's term.
  It needs a second objective to aggregate, so its "alone" form is with replay (cl_real's replay options): there is
  no `grad_aggregation_replay`, `grad_aggregation` is that combination;
* `meta_init`: expert routing (cl_real's `expert_routing` options) whose created experts start from a Reptile
  initialisation meta-learned over the earlier tasks' kept rows (`meta_init_method: reptile`), where cl_real's
  `expert_routing` starts each created expert fresh (peft's LoRA init);
* `olora_replay`, `osf_replay`, `distillation_replay`, `meta_init_replay`: the same with cl_real's replay
  (`cl_real.REPLAY`: a balanced buffer of 256 rows, 4 replayed rows per step, alpha 1). The package refuses none of
  these combinations (the smoke test runs every one end to end); the only combination left out is
  `grad_aggregation_replay`, for the reason above.

Seeds 0 and 1 for every method. One JSON file per (method, seed), `docs/results/cross_task_real/<method>_seed<k>.json`
(cl_real's record, stamped as cl_real stamps its own):

    python benchmarks/cross_task_real.py --all [--max-runs N]      # every missing or stale run, one process each
    python benchmarks/cross_task_real.py --method olora --seed 0   # one run
    python benchmarks/cross_task_real.py --plan                    # what --all would run, and why
    python benchmarks/cross_task_real.py --report                  # docs/results/cross_task_real.{md,json} only
    python benchmarks/cross_task_real.py --smoke [--method M]      # the pipeline on a tiny Gemma, into a temp dir

Model and data as in cl_real.py (`HF_ADAPTIVE_CACHE` for SmolLM2; `--data`, default `../shared/data/cl_benchmark`).
`--smoke`: cl_real's smoke set-up (tiny Gemma with a word-level tokenizer, SST-2 and QQP x 16 rows) with batches of 4,
so every task has 4 steps (with cl_real's 8 the second task's 2 steps include the warm-up's step at LR 0, and a loss
term such as O-LoRA's would barely act), and the smoke budgets of `SMOKE_OPTIONS`; never into docs/results.

Report (`--report`, also after `--all` and `--smoke`): one table, a row per method of this script (current runs only:
avg acc, BWT and forgetting as `mean [min, max]` over the seeds, wall time, runs done / wanted, the estimate) and
reference rows read from cl_real.py's stored records (`docs/results/cl_real/`, `--reference`): EWC + replay and joint,
and the same-recipe counterpart each method builds on (naive, replay, expert_routing), with their code version and
whether cl_real's own rule finds them current. Then a line per method: "helps" vs EWC + replay when its seed-mean
average accuracy is above the highest of EWC + replay's seeds (i.e. above EWC + replay's seed spread; `HELPS_RULE`),
else "does not help", or "not run yet" without a current run; with the difference to its counterpart.

Estimated wall time per run (`EST_MINUTES`; 2 quiet cores; from cl_real's measured runs: naive 9 min (9.0-9.1),
replay 12.2, EWC + replay 12.7-14.3, one LoRA per task 9.9; 2-4x that when other jobs share the cores):
* olora ~9.5 min: naive's cost; the orthogonality term is 120 products of 8 x 576 matrices per step, the merge of the
  finished adapter a few ms per task. olora_replay ~12.5 (replay's cost).
* osf ~12 min: the trained part is half or more of every q,k,v,o matrix (~24 M parameters instead of LoRA's 0.9 M):
  Adam's update and the projection of the factors after every step, the factors' product in every forward and a
  re-decomposition (120 SVDs of <= 576 x 576) per task: ~1.3x naive, the least certain estimate. osf_replay ~16.
* distillation ~10.5 min: the teacher's forward (no gradient) on every batch of tasks 2-5, ~1/3 of a step: +~100 s.
  distillation_replay ~14 (the teacher sees the current batch, not the replayed rows).
* grad_aggregation ~13 min: replay's 12.2 and the torchjd step: one `autograd.grad` per objective (task, replay) in
  place of the summed backward, a 2 x 0.9 M Jacobian over the LoRA parameters and UPGrad on its 2 x 2 Gramian (ms).
* meta_init ~37 min: expert routing ~12 (one LoRA per task's 9.9, signatures and the router's evaluations; cl_real's
  routed run took 68 min only because other jobs shared the cores) plus Reptile: at each created expert, 10 outer
  steps x (earlier tasks) x 5 inner SGD steps of 8 rows, 50 + 100 + 150 + 200 = 500 steps over the sequence, each
  a training step's cost or more (~3 s: the inner loop's loss takes the full logits of every position, not the
  answer's only): ~25 min. meta_init_replay ~40. (`meta_init_tasks_per_step` 1 would cut the 500 steps to 200; the
  default, all earlier tasks, is kept.)
Total: ~165 min per seed, ~5.5 h for the 18 runs on 2 quiet cores (11-22 h under load); `--all` runs seed 0 of every
method first (the cheap ones first, the Reptile runs last), so a partial run already has one seed of most.

OSF's learning rate (`--osf-lr-probe`): every other method trains with the recipe's learning rate 2e-3, chosen for
LoRA. OSF trains full matrices' low singular directions, for which full fine-tuning rates are usually far smaller,
and its first run at 2e-3 ended at zero-shot accuracy (0.504) with a first-task training loss of 1.01 where LoRA
reaches 0.47. The probe trains OSF on the first task alone (SST-2, seed 0, the recipe otherwise) at each of
`OSF_LR_CANDIDATES` (the recipe's 2e-3, then a decade and two decades below: 2e-5 is TRL's SFT default for full
fine-tuning) and picks the lowest mean training loss: the training data only, never the evaluation rows (their
accuracy is printed beside it, not used). `OSF_LEARNING_RATE` holds the probe's choice (a test checks it against the
committed `cross_task_real_osf_lr_probe.json`); ~3 min per candidate.
Seeds: the training seed (LoRA initialisation, data order, replay draws); the router's, signature's and Reptile's own
seeds keep their default 0 (as in cl_real's expert_routing), and the data subsets are the same for every seed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cl_real  # noqa: E402
from cl_real import Method  # noqa: E402
from common import RESULTS, write_results  # noqa: E402

NAME = "cross_task_real"
RESULTS_DIR = RESULTS / NAME
#: this file and what it imports from (a run's code version covers them)
SCRIPTS = (Path(__file__).resolve(), *cl_real.SCRIPTS)
SEEDS = (0, 1)

#: cl_real's recipe, unchanged: the same sequence, budgets and training settings as its EWC + replay and joint runs
SETTINGS: dict[str, Any] = cl_real.SETTINGS
#: cl_real's smoke set-up with batches of 4 (4 steps per task of 16 rows: the second task's loss terms act)
SMOKE_SETTINGS: dict[str, Any] = {
    **cl_real.SMOKE_SETTINGS,
    "config": {**cl_real.SMOKE_SETTINGS["config"], "per_device_train_batch_size": 4},
}

# ------------------------------------------------------------------------------------------------------ methods
#: O-LoRA: lambda_1 = 0.5 and lambda_2 = 0, the package's defaults, which are the values of the O-LoRA authors'
#: scripts (`OLoRAConfig`'s help); the plugin adds its own LoRA per task (the recipe's shape: r=8 on q,k,v,o) and
#: refuses any trainer adapter_strategy but 'full'
OLORA = {"adapter_strategy": "full", "olora_orth_lambda": 0.5, "olora_l2_lambda": 0.0}
#: OSF: the package's defaults: peft's own default of 50 % of each matrix's singular directions frozen for the first
#: task, +10 % per later task (what the finished tasks use joins the frozen part), capped at 90 %, reached exactly at
#: the 5th task; `project_updates` keeps the factors orthogonal to the frozen directions after every Adam step (peft
#: projects only the gradients, which Adam's per-entry scaling leaks: the help says True makes the protection exact)
#: OSF's learning rate, chosen by `--osf-lr-probe` (the module docstring; None: the recipe's): session 12's probe,
#: mean first-task training loss 1.017 at 2e-3, 0.546 at 2e-4, 0.535 at 2e-5 (cross_task_real_osf_lr_probe.md)
OSF_LEARNING_RATE: float | None = 2e-5
OSF_LR_CANDIDATES = (2e-3, 2e-4, 2e-5)
OSF = {
    "adapter_strategy": "osf",
    "osf_effective_rank": 0.5,
    "osf_rank_step": 0.1,
    "osf_max_effective_rank": 0.9,
    "osf_project_updates": True,
    **({"learning_rate": OSF_LEARNING_RATE} if OSF_LEARNING_RATE is not None else {}),
}
#: LwF (Li & Hoiem 2016): the teacher is the model at the previous task's end (a snapshot of the LoRA tensors only),
#: forward KL(teacher || model) at the positions that predict an answer token (the positions the task loss trains;
#: with answer-only logits the teacher runs on the same kept columns), the defaults' weight 1 and temperature 1
#: (no T^2 rescaling, as in TRL); no hidden-state term (`distill_feature_layers` empty, the default)
DISTILLATION = {
    "distill_lambda": 1.0,
    "distill_divergence": "forward_kl",
    "distill_temperature": 1.0,
    "distill_positions": "answer",
    "distill_teacher": "previous_task",
}
#: UPGrad (the default aggregator: the update does not increase any objective, to first order), each loss term its
#: own objective (the default 'terms'; with replay the only term it equals 'task_vs_rest'), on the summed loss's
#: scale (the default 'sum': "a learning rate tuned without aggregation carries over", the recipe's 2e-3)
GRAD_AGGREGATION = {
    "grad_aggregation_aggregator": "upgrad",
    "grad_aggregation_objectives": "terms",
    "grad_aggregation_scale": "sum",
}
#: Reptile (Nichol et al. 2018) over the earlier tasks' kept rows, with `MetaInitConfig`'s defaults: 5 inner SGD
#: steps at 0.05 on 8 rows, 10 outer steps of epsilon 0.5 at each created expert, 32 rows kept per finished task,
#: every earlier task in each outer step; on cl_real's expert routing options (adapter_strategy 'full': the router
#: chooses the expert; 50 eval rows per routing check, 16 rows per signature)
META_INIT = {
    **cl_real.ROUTING,
    "meta_init_method": "reptile",
    "meta_init_inner_steps": 5,
    "meta_init_inner_lr": 0.05,
    "meta_init_outer_steps": 10,
    "meta_init_outer_lr": 0.5,
    "meta_init_support_batch_size": 8,
    "meta_init_rows_per_task": 32,
}
#: cl_real's replay: a class-balanced buffer of 256 rows, 4 replayed rows per step, weight 1
REPLAY = cl_real.REPLAY

METHODS: dict[str, Method] = {
    "olora": Method(("olora",), OLORA),
    "osf": Method((), OSF),
    "distillation": Method(("distillation",), DISTILLATION),
    # needs a second objective: its "alone" form is with replay (there is no grad_aggregation_replay)
    "grad_aggregation": Method(("replay", "grad_aggregation"), {**REPLAY, **GRAD_AGGREGATION}),
    "meta_init": Method(("expert_routing",), META_INIT),
    "olora_replay": Method(("olora", "replay"), {**OLORA, **REPLAY}),
    "osf_replay": Method(("replay",), {**OSF, **REPLAY}),
    "distillation_replay": Method(("distillation", "replay"), {**DISTILLATION, **REPLAY}),
    "meta_init_replay": Method(("expert_routing", "replay"), {**META_INIT, **REPLAY}),
}
#: combinations with replay not in `METHODS`, and why
LEFT_OUT = {
    "grad_aggregation_replay": "grad_aggregation aggregates the task's gradient with replay's: its alone form is "
    "already the combination with replay (without a second objective there is nothing to aggregate)",
}
#: what each method is measured against besides EWC + replay: the cl_real method with the same recipe minus the
#: mechanism (a cl_real record)
COUNTERPART = {
    "olora": "naive",
    "osf": "naive",
    "distillation": "naive",
    "grad_aggregation": "replay",
    "meta_init": "expert_routing",
    "olora_replay": "replay",
    "osf_replay": "replay",
    "distillation_replay": "replay",
    "meta_init_replay": "expert_routing",
}
#: what the options mean, for the report
DESCRIPTION = {
    "olora": "O-LoRA: a LoRA per task, earlier ones merged and frozen, orthogonality loss lambda_1 0.5",
    "osf": "OSF: 50 % (+10 %/task, max 90 %) of each q,k,v,o matrix's singular directions frozen, the rest trained",
    "distillation": "LwF: forward KL to the previous task's model at answer positions, weight 1, T 1",
    "grad_aggregation": "UPGrad between the task loss and replay's term (replay needed: its alone form)",
    "meta_init": "expert routing, created experts from a Reptile init over earlier tasks (cl_real's: fresh)",
    "olora_replay": "O-LoRA + replay",
    "osf_replay": "OSF + replay",
    "distillation_replay": "LwF + replay",
    "meta_init_replay": "Reptile-initialised expert routing + replay",
}
#: the estimated wall time of one run, minutes, on 2 quiet cores (the module docstring says how)
EST_MINUTES = {
    "olora": 9.5,
    "osf": 12.0,
    "distillation": 10.5,
    "grad_aggregation": 13.0,
    "meta_init": 37.0,
    "olora_replay": 12.5,
    "osf_replay": 16.0,
    "distillation_replay": 14.0,
    "meta_init_replay": 40.0,
}
#: `--all`'s order within a seed: the cheap ones first, the Reptile runs last
PLAN_ORDER = [
    "olora",
    "distillation",
    "osf",
    "grad_aggregation",
    "olora_replay",
    "distillation_replay",
    "osf_replay",
    "meta_init",
    "meta_init_replay",
]
#: options scaled down for `--smoke`'s 16-row tasks (only those a method sets), on top of cl_real's `SMOKE_OPTIONS`
SMOKE_OPTIONS = {
    "meta_init_inner_steps": 2,
    "meta_init_outer_steps": 2,
    "meta_init_support_batch_size": 4,
    "meta_init_rows_per_task": 8,
}

#: the reference method of the verdict, and the reference rows read from cl_real's records
BEST_EXISTING = "ewc_replay"
REFERENCES = ("ewc_replay", "joint", "naive", "replay", "expert_routing")
REFERENCE_LABEL = {
    "ewc_replay": "EWC + replay",
    "joint": "joint",
    "naive": "naive",
    "replay": "replay",
    "expert_routing": "expert routing (fresh experts)",
}
HELPS_RULE = (
    "a method helps vs EWC + replay when the mean of its seeds' average accuracies is above the highest of EWC + "
    "replay's seeds (above EWC + replay's seed spread); otherwise it does not help"
)

if set(METHODS) & set(cl_real.METHODS):  # cl_real_knows would shadow cl_real's own methods
    raise RuntimeError(f"method names shared with cl_real.py: {sorted(set(METHODS) & set(cl_real.METHODS))}")
if set(METHODS) != set(PLAN_ORDER) or set(METHODS) != set(EST_MINUTES):
    raise RuntimeError("METHODS, PLAN_ORDER and EST_MINUTES must name the same methods")


@contextlib.contextmanager
def cl_real_knows(methods: dict[str, Method] = METHODS, smoke_options: dict[str, Any] = SMOKE_OPTIONS) -> Iterator:
    """For the duration, `cl_real.METHODS` also holds `methods` and `cl_real.SMOKE_OPTIONS` also `smoke_options`, so
    cl_real's `run_one` (which looks both up by name) runs this script's methods; both are restored after."""
    saved = cl_real.METHODS, cl_real.SMOKE_OPTIONS
    cl_real.METHODS = {**saved[0], **methods}
    cl_real.SMOKE_OPTIONS = {**saved[1], **smoke_options}
    try:
        yield
    finally:
        cl_real.METHODS, cl_real.SMOKE_OPTIONS = saved


def method_options(method: str, smoke: bool = False) -> dict[str, Any]:
    """The options `method` adds to the recipe (scaled for `--smoke` as the run scales them)."""
    with cl_real_knows():
        return cl_real.method_options(method, smoke)


def code_version(settings: dict[str, Any] = SETTINGS) -> cl_real.CodeVersion:
    """cl_real's `CodeVersion` over `settings`, this file, cl_real.py and common.py."""
    return cl_real.CodeVersion(settings, scripts=SCRIPTS)


# --------------------------------------------------------------------------------------------------------- plan
def wanted_runs() -> list[tuple[str, int]]:
    """Every (method, seed), in `--all` order: seed 0 of every method (`PLAN_ORDER`), then seed 1."""
    return [(method, seed) for seed in SEEDS for method in PLAN_ORDER]


def plan(runs: dict[tuple[str, int], dict], version: cl_real.CodeVersion | str) -> list[tuple[tuple[str, int], str]]:
    """The runs `--all` would do now, in order, each with why ('missing' or 'stale')."""
    todo = []
    for key in wanted_runs():
        status = cl_real.run_status(runs, key, version)
        if status != "current":
            todo.append((key, status))
    return todo


# ------------------------------------------------------------------------------------------------------- runs
def run_and_save(method: str, seed: int, settings: dict, data: Path, results_dir: Path, smoke: bool) -> None:
    """One run through cl_real's `run_one`, stored with its code version stamp (`cl_real.run_and_save`)."""
    with cl_real_knows():
        cl_real.run_and_save(method, seed, settings, data, results_dir, code_version(settings), smoke)


def run_all(settings: dict, data: Path, results_dir: Path, max_runs: int | None, smoke: bool) -> int:
    """Every missing or stale run in `--all` order, each in its own process (the smoke runs in this one). The plan
    and the code version are recomputed after each run; no (method, seed) runs twice in one call."""
    attempted: set[tuple[str, int]] = set()
    failed = 0
    while max_runs is None or len(attempted) < max_runs:
        version = code_version(settings)
        todo = [(k, why) for k, why in plan(cl_real.load_results(results_dir), version) if k not in attempted]
        if not todo:
            break
        (method, seed), why = todo[0]
        attempted.add((method, seed))
        print(f"=== {method} seed {seed} ({why}); {len(todo) - 1} more after it", flush=True)
        if smoke:
            run_and_save(method, seed, settings, data, results_dir, smoke=True)
            continue
        command = [sys.executable, str(Path(__file__).resolve()), "--method", method, "--seed", str(seed)]
        command += ["--data", str(data), "--results", str(results_dir)]
        if subprocess.run(command, check=False).returncode != 0:
            print(f"    {method} seed {seed} failed; continuing with the next run", flush=True)
            failed += 1
    return 1 if failed else 0


# ------------------------------------------------------------------------------------------------------ report
def _row(method: str, done: list[tuple[int, dict]]) -> dict[str, Any]:
    def metric(name: str) -> list:
        return [(d.get("metrics") or {}).get(name) for _, d in done]

    return {
        "method": method,
        "seeds": [s for s, _ in done],
        "avg_acc": metric("avg_acc"),
        "mean_avg_acc": cl_real._mean(metric("avg_acc")),
        "bwt": metric("bwt"),
        "forgetting": metric("forgetting"),
        "wall_minutes": [d.get("wall_seconds", float("nan")) / 60 for _, d in done],
        "load_average": [cl_real._mean(list((d.get("load_average") or {}).values())) for _, d in done],
        "code_versions": sorted({d.get("code_version", "?") for _, d in done}),
        "final_row": [(d.get("matrix") or [[]])[-1] for _, d in done],
        "task_names": done[0][1].get("task_names", []) if done else [],
    }


def summarize(runs: dict[tuple[str, int], dict], version: cl_real.CodeVersion | str) -> list[dict[str, Any]]:
    """A row per method of `METHODS` (in its order), from its current runs; `stale` lists the seeds whose stored
    run is stale (left out of the row, re-run by `--all`)."""
    rows = []
    for method in METHODS:
        current, stale = [], []
        for (m, seed), data in sorted(runs.items(), key=lambda kv: kv[0][1]):
            if m == method and seed in SEEDS:
                (current if cl_real.is_current(data, version) else stale).append((seed, data))
        row = _row(method, current)
        row.update(
            plugins=list(METHODS[method].plugins),
            done=len(current),
            wanted=len(SEEDS),
            stale=[s for s, _ in stale],
            est_minutes=EST_MINUTES[method],
        )
        rows.append(row)
    return rows


def reference_rows(reference: dict[tuple[str, int], dict]) -> dict[str, dict[str, Any]]:
    """A row per `REFERENCES` method with records in cl_real's folder (every stored seed), with whether cl_real's
    own rule (`cl_real.CodeVersion` of its settings) finds each record current."""
    version = cl_real.CodeVersion(cl_real.SETTINGS)
    rows = {}
    for method in REFERENCES:
        done = sorted((seed, d) for (m, seed), d in reference.items() if m == method)
        if not done:
            continue
        row = _row(method, done)
        row["current"] = [cl_real.is_current(d, version) for _, d in done]
        row["settings_match"] = all(d.get("settings") == cl_real.SETTINGS for _, d in done)
        rows[method] = row
    return rows


def verdicts(rows: list[dict[str, Any]], references: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per method: helps / does not help vs EWC + replay by `HELPS_RULE` (current runs only), or not run yet; with
    the difference to its counterpart (`COUNTERPART`) in points (hundredths of average accuracy)."""
    ref = references.get(BEST_EXISTING)
    accs = [a for a in (ref or {}).get("avg_acc", []) if a is not None]
    out = {}
    for row in rows:
        method = row["method"]
        mean = row["mean_avg_acc"]
        if row["done"] == 0 or mean is None:
            out[method] = {"verdict": "not run yet", "line": f"{method}: not run yet"}
            continue
        if not accs:
            out[method] = {
                "verdict": "no reference",
                "line": f"{method}: no EWC + replay record to compare with (avg acc {mean:.3f})",
            }
            continue
        ref_max, ref_mean = max(accs), cl_real._mean(accs)
        helps = mean > ref_max
        verdict = "helps" if helps else "does not help"
        line = (
            f"{method}: **{verdict}** vs EWC + replay (avg acc {mean:.3f} over seed(s) "
            f"{', '.join(map(str, row['seeds']))} vs EWC + replay's highest seed {ref_max:.3f}; "
            f"{100 * (mean - ref_mean):+.1f} points vs its mean {ref_mean:.3f}; BWT {cl_real.spread(row['bwt'])} vs "
            f"{cl_real.spread(ref['bwt'])})"
        )
        other = references.get(COUNTERPART[method])
        other_mean = None if other is None else other["mean_avg_acc"]
        if other_mean is not None:
            line += (
                f"; vs cl_real's {COUNTERPART[method]} (the same recipe without it, {other_mean:.3f}): "
                f"{100 * (mean - other_mean):+.1f} points"
            )
        if row["done"] < row["wanted"]:
            line += f" (provisional: {row['done']} of {row['wanted']} seeds)"
        out[method] = {
            "verdict": verdict,
            "helps": helps,
            "mean_avg_acc": mean,
            "reference_max": ref_max,
            "reference_mean": ref_mean,
            "counterpart": COUNTERPART[method],
            "counterpart_mean": other_mean,
            "provisional": row["done"] < row["wanted"],
            "line": line,
        }
    return out


def _reference_note(row: dict[str, Any]) -> str:
    versions = ", ".join(v[:8] for v in row["code_versions"])
    current = "current" if all(row["current"]) else "stale by cl_real's rule (older code)"
    settings = "" if row["settings_match"] else "; other settings"
    return f"cl_real's record, {versions}, {current}{settings}"


def report_markdown(
    runs: dict[tuple[str, int], dict],
    reference: dict[tuple[str, int], dict],
    version: cl_real.CodeVersion | str,
    settings: dict[str, Any] = SETTINGS,
    reference_dir: Path | None = None,
) -> str:
    rows = summarize(runs, version)
    refs = reference_rows(reference)
    verdict = verdicts(rows, refs)
    todo = plan(runs, version)
    recipe = "cl_real.py's smoke set-up with batches of 4" if settings["model"] == "tiny" else "cl_real.py's, unchanged"
    lines = [
        f"# Learning across tasks on a real model ({settings['model']}): O-LoRA, OSF, LwF, UPGrad, Reptile-initialised "
        "experts vs EWC + replay",
        "",
        "Written by `python benchmarks/cross_task_real.py --report` from one JSON file per method and seed "
        "(`docs/results/cross_task_real/`; `--all` runs what is missing or stale: a run is stale when a file it "
        f"loaded, the scripts or the settings changed since). Whole-package version now `{version}`.",
        "",
        f"Recipe: {recipe}: "
        f"{' -> '.join(settings['tasks'])}, {settings['n_train']} training rows "
        f"per task (1 epoch), {settings['n_eval']} eval rows per task (the same for every seed), "
        + ", ".join(f"{k}={v}" for k, v in settings["config"].items())
        + f"; {settings['threads']} threads. Each method changes only its own options (below).",
        "",
        *(
            ["(`--smoke`: the pipeline on a tiny random model; its accuracies say nothing about the methods.)", ""]
            if settings["model"] == "tiny"
            else []
        ),
        f"Rule: {HELPS_RULE}. Avg acc: mean over the tasks after the last one; BWT and forgetting as in "
        "`hf_adaptive.metrics`; `mean [min, max]` over the seeds. Wall time: the whole run (2 cores; load: the "
        "1-minute load average at its start and end: above 2, other jobs shared the cores and stretched it). "
        "est.: the estimate on 2 quiet cores (the script's docstring). Rows of this script: current runs only.",
        "",
        "| method | what | runs | avg acc | BWT | forgetting | wall time (min) | est. (min) | load | code version |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        versions = ", ".join(v[:8] for v in row["code_versions"]) or "-"
        stale = f" (+{len(row['stale'])} stale)" if row["stale"] else ""
        lines.append(
            f"| {row['method']} | {DESCRIPTION[row['method']]} | {row['done']}/{row['wanted']}{stale} | "
            f"{cl_real.spread(row['avg_acc'])} | {cl_real.spread(row['bwt'])} | {cl_real.spread(row['forgetting'])} "
            f"| {cl_real.spread(row['wall_minutes'], 1)} | {row['est_minutes']:g} | "
            f"{cl_real.spread(row['load_average'], 1)} | {versions} |"
        )
    for method in REFERENCES:
        row = refs.get(method)
        label = f"*{REFERENCE_LABEL[method]}* (reference)"
        if row is None:
            lines.append(f"| {label} | no record in cl_real's folder | 0 | n/a | n/a | n/a | n/a | - | n/a | - |")
            continue
        lines.append(
            f"| {label} | {_reference_note(row)} | {len(row['seeds'])} | {cl_real.spread(row['avg_acc'])} | "
            f"{cl_real.spread(row['bwt'])} | {cl_real.spread(row['forgetting'])} | "
            f"{cl_real.spread(row['wall_minutes'], 1)} | - | {cl_real.spread(row['load_average'], 1)} | "
            f"{', '.join(v[:8] for v in row['code_versions'])} |"
        )
    where = reference_dir if reference_dir is not None else "none given"
    lines += [
        "",
        f"Reference rows: cl_real.py's own stored records (`{where}`), every seed stored, with the code version "
        "each carries; cl_real's rule calls a record stale when the package files it was made with changed since "
        "(records made before its manifests carry a whole-package hash, so any package edit makes them stale). They "
        "were made with this recipe; a stale one was made by older package code.",
        "",
        "Verdicts:",
        "",
        *(f"- {v['line']}" for v in verdict.values()),
        "",
        "Left out: " + "; ".join(f"`{k}`: {why}" for k, why in LEFT_OUT.items()) + ".",
        "",
        "Options of each method (on top of the recipe):",
        "",
        *(
            f"- `{m}`: plugins {list(spec.plugins) or 'none'}; "
            + ", ".join(f"{k}={v}" for k, v in spec.options.items())
            for m, spec in METHODS.items()
        ),
    ]
    done_rows = [r for r in rows if r["done"]]
    if done_rows:
        names = done_rows[0]["task_names"]
        lines += [
            "",
            "Final accuracy per task (seed mean, current runs):",
            "",
            "| method | " + " | ".join(names) + " |",
            "|---|" + "---|" * len(names),
        ]
        for row in [*done_rows, *(refs[m] for m in REFERENCES if m in refs)]:
            cells = []
            for j in range(len(names)):
                values = [r[j] for r in row["final_row"] if j < len(r) and r[j] is not None]
                cells.append(cl_real._fmt(cl_real._mean(values)))
            lines.append(f"| {row['method']} | " + " | ".join(cells) + " |")
    remaining = sum(EST_MINUTES[m] for (m, _), _ in todo)
    lines += [
        "",
        "Still to run (`--all` order): "
        + (", ".join(f"{m}/seed{s} ({why})" for (m, s), why in todo) or "none")
        + (f"; ~{remaining / 60:.1f} h estimated on 2 quiet cores." if todo else "."),
    ]
    return "\n".join(lines)


def build_report(
    results_dir: Path,
    out: Path,
    version: cl_real.CodeVersion | str,
    settings: dict[str, Any] = SETTINGS,
    reference_dir: Path | None = cl_real.RESULTS_DIR,
    name: str = NAME,
) -> str:
    """`<out>/<name>.md` and `.json` from the runs in `results_dir` and cl_real's records in `reference_dir`."""
    runs = cl_real.load_results(results_dir)
    reference = cl_real.load_results(reference_dir) if reference_dir is not None else {}
    markdown = report_markdown(runs, reference, version, settings, reference_dir)
    rows = summarize(runs, version)
    refs = reference_rows(reference)
    summary = {
        "code_version": str(version),
        "settings": settings,
        "methods": {m: dataclasses.asdict(spec) for m, spec in METHODS.items()},
        "left_out": LEFT_OUT,
        "counterpart": COUNTERPART,
        "seeds": list(SEEDS),
        "est_minutes": EST_MINUTES,
        "rule": HELPS_RULE,
        "summary": cl_real._json_safe(rows),
        "references": cl_real._json_safe(refs),
        "reference_dir": None if reference_dir is None else str(reference_dir),
        "verdicts": cl_real._json_safe(verdicts(rows, refs)),
        "todo": [{"method": m, "seed": s, "why": why} for (m, s), why in plan(runs, version)],
    }
    write_results(name, summary, markdown, out=out)
    return markdown


# ------------------------------------------------------------------------------------------------ OSF's LR probe
def osf_lr_probe(settings: dict[str, Any], data: Path, seed: int = 0, smoke: bool = False) -> dict[str, Any]:
    """OSF on the first task alone at each of `OSF_LR_CANDIDATES`; the lowest mean training loss is chosen (the
    module docstring). Each candidate is a cl_real run (`run_one`) of one task."""
    first = {**settings, "tasks": settings["tasks"][:1]}
    rows = []
    for lr in OSF_LR_CANDIDATES:
        name = f"osf_lr_probe_{lr:g}"
        with cl_real_knows({name: Method((), {**OSF, "learning_rate": lr})}):
            record = cl_real.run_one(name, seed, first, data, smoke)
        rows.append(
            {
                "learning_rate": lr,
                "train_loss": record["extra"]["train_loss"][0],
                "accuracy": record["matrix"][-1][0],
                "wall_seconds": record["wall_seconds"],
            }
        )
        print(f"OSF at lr {lr:g}: {rows[-1]}", flush=True)
    chosen = min(rows, key=lambda r: r["train_loss"])["learning_rate"]
    return {"task": first["tasks"][0], "seed": seed, "rows": rows, "chosen": chosen, "smoke": smoke}


def osf_lr_probe_markdown(probe: dict[str, Any]) -> str:
    lines = [
        "# OSF's learning rate on the real model (cross_task_real.py --osf-lr-probe)",
        "",
        f"OSF alone on the first task ({probe['task']}, seed {probe['seed']}, cl_real's recipe otherwise: 256 rows, "
        "1 epoch, batches of 8) at each candidate learning rate; the lowest mean training loss is chosen (training "
        "data only: the accuracy on the task's evaluation rows is shown, not used).",
        "",
        "| learning rate | mean training loss | accuracy (not used) | wall (min) |",
        "|---|---|---|---|",
        *(
            f"| {r['learning_rate']:g}{' (chosen)' if r['learning_rate'] == probe['chosen'] else ''} | "
            f"{r['train_loss']:.4f} | {r['accuracy']:.3f} | {r['wall_seconds'] / 60:.1f} |"
            for r in probe["rows"]
        ),
        "",
        f"Chosen: {probe['chosen']:g} (`OSF_LEARNING_RATE` in the script).",
    ]
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------------------- main
def _inside(path: Path, folder: Path) -> bool:
    return Path(path).resolve().is_relative_to(Path(folder).resolve())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", choices=list(METHODS), help="run this method once (with --seed)")
    parser.add_argument("--seed", type=int, choices=list(SEEDS), default=0)
    parser.add_argument("--all", action="store_true", help="run every missing or stale (method, seed), in order")
    parser.add_argument("--max-runs", type=int, default=None, help="with --all: stop after this many runs")
    parser.add_argument("--plan", action="store_true", help="print what --all would run and exit")
    parser.add_argument("--report", action="store_true", help="only rebuild the report from the stored runs")
    parser.add_argument("--osf-lr-probe", action="store_true", help="choose OSF's learning rate (module docstring)")
    parser.add_argument("--smoke", action="store_true", help="the pipeline on a tiny model, 2 tasks x 16 rows")
    parser.add_argument("--data", type=Path, default=cl_real.DEFAULT_DATA, help="the CL benchmark folder")
    parser.add_argument("--results", type=Path, default=None, help="folder of the per-run JSON files")
    parser.add_argument("--out", type=Path, default=None, help="folder of the report (md, json)")
    parser.add_argument(
        "--reference", type=Path, default=None, help="cl_real's records (default docs/results/cl_real; smoke: none)"
    )
    ns = parser.parse_args(argv)
    settings = SMOKE_SETTINGS if ns.smoke else SETTINGS
    if ns.smoke:  # never into docs/results: a temporary folder unless --results / --out say where
        for option, path in (("--out", ns.out), ("--results", ns.results)):
            if path is not None and _inside(path, RESULTS):
                parser.error(f"{option} {path} is not allowed with --smoke: it is inside {RESULTS}")
        base = Path(tempfile.mkdtemp(prefix="cross_task_real_smoke_")) if ns.out is None else ns.out
        results_dir, out, reference_dir = ns.results or base / "runs", base, ns.reference
    else:
        results_dir, out = ns.results or RESULTS_DIR, ns.out or RESULTS
        reference_dir = ns.reference or cl_real.RESULTS_DIR
    if ns.plan:
        version = code_version(settings)
        todo = plan(cl_real.load_results(results_dir), version)
        total = sum(EST_MINUTES[m] for (m, _), _ in todo)
        print(f"code version {version}; {len(todo)} run(s) to do (of {len(wanted_runs())}), ~{total:.0f} min:")
        for (method, seed), why in todo:
            print(f"  {method} seed {seed} ({why}; ~{EST_MINUTES[method]:g} min)")
        return 0
    if ns.osf_lr_probe:
        probe = osf_lr_probe(settings, ns.data, smoke=ns.smoke)
        write_results(f"{NAME}_osf_lr_probe", probe, osf_lr_probe_markdown(probe), out=out)
        return 0
    if (ns.method or ns.all or ns.smoke) and not ns.report:
        missing = [t for t in settings["tasks"] if not (ns.data / t).is_dir()]
        if missing:
            parser.error(f"--data {ns.data} is not allowed: it needs the CL benchmark task folders {missing}")
    status = 0
    if ns.method is not None and not ns.report:
        run_and_save(ns.method, ns.seed, settings, ns.data, results_dir, ns.smoke)
    elif (ns.all or ns.smoke) and not ns.report:
        status = run_all(settings, ns.data, results_dir, ns.max_runs, ns.smoke)
    elif not ns.report:
        parser.error("give --method M [--seed K], --all, --plan, --report or --smoke")
    if ns.report or ns.all or ns.smoke:
        build_report(results_dir, out, code_version(settings), settings, reference_dir)
    return status


if __name__ == "__main__":
    sys.exit(main())
