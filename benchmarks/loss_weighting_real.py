"""The loss-weight controller on a real model (issue 14): learned weights of EWC and replay against a grid.

Goal: "with at least two loss terms on the real model (replay and EWC), the learned weighting (uncertainty or
softmax) reaches an average accuracy within 1 point of the best fixed weighting found by a grid, without the grid".
SmolLM2-135M learns a short task sequence with EWC + replay (cl_real.py's `ewc_replay`); the arms differ only in how
the task loss and the two plugin terms are weighted:

* the grid: fixed weights, EWC's `ewc_lambda` x replay's `replay_alpha` (`EWC_GRID` x `REPLAY_GRID`, 3 x 3);
* `uncertainty` and `softmax`: `ContinualConfig.loss_weighting`, the `LossWeightController` of
  `hf_adaptive.control.loss_weighting`, built by `ContinualTrainer` over the plugins' terms (`ewc`, `replay`) and
  the task loss, trained by the model's optimizer.

Each (arm, seed) is one run, seeds 0 and 1, stored in its own JSON file (`docs/results/loss_weighting_real/
<arm>_seed<k>.json`, atomic, with cl_real.py's code version stamp: the manifest of every file the run loaded), so the
22 runs can be spread over sessions and a stale one (code changed since) is run again:

    python benchmarks/loss_weighting_real.py --arm uncertainty --seed 0   # one run (~3.6 min on 2 quiet cores)
    python benchmarks/loss_weighting_real.py --all [--max-runs N]         # every missing or stale run, in order
    python benchmarks/loss_weighting_real.py --plan                       # what --all would run, and why
    python benchmarks/loss_weighting_real.py --report                     # docs/results/loss_weighting_real.md/.json
    python benchmarks/loss_weighting_real.py --quick [--out DIR]          # the whole pipeline on a tiny model

`--all` runs each (arm, seed) in its own process, seed 0 of every arm first (the default cell, the two learned arms,
then the rest of the grid), then seed 1 in the same order. `--quick` is cl_real.py's smoke setup (a tiny Gemma with
a word-level tokenizer, 2 tasks x 16 rows, batches of 4) with a 2 x 1 grid (ewc_lambda 100 and 1000, replay_alpha 1)
and the two learned arms, seed 0, in one process, into a temporary folder unless `--out` (never into docs/results;
`--out`/`--results` there are refused). It checks the pipeline; its accuracies say nothing about the goal.
Model, data, recipe, task loading, code versions and result files are cl_real.py's, imported (`--data`: the CL
benchmark folder, default `../shared/data/cl_benchmark`).

Sequence: SST-2 -> WiC -> BoolQA, 128 training rows per task (16 steps of 8), 100 eval rows per task (the same
subsets for every seed). Why: of cl_real's five tasks these are the ones SmolLM2 learns at this budget and that can
be forgotten. SST-2 is learned best (0.53 -> 0.82 after one task in cl_real) and erased most by later tasks (0.66 on
average after naive's five tasks, 0.53 on seed 0; 0.90 with EWC + replay), so it carries the forgetting the weights
must prevent; WiC and BoolQA share the True/False label words, so BoolQA can overwrite WiC's use of them, and both
are harder (WiC 0.56, BoolQA 0.68-0.72 over its majority class 0.64): a stiff EWC weight that blocks learning shows
up on them. IMDB (same label words as SST-2: it helps SST-2 rather than erasing it) and MNLI (0.35-0.48, near its
chance 0.33) would add cost and little signal. Metrics as in cl_real.py: average accuracy after the last task, BWT
and forgetting from the lower triangle of the accuracy matrix (unseen tasks are not evaluated, so no FWT).

EWC + replay options (`OPTIONS`): cl_real's `ewc_replay` (Fisher scaled to a largest entry of 1, `ewc_lambda` 100,
`replay_alpha` 1, balanced buffer, 4 replayed rows per step) with the two budgets that scale with a task's size
halved like the task (256 -> 128 rows): `fisher_samples` 64 -> 32 (a quarter of a task's rows, as in cl_real) and
`replay_buffer_size` 256 -> 128 (one task's worth of rows, as in cl_real).

Why this grid: EWC's lambda 10, 100, 1000 spans 100x around cl_real's hybrid default 100, from a light damping to
cl_real's EWC-alone strength 1000 (too stiff beside replay, cl_real's notes say: it blocks learning); replay's alpha
0.1, 0.3, 1 spans 10x below the default 1, because `replay_alpha` is a weight in [0, 1] (`ReplayConfig`): the grid
cannot weight replay above the task loss, while a learned weighting can (uncertainty up to 1/2 e^3 ~ 10 per term,
softmax up to its total of 3). A learned arm that beats the grid may therefore do it with weights the grid cannot
reach; the report gives the learned weights so this can be read.

The learned arms start from cl_real's defaults: under a learned weighting the controller sees each term already
multiplied by its fixed weight (`LossTerm.weight`, here `replay_alpha` 1; EWC's lambda is inside its term's value,
(lambda/2) sum F (theta - theta*)^2), and its weights multiply those. Both controllers start with every weight at
1 (uncertainty: 1/2 e^-s with s = log 1/2; softmax: the total 3 split evenly over task, ewc, replay), i.e. at
`ewc_lambda` 100 and an effective `replay_alpha` 1, cl_real's `ewc_replay` (softmax gives the whole total to the
only term present: the task loss weighs 3 during the first task, before EWC and replay have anything). Each run
stores the weights logged at every step (`weights.trajectory`: task, step, weights, term losses), the first and
last, their mean per task, and how far the controller's output biases moved (`weights.controller_bias_shift`:
nonzero only for a term whose loss reached the controller), which shows that the weighting acts on the `ewc` and
`replay` terms.

Report (`--report`, also after `--all` and `--quick`): the grid as a table (avg acc `mean [min, max]` over seeds per
cell), every arm's avg acc, BWT, forgetting and wall time, the learned weights, the best and the median grid cell
(the median: what a user gets without tuning), the verdict per learned arm ("learned uncertainty within 1 point of
the best grid cell: met (difference -0.4 points)"), the runs still to do, and a heatmap of the grid with the learned
arms in its title (`loss_weighting_real_grid.png`). The verdict compares seed means; it is marked provisional while
runs are missing or stale.

Budget (an estimate, not measured for this sequence; from cl_real.py's runs of 5 tasks x 256 rows on 2 quiet cores:
naive 8.8 min, ewc_replay 12.7 min): ewc_replay trained at 1.7 s/step on SST-2 (nothing to replay yet), 3.0 s on WiC
and 3.7 s on BoolQA (4 replayed rows on top of 8), so 16 steps per task are ~135 s; evaluation ~11 s per task and
100 rows (shorter for SST-2, longer for BoolQA), 6 in the lower triangle: ~50 s; the Fisher ~20 s per 64 rows, 32
rows after each of the 3 tasks: ~30 s; loading ~5 s. About 3.6 min a run, 22 runs ~80 min (70-90) on 2 quiet cores,
2-4x that under load; a little over the ~70 min aimed at. Cheaper: `n_eval` 64 (-18 s a run) or `fisher_samples`
16 (-15 s a run). The learned controller (a 2-layer net of 16 hidden units) should add nothing measurable.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cl_real  # noqa: E402
from common import RESULTS, environment, write_results  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

NAME = "loss_weighting_real"
RESULTS_DIR = RESULTS / NAME
#: this file and what it imports from (a run's code version covers them; cl_real.py's manifests)
SCRIPTS = (Path(__file__).resolve(), *cl_real.SCRIPTS)
PLUGINS = ("ewc", "replay")
#: the goal's tolerance: a learned arm within this many points (hundredths of avg acc) of the best grid cell
TOLERANCE_POINTS = 1.0

TASKS = ["SST-2", "WiC", "BoolQA"]
#: cl_real.py's recipe on the shorter sequence
SETTINGS: dict[str, Any] = {**cl_real.SETTINGS, "tasks": TASKS, "n_train": 128, "n_eval": 100}
#: cl_real's ewc_replay options, with the Fisher rows and the buffer halved like the tasks (256 -> 128 rows)
OPTIONS: dict[str, Any] = {**cl_real.METHODS["ewc_replay"].options, "fisher_samples": 32, "replay_buffer_size": 128}
EWC_GRID = (10.0, 100.0, 1000.0)
REPLAY_GRID = (0.1, 0.3, 1.0)
LEARNED = ("uncertainty", "softmax")
SEEDS = (0, 1)

#: `--quick`: cl_real's smoke setup (tiny Gemma, 2 tasks x 16 rows, the smoke budgets) with a 2 x 1 grid, seed 0;
#: batches of 4, so each task has 4 steps: with 2 (the first at learning rate 0, warm-up) the second task's EWC penalty
#: would stay exactly 0 and its weight would multiply nothing
QUICK_SETTINGS: dict[str, Any] = {
    **cl_real.SMOKE_SETTINGS,
    "tasks": ["SST-2", "WiC"],
    "config": {**cl_real.SMOKE_SETTINGS["config"], "per_device_train_batch_size": 4},
}
QUICK_OPTIONS: dict[str, Any] = {**OPTIONS, **{k: v for k, v in cl_real.SMOKE_OPTIONS.items() if k in OPTIONS}}


@dataclasses.dataclass(frozen=True)
class Study:
    """A whole study: the recipe, the EWC + replay options every arm shares, the grid, the learned modes, the seeds."""

    settings: dict[str, Any]
    options: dict[str, Any]
    ewc_grid: tuple[float, ...]
    replay_grid: tuple[float, ...]
    learned: tuple[str, ...]
    seeds: tuple[int, ...]


REAL = Study(SETTINGS, OPTIONS, EWC_GRID, REPLAY_GRID, LEARNED, SEEDS)
#: the quick grid holds the default cell (the learned arms' start): a learned arm differs from it by the weighting alone
QUICK = Study(QUICK_SETTINGS, QUICK_OPTIONS, (100.0, 1000.0), (1.0,), LEARNED, (0,))


@dataclasses.dataclass(frozen=True)
class Arm:
    """One weighting: a fixed grid cell (`weighting` "none") or a learned controller ("uncertainty" / "softmax");
    `options` are the ContinualConfig options it adds to the recipe."""

    name: str
    weighting: str
    ewc_lambda: float
    replay_alpha: float
    options: dict[str, Any]


def grid_name(ewc_lambda: float, replay_alpha: float) -> str:
    """A grid cell's name (and file name stem): `ewc100_replay0.3`."""
    return f"ewc{ewc_lambda:g}_replay{replay_alpha:g}"


def build_arms(study: Study = REAL) -> dict[str, Arm]:
    """Every arm of `study`, by name: the grid cells (EWC lambda major), then the learned modes."""
    arms: dict[str, Arm] = {}
    for ewc_lambda in study.ewc_grid:
        for replay_alpha in study.replay_grid:
            name = grid_name(ewc_lambda, replay_alpha)
            options = {
                **study.options,
                "ewc_lambda": ewc_lambda,
                "replay_alpha": replay_alpha,
                "loss_weighting": "none",
            }
            arms[name] = Arm(name, "none", ewc_lambda, replay_alpha, options)
    for mode in study.learned:
        options = {**study.options, "loss_weighting": mode}
        arms[mode] = Arm(mode, mode, study.options["ewc_lambda"], study.options["replay_alpha"], options)
    return arms


def default_cell(study: Study = REAL) -> str | None:
    """The grid cell of cl_real's ewc_replay weights (the learned arms' start), when the grid has it."""
    name = grid_name(study.options["ewc_lambda"], study.options["replay_alpha"])
    return name if name in build_arms(study) else None


def wanted_runs(study: Study = REAL) -> list[tuple[str, int]]:
    """Every (arm, seed), in `--all` order: per seed (0 first), the default cell, the learned arms, the rest."""
    arms = build_arms(study)
    first = [a for a in (default_cell(study), *study.learned) if a is not None]
    order = first + [a for a in arms if a not in first]
    return [(arm, seed) for seed in study.seeds for arm in order]


def plan(
    runs: dict[tuple[str, int], dict], version: cl_real.CodeVersion | str, study: Study = REAL
) -> list[tuple[tuple[str, int], str]]:
    """The runs `--all` would do now, in order, each with why ('missing' or 'stale')."""
    todo = []
    for key in wanted_runs(study):
        status = cl_real.run_status(runs, key, version)
        if status != "current":
            todo.append((key, status))
    return todo


def code_version(study: Study = REAL) -> cl_real.CodeVersion:
    """cl_real's `CodeVersion` over this study's settings and options, this file, cl_real.py and common.py."""
    return cl_real.CodeVersion({**study.settings, "options": study.options}, scripts=SCRIPTS)


# ----------------------------------------------------------------------------------------------------- one run
class WeightRecorder(TrainerCallback):
    """Keeps every training log's `weight_<term>` and `loss_<term>` (`ContinualTrainer.log`), with the task index:
    the weights the trainer actually used, fixed or learned."""

    def __init__(self) -> None:
        self.trainer: Any = None
        self.steps: list[dict[str, Any]] = []

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        logs = logs or {}
        weights = {k.removeprefix("weight_"): float(v) for k, v in logs.items() if k.startswith("weight_")}
        losses = {k.removeprefix("loss_"): float(v) for k, v in logs.items() if k.startswith("loss_")}
        if weights or losses:
            task = getattr(self.trainer, "current_task_index", None)
            self.steps.append({"task": task, "step": state.global_step, "weights": weights, "losses": losses})


def _controller_state(controller: Any) -> dict[str, Any] | None:
    """A copy of a `LossWeightController`'s parameters (None without one)."""
    if controller is None or not hasattr(controller, "named_parameters"):
        return None
    return {name: p.detach().clone() for name, p in controller.named_parameters()}


def start_weights(controller: Any) -> dict[str, float] | None:
    """The weights a `LossWeightController` starts from by design: 1 each (uncertainty), or its total split evenly
    over the weighted terms (softmax)."""
    names = getattr(controller, "weighted", None)
    if not names:
        return None
    if getattr(controller, "mode", None) == "softmax":
        return {name: controller.total_weight / len(names) for name in names}
    return dict.fromkeys(names, 1.0)


def weight_summary(steps: Sequence[dict[str, Any]], controller: Any, initial: dict[str, Any] | None) -> dict:
    """First and last logged weight per term, the mean per task, and how far the controller moved: its output bias
    per weighted term (moves only for a term whose loss reached it) and the L2 norm of all its parameter changes."""
    first: dict[str, float] = {}
    final: dict[str, float] = {}
    by_task: dict[int, dict[str, list[float]]] = {}
    for step in steps:
        for name, value in step["weights"].items():
            first.setdefault(name, value)
            final[name] = value
            by_task.setdefault(step["task"], {}).setdefault(name, []).append(value)
    summary: dict[str, Any] = {
        "first": first,
        "final": final,
        "per_task_mean": [
            {"task_index": task, "weights": {n: statistics.mean(v) for n, v in sorted(w.items())}}
            for task, w in by_task.items()
        ],
        "start": start_weights(controller),
        "controller_bias_shift": None,
        "controller_param_shift": None,
        "trajectory": list(steps),
    }
    if initial:
        now = dict(controller.named_parameters())
        summary["controller_param_shift"] = math.sqrt(
            sum(float((now[n].detach() - p).float().pow(2).sum()) for n, p in initial.items())
        )
        last = controller.net[-1]
        key = next(n for n, p in now.items() if p is last.bias)
        shift = (last.bias.detach() - initial[key]).tolist()
        summary["controller_bias_shift"] = dict(zip(controller.weighted, shift))
    return summary


def run_arm(arm: Arm, seed: int, study: Study, data: Path) -> dict[str, Any]:
    """Train the task sequence with `arm`'s weighting and `seed`; return its result record (not yet written)."""
    import torch
    from transformers import PrinterCallback, set_seed

    from hf_adaptive.config import ContinualConfig
    from hf_adaptive.registry import build_plugins
    from hf_adaptive.trainer import ContinualTrainer

    settings = study.settings
    torch.set_num_threads(settings["threads"])
    load_average_start = os.getloadavg()[0]
    started = time.perf_counter()
    set_seed(seed)
    tasks = cl_real.load_tasks(settings, data)
    model, tokenizer = cl_real.load_model(settings, tasks, seed)
    load_seconds = time.perf_counter() - started
    eval_seconds = [0.0]
    recorder = WeightRecorder()
    with tempfile.TemporaryDirectory() as tmp:
        config = ContinualConfig(
            output_dir=tmp,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            disable_tqdm=True,
            logging_strategy="steps",
            logging_steps=1,  # every step's weights reach `recorder` (a host sync per step: negligible here)
            save_results_plot=False,
            dataloader_num_workers=0,
            seed=seed,
            **{**settings["config"], **arm.options},
        )
        trainer = ContinualTrainer(
            model=model,
            args=config,
            processing_class=tokenizer,
            callbacks=[*build_plugins(list(PLUGINS), config, model=model), recorder],
        )
        trainer.remove_callback(PrinterCallback)  # it would print every step's log line
        recorder.trainer = trainer
        controller = trainer.loss_weighting
        initial = _controller_state(controller)
        evaluate = trainer.evaluate_tasks

        def timed_evaluate(*args: Any, **kwargs: Any) -> list[float]:
            t0 = time.perf_counter()
            try:
                return evaluate(*args, **kwargs)
            finally:
                eval_seconds[0] += time.perf_counter() - t0

        trainer.evaluate_tasks = timed_evaluate
        result = trainer.train_sequence(tasks)
        weights = weight_summary(recorder.steps, controller, initial)
    wall = time.perf_counter() - started
    train_seconds = sum(result.train_time)
    record = {
        "arm": arm.name,
        "method": arm.name,  # cl_real's result files are keyed by "method"
        "seed": seed,
        "weighting": arm.weighting,
        "ewc_lambda": arm.ewc_lambda,
        "replay_alpha": arm.replay_alpha,
        "task_names": [t.name for t in tasks],
        "matrix": result.matrix,
        "steps": list(result.extra.get("steps", [])),
        "train_time": list(result.train_time),
        "extra": {k: v for k, v in result.extra.items() if k != "steps"},
        "metrics": result.metrics(("avg_acc", "bwt", "forgetting", "fwt")),
        "weights": weights,
        "wall_seconds": wall,
        "load_seconds": load_seconds,
        "train_seconds": train_seconds,
        "eval_seconds": eval_seconds[0],
        "other_seconds": wall - load_seconds - train_seconds - eval_seconds[0],
        "load_average": {"start": load_average_start, "end": os.getloadavg()[0]},
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "plugins": list(PLUGINS),
        "options": arm.options,
        "kind": "sequence",
        "settings": settings,
        "data": str(data),
        "environment": environment(),
        "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    record["total_steps"] = sum(record["steps"])
    return cl_real._json_safe(record)


def _weights_text(weights: dict[str, float] | None, digits: int = 3) -> str:
    if not weights:
        return "n/a"
    return ", ".join(f"{name} {value:.{digits}g}" for name, value in weights.items())


def _task_label(index: int | None, names: Sequence[str]) -> str:
    return names[index] if isinstance(index, int) and 0 <= index < len(names) else f"task {index}"


def run_and_save(arm: str, seed: int, study: Study, data: Path, results_dir: Path) -> Path:
    """One run, stored with its code version stamp (cl_real's `save_run`: atomic, manifest of the loaded files)."""
    version = code_version(study)
    print(f"--- {arm} seed {seed} (whole package {version})", flush=True)
    record = run_arm(build_arms(study)[arm], seed, study, data)
    path = cl_real.save_run(results_dir, record, version)
    m, w = record["metrics"], record["weights"]
    print(
        f"    avg_acc={cl_real._fmt(m.get('avg_acc'))} bwt={cl_real._fmt(m.get('bwt'))} "
        f"forgetting={cl_real._fmt(m.get('forgetting'))} wall={record['wall_seconds'] / 60:.1f} min "
        f"(train {record['train_seconds']:.0f} s, eval {record['eval_seconds']:.0f} s) -> {path}",
        flush=True,
    )
    if record["weighting"] != "none":
        print(f"    learned weights: start {_weights_text(w['start'])}; first {_weights_text(w['first'])}; ", end="")
        print(f"final {_weights_text(w['final'])}; controller bias shift {_weights_text(w['controller_bias_shift'])}")
    return path


def run_all(study: Study, data: Path, results_dir: Path, max_runs: int | None, in_process: bool) -> int:
    """Every missing or stale run in `--all` order; each in its own process unless `in_process` (the quick study).
    The plan is recomputed after each run (code edited meanwhile is caught); no (arm, seed) runs twice in a call."""
    attempted: set[tuple[str, int]] = set()
    failed = 0
    while max_runs is None or len(attempted) < max_runs:
        version = code_version(study)
        todo = [(k, why) for k, why in plan(cl_real.load_results(results_dir), version, study) if k not in attempted]
        if not todo:
            break
        (arm, seed), why = todo[0]
        attempted.add((arm, seed))
        print(f"=== {arm} seed {seed} ({why}); {len(todo) - 1} more after it", flush=True)
        if in_process:
            run_and_save(arm, seed, study, data, results_dir)
            continue
        command = [sys.executable, str(Path(__file__).resolve()), "--arm", arm, "--seed", str(seed)]
        command += ["--data", str(data), "--results", str(results_dir)]
        if subprocess.run(command, check=False).returncode != 0:
            print(f"    {arm} seed {seed} failed; continuing with the next run", flush=True)
            failed += 1
    return 1 if failed else 0


# -------------------------------------------------------------------------------------------------------- report
def summarize(
    runs: dict[tuple[str, int], dict], version: cl_real.CodeVersion | str, study: Study = REAL
) -> list[dict[str, Any]]:
    """One row per arm of `study` that has results: its seeds, metrics per seed, their mean avg acc, wall time,
    final learned weights, code versions and whether any run is stale."""
    rows = []
    for name, arm in build_arms(study).items():
        done = sorted((seed, data) for (a, seed), data in runs.items() if a == name)
        if not done:
            continue

        def metric(key: str, done: list = done) -> list:
            return [(d.get("metrics") or {}).get(key) for _, d in done]

        rows.append(
            {
                "arm": name,
                "weighting": arm.weighting,
                "ewc_lambda": arm.ewc_lambda,
                "replay_alpha": arm.replay_alpha,
                "seeds": [s for s, _ in done],
                "avg_acc": metric("avg_acc"),
                "mean_avg_acc": cl_real._mean(metric("avg_acc")),
                "bwt": metric("bwt"),
                "forgetting": metric("forgetting"),
                "wall_minutes": [d.get("wall_seconds", float("nan")) / 60 for _, d in done],
                "final_weights": [(d.get("weights") or {}).get("final") for _, d in done],
                "per_task_weights": [(d.get("weights") or {}).get("per_task_mean") for _, d in done],
                "task_names": [d.get("task_names") or [] for _, d in done],
                "bias_shift": [(d.get("weights") or {}).get("controller_bias_shift") for _, d in done],
                "code_versions": sorted({d.get("code_version", "?") for _, d in done}),
                "stale": any(not cl_real.is_current(d, version) for _, d in done),
            }
        )
    return rows


def verdicts(rows: Sequence[dict[str, Any]], study: Study = REAL, todo: Sequence = ()) -> dict[str, Any]:
    """The goal on seed means: each learned arm against the best grid cell (met when at most `TOLERANCE_POINTS`
    below it) and against the median of the grid cells; the goal is met when one learned arm meets it."""
    grid = [r for r in rows if r["weighting"] == "none" and r["mean_avg_acc"] is not None]
    best = max(grid, key=lambda r: r["mean_avg_acc"]) if grid else None  # first of equals, in the grid's order
    median = statistics.median(r["mean_avg_acc"] for r in grid) if grid else None
    learned: dict[str, dict[str, Any]] = {}
    for mode in study.learned:
        row = next((r for r in rows if r["arm"] == mode and r["mean_avg_acc"] is not None), None)
        if row is None or best is None:
            learned[mode] = {
                "measured": False,
                "line": f"learned {mode} within 1 point of the best grid cell: "
                + ("not run yet" if row is None else "no grid cell run yet"),
            }
            continue
        diff = 100 * (row["mean_avg_acc"] - best["mean_avg_acc"])
        vs_median = 100 * (row["mean_avg_acc"] - median)
        met = diff >= -TOLERANCE_POINTS - 1e-6  # 1e-6: float noise of the subtraction (0.64 - 0.65 = -0.0100...01)
        learned[mode] = {
            "measured": True,
            "mean_avg_acc": row["mean_avg_acc"],
            "seeds": row["seeds"],
            "difference_points": diff,
            "vs_median_points": vs_median,
            "met": met,
            "line": f"learned {mode} within 1 point of the best grid cell: {'met' if met else 'missed'} "
            f"(difference {diff:+.1f} points: {row['mean_avg_acc']:.3f} vs {best['arm']} "
            f"{best['mean_avg_acc']:.3f}); against the median grid cell ({median:.3f}): {vs_median:+.1f} points",
        }
    measured = [v for v in learned.values() if v["measured"]]
    if not measured:
        goal = "not measured yet"
    else:
        goal = "met" if any(v["met"] for v in measured) else "missed"
    return {
        "best_cell": None if best is None else {"arm": best["arm"], "mean_avg_acc": best["mean_avg_acc"]},
        "median_cell_avg_acc": median,
        "grid_cells_run": len(grid),
        "grid_cells": len(study.ewc_grid) * len(study.replay_grid),
        "learned": learned,
        "goal": goal,
        "provisional": bool(todo),
    }


def _cell(row: dict[str, Any] | None, best: str | None) -> str:
    if row is None:
        return "not run"
    text = cl_real.spread(row["avg_acc"])
    if row["arm"] == best:
        text = f"**{text}**"
    return text + (" (stale)" if row["stale"] else "")


def report_markdown(
    runs: dict[tuple[str, int], dict],
    version: cl_real.CodeVersion | str,
    study: Study = REAL,
    png: str | None = None,
) -> str:
    """The report of whatever results exist: verdict, grid table, every arm, the learned weights, what is to run."""
    rows = summarize(runs, version, study)
    by_arm = {r["arm"]: r for r in rows}
    todo = plan(runs, version, study)
    verdict = verdicts(rows, study, todo)
    settings = study.settings
    best = (verdict["best_cell"] or {}).get("arm")
    goal = verdict["goal"] + (" (provisional: runs missing or stale)" if verdict["provisional"] else "")
    lines = [
        f"# The loss-weight controller on a real model ({settings['model']}): learned vs grid weights of EWC and "
        "replay",
        "",
        f"Written by `python benchmarks/loss_weighting_real.py --report` from one JSON file per arm and seed "
        f"(`--all` runs what is missing or stale; a run is stale when a file it loaded, the scripts or the settings "
        f"changed since). Whole-package version now `{version}`.",
        "",
        f"Goal (issue 14): with EWC and replay, a learned weighting (uncertainty or softmax) reaches an average "
        f"accuracy within {TOLERANCE_POINTS:g} point of the best fixed weighting of a grid, without the grid. "
        f"**Goal: {goal}.**",
        "",
        *(
            ["(`--quick`: the pipeline on a tiny random model; its accuracies say nothing about the goal.)", ""]
            if settings["model"] == "tiny"
            else []
        ),
        *(f"- {v['line']}" for v in verdict["learned"].values()),
        "",
        f"Tasks, in order: {' -> '.join(settings['tasks'])}; {settings['n_train']} training rows per task (1 epoch), "
        f"{settings['n_eval']} evaluation rows per task (the same for every seed); seeds "
        f"{', '.join(map(str, study.seeds))}. Recipe (cl_real.py's): "
        + ", ".join(f"{k}={v}" for k, v in settings["config"].items())
        + f"; {settings['threads']} threads. EWC + replay options of every arm: "
        + ", ".join(f"{k}={v}" for k, v in study.options.items())
        + "; a grid cell sets ewc_lambda and replay_alpha, a learned arm sets loss_weighting (its weights start at "
        "1 each: the default cell's weights).",
        "",
        "Points: hundredths of average accuracy (mean over the tasks after the last one). Cells: `mean [min, max]` "
        "over the seeds; bold: the best cell (highest seed mean). The median grid cell is what a user gets from an "
        "untuned choice on this grid.",
        "",
        "Average accuracy of the fixed weightings (rows: EWC lambda, columns: replay alpha):",
        "",
        "| ewc_lambda \\ replay_alpha | " + " | ".join(f"{a:g}" for a in study.replay_grid) + " |",
        "|---|" + "---|" * len(study.replay_grid),
    ]
    for ewc_lambda in study.ewc_grid:
        cells = [_cell(by_arm.get(grid_name(ewc_lambda, a)), best) for a in study.replay_grid]
        lines.append(f"| {ewc_lambda:g} | " + " | ".join(cells) + " |")
    best_text = "none yet" if best is None else f"{best} ({verdict['best_cell']['mean_avg_acc']:.3f})"
    median = verdict["median_cell_avg_acc"]
    lines += [
        "",
        f"Best grid cell: {best_text}; median of the {verdict['grid_cells_run']} grid cells run (of "
        f"{verdict['grid_cells']}): {cl_real._fmt(median)}.",
        "",
        "Every arm:",
        "",
        "| arm | weighting | ewc_lambda | replay_alpha | seeds | avg acc | BWT | forgetting | wall time (min) | "
        "code version |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        versions = ", ".join(v[:8] for v in row["code_versions"])
        start = " (start)" if row["weighting"] != "none" else ""
        lines.append(
            f"| {row['arm']} | {row['weighting']} | {row['ewc_lambda']:g}{start} | {row['replay_alpha']:g}{start} | "
            f"{', '.join(map(str, row['seeds']))} | {cl_real.spread(row['avg_acc'])} | {cl_real.spread(row['bwt'])} "
            f"| {cl_real.spread(row['forgetting'])} | {cl_real.spread(row['wall_minutes'], 1)} | "
            f"{versions}{' (stale)' if row['stale'] else ''} |"
        )
    learned_rows = [r for r in rows if r["weighting"] != "none"]
    if learned_rows:
        lines += [
            "",
            "Learned weights (the controller's weight on each term; the EWC weight multiplies the term "
            f"(ewc_lambda/2) sum F (theta - theta*)^2 with ewc_lambda {study.options['ewc_lambda']:g}, the replay "
            "weight replaces replay_alpha). Per task: the mean over its steps (the first task has no EWC or replay "
            "term). "
            "Bias shift: how far the controller's output bias for each term moved in training (0 for a term that "
            "never reached it).",
            "",
            "| arm | seed | per task: mean weights | final weights | controller bias shift |",
            "|---|---|---|---|---|",
        ]
        for row in learned_rows:
            for seed, per_task, final, shift, names in zip(
                row["seeds"], row["per_task_weights"], row["final_weights"], row["bias_shift"], row["task_names"]
            ):
                tasks = "; ".join(
                    f"{_task_label(t.get('task_index'), names)}: {_weights_text(t.get('weights'))}"
                    for t in per_task or []
                )
                lines.append(
                    f"| {row['arm']} | {seed} | {tasks or 'n/a'} | {_weights_text(final)} | {_weights_text(shift)} |"
                )
    lines += [
        "",
        "Still to run (`--all` order): " + (", ".join(f"{a}/seed{s} ({why})" for (a, s), why in todo) or "none."),
    ]
    if png:
        lines += ["", f"![grid heatmap]({png})"]
    return "\n".join(lines)


def plot_grid(rows: Sequence[dict[str, Any]], study: Study, path: Path) -> bool:
    """Heatmap of the grid's mean avg acc with the learned arms' in the title; False when no grid cell has run."""
    by_arm = {r["arm"]: r for r in rows}
    if not any(r["weighting"] == "none" and r["mean_avg_acc"] is not None for r in rows):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    values = np.full((len(study.ewc_grid), len(study.replay_grid)), np.nan)
    for i, ewc_lambda in enumerate(study.ewc_grid):
        for j, alpha in enumerate(study.replay_grid):
            row = by_arm.get(grid_name(ewc_lambda, alpha))
            if row is not None and row["mean_avg_acc"] is not None:
                values[i, j] = row["mean_avg_acc"]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(study.replay_grid) + 2.5), 1.2 * len(study.ewc_grid) + 2.0))
    image = ax.imshow(values, cmap="viridis", aspect="auto")
    low, high = np.nanmin(values), np.nanmax(values)
    for (i, j), value in np.ndenumerate(values):
        bright = not np.isnan(value) and high > low and (value - low) / (high - low) > 0.6  # viridis: yellow on top
        text = "not run" if np.isnan(value) else f"{value:.3f}"
        ax.text(
            j,
            i,
            text,
            ha="center",
            va="center",
            fontsize=9,
            color="gray" if np.isnan(value) else "black" if bright else "white",
        )
    ax.set_xticks(range(len(study.replay_grid)), [f"{a:g}" for a in study.replay_grid])
    ax.set_yticks(range(len(study.ewc_grid)), [f"{e:g}" for e in study.ewc_grid])
    ax.set_xlabel("replay_alpha")
    ax.set_ylabel("ewc_lambda")
    learned = [f"{m} {cl_real._fmt(by_arm[m]['mean_avg_acc'])}" for m in study.learned if m in by_arm]
    ax.set_title(
        "avg acc (seed mean) of the fixed weightings\nlearned: " + (", ".join(learned) or "not run"), fontsize=9
    )
    fig.colorbar(image, ax=ax, label="avg acc")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def build_report(
    results_dir: Path, out: Path, version: cl_real.CodeVersion | str, study: Study = REAL, name: str = NAME
) -> str:
    """`<out>/<name>.md` + `.json` (`common.write_results`) and `<out>/<name>_grid.png` from `results_dir`'s runs."""
    runs = cl_real.load_results(results_dir)
    rows = summarize(runs, version, study)
    png = Path(out) / f"{name}_grid.png"
    plotted = plot_grid(rows, study, png)
    markdown = report_markdown(runs, version, study, png.name if plotted else None)
    todo = plan(runs, version, study)
    summary = {
        "code_version": str(version),
        "settings": study.settings,
        "options": study.options,
        "arms": {a: dataclasses.asdict(spec) for a, spec in build_arms(study).items()},
        "seeds": list(study.seeds),
        "summary": cl_real._json_safe(rows),
        "verdict": cl_real._json_safe(verdicts(rows, study, todo)),
        "todo": [{"arm": a, "seed": s, "why": why} for (a, s), why in todo],
    }
    write_results(name, summary, markdown, out=out)
    return markdown


# ---------------------------------------------------------------------------------------------------------- main
def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed: give an integer >= 1")
    return value


def _inside(path: Path, folder: Path) -> bool:
    return Path(path).resolve().is_relative_to(Path(folder).resolve())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--arm", choices=list(build_arms(REAL)), help="run this arm once (with --seed)")
    mode.add_argument("--all", action="store_true", help="run every missing or stale (arm, seed), in order")
    mode.add_argument("--plan", action="store_true", help="print what --all would run and exit")
    mode.add_argument("--report", action="store_true", help="only rebuild the report from the stored runs")
    mode.add_argument("--quick", action="store_true", help="the whole study on a tiny model, 2 tasks x 16 rows")
    parser.add_argument("--seed", type=int, choices=list(SEEDS), default=None, help="with --arm (default 0)")
    parser.add_argument("--max-runs", type=_positive_int, default=None, help="with --all: stop after this many runs")
    parser.add_argument("--data", type=Path, default=cl_real.DEFAULT_DATA, help="the CL benchmark folder")
    parser.add_argument("--results", type=Path, default=None, help="folder of the per-run JSON files")
    parser.add_argument("--out", type=Path, default=None, help="folder of the report (md, json, png)")
    ns = parser.parse_args(argv)
    if ns.seed is not None and ns.arm is None:
        parser.error(f"--seed {ns.seed} is only allowed with --arm (--all runs every seed: {list(SEEDS)})")
    if ns.max_runs is not None and not ns.all:
        parser.error(f"--max-runs {ns.max_runs} is only allowed with --all")
    if not (ns.arm or ns.all or ns.plan or ns.report or ns.quick):
        parser.error("give one of --arm ARM [--seed K], --all, --plan, --report or --quick")
    study = QUICK if ns.quick else REAL
    if ns.quick:  # never into docs/results: a temporary folder unless --out / --results say where
        for option, path in (("--out", ns.out), ("--results", ns.results)):
            if path is not None and _inside(path, RESULTS):
                parser.error(
                    f"{option} {path} is not allowed with --quick: it is inside {RESULTS}; give another "
                    "folder or leave it out (a temporary folder)"
                )
        base = ns.out or Path(tempfile.mkdtemp(prefix="loss_weighting_real_quick_"))
        results_dir, out = ns.results or base / "runs", base
    else:
        results_dir, out = ns.results or RESULTS_DIR, ns.out or RESULTS
    if ns.arm or ns.all or ns.quick:
        missing = [t for t in study.settings["tasks"] if not (ns.data / t).is_dir()]
        if missing:
            parser.error(
                f"--data {ns.data} is not allowed: it needs the CL benchmark task folders {missing} "
                "(O-LoRA's CL_Benchmark layout: <task>/train.json, test.json, labels.json)"
            )
    if ns.plan:
        version = code_version(study)
        todo = plan(cl_real.load_results(results_dir), version, study)
        print(f"code version {version}; {len(todo)} run(s) to do (of {len(wanted_runs(study))}):")
        for (arm, seed), why in todo:
            print(f"  {arm} seed {seed} ({why})")
        return 0
    if ns.arm:
        run_and_save(ns.arm, 0 if ns.seed is None else ns.seed, study, ns.data, results_dir)
        return 0
    status = 0
    if ns.all or ns.quick:
        status = run_all(study, ns.data, results_dir, ns.max_runs, in_process=ns.quick)
    build_report(results_dir, out, code_version(study), study)
    return status


if __name__ == "__main__":
    sys.exit(main())
