"""The adaptive LR law on a real model: how much does the final loss depend on the base learning rate?

Issue 14 ("The adaptive scheduler"): over a 100x range of base learning rates on SmolLM2-135M (LoRA on a shared
task), the adaptive law must keep the smallest spread of the final held-out loss across those LRs **and** reach, at
its best LR, a final loss within 5 % of the best constant or cosine schedule's. On the tiny Gemma
(`benchmarks/lr_robustness.py`, `docs/results/lr_robustness.md`) the adaptive law had the smallest spread, but its
best final loss was 0.102 against constant's 0.017; this script measures the same question on the real model,
through the public API only.

Arms: schedule x base LR x seed, each one run, stored as its own JSON file
(`docs/results/scheduler_real/<task>_<schedule>_lr<lr>_seed<k>.json`) with the code version that produced it
(`cl_real.CodeVersion`: the manifest of the package files the run loaded, this script, `cl_real.py`,
`common.py` and `SETTINGS`), so the arms can be spread over sessions and a stale one is re-run:

* `constant`: transformers' `lr_scheduler_type="constant_with_warmup"`, 2 warm-up steps (cl_real's: transformers'
  warm-up gives the first step LR 0 and the second half the base LR);
* `cosine`: `lr_scheduler_type="cosine"`, the same 2 warm-up steps, down to 0 at the last step;
* `adaptive`: the package's adaptive law, `build_plugins(["adaptive_scheduler"], config, model=model)`
  (`AdaptiveSchedulerCallback`, `hf_adaptive/scheduling/`), with its default `AdaptiveSchedulerConfig` (u=1.02,
  d=0.8, patience 5, cooldown 5, 3 observations of warm-up, momentum (Adam's beta1) adapted in [0.5, 0.95]). The
  callback owns the LR, so the Trainer's schedule must be `constant` (it refuses any other, a warm-up included);
  `logging_steps=1` (every arm) makes each step's training loss one observation. Defaults kept on purpose: the
  question is how the law does as a user gets it. Note what the patience rule allows in one epoch of 32 steps: at
  most 1.02^29 = 1.8x up, or about three cuts (5 bad observations + 5 of cooldown each), 0.8^3 = 0.51x down, so it
  cannot move a 100x-off base LR to a good one within this budget. The spike rule (on by default since the first
  30 runs of this grid showed it was missing: `spike_ratio=3`, a cut by 0.5 at once on a loss above 3x its EMA)
  adds a cut per loss spike;
* `adaptive_cosine`: the same law with `adaptive_anneal="cosine"`: the LR in force is the law's LR times the
  cosine decay over the run's steps (the factor transformers' cosine schedule applies, no warm-up), so the law
  adapts while the run anneals. Compared with `cosine`, it shows what the law adds to the schedule that won the
  first grid.

Base LRs: 1e-4, 3e-4, 1e-3, 3e-3, 1e-2 (100x; cl_real trains at 2e-3); seeds 0 and 1 (LoRA initialisation and
batch order; the data subsets stay the same: `data_seed`).

Recipe (cl_real.py's `SETTINGS`): `ContinualConfig` + `ContinualTrainer.train_sequence([task])` on one task (SST-2 by
default, `--task`), one shared LoRA r=8 (alpha 16) on q, k, v, o, AdamW, no weight decay, batches of 8, 256
training rows, 1 epoch (32 steps), plain prompts <= 96 tokens, answer-only logits, 2 threads; 100 held-out rows
from the task's test split (`load_cl_benchmark_task(folder, name, n_train, n_eval, seed=0)`: the same rows for
every arm and seed).

Per run: the final held-out loss (`hf_adaptive.scheduling.validation_loss`: the mean next-token cross-entropy over
the answer tokens of the eval rows, the label word and the appended eos, i.e. the training objective without
dropout, on rows tokenized as the trainer tokenizes them: `tokenize_task` with the run's `prompt_options` and
`append_eos_token`), the accuracy (rank classification with mean label scoring: the trainer's own continual
evaluation, `train_sequence`'s accuracy matrix), the final training loss (mean of the last 5 steps), the LR in
force at the last step and at every step (read from the optimizer at each step), the adaptive law's decisions
(counts of its events), wall seconds (load, train, evaluation) and the 1-minute load average at start and end. A
run whose training hits `nonfinite_patience` non-finite steps in a row, or ends with a non-finite loss or accuracy,
is recorded as diverged (held-out loss +inf in the report).

Report (`docs/results/scheduler_real.md` + `.json`, `scheduler_real.png`): per schedule, the final held-out loss at
each LR (mean [min, max] over seeds), its spread (max - min over LRs of the seed means), spread / constant's spread,
the best loss and its LR; the two targets judged plainly; the same for accuracy; the final training loss and the
LR in force at the end; what is still to run. The plot: held-out loss and accuracy against the base LR (log x),
one line per schedule (seed mean) with its min-max band.

    python benchmarks/scheduler_real.py --all [--max-runs N]   # every missing or stale arm, one process each
    python benchmarks/scheduler_real.py --plan                 # what --all would run, and why
    python benchmarks/scheduler_real.py --report               # the report from the stored runs only
    python benchmarks/scheduler_real.py --quick                # the pipeline on a tiny Gemma, into a temp dir
    python benchmarks/scheduler_real.py --all --schedules constant,adaptive --lrs 1e-4,1e-2 --seeds 0 --task SST-2
    python benchmarks/scheduler_real.py --run adaptive 1e-3 0  # one arm (what --all starts for each)

`--all` runs seed 0 completely first (each LR: constant, cosine, adaptive in turn, so partial results compare the
schedules at the same LRs under similar machine load), then seed 1. Each arm runs in its own process and is
written atomically when it ends: a killed `--all` loses at most the arm in progress. `--quick` writes into a
temporary folder unless `--out` (report) / `--results` (runs) say where, never into docs/results.

Model: `load_model_and_tokenizer("smollm2-135m")` (set `HF_ADAPTIVE_CACHE` to where it was converted); `--quick`:
cl_real's tiny Gemma with a word-level tokenizer over the task's words. Data: `../shared/data/cl_benchmark`
(O-LoRA's CL_Benchmark layout) or `--data DIR`.

Budget (an estimate, not measured here; figures from cl_real.py's measurements on 2 quiet cores): per run ~5 s of
loading, 32 LoRA steps x 1.6-2.4 s (SST-2's short prompts: ~1.6 s) = 50-80 s, the accuracy 100 x 0.1 s = 10 s,
the held-out loss (full logits) ~10 s: ~75-105 s, about 90 s. The first grid: 3 schedules x 5 LRs x 2 seeds = 30
runs x ~90 s = ~45 min on quiet cores, 40 runs with `adaptive_cosine` ~60 min; 2-4x that under load. Seed 0
alone: 20 runs, ~30 min.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import json
import math
import os
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, environment, write_results  # noqa: E402, I001  (first: the offline, 1-thread setup)
import cl_real  # noqa: E402
from cl_real import PACKAGE, CodeVersion, _json_safe, is_current  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve()
#: the files a run depends on besides the package: this script and the helpers it imports
SCRIPTS = (HERE, HERE.with_name("cl_real.py"), HERE.with_name("common.py"))
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "cl_benchmark"
RESULTS_DIR = RESULTS / "scheduler_real"
NAME = "scheduler_real"
DEFAULT_TASK = "SST-2"

#: schedule -> transformers' `lr_scheduler_type` (adaptive: the callback requires "constant" and owns the LR)
SCHEDULES: dict[str, str] = {
    "constant": "constant_with_warmup",
    "cosine": "cosine",
    "adaptive": "constant",
    "adaptive_cosine": "constant",
}
#: the schedules the adaptive law is compared with (issue 14: "the best constant or cosine schedule")
BASELINES = ("constant", "cosine")
#: the adaptive law's arms -> the `adaptive_*` options they set on top of its defaults
ADAPTIVE: dict[str, dict[str, Any]] = {"adaptive": {}, "adaptive_cosine": {"adaptive_anneal": "cosine"}}
LRS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
SEEDS = (0, 1)
QUICK_LRS = (1e-4, 1e-2)
QUICK_SEEDS = (0,)
#: the adaptive law's best loss must be within this factor of the best baseline's
LOSS_TOLERANCE = 1.05
#: training-loss steps averaged for the final training loss
LAST_STEPS = 5

_RECIPE = {k: v for k, v in cl_real.SETTINGS["config"].items() if k not in ("learning_rate", "lr_scheduler_type")}
#: the recipe every arm shares (an arm changes only its schedule, base LR and seed)
SETTINGS: dict[str, Any] = {
    "model": "smollm2-135m",
    "task": DEFAULT_TASK,
    "n_train": 256,
    "n_eval": 100,
    "data_seed": 0,
    "threads": 2,
    "eval_loss_batch_size": 16,
    "config": {**_RECIPE, "num_train_epochs": 1, "warmup_steps": 2, "logging_steps": 1},
}
#: `--quick`: the tiny Gemma, 32 training rows x 2 epochs (8 steps), 16 eval rows, 1 thread
QUICK_SETTINGS: dict[str, Any] = {
    **SETTINGS,
    "model": "tiny",
    "n_train": 32,
    "n_eval": 16,
    "threads": 1,
    "config": {
        **SETTINGS["config"],
        "num_train_epochs": 2,
        "prompt_max_length": 64,
        "continual_eval_token_budget": 1024,
    },
}

Key = tuple[str, float, int]  # (schedule, base LR, seed)


@dataclasses.dataclass(frozen=True)
class Grid:
    """The arms a study wants: schedules x base LRs x seeds (each in the order given)."""

    schedules: tuple[str, ...] = tuple(SCHEDULES)
    lrs: tuple[float, ...] = LRS
    seeds: tuple[int, ...] = SEEDS

    def keys(self) -> list[Key]:
        """Every arm in `--all`'s order: seed by seed (a complete seed 0 first), LR by LR, schedule by schedule."""
        return [(s, lr, seed) for seed in self.seeds for lr in self.lrs for s in self.schedules]


# -------------------------------------------------------------------------------------------------- CLI values
# argparse prefixes these messages with the option ("argument --lrs: ..."); `--run` prefixes them itself
def _items(text: str) -> list[str]:
    return [part.strip() for part in str(text).split(",") if part.strip()]


def _no_duplicates(text: str, values: Sequence[Any]) -> None:
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed: a value is given twice")


def parse_schedule(text: str) -> str:
    """One schedule name of `SCHEDULES`."""
    if text not in SCHEDULES:
        raise argparse.ArgumentTypeError(
            f"schedule {text!r} is not allowed: choose from {', '.join(SCHEDULES)} (comma-separated)"
        )
    return text


def parse_schedules(text: str) -> tuple[str, ...]:
    """`--schedules constant,adaptive`: known names, at least one, no repeats."""
    names = _items(text)
    if not names:
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed: name at least one of {', '.join(SCHEDULES)}")
    names = [parse_schedule(name) for name in names]
    _no_duplicates(text, names)
    return tuple(names)


def parse_lr(text: str) -> float:
    """One base LR: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(
            f"learning rate {text!r} is not allowed: every learning rate must be a finite number > 0"
        )
    return value


def parse_lrs(text: str) -> tuple[float, ...]:
    """`--lrs 1e-4,1e-2`: at least one finite LR > 0, no repeats."""
    items = _items(text)
    if not items:
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed: give at least one learning rate > 0")
    values = [parse_lr(item) for item in items]
    _no_duplicates(text, values)
    return tuple(values)


def parse_seed(text: str) -> int:
    """One seed: an integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"seed {text!r} is not allowed: seeds are integers >= 0")
    return value


def parse_seeds(text: str) -> tuple[int, ...]:
    """`--seeds 0,1`: at least one integer seed >= 0, no repeats."""
    items = _items(text)
    if not items:
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed: give at least one seed (an integer >= 0)")
    values = [parse_seed(item) for item in items]
    _no_duplicates(text, values)
    return tuple(values)


# ----------------------------------------------------------------------------------------- stored runs, the plan
def result_path(results_dir: Path, task: str, schedule: str, lr: float, seed: int) -> Path:
    return Path(results_dir) / f"{task}_{schedule}_lr{lr:g}_seed{seed}.json"


def load_results(results_dir: Path, task: str) -> dict[Key, dict]:
    """Every stored run of `task` in `results_dir`, by (schedule, base LR, seed); unreadable files are skipped."""
    runs: dict[Key, dict] = {}
    for path in sorted(Path(results_dir).glob("*_seed*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            key = (str(data["schedule"]), float(data["base_lr"]), int(data["seed"]))
            if data.get("task") == task:
                runs[key] = data
        except (OSError, ValueError, KeyError, TypeError) as err:
            print(f"skipping {path}: not a scheduler_real result ({err})", file=sys.stderr)
    return runs


def run_status(runs: dict[Key, dict], key: Key, version: CodeVersion | str) -> str:
    """'missing', 'stale' (made by other code or settings) or 'current'."""
    if key not in runs:
        return "missing"
    return "current" if is_current(runs[key], version) else "stale"


def plan(runs: dict[Key, dict], grid: Grid, version: CodeVersion | str) -> list[tuple[Key, str]]:
    """The arms `--all` would run now, in order, each with why ('missing' or 'stale')."""
    return [(key, status) for key in grid.keys() if (status := run_status(runs, key, version)) != "current"]


def arm_name(key: Key) -> str:
    schedule, lr, seed = key
    return f"{schedule}/lr{lr:g}/seed{seed}"


# ------------------------------------------------------------------------------------------------------ one run
def _step_recorder(every: int) -> Any:
    """A callback keeping the LR in force at every optimizer step (read from the optimizer itself, whatever set
    it), every logged training loss and the trainer's count of skipped non-finite steps; prints a progress line
    every `every` steps."""
    from transformers import TrainerCallback

    class StepRecorder(TrainerCallback):
        def __init__(self) -> None:
            self.lrs: list[float] = []
            self.losses: list[float] = []
            self.skipped = 0  # the trainer's `nonfinite_steps_skipped` log (non-finite steps it skipped so far)
            self.started = time.perf_counter()

        def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
            if optimizer is not None:
                self.lrs.append(float(optimizer.param_groups[0]["lr"]))

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))
                self.skipped = int(logs.get("nonfinite_steps_skipped", self.skipped))
                if every and state.global_step % every == 0:
                    lr = self.lrs[-1] if self.lrs else float("nan")
                    print(
                        f"    step {state.global_step}/{state.max_steps} loss {logs['loss']:.4f} lr {lr:.3g} "
                        f"({time.perf_counter() - self.started:.0f} s)",
                        flush=True,
                    )

    return StepRecorder()


def held_out_loss(model: Any, tokenizer: Any, task: Any, config: Any, batch_size: int) -> float:
    """Mean answer-token cross-entropy on the task's eval rows (`validation_loss`), the rows tokenized as the
    trainer tokenizes them for this run (prompt options, eos)."""
    from hf_adaptive.scheduling import validation_loss
    from hf_adaptive.tasks import tokenize_task
    from hf_adaptive.tasks.prompting import prompt_options

    rows = tokenize_task(task, tokenizer, "eval", append_eos=config.append_eos_token, **prompt_options(config))
    return validation_loss(model, tokenizer, rows, batch_size=batch_size)


def _finite(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def run_arm(schedule: str, lr: float, seed: int, settings: dict[str, Any], data: Path) -> dict[str, Any]:
    """Train one arm and return its record (not yet written)."""
    import torch
    from transformers import PrinterCallback, set_seed

    from hf_adaptive.config import ContinualConfig
    from hf_adaptive.registry import build_plugins
    from hf_adaptive.tasks.cl_benchmark import load_cl_benchmark_task
    from hf_adaptive.trainer import ContinualTrainer, NonFiniteTrainingError

    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r} is not allowed: choose one of {list(SCHEDULES)}")
    torch.set_num_threads(settings["threads"])
    load_average_start = os.getloadavg()[0]
    started = time.perf_counter()
    set_seed(seed)
    task = load_cl_benchmark_task(
        data, settings["task"], max_train=settings["n_train"], max_eval=settings["n_eval"], seed=settings["data_seed"]
    )
    model, tokenizer = cl_real.load_model(settings, [task], seed)
    load_seconds = time.perf_counter() - started
    options = {"learning_rate": lr, "lr_scheduler_type": SCHEDULES[schedule], **ADAPTIVE.get(schedule, {})}
    record: dict[str, Any] = {"diverged": False, "error": None}
    with tempfile.TemporaryDirectory() as tmp:
        config = ContinualConfig(
            output_dir=tmp,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            disable_tqdm=True,
            save_results_plot=False,
            dataloader_num_workers=0,
            seed=seed,
            **{**settings["config"], **options},
        )
        plugins = build_plugins(["adaptive_scheduler"], config, model=model) if schedule in ADAPTIVE else []
        recorder = _step_recorder(every=8)
        trainer = ContinualTrainer(model=model, args=config, processing_class=tokenizer, callbacks=[*plugins, recorder])
        trainer.remove_callback(PrinterCallback)  # one line per logged step otherwise; the recorder prints less
        accuracy = eval_loss = None
        train_seconds = eval_seconds = 0.0
        skipped = 0
        t0 = time.perf_counter()
        try:
            result = trainer.train_sequence([task])
        except NonFiniteTrainingError as err:
            train_seconds = time.perf_counter() - t0
            record.update(diverged=True, error=f"{type(err).__name__}: {err}")
            skipped = recorder.skipped + 1  # the step that raised was skipped too, but never logged
        else:
            train_seconds = result.train_time[0]
            eval_seconds = time.perf_counter() - t0 - train_seconds  # the trainer's accuracy evaluation
            accuracy = _finite(result.matrix[-1][0])
            skipped = int((result.extra.get("nonfinite_steps_skipped") or [0])[0])
            t1 = time.perf_counter()
            eval_loss = _finite(held_out_loss(trainer.model, tokenizer, task, config, settings["eval_loss_batch_size"]))
            eval_seconds += time.perf_counter() - t1
            if accuracy is None or eval_loss is None:
                record.update(diverged=True, error="non-finite held-out loss or accuracy")
        law_lrs: list[float] = []
        if plugins:
            law = plugins[0]
            # the law's own LR in force at each step (before the anneal): the base, then each decision's
            law_lrs = [lr] + [float(h["law_lr"]) for h in law.history[:-1]]
            record["adaptive_config"] = dataclasses.asdict(law.config)
            record["adaptive_events"] = dict(collections.Counter(h["event"] for h in law.history))
            record["adaptive_momentum_final"] = law.scheduler.momentum if law.scheduler is not None else None
    losses = [v for v in recorder.losses if math.isfinite(v)]
    record.update(
        task=settings["task"],
        schedule=schedule,
        base_lr=lr,
        seed=seed,
        lr_scheduler_type=SCHEDULES[schedule],
        metrics={
            "eval_loss": eval_loss,
            "accuracy": accuracy,
            "train_loss": statistics.fmean(losses[-LAST_STEPS:]) if losses else None,
            "lr_final": recorder.lrs[-1] if recorder.lrs else None,
        },
        trajectory={"lr": recorder.lrs, "loss": recorder.losses, **({"law_lr": law_lrs} if law_lrs else {})},
        steps=len(recorder.lrs),
        nonfinite_steps_skipped=skipped,
        wall_seconds=time.perf_counter() - started,
        load_seconds=load_seconds,
        train_seconds=train_seconds,
        eval_seconds=eval_seconds,
        load_average={"start": load_average_start, "end": os.getloadavg()[0]},
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        settings=settings,
        data=str(data),
        environment=environment(),
        finished_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
    return _json_safe(record)


def save_run(results_dir: Path, record: dict[str, Any], version: CodeVersion | str) -> Path:
    """Store a finished run atomically, stamped with its code version (a `CodeVersion`: what it loaded)."""
    path = result_path(results_dir, record["task"], record["schedule"], record["base_lr"], record["seed"])
    return cl_real.write_stamped(path, record, version)


def run_and_save(
    key: Key, settings: dict[str, Any], data: Path, results_dir: Path, version: CodeVersion | str
) -> dict[str, Any]:
    schedule, lr, seed = key
    print(f"--- {arm_name(key)} on {settings['task']} ({settings['model']})", flush=True)
    record = run_arm(schedule, lr, seed, settings, data)
    path = save_run(results_dir, record, version)
    m = record["metrics"]
    print(
        f"    eval loss {_fmt(m['eval_loss'])} acc {_fmt(m['accuracy'])} train loss {_fmt(m['train_loss'])} "
        f"final lr {_fmt_lr(m['lr_final'])}{' DIVERGED' if record['diverged'] else ''} "
        f"wall {record['wall_seconds']:.0f} s (train {record['train_seconds']:.0f} s) -> {path}",
        flush=True,
    )
    return record


# ------------------------------------------------------------------------------------------------ the summary
def _value(record: dict[str, Any], metric: str) -> float | None:
    """A run's metric; a diverged run's held-out loss is +inf (the worst), its other metrics missing."""
    value = (record.get("metrics") or {}).get(metric)
    if record.get("diverged") and metric == "eval_loss":
        return math.inf
    return _finite(value)


def cell(values: Sequence[float | None]) -> dict[str, Any]:
    """Seed statistics of one (schedule, LR): mean, min, max over the runs with a value (+inf: diverged)."""
    present = [v for v in values if v is not None]
    diverged = sum(1 for v in present if v == math.inf)
    if not present:
        return {"n": 0, "mean": None, "min": None, "max": None, "diverged": 0}
    return {
        "n": len(present),
        "mean": math.inf if diverged else statistics.fmean(present),
        "min": min(present),
        "max": max(present),
        "diverged": diverged,
    }


def summarize_metric(runs: dict[Key, dict], grid: Grid, metric: str, higher_is_better: bool) -> dict[str, Any]:
    """Per schedule: each LR's cell, the spread (max - min over LRs of the seed means), the best mean and its LR,
    and whether every LR has a value. +inf means (diverged) make the spread +inf; the best is over finite means."""
    out: dict[str, Any] = {}
    for schedule in grid.schedules:
        per_lr = []
        for lr in grid.lrs:
            values = [_value(runs[(schedule, lr, s)], metric) for s in grid.seeds if (schedule, lr, s) in runs]
            per_lr.append({"lr": lr, **cell(values)})
        means = [(c["mean"], c["lr"]) for c in per_lr if c["mean"] is not None]
        finite = [(m, lr) for m, lr in means if math.isfinite(m)]
        spread = max(m for m, _ in means) - min(m for m, _ in means) if means else None
        if finite:
            best, best_lr = (max if higher_is_better else min)(finite, key=lambda item: item[0])
        else:
            best, best_lr = None, None
        out[schedule] = {
            "per_lr": per_lr,
            "spread": spread,
            "best": best,
            "best_lr": best_lr,
            "complete": all(c["n"] > 0 for c in per_lr),
        }
    constant = (out.get("constant") or {}).get("spread")
    for entry in out.values():
        s = entry["spread"]
        ok = constant is not None and math.isfinite(constant) and constant > 0 and s is not None
        entry["spread_vs_constant"] = s / constant if ok else None
    return out


def judge(loss: dict[str, Any], name: str = "adaptive") -> dict[str, Any]:
    """The two targets for the adaptive arm `name` on the held-out loss summary (`summarize_metric(...,
    "eval_loss", False)`).

    `spread_smallest`: its spread is finite and below every schedule's that is not an adaptive arm. `within_tolerance`:
    its best loss / min(best loss of the baselines in the grid) <= `LOSS_TOLERANCE` (`ratio`). Each is True,
    False, or None (not judged, `why`) while a schedule it is compared with lacks a result at some base LR."""
    baselines = [b for b in BASELINES if b in loss]
    verdict: dict[str, Any] = {
        "spread_smallest": None,
        "within_tolerance": None,
        "ratio": None,
        "baselines": baselines,
        "why": None,
    }
    adaptive = loss.get(name)
    others = [v for k, v in loss.items() if k not in ADAPTIVE]
    incomplete = [k for k, v in loss.items() if not v["complete"] and (k == name or k not in ADAPTIVE)]
    if adaptive is None:
        verdict["why"] = f"{name} is not in the grid"
    elif not others:
        verdict["why"] = "no schedule to compare with in the grid"
    elif incomplete:
        verdict["why"] = f"no result yet at some base LR for {', '.join(incomplete)}"
    if verdict["why"]:
        return verdict
    spread = adaptive["spread"]
    verdict["spread_smallest"] = math.isfinite(spread) and all(spread < v["spread"] for v in others)
    bests = [loss[b]["best"] for b in baselines if loss[b]["best"] is not None]
    if not baselines:
        verdict["why"] = "neither constant nor cosine is in the grid"
    elif adaptive["best"] is None:
        verdict["within_tolerance"] = False
        verdict["why"] = f"every {name} run diverged"
    elif not bests:
        verdict["within_tolerance"] = True
        verdict["why"] = "every constant / cosine run diverged"
    else:
        reference = min(bests)
        ratio = adaptive["best"] / reference if reference > 0 else (1.0 if adaptive["best"] == 0 else math.inf)
        verdict["ratio"] = ratio
        verdict["within_tolerance"] = ratio <= LOSS_TOLERANCE
    return verdict


def summarize(runs: dict[Key, dict], grid: Grid) -> dict[str, Any]:
    """Everything the report shows: per-metric summaries and the verdicts (`verdict`: the default law's,
    `verdicts`: every adaptive arm's of the grid)."""
    loss = summarize_metric(runs, grid, "eval_loss", higher_is_better=False)
    return {
        "eval_loss": loss,
        "accuracy": summarize_metric(runs, grid, "accuracy", higher_is_better=True),
        "train_loss": summarize_metric(runs, grid, "train_loss", higher_is_better=False),
        "lr_final": summarize_metric(runs, grid, "lr_final", higher_is_better=False),
        "verdict": judge(loss),
        "verdicts": {name: judge(loss, name) for name in ADAPTIVE if name in grid.schedules},
    }


# ------------------------------------------------------------------------------------------------------ report
def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if value == math.inf:
        return "diverged"
    return f"{value:.{digits}f}"


def _fmt_lr(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2e}"


def _fmt_cell(c: dict[str, Any], digits: int = 3, lr: bool = False) -> str:
    """`mean [min, max]` over seeds, the single value, 'diverged (k/n)' or n/a."""
    f = _fmt_lr if lr else (lambda v: _fmt(v, digits))
    if not c["n"]:
        return "n/a"
    if c["diverged"]:
        return f"diverged ({c['diverged']}/{c['n']} seeds)"
    if c["n"] == 1:
        return f(c["mean"])
    return f"{f(c['mean'])} [{f(c['min'])}, {f(c['max'])}]"


def _verdict_word(flag: bool | None) -> str:
    return "not judged" if flag is None else ("met" if flag else "missed")


def verdict_lines(summary: dict[str, Any], grid: Grid) -> list[str]:
    """The two targets, judged plainly, for each adaptive arm of the grid."""
    loss = summary["eval_loss"]
    spreads = ", ".join(f"{s} {_fmt(v['spread'])}" for s, v in loss.items() if s not in ADAPTIVE)
    lines: list[str] = []
    verdicts = summary.get("verdicts") or {"adaptive": summary["verdict"]}
    for name, verdict in verdicts.items():
        names = verdict["baselines"] or list(BASELINES)
        reference = "min(" + ", ".join(f"best {b}" for b in names) + ")"
        bests = "; ".join(
            f"{s} {_fmt(loss[s]['best'])} at lr {loss[s]['best_lr']:g}"
            for s in (name, *names)
            if s in loss and loss[s]["best"] is not None
        )
        ratio = verdict["ratio"]
        ratio_text = f"ratio {ratio:.2f}" if ratio is not None and math.isfinite(ratio) else "ratio n/a"
        own = _fmt((loss.get(name) or {}).get("spread"))
        lines += [
            f"- {name} spread smallest: **{_verdict_word(verdict['spread_smallest'])}** (spread of the seed-mean "
            f"held-out loss over {len(grid.lrs)} base LR(s): {name} {own}; {spreads or 'no baselines'})",
            f"- {name} best loss within {round((LOSS_TOLERANCE - 1) * 100)} % of {reference}: "
            f"**{_verdict_word(verdict['within_tolerance'])}** ({ratio_text}; {bests or 'no results'})",
        ]
        if verdict.get("why"):
            lines.append(f"- {name} not judged / caveat: {verdict['why']}")
    if not any(name in grid.schedules for name in ADAPTIVE):
        lines.append("- the adaptive law is not in this grid (`--schedules`)")
    return lines


def metric_table(entry: dict[str, Any], grid: Grid, best_word: str | None, digits: int = 3) -> list[str]:
    """One row per schedule: each LR's cell, then (with `best_word`) the spread, spread / constant's spread, and the
    best seed mean with its LR; without `best_word` (the LR table) the LR cells only."""
    lr = best_word is None
    head = "| schedule | " + " | ".join(f"lr {x:g}" for x in grid.lrs) + " |"
    lines = [head, "|---|" + "---|" * len(grid.lrs)]
    if not lr:
        lines = [head + f" spread | spread / constant | {best_word} |", "|---|" + "---|" * (len(grid.lrs) + 3)]
    for schedule, s in entry.items():
        cells = [_fmt_cell(c, digits, lr) for c in s["per_lr"]]
        partial = "" if s["complete"] else " (partial)"
        row = f"| {schedule}{partial} | " + " | ".join(cells) + " |"
        if not lr:
            ratio = "n/a" if s["spread_vs_constant"] is None else f"{s['spread_vs_constant']:.2f}"
            best = "n/a" if s["best"] is None else f"{_fmt(s['best'], digits)} (lr {s['best_lr']:g})"
            spread = "inf" if s["spread"] == math.inf else _fmt(s["spread"], digits)
            row += f" {spread} | {ratio} | {best} |"
        lines.append(row)
    return lines


def reachable_range(config: dict[str, Any], steps: int) -> dict[str, Any]:
    """How far the adaptive law can move the LR in `steps` observations, from its gains alone (`AdaptiveScheduler`'s
    rules): after `warmup` observations, a cut by `lr_down` needs more than `patience` non-improving observations in a
    row and is followed by `cooldown` observations without any change, so the cuts fall at observations w+p+1,
    w+p+1 + (p+1+c), ...; a rise is at most `lr_up` per improving observation. Returns the fewest / most factors
    (`low`, `high`), the most cuts and the observations they fall at."""
    w, p, c = int(config["warmup"]), int(config["patience"]), int(config["cooldown"])
    first, period = w + p + 1, p + 1 + c
    at = list(range(first, steps + 1, period)) if steps >= first else []
    return {
        "low": float(config["lr_down"]) ** len(at),
        "high": float(config["lr_up"]) ** max(0, steps - w),
        "cuts": len(at),
        "cut_observations": at,
    }


def lr_cuts(record: dict[str, Any]) -> list[int]:
    """The steps (1-based) whose law LR is below the previous step's, from a run's trajectory (`law_lr`, the law's
    own LR before any anneal; records without it: the LR in force)."""
    trajectory = record.get("trajectory") or {}
    lrs = trajectory.get("law_lr") or trajectory.get("lr") or []
    return [i + 1 for i in range(1, len(lrs)) if lrs[i] < lrs[i - 1] * (1 - 1e-9)]


def reach_lines(runs: dict[Key, dict], grid: Grid) -> list[str]:
    """Why the law cannot flatten the grid's LR range in these runs: its reachable factor window against the range,
    and where each adaptive run cut its LR and had its worst training loss."""
    adaptive = [(k, runs[k]) for k in grid.keys() if k in runs and k[0] in ADAPTIVE and runs[k].get("adaptive_config")]
    if not adaptive:
        return []
    key, first = adaptive[0]
    steps = int(first.get("steps") or 0)
    reach = reachable_range(first["adaptive_config"], steps)
    lrs = sorted(grid.lrs)
    cfg = first["adaptive_config"]
    lines = [
        "",
        "## What the law can reach in one run",
        "",
        f"In {steps} observations (one per step) the law's gains allow at most {reach['cuts']} cuts by "
        f"{cfg['lr_down']:g} (warm-up {cfg['warmup']}, patience {cfg['patience']}, cooldown {cfg['cooldown']}: "
        f"observations {', '.join(map(str, reach['cut_observations'])) or 'none'}) and at most a factor "
        f"{cfg['lr_up']:g} per improving observation: the final LR lies within [{reach['low']:.2f}, "
        f"{reach['high']:.2f}] x the base LR, a {reach['high'] / reach['low']:.1f}x window, against the grid's "
        f"{lrs[-1] / lrs[0]:.0f}x range of base LRs: the patience rule alone cannot bring the largest base LR down "
        "to the best one in one task, whatever it observes."
        + (
            f" The spike rule adds a cut by {cfg['spike_backoff']:g} at once on each loss above "
            f"{cfg['spike_ratio']:g} x the loss EMA (warm-up included)."
            if cfg.get("spike_ratio")
            else ""
        )
        + " Cuts below count the LR decisions of the law only (an anneal's decay is not a cut).",
        "",
        "| run | LR cut at steps | spikes | final law LR / base | worst training loss (step) |",
        "|---|---|---|---|---|",
    ]
    for k, r in adaptive:
        trajectory = r.get("trajectory") or {}
        law = trajectory.get("law_lr") or trajectory.get("lr") or []  # records before the anneal: lr is the law's
        losses = trajectory.get("loss") or []
        finite = [(v, i + 1) for i, v in enumerate(losses) if v is not None and math.isfinite(v)]
        worst = max(finite) if finite else None
        ratio = law[-1] / r["base_lr"] if law and r.get("base_lr") else None
        spikes = (r.get("adaptive_events") or {}).get("spike", 0)
        lines.append(
            f"| {arm_name(k)} | {', '.join(map(str, lr_cuts(r))) or 'none'} | {spikes} | {_fmt(ratio, 2)} | "
            + (f"{worst[0]:.2f} ({worst[1]})" if worst else "n/a")
            + " |"
        )
    return lines


def report_markdown(
    runs: dict[Key, dict],
    grid: Grid,
    version: CodeVersion | str,
    settings: dict[str, Any] = SETTINGS,
    png: str | None = None,
    command: str = "python benchmarks/scheduler_real.py --report",
) -> str:
    """The report of whatever results exist: verdicts, the tables, the runs, what is still to run."""
    summary = summarize(runs, grid)
    in_grid = {k: v for k, v in runs.items() if k in set(grid.keys())}
    outside = len(runs) - len(in_grid)
    stale = [k for k in grid.keys() if k in runs and not is_current(runs[k], version)]
    todo = plan(runs, grid, version)
    cfg = settings["config"]
    lrs = sorted(grid.lrs)
    lines = [
        f"# Adaptive LR law vs constant and cosine on {settings['model']}: LoRA on {settings['task']}, "
        f"{lrs[-1] / lrs[0]:.0f}x range of base LRs",
        "",
        f"Written by `{command}` from the runs in its results folder (one JSON file per schedule, base LR and seed; "
        "`--all` runs what is missing or stale). A run stores the hash of every package file it loaded, of the "
        f"scripts and of the settings; it is stale when one of those changed since. {len(in_grid)} of "
        f"{len(grid.keys())} runs of the grid stored"
        + (f", {len(stale)} of them stale" if stale else "")
        + (f"; {outside} stored runs outside the grid ignored" if outside else "")
        + ".",
        "",
        f"Recipe: `ContinualTrainer.train_sequence([{settings['task']}])`, {settings['n_train']} training rows, "
        f"{cfg['num_train_epochs']} epoch(s) of batches of {cfg['per_device_train_batch_size']}, "
        f"{settings['n_eval']} held-out rows (the same for every arm), shared LoRA r={cfg['lora_r']} on "
        f"{', '.join(cfg['lora_target_modules'])}, AdamW, threads={settings['threads']}; schedules: "
        + ", ".join(f"{s} = `{t}`" for s, t in SCHEDULES.items() if s in grid.schedules)
        + f" (warm-up {cfg['warmup_steps']} steps where the schedule has one; adaptive: `build_plugins"
        '(["adaptive_scheduler"])` with its default gains, one observation per step; adaptive_cosine: the same with '
        '`adaptive_anneal="cosine"`). Seeds '
        + ", ".join(map(str, grid.seeds))
        + ". Full options: the JSON summary (`settings`).",
        "",
        "Held-out loss: mean answer-token cross-entropy on the eval rows (`hf_adaptive.scheduling.validation_loss`, "
        "label word + eos, as trained). Cells: `mean [min, max]` over seeds. Spread: max - min over the base LRs of "
        "the seed means (smaller = less sensitive to the base LR); diverged runs count as +inf.",
        "",
        "## Targets (issue 14)",
        "",
        *verdict_lines(summary, grid),
        "",
        "## Final held-out loss",
        "",
        *metric_table(summary["eval_loss"], grid, "best (lowest)"),
        "",
        "## Accuracy (rank classification, the trainer's continual evaluation)",
        "",
        *metric_table(summary["accuracy"], grid, "best (highest)"),
        "",
        f"## Final training loss (mean of the last {LAST_STEPS} steps)",
        "",
        *metric_table(summary["train_loss"], grid, "best (lowest)"),
        "",
        "## LR in force at the last step",
        "",
        *metric_table(summary["lr_final"], grid, None),
    ]
    events = [
        (k, runs[k].get("adaptive_events"))
        for k in grid.keys()
        if k in runs and k[0] in ADAPTIVE and runs[k].get("adaptive_events")
    ]
    if events:
        lines += [
            "",
            "Adaptive law's decisions per run (one observation per step): "
            + "; ".join(f"{arm_name(k)}: " + ", ".join(f"{e} {n}" for e, n in sorted(ev.items())) for k, ev in events)
            + ".",
        ]
    lines += reach_lines(runs, grid)
    lines += ["", "## Runs", "", "| arm | held-out loss | accuracy | steps | wall (s) | load start-end | code |"]
    lines.append("|---|---|---|---|---|---|---|")
    for key in grid.keys():
        if key not in runs:
            continue
        r = runs[key]
        m = r.get("metrics") or {}
        load = r.get("load_average") or {}
        code = str(r.get("code_version", "?"))[:8] + (" (stale)" if key in stale else "")
        lines.append(
            f"| {arm_name(key)} | {_fmt(_value(r, 'eval_loss'))} | {_fmt(m.get('accuracy'))} | {r.get('steps', '?')} "
            f"| {_fmt(r.get('wall_seconds'), 0)} | {_fmt(load.get('start'), 1)}-{_fmt(load.get('end'), 1)} | {code} |"
        )
    lines += [
        "",
        "Still to run (`--all` order): "
        + (", ".join(f"{arm_name(k)} ({why})" for k, why in todo) + "." if todo else "none."),
    ]
    if png:
        lines += ["", f"![held-out loss and accuracy vs base LR]({png})"]
    return "\n".join(lines)


def plot(summary: dict[str, Any], grid: Grid, path: Path, title: str) -> bool:
    """Held-out loss and accuracy vs base LR (log x): per schedule the seed mean and its min-max band. False when
    there is nothing to plot."""
    if not any(c["n"] for s in summary["eval_loss"].values() for c in s["per_lr"]):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), layout="constrained")
    for ax, (metric, label) in zip(axes, (("eval_loss", "final held-out loss"), ("accuracy", "accuracy"))):
        for schedule, entry in summary[metric].items():
            points = [c for c in entry["per_lr"] if c["n"] and c["mean"] is not None and math.isfinite(c["mean"])]
            if not points:
                continue
            xs = [c["lr"] for c in points]
            (line,) = ax.plot(xs, [c["mean"] for c in points], marker="o", label=schedule)
            ax.fill_between(
                xs, [c["min"] for c in points], [c["max"] for c in points], alpha=0.2, color=line.get_color()
            )
            for c in entry["per_lr"]:
                if c["diverged"]:
                    ax.axvline(c["lr"], color=line.get_color(), linestyle=":", alpha=0.6)
        ax.set_xscale("log")
        ax.set_xlabel("base learning rate")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def report_name(task: str) -> str:
    return NAME if task == DEFAULT_TASK else f"{NAME}_{task.lower().replace('-', '_')}"


def build_report(
    results_dir: Path,
    out: Path,
    grid: Grid,
    version: CodeVersion | str,
    settings: dict[str, Any] = SETTINGS,
    name: str | None = None,
    command: str = "python benchmarks/scheduler_real.py --report",
) -> str:
    """`<out>/<name>.md` (+ `.json`) and `<out>/<name>.png` from the runs of `settings['task']` in `results_dir`."""
    name = name or report_name(settings["task"])
    runs = load_results(results_dir, settings["task"])
    summary = summarize(runs, grid)
    png = Path(out) / f"{name}.png"
    title = f"{settings['model']}, LoRA on {settings['task']}: seed mean, min-max band"
    plotted = plot(summary, grid, png, title)
    markdown = report_markdown(runs, grid, version, settings, png.name if plotted else None, command)
    data = {
        "code_version": str(version),
        "settings": settings,
        "grid": dataclasses.asdict(grid),
        "schedules": {s: SCHEDULES[s] for s in grid.schedules},
        "summary": _json_safe(summary),
        "runs": [
            _json_safe({k: v for k, v in runs[key].items() if k not in ("trajectory", "code_files", "settings")})
            for key in grid.keys()
            if key in runs
        ],
        "todo": [{"arm": arm_name(k), "why": why} for k, why in plan(runs, grid, version)],
    }
    write_results(name, data, markdown, out=out)
    return markdown


# --------------------------------------------------------------------------------------------------------- main
def run_all(
    grid: Grid,
    settings: dict[str, Any],
    data: Path,
    results_dir: Path,
    in_process: bool,
    max_runs: int | None = None,
) -> int:
    """Every missing or stale arm in the planned order; each in its own process unless `in_process` (`--quick`).
    The plan and the code version are recomputed after each arm (code edited meanwhile is caught); an arm runs at
    most once per call. Returns 1 when an arm failed."""
    attempted: set[Key] = set()
    failed = 0
    while max_runs is None or len(attempted) < max_runs:
        version = CodeVersion(settings, PACKAGE, SCRIPTS)
        todo = [(k, why) for k, why in plan(load_results(results_dir, settings["task"]), grid, version)]
        todo = [(k, why) for k, why in todo if k not in attempted]
        if not todo:
            break
        key, why = todo[0]
        attempted.add(key)
        print(f"=== {arm_name(key)} ({why}); {len(todo) - 1} more after it", flush=True)
        if in_process:
            run_and_save(key, settings, data, results_dir, version)
            continue
        schedule, lr, seed = key
        command = [sys.executable, str(HERE), "--run", schedule, repr(lr), str(seed), "--task", settings["task"]]
        command += ["--data", str(data), "--results", str(results_dir)]
        if subprocess_run(command) != 0:
            print(f"    {arm_name(key)} failed; continuing with the next arm", flush=True)
            failed += 1
    return 1 if failed else 0


def subprocess_run(command: list[str]) -> int:
    import subprocess

    return subprocess.run(command, check=False).returncode


def _inside(path: Path, folder: Path) -> bool:
    return Path(path).resolve().is_relative_to(Path(folder).resolve())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--all", action="store_true", help="run every missing or stale arm of the grid, in order")
    parser.add_argument("--max-runs", type=int, default=None, help="with --all: stop after this many arms")
    parser.add_argument("--plan", action="store_true", help="print what --all would run and exit")
    parser.add_argument("--report", action="store_true", help="only rebuild the report and the plot")
    parser.add_argument("--quick", action="store_true", help="the pipeline on a tiny Gemma, into a temp dir")
    parser.add_argument("--run", nargs=3, metavar=("SCHEDULE", "LR", "SEED"), help="run one arm and store it")
    parser.add_argument(
        "--schedules", type=parse_schedules, default=None, help="comma-separated, of " + ", ".join(SCHEDULES)
    )
    parser.add_argument("--lrs", type=parse_lrs, default=None, help="comma-separated base LRs > 0")
    parser.add_argument("--seeds", type=parse_seeds, default=None, help="comma-separated seeds >= 0")
    parser.add_argument("--task", default=DEFAULT_TASK, help="a task of the CL benchmark folder")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the CL benchmark folder")
    parser.add_argument("--results", type=Path, default=None, help="folder of the per-run JSON files")
    parser.add_argument("--out", type=Path, default=None, help="folder of the report (md, json, png)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    if ns.max_runs is not None and ns.max_runs < 1:
        parser.error(f"argument --max-runs: {ns.max_runs} is not allowed: give a number of arms >= 1")
    if not str(ns.task).strip() or "/" in ns.task:
        parser.error(f"argument --task: {ns.task!r} is not allowed: the name of a task folder in --data")
    settings = {**(QUICK_SETTINGS if ns.quick else SETTINGS), "task": ns.task}
    grid = Grid(
        ns.schedules or tuple(SCHEDULES),
        ns.lrs or (QUICK_LRS if ns.quick else LRS),
        ns.seeds or (QUICK_SEEDS if ns.quick else SEEDS),
    )
    if ns.quick:  # never into docs/results: a temporary folder unless --out / --results say where
        for option, path in (("--out", ns.out), ("--results", ns.results)):
            if path is not None and _inside(path, RESULTS):
                parser.error(f"argument {option}: {path} is not allowed with --quick: it is inside {RESULTS}")
        if ns.out is None and ns.plan:  # nothing is written: no folder to make
            base = Path(tempfile.gettempdir()) / "scheduler_real_quick_plan"
        else:
            base = ns.out or Path(tempfile.mkdtemp(prefix="scheduler_real_quick_"))
        results_dir, out = ns.results or base / "runs", base
    else:
        results_dir, out = ns.results or RESULTS_DIR, ns.out or RESULTS
    version = CodeVersion(settings, PACKAGE, SCRIPTS)
    if ns.plan:
        todo = plan(load_results(results_dir, settings["task"]), grid, version)
        print(f"{settings['task']} on {settings['model']}: {len(todo)} of {len(grid.keys())} arm(s) to run:")
        for key, why in todo:
            print(f"  {arm_name(key)} ({why})")
        return 0
    if ns.run is not None:
        schedule, lr_text, seed_text = ns.run
        try:
            key = (parse_schedule(schedule), parse_lr(lr_text), parse_seed(seed_text))
        except argparse.ArgumentTypeError as err:
            parser.error(f"argument --run: {err}")
        run_and_save(key, settings, ns.data, results_dir, version)
        return 0
    if not (ns.all or ns.quick or ns.report):
        parser.error("give --all, --plan, --report, --quick or --run SCHEDULE LR SEED")
    status = 0
    if (ns.all or ns.quick) and not ns.report:
        status = run_all(grid, settings, ns.data, results_dir, in_process=ns.quick, max_runs=ns.max_runs)
    command = "python benchmarks/scheduler_real.py " + " ".join(argv if argv is not None else sys.argv[1:])
    build_report(results_dir, out, grid, CodeVersion(settings, PACKAGE, SCRIPTS), settings, command=command.strip())
    return status


if __name__ == "__main__":
    sys.exit(main())
