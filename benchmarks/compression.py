"""Compression of a finished task sequence: accuracy on every task vs size on disk vs CPU latency, for fp32,
post-training quantization (PTQ), quantization-aware training (QAT), gradual magnitude pruning (with and without
distillation from the dense model) and physical head pruning (issue 16).

Pipeline:

1. The finished sequence (`build_base`, cached once, reused by every arm): SmolLM2-135M learns SST-2 -> IMDB ->
   BoolQA (256 rows each, 1 epoch) with cl_real's recipe and replay (`SEQUENCE`: shared LoRA r=8 on q,k,v,o, lr
   2e-3, batches of 8 + 4 replayed rows), and the LoRA adapter is merged into the base weights
   (`merge_and_unload`). Why LoRA merged rather than full fine-tuning: it is the recipe cl_real measured on these
   tasks (replay ends at SST-2 0.87, IMDB 0.74, BoolQA 0.71 on the 5-task sequence), a LoRA step is the cheaper
   one on 2 cores, and once merged the weights are plain dense Linear weights, so every compression method acts on
   the same plain model (quantizing or pruning the base under an unmerged adapter would leave the adapter float
   and dense). The merged model is saved in the cache (`--cache`, default `$HF_ADAPTIVE_CACHE/compression_bench`)
   with its sequence record; `docs/results/compression/base.json` keeps a copy of the record.
2. Arms (`ARMS`), each from a fresh load of the finished model, each stored in its own JSON file
   (`docs/results/compression/<arm>.json`, stamped with the code version and the finished model it used), so a
   killed run continues with the arms that are missing or stale:
   * `fp32`: the finished model as it is (the reference);
   * `ptq_*`: `quantize_model` with int8_weight_only, int8_dynamic, 8da4w (torchao's standard configs), and
     int8_dynamic with `qat_compatible=True` (`_intx`: QAT's int8 numerics, the PTQ baseline of QAT at int8);
   * `qat_*`: a short recovery phase (`RECOVERY`: full fine-tuning on replayed rows of all tasks) with `QATPlugin`
     fake-quantizing the whole phase, converted at its end, for 8da4w and int8_dynamic;
   * `prune{50,70,90}`: the same recovery phase with `GradualPruningPlugin` (unstructured magnitude, per layer, the
     decoder's projections) ramping to 50 / 70 / 90 % on the cubic schedule over its first two thirds;
     `_distill`: + `DistillationPlugin` with the dense finished model as explicit teacher (forward KL at the answer
     positions, weight 1);
   * `heads50`: Michel et al. head importance (gradient of the answer loss w.r.t. per-head gates, layer-normalised,
     on the recovery rows), the least important half of all heads removed physically (`prune_heads`, ranked
     globally), then the same recovery phase;
   * controls: `recovered` (the recovery phase alone, no compression), `recovered_lr2e-5` / `recovered_lr5e-5`
     (the same at a higher rate: 5e-5, the first run's rate, flipped BoolQA to its minority label by itself),
     `recovered_ptq_*` (PTQ of the recovered model: with it, QAT's gain over PTQ is told apart from what the extra
     training on the replayed rows does) and `heads50_no_recovery`.
3. Per arm: rank-classification accuracy on every task (`score`: `rank_classify` with cl_real's prompt options,
   plain prompts <= 96 tokens, mean label scoring, 100 held-out rows per task) and their mean, and the balanced
   accuracy (mean per-label recall: a label bias scores 0.5 however skewed the eval rows are); size on disk (the
   arm's model saved as it would be shipped, `save_pretrained` / `save_quantized` / `save_pruned_model` without
   remote code, no tokenizer: the sum of the files); for gradual pruning also the size if the zeros were stored
   sparse (`bitmap`: every tensor as its non-zero values plus one bit per entry when that is smaller than dense,
   computed from the saved tensors); CPU latency: a fixed batch of `batch` x `prompt_tokens` tokens of real
   prompts, the prompt forward (prefill, `logits_to_keep=1`) and one new token with the KV cache (decode), timed
   `reps` times after `warmup`, interleaved with a fresh load of the fp32 model in the same process (A B, B A,
   ...): the ratios are medians of the per-round ratios, so machine load hits both alike. Accuracy and size are
   compared with the fp32 arm's record.

    python benchmarks/compression.py --plan            # the finished model's and every arm's state, nothing run
    python benchmarks/compression.py --all             # the finished model if missing, then every missing/stale arm
    python benchmarks/compression.py --arm prune70     # one arm (the finished model first if missing)
    python benchmarks/compression.py --report          # docs/results/compression.{md,json} + compression_pareto.png
    python benchmarks/compression.py --quick --out DIR # the whole pipeline on the tiny Gemma, built-in tasks

Real-mode budget on 2 cores, measured by the first full run (18 arms, lr 5e-5, load 1.7-3.4): the finished sequence
7.0 min (once; cached); an arm without training 0.9-1.7 min (PTQ's eager torchao layers make its evaluation
slower); a recovery arm 3.1-3.7 min (24 full fine-tuning steps of 8 rows: 123-145 s), with distillation 4-9 min
(the teacher's forward), heads50 6 min (head importance first); all 18 arms 57 min, 20 arms now about 64 min.

Code version (`code_version`, cl_real's `CodeVersion`): an arm stores the SHA-256 of every `hf_adaptive` module it
imported, of the package's data files, of this file, `cl_real.py`, `common.py` and of the settings; it stays current
while those hash the same. The
finished model is cached by its own settings (`base_key`), not the code version (it takes the longest to make);
`--rebuild-base` makes it again, and every arm made from another finished model is then stale.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import hashlib
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cl_real import CodeVersion, _json_safe, is_current, version_stamp  # noqa: E402
from common import RESULTS, environment, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "hf_adaptive"
#: what an arm's code version covers besides the package: this file, cl_real.py (its code version and JSON helpers)
#: and common.py
SCRIPTS = (Path(__file__).resolve(), *(Path(__file__).resolve().with_name(n) for n in ("cl_real.py", "common.py")))
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "cl_benchmark"
RESULTS_DIR = RESULTS / "compression"
NAME = "compression"
BASE_RECORD = "compression_base.json"

# ---------------------------------------------------------------------------------------------------- settings
#: cl_real's recipe (its `SETTINGS["config"]`), copied so that an edit there does not silently change this run
SEQUENCE_CONFIG: dict[str, Any] = {
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
}
#: how every arm is scored (cl_real's prompt and scoring options)
EVAL_CONFIG: dict[str, Any] = {
    "prompt_max_length": 96,
    "prompt_format": "plain",
    "label_scoring": "mean",
    "continual_eval_batch_size": 32,
    "continual_eval_token_budget": 4096,
    "evaluate_unseen_tasks": False,
    "evaluate_baseline": False,
}
#: cl_real's replay (`REPLAY`): a balanced buffer, 4 replayed rows per batch of 8
REPLAY = {"replay_alpha": 1.0, "replay_buffer_size": 256, "replay_policy": "balanced", "replay_batch_size": 4}
#: the recovery phase of QAT, gradual pruning and head pruning: full fine-tuning (those methods change the base
#: weights themselves) on `rows_per_task` replayed rows of every task, mixed, 1 epoch. lr 1e-5: the first run used
#: 5e-5, and that phase alone (nothing compressed) flipped BoolQA to its minority label (0.72 -> 0.37; 2e-5: 0.47;
#: 1e-5: 0.73); the `recovered_lr*` controls keep those rates in the table
RECOVERY: dict[str, Any] = {
    "rows_per_task": 64,
    "num_train_epochs": 1,
    "per_device_train_batch_size": 8,
    "learning_rate": 1e-5,
    "lr_scheduler_type": "linear",
    "warmup_steps": 2,
    "weight_decay": 0.0,
}
#: gradual pruning: the cubic ramp over the first `ramp_fraction` of the recovery steps, about `updates` updates
PRUNING: dict[str, Any] = {"ramp_fraction": 2 / 3, "updates": 10, "scope": "layer"}
#: distillation from the dense finished model (`DistillationConfig` fields)
DISTILLATION: dict[str, Any] = {"distill_lambda": 1.0, "divergence": "forward_kl", "temperature": 1.0}
#: the latency probe: batch x prompt tokens of real prompts, `reps` timed rounds after `warmup`
LATENCY: dict[str, Any] = {"batch": 4, "prompt_tokens": 64, "warmup": 3, "reps": 20}

SETTINGS: dict[str, Any] = {
    "model": "smollm2-135m",
    "task_source": "cl_benchmark",
    "tasks": ["SST-2", "IMDB", "BoolQA"],
    "n_train": 256,
    "n_eval": 100,
    "data_seed": 0,
    "seed": 0,
    "threads": 2,
    "sequence": {"config": SEQUENCE_CONFIG, "plugins": ["replay"], "options": REPLAY},
    "eval": EVAL_CONFIG,
    "recovery": RECOVERY,
    "pruning": PRUNING,
    "distillation": DISTILLATION,
    "heads": {"importance_rows_per_task": 32},
    "quantization": {"group_size": 32},
    "latency": LATENCY,
}

#: `--quick`: the same pipeline on the tiny Gemma (2 layers, 4 heads) and three built-in tasks, scaled down
QUICK_SETTINGS: dict[str, Any] = {
    **SETTINGS,
    "model": "tiny",
    "task_source": "builtin",
    "tasks": ["first_color", "last_color", "has_cat"],
    "n_train": 32,
    "n_eval": 16,
    "threads": 1,
    "sequence": {**SETTINGS["sequence"], "options": {**REPLAY, "replay_buffer_size": 16}},
    "eval": {**EVAL_CONFIG, "continual_eval_token_budget": 1024},
    "recovery": {**RECOVERY, "rows_per_task": 16},
    "heads": {"importance_rows_per_task": 8},
    "latency": {"batch": 2, "prompt_tokens": 16, "warmup": 1, "reps": 3},
}


@dataclasses.dataclass(frozen=True)
class Arm:
    """One compressed (or reference) model: what is done to the finished model, in this order: heads removed, a
    recovery phase (with QAT, gradual pruning, distillation), post-training quantization."""

    group: str  # "reference" | "ptq" | "qat" | "pruning" | "heads" | "control"
    scheme: str | None = None  # quantization scheme: PTQ after everything, or QAT's (with `qat`)
    qat_compatible: bool = False  # PTQ with QAT's int8 numerics (torchao's Intx configs)
    qat: bool = False  # the quantization is learned during the recovery phase (QATPlugin), not applied after
    recovery: bool = False  # a recovery phase (full fine-tuning on the replayed rows of all tasks)
    sparsity: float = 0.0  # gradual magnitude pruning to this sparsity during the recovery phase
    distill: bool = False  # + distillation from the dense finished model during the recovery phase
    heads: float = 0.0  # this fraction of all attention heads removed (importance-ranked) before the recovery
    recovery_lr: float | None = None  # the recovery phase at this learning rate instead of RECOVERY's (controls)


ARMS: dict[str, Arm] = {
    "fp32": Arm("reference"),
    "ptq_int8_weight_only": Arm("ptq", scheme="int8_weight_only"),
    "ptq_int8_dynamic": Arm("ptq", scheme="int8_dynamic"),
    "ptq_8da4w": Arm("ptq", scheme="8da4w"),
    "ptq_int8_dynamic_intx": Arm("ptq", scheme="int8_dynamic", qat_compatible=True),
    "qat_8da4w": Arm("qat", scheme="8da4w", qat=True, recovery=True),
    "qat_int8_dynamic_intx": Arm("qat", scheme="int8_dynamic", qat=True, recovery=True),
    "prune50": Arm("pruning", recovery=True, sparsity=0.5),
    "prune70": Arm("pruning", recovery=True, sparsity=0.7),
    "prune90": Arm("pruning", recovery=True, sparsity=0.9),
    "prune50_distill": Arm("pruning", recovery=True, sparsity=0.5, distill=True),
    "prune70_distill": Arm("pruning", recovery=True, sparsity=0.7, distill=True),
    "prune90_distill": Arm("pruning", recovery=True, sparsity=0.9, distill=True),
    "heads50": Arm("heads", recovery=True, heads=0.5),
    "recovered": Arm("control", recovery=True),
    "recovered_lr2e-5": Arm("control", recovery=True, recovery_lr=2e-5),
    "recovered_lr5e-5": Arm("control", recovery=True, recovery_lr=5e-5),
    "recovered_ptq_8da4w": Arm("control", scheme="8da4w", recovery=True),
    "recovered_ptq_int8_dynamic_intx": Arm("control", scheme="int8_dynamic", qat_compatible=True, recovery=True),
    "heads50_no_recovery": Arm("control", heads=0.5),
}
#: (scheme, PTQ arm, PTQ-after-recovery arm, QAT arm): the rows of the QAT vs PTQ table
QAT_PAIRS = (
    ("8da4w", "ptq_8da4w", "recovered_ptq_8da4w", "qat_8da4w"),
    ("int8_dynamic (Intx, per-channel)", "ptq_int8_dynamic_intx", "recovered_ptq_int8_dynamic_intx",
     "qat_int8_dynamic_intx"),
)  # fmt: skip


def arm_description(arm: Arm) -> str:
    parts = []
    if arm.heads:
        parts.append(f"{arm.heads:.0%} of heads removed")
    if arm.recovery:
        extra = [f"gradual pruning to {arm.sparsity:.0%}"] if arm.sparsity else []
        extra += ["distillation from fp32"] if arm.distill else []
        extra += [f"QAT {arm.scheme}"] if arm.qat else []
        extra += [f"lr {arm.recovery_lr:g}"] if arm.recovery_lr is not None else []
        parts.append("recovery" + (f" ({', '.join(extra)})" if extra else ""))
    if arm.scheme and not arm.qat:
        parts.append(f"PTQ {arm.scheme}" + (" (QAT numerics)" if arm.qat_compatible else ""))
    return ", ".join(parts) or "the finished model"


# ------------------------------------------------------------------------------------------ versions and records
def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def code_version(settings: dict[str, Any], package: Path = PACKAGE, scripts: Sequence[Path] = SCRIPTS) -> CodeVersion:
    """cl_real's `CodeVersion` over this benchmark's scripts: an arm stores the manifest of what it loaded."""
    return CodeVersion(settings, package, scripts)


def base_key(settings: dict[str, Any]) -> str:
    """What the finished model depends on: the model, the tasks and data, the seed and the sequence recipe."""
    keys = ("model", "task_source", "tasks", "n_train", "n_eval", "data_seed", "seed", "sequence", "eval")
    return _digest({k: settings[k] for k in keys})


def base_dir(cache: Path, settings: dict[str, Any]) -> Path:
    return Path(cache) / f"base_{base_key(settings)}"


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def base_record(cache: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The finished model's record, when the cached model is complete (written last, atomically with the folder)."""
    record = read_json(base_dir(cache, settings) / BASE_RECORD)
    return record if record and record.get("base_key") == base_key(settings) else None


def load_arm_records(results_dir: Path) -> dict[str, dict[str, Any]]:
    """Every stored arm of `results_dir`, by name (unreadable files are skipped with a note)."""
    records = {}
    for name in ARMS:
        path = Path(results_dir) / f"{name}.json"
        if path.is_file():
            data = read_json(path)
            if data is None or data.get("arm") != name:
                print(f"skipping {path}: not a compression result", file=sys.stderr)
                continue
            records[name] = data
    return records


def arm_status(record: dict[str, Any] | None, version: CodeVersion | str, base: dict[str, Any] | None) -> str:
    """'missing', 'stale' (made by other code, or from another finished model) or 'current'."""
    if record is None:
        return "missing"
    if not is_current(record, version):
        return "stale"
    if base is not None and record.get("base_id") != base.get("base_id"):
        return "stale"
    return "current"


def plan(results_dir: Path, cache: Path, settings: dict[str, Any], version: CodeVersion | str) -> list[tuple[str, str]]:
    """What `--all` would do now, in order: ('base', why) when the finished model is missing, then each arm that
    is not current, with why."""
    base = base_record(cache, settings)
    todo = [] if base is not None else [("base", "missing")]
    if base is None:  # the arms' status against the copy of the record kept with the results (another machine)
        copy = read_json(Path(results_dir) / "base.json")
        base = copy if copy and copy.get("base_key") == base_key(settings) else None
    records = load_arm_records(results_dir)
    for name in ARMS:
        status = "missing" if base is None else arm_status(records.get(name), version, base)
        if status != "current":
            todo.append((name, status))
    return todo


def _mean(values: Sequence[float | None]) -> float | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.mean(values) if values else None


# ------------------------------------------------------------------------------------------------ model and data
def setup(settings: dict[str, Any]) -> None:
    import torch
    from transformers import set_seed
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(settings["threads"])
    set_seed(settings["seed"])
    hf_logging.disable_progress_bar()  # loading / writing bars for every arm's model


def load_tasks(settings: dict[str, Any], data: Path) -> list:
    if settings["task_source"] == "builtin":
        from hf_adaptive.tasks import builtin_suite

        return builtin_suite(settings["tasks"], settings["n_train"], settings["n_eval"], settings["data_seed"])
    from hf_adaptive.tasks.cl_benchmark import load_cl_benchmark_task

    return [
        load_cl_benchmark_task(
            data, name, max_train=settings["n_train"], max_eval=settings["n_eval"], seed=settings["data_seed"]
        )
        for name in settings["tasks"]
    ]


def load_pretrained(settings: dict[str, Any]):
    from hf_adaptive.models import build_tiny_gemma, load_model_and_tokenizer

    if settings["model"] == "tiny":
        return build_tiny_gemma(seed=settings["seed"])
    return load_model_and_tokenizer(settings["model"], seed=settings["seed"])


def load_float(directory: Path):
    """A model saved by `save_pretrained`, float32, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32)
    model.eval()
    return model


def load_finished(directory: Path):
    """(model, tokenizer) of the cached finished model."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return load_float(directory), tokenizer


def continual_config(settings: dict[str, Any], output_dir: str, training: dict[str, Any], **options: Any):
    from hf_adaptive.config import ContinualConfig

    return ContinualConfig(
        output_dir=output_dir,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=not sys.stderr.isatty(),
        logging_steps=10_000,
        save_results_plot=False,
        dataloader_num_workers=0,
        seed=settings["seed"],
        **{**training, **settings["eval"], **options},
    )


def balanced_accuracy(predictions: Sequence[int], labels: Sequence[int], classes: int) -> float:
    """The mean over classes of the share of that class's rows predicted right (classes absent from `labels` left
    out): a model that always answers one label scores 1/classes whatever the split's label balance, so a flip to
    the minority label is told apart from forgetting what was learned (BoolQA's eval rows are 68 % True)."""
    recalls = []
    for k in range(classes):
        rows = [p for p, y in zip(predictions, labels) if y == k]
        if rows:
            recalls.append(sum(p == k for p in rows) / len(rows))
    return statistics.mean(recalls) if recalls else float("nan")


def score(model, tokenizer, tasks: list, settings: dict[str, Any]) -> tuple[list[float], list[float]]:
    """(accuracy, balanced accuracy) on every task's eval split: `rank_classify` with the options
    `ContinualTrainer.evaluate_tasks` reads from the same settings (`task_accuracy`'s scoring; NaN for a task whose
    label scores are not finite, as there)."""
    from hf_adaptive.tasks.formatting import rank_classify

    e = settings["eval"]
    options = {
        "max_length": e["prompt_max_length"],
        "prompt_format": e["prompt_format"],
        "label_scoring": e["label_scoring"],
        "token_budget": e["continual_eval_token_budget"],
    }
    accuracy, balanced = [], []
    for task in tasks:
        data = task.eval_dataset
        predictions, _ = rank_classify(model, tokenizer, task, data, e["continual_eval_batch_size"], **options)
        labels = [task.label_index(x) for x in data["label"]]
        if any(p < 0 for p in predictions):
            accuracy.append(float("nan"))
            balanced.append(float("nan"))
            continue
        accuracy.append(sum(p == y for p, y in zip(predictions, labels)) / len(labels))
        balanced.append(balanced_accuracy(predictions, labels, len(task.verbalizer)))
    return accuracy, balanced


def evaluate(model, tokenizer, tasks: list, settings: dict[str, Any]) -> list[float]:
    """Accuracy on every task's eval split (`score`'s first half)."""
    return score(model, tokenizer, tasks, settings)[0]


# ----------------------------------------------------------------------------------------- the finished sequence
def build_base(
    settings: dict[str, Any], data: Path, cache: Path, results_dir: Path, version: CodeVersion | str
) -> dict:
    """Train the sequence, merge the LoRA adapter, save model + tokenizer + record into the cache (whole: a
    temporary sibling renamed at the end) and a copy of the record into `results_dir/base.json`."""
    from hf_adaptive.registry import build_plugins
    from hf_adaptive.trainer import ContinualTrainer
    from hf_adaptive.utils.io import atomic_write_json

    started = time.perf_counter()
    load_average = os.getloadavg()[0]
    setup(settings)
    tasks = load_tasks(settings, data)
    model, tokenizer = load_pretrained(settings)
    seq = settings["sequence"]
    with tempfile.TemporaryDirectory() as tmp:
        config = continual_config(settings, tmp, seq["config"], **seq["options"])
        trainer = ContinualTrainer(
            model=model,
            args=config,
            processing_class=tokenizer,
            callbacks=build_plugins(list(seq["plugins"]), config, model=model),
        )
        result = trainer.train_sequence(tasks)
    merged = trainer.model
    if hasattr(merged, "merge_and_unload"):
        merged = merged.merge_and_unload()
    final = base_dir(cache, settings)
    tmp_dir = final.parent / f".{final.name}.tmp"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir(parents=True)
    merged.save_pretrained(tmp_dir)
    tokenizer.save_pretrained(tmp_dir)
    finished_at = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    record = _json_safe(
        {
            "base_key": base_key(settings),
            "base_id": f"{base_key(settings)}@{finished_at}",
            "task_names": [t.name for t in tasks],
            "matrix": result.matrix,
            "metrics": result.metrics(("avg_acc", "bwt", "forgetting")),
            "train_time": list(result.train_time),
            "steps": list(result.extra.get("steps", [])),
            "merged": "LoRA merged into the base weights (merge_and_unload)",
            "wall_seconds": time.perf_counter() - started,
            "load_average": {"start": load_average, "end": os.getloadavg()[0]},
            **version_stamp(version),
            "settings": {k: settings[k] for k in ("model", "tasks", "n_train", "n_eval", "sequence", "eval")},
            "environment": environment(),
            "finished_at": finished_at,
        }
    )
    atomic_write_json(tmp_dir / BASE_RECORD, record)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp_dir, final)
    for old in Path(cache).glob("recovered_*"):  # recovered models of an older finished model
        shutil.rmtree(old, ignore_errors=True)
    atomic_write_json(Path(results_dir) / "base.json", record)
    print(f"finished model -> {final} (avg acc {_fmt(record['metrics'].get('avg_acc'))})", flush=True)
    return record


# ------------------------------------------------------------------------------------------------ recovery phase
def recovery_tasks(tasks: list, settings: dict[str, Any]) -> list:
    """The tasks with their training rows cut to `rows_per_task` seeded rows each (what a balanced replay buffer
    keeps of every task); the eval splits are the tasks' own."""
    from hf_adaptive.tasks import Task

    n = settings["recovery"]["rows_per_task"]
    out = []
    for task in tasks:
        train = task.train_dataset.shuffle(seed=settings["data_seed"]).select(range(min(n, len(task.train_dataset))))
        out.append(
            Task(
                name=task.name,
                train_dataset=train,
                eval_dataset=task.eval_dataset,
                verbalizer=list(task.verbalizer),
                template=task.template,
                description=task.description,
                metadata=dict(task.metadata),
            )
        )
    return out


def recovery_steps(tasks: list, settings: dict[str, Any]) -> int:
    r = settings["recovery"]
    rows = sum(len(t.train_dataset) for t in tasks)
    return math.ceil(rows / r["per_device_train_batch_size"]) * r["num_train_epochs"]


def pruning_schedule(steps: int, sparsity: float, settings: dict[str, Any]) -> dict[str, Any]:
    """`GradualPruningConfig` fields: the cubic ramp from 0 at step 0 to `sparsity` over the first
    `ramp_fraction` of the recovery's `steps`, about `updates` updates; the rest trains at the final sparsity."""
    p = settings["pruning"]
    ramp = max(1, round(p["ramp_fraction"] * steps))
    frequency = max(1, ramp // p["updates"])
    return {
        "initial_sparsity": 0.0,
        "final_sparsity": sparsity,
        "begin_step": 0,
        "frequency": frequency,
        "num_updates": max(1, ramp // frequency),
        "scope": p["scope"],
    }


def recover(
    model, tokenizer, tasks: list, settings: dict[str, Any], callbacks: list, learning_rate: float | None = None
) -> tuple[list[float], dict]:
    """The recovery phase: `ContinualTrainer.train_joint` (full fine-tuning) on the replayed rows of all tasks,
    mixed, with `callbacks` (at `learning_rate` instead of the recipe's when given); returns the accuracy on every
    task after it (scored where the trainer scores, once the plugins have finished: QAT converted, pruning made
    permanent; by `score`, so the info carries the balanced accuracy too) and what it did."""
    from hf_adaptive.trainer import ContinualTrainer

    with tempfile.TemporaryDirectory() as tmp:
        config_fields = {k: v for k, v in settings["recovery"].items() if k != "rows_per_task"}
        if learning_rate is not None:
            config_fields["learning_rate"] = learning_rate
        config = continual_config(settings, tmp, {"adapter_strategy": "full", **config_fields})
        trainer = ContinualTrainer(model=model, args=config, processing_class=tokenizer, callbacks=callbacks)
        eval_seconds, balanced = [0.0], []

        def scored(stream: Any, trainer: ContinualTrainer = trainer) -> list[float]:
            t0 = time.perf_counter()
            try:
                accuracy, balanced[:] = score(trainer.model, tokenizer, list(stream), settings)
                return accuracy
            finally:
                eval_seconds[0] += time.perf_counter() - t0

        trainer.evaluate_tasks = scored
        t0 = time.perf_counter()
        row = trainer.train_joint(tasks)
        wall = time.perf_counter() - t0
    extra: dict[str, Any] = {}
    for plugin in callbacks:
        extra.update(plugin.extra_results())
    pruning = extra.get("gradual_pruning")
    if isinstance(pruning, dict):  # the per-module table is long: the overall sparsity and the updates suffice
        extra["gradual_pruning"] = {
            "sparsity": pruning.get("sparsity"),
            "updates": [(u["step"], round(u["sparsity"], 4)) for u in pruning.get("updates", [])],
        }
    info = {
        "steps": trainer.state.global_step,
        "train_seconds": wall - eval_seconds[0],
        "eval_seconds": eval_seconds[0],
        "balanced": list(balanced),
        "learning_rate": config_fields["learning_rate"],
        "train_loss": trainer.state.log_history[-1].get("train_loss") if trainer.state.log_history else None,
        "plugins": extra,
    }
    trained = trainer.model
    del trainer
    gc.collect()
    return row, {**info, "model": trained}


def recovered_dir(bench: Bench, base: dict[str, Any]) -> Path:
    """Where the finished model after the plain recovery phase is cached (per finished model, recipe and code)."""
    return Path(bench.cache) / f"recovered_{_digest([base['base_id'], bench.settings['recovery'], str(bench.version)])}"


def recovered_model(bench: Bench, tasks: list, base: dict[str, Any]):
    """The finished model after the plain recovery phase, from the cache (made by the `recovered` arm or here)."""
    directory = recovered_dir(bench, base)
    if (directory / "config.json").is_file():
        return load_float(directory), {"from_cache": str(directory)}
    model, tokenizer = load_finished(base_dir(bench.cache, bench.settings))
    _, info = recover(model, tokenizer, recovery_tasks(tasks, bench.settings), bench.settings, [])
    model = info.pop("model")
    cache_recovered(model, directory)
    return model, info


def cache_recovered(model, directory: Path) -> None:
    """Keep the recovered model at `directory`, written whole; recovered models of other versions are removed."""
    for old in directory.parent.glob("recovered_*"):
        if old != directory:
            shutil.rmtree(old, ignore_errors=True)
    save_whole(model, directory)


def save_whole(model, directory: Path) -> None:
    """`save_pretrained` into a temporary sibling, renamed over `directory` (never half a model)."""
    tmp = directory.parent / f".{directory.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)


# -------------------------------------------------------------------------------------------------- head pruning
def importance_batches(model, tokenizer, tasks: list, settings: dict[str, Any]) -> list[dict]:
    """Training rows (answer labels) of the first `importance_rows_per_task` recovery rows of every task, in
    right-padded batches of 8."""
    from hf_adaptive.tasks import CausalLMCollator, tokenize_task

    e = settings["eval"]
    collator = CausalLMCollator(tokenizer)
    rows = []
    for task in tasks:
        data = tokenize_task(task, tokenizer, "train", e["prompt_max_length"], prompt_format=e["prompt_format"])
        n = min(settings["heads"]["importance_rows_per_task"], len(data))
        rows += [{k: data[i][k] for k in ("input_ids", "attention_mask", "labels")} for i in range(n)]
    return [collator(rows[i : i + 8]) for i in range(0, len(rows), 8)]


def prune_heads_by_importance(model, tokenizer, tasks: list, fraction: float, settings: dict[str, Any]) -> dict:
    """Remove the `fraction` of all attention heads with the lowest Michel et al. importance (per-layer normalised,
    ranked globally), physically (`prune_heads`); returns what was removed."""
    import torch

    from hf_adaptive.models import gate_model, head_importance, prune_heads

    gated = gate_model(model)
    try:
        scores = head_importance(model, importance_batches(model, tokenizer, tasks, settings))
    finally:
        gated.remove()
    layers, heads = scores.shape
    count = round(fraction * layers * heads)
    order = torch.argsort(scores.flatten(), stable=True)[:count].tolist()
    drop: dict[int, list[int]] = {}
    for index in order:
        drop.setdefault(index // heads, []).append(index % heads)
    prune_heads(model, {layer: sorted(h) for layer, h in drop.items()})
    layout = model.config.pruned_heads_layout
    return {
        "removed": count,
        "total": layers * heads,
        "kept_per_layer": [0 if layout[str(i)]["zeroed"] else len(layout[str(i)]["heads"]) for i in range(layers)],
        "importance": [[round(v, 4) for v in row] for row in scores.tolist()],
    }


# ------------------------------------------------------------------------------------------------ size on disk
def sparse_bytes(directory: Path) -> int:
    """The folder's size if every saved tensor were stored as its non-zero values plus a bitmap of their
    positions (1 bit per entry) whenever that is smaller than dense; the other files as they are."""
    from safetensors import safe_open

    total = sum(f.stat().st_size for f in Path(directory).rglob("*") if f.is_file())
    for file in sorted(Path(directory).rglob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open is not a dict
                tensor = handle.get_tensor(key)
                dense = tensor.numel() * tensor.element_size()
                bitmap = int(tensor.count_nonzero()) * tensor.element_size() + math.ceil(tensor.numel() / 8)
                total -= dense - min(dense, bitmap)
    return total


def saved_size(model, directory: Path, sparse: bool) -> dict[str, Any]:
    """Save the arm's model as it would be shipped (no tokenizer) and measure it; the folder is removed after."""
    from hf_adaptive.compression import model_size_bytes, save_quantized
    from hf_adaptive.models import save_pruned_model

    try:
        if getattr(model, "hf_quantizer", None) is not None:
            save_quantized(model, directory)
            how = "save_quantized (torchao safetensors)"
        elif getattr(model.config, "pruned_heads_layout", None):
            save_pruned_model(model, directory, remote_code=False)
            how = "save_pruned_model"
        else:
            model.save_pretrained(directory)
            how = "save_pretrained"
        files = {f.name: f.stat().st_size for f in Path(directory).rglob("*") if f.is_file()}
        out = {"bytes": model_size_bytes(directory), "files": files, "how": how}
        if sparse:
            out["sparse_bytes"] = sparse_bytes(directory)
        return out
    finally:
        shutil.rmtree(directory, ignore_errors=True)


# ------------------------------------------------------------------------------------------------------ latency
def latency_prompts(tokenizer, tasks: list, batch: int, length: int):
    """A fixed (batch, length) block of token ids: the tasks' eval prompts, one after another, cut into rows."""
    import torch

    wanted, stream = batch * length, []
    while len(stream) < wanted:
        before = len(stream)
        for task in tasks:
            for text in task.eval_dataset["text"]:
                stream += tokenizer(task.prompt(text), add_special_tokens=False)["input_ids"]
                if len(stream) >= wanted:
                    break
            if len(stream) >= wanted:
                break
        if len(stream) == before:
            raise ValueError("latency_prompts: the tasks' prompts tokenize to nothing")
    return torch.tensor(stream[:wanted], dtype=torch.long).view(batch, length)


def one_token(model, ids) -> tuple[float, float]:
    """(prefill seconds, decode seconds): the prompt forward with a KV cache (logits of the last position only),
    then one new token per row from that cache."""
    import torch

    with torch.no_grad():
        t0 = time.perf_counter()
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        t1 = time.perf_counter()
        nxt = out.logits[:, -1:].argmax(-1)
        t2 = time.perf_counter()
        model(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True, logits_to_keep=1)
        t3 = time.perf_counter()
    return t1 - t0, t3 - t2


def measure_latency(model, reference, ids, warmup: int, reps: int) -> dict[str, Any]:
    """Prefill and decode time of `model` and of `reference` (the fp32 model), interleaved round by round (the
    order alternating), `warmup` rounds dropped; ratios: the median of the per-round ratios."""
    model.eval()
    reference.eval()
    times: dict[str, dict[str, list[float]]] = {k: {"prefill": [], "decode": []} for k in ("arm", "fp32")}
    pair = {"arm": model, "fp32": reference}
    for r in range(warmup + reps):
        for key in ("arm", "fp32") if r % 2 == 0 else ("fp32", "arm"):
            prefill, decode = one_token(pair[key], ids)
            if r >= warmup:
                times[key]["prefill"].append(prefill)
                times[key]["decode"].append(decode)
    out: dict[str, Any] = {"batch": ids.shape[0], "prompt_tokens": ids.shape[1], "reps": reps, "warmup": warmup}
    for phase in ("prefill", "decode"):
        arm, ref = times["arm"][phase], times["fp32"][phase]
        out[f"{phase}_ms"] = 1e3 * statistics.median(arm)
        out[f"fp32_{phase}_ms"] = 1e3 * statistics.median(ref)
        out[f"{phase}_ratio"] = statistics.median(a / b for a, b in zip(arm, ref))
    return out


# ---------------------------------------------------------------------------------------------------------- arms
@dataclasses.dataclass
class Bench:
    """Where a run reads and writes, and with which settings and code version."""

    settings: dict[str, Any]
    data: Path
    cache: Path
    results_dir: Path
    version: CodeVersion | str


def run_arm(name: str, bench: Bench) -> dict[str, Any]:
    """Make arm `name` from a fresh load of the finished model, measure it, and return its record (not written)."""
    from hf_adaptive.compression import GradualPruningPlugin, QATPlugin, quantize_model
    from hf_adaptive.compression.config import GradualPruningConfig
    from hf_adaptive.distillation import DistillationConfig, DistillationPlugin

    arm, s = ARMS[name], bench.settings
    base = base_record(bench.cache, s)
    if base is None:
        raise ValueError(f"arm {name!r}: the finished model is missing from {bench.cache}; run --all or --base-only")
    started, load_average = time.perf_counter(), os.getloadavg()[0]
    setup(s)
    tasks = load_tasks(s, bench.data)
    replayed = recovery_tasks(tasks, s)
    directory = base_dir(bench.cache, s)
    model, tokenizer = load_finished(directory)
    record: dict[str, Any] = {"arm": name, "spec": dataclasses.asdict(arm), "description": arm_description(arm)}
    row: list[float] | None = None
    balanced: list[float] = []
    if arm.heads:
        t0 = time.perf_counter()
        record["heads"] = prune_heads_by_importance(model, tokenizer, replayed, arm.heads, s)
        record["heads"]["seconds"] = time.perf_counter() - t0
    if arm.recovery and (arm.qat or arm.sparsity or arm.heads or arm.scheme is None):
        callbacks: list[Any] = []
        steps = recovery_steps(replayed, s)
        if arm.sparsity:
            schedule = pruning_schedule(steps, arm.sparsity, s)
            record["pruning_schedule"] = schedule
            callbacks.append(GradualPruningPlugin(GradualPruningConfig(**schedule)))
        if arm.distill:
            teacher = load_float(directory)
            callbacks.append(DistillationPlugin(DistillationConfig(**s["distillation"]), teacher=teacher))
        if arm.qat:
            group = s["quantization"]["group_size"]
            callbacks.append(QATPlugin(scheme=arm.scheme, group_size=group, tasks="last"))
        row, info = recover(model, tokenizer, replayed, s, callbacks, arm.recovery_lr)
        model = info.pop("model")
        balanced = info.pop("balanced")
        record["recovery"] = info
        if name == "recovered":  # the recovered_ptq arms start from this model
            cache_recovered(model, recovered_dir(bench, base))
    elif arm.recovery:  # PTQ of the recovered model
        model, info = recovered_model(bench, tasks, base)
        record["recovery"] = info
    if arm.scheme and not arm.qat:
        t0 = time.perf_counter()
        quantize_model(model, arm.scheme, group_size=s["quantization"]["group_size"], qat_compatible=arm.qat_compatible)
        record["quantize_seconds"] = time.perf_counter() - t0
    eval_seconds = (record.get("recovery") or {}).get("eval_seconds", 0.0) if row is not None else 0.0
    if row is None:
        t0 = time.perf_counter()
        row, balanced = score(model, tokenizer, tasks, s)
        eval_seconds = time.perf_counter() - t0
    record["size"] = saved_size(model, Path(bench.cache) / f".arm_{name}.tmp", sparse=arm.sparsity > 0)
    lat = s["latency"]
    reference = load_float(directory)
    ids = latency_prompts(tokenizer, tasks, lat["batch"], lat["prompt_tokens"])
    record["latency"] = measure_latency(model, reference, ids, lat["warmup"], lat["reps"])
    del reference
    record.update(
        task_names=[t.name for t in tasks],
        accuracy=dict(zip([t.name for t in tasks], row)),
        avg_acc=_mean(row),
        balanced_accuracy=dict(zip([t.name for t in tasks], balanced)),
        avg_balanced=_mean(balanced),
        eval_seconds=eval_seconds,
        wall_seconds=time.perf_counter() - started,
        load_average={"start": load_average, "end": os.getloadavg()[0]},
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        base_id=base["base_id"],
        environment=environment(),
        finished_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
    return _json_safe(record)


def run_and_save(name: str, bench: Bench) -> None:
    from hf_adaptive.utils.io import atomic_write_json

    print(f"--- {name}: {arm_description(ARMS[name])} (whole package {bench.version})", flush=True)
    record = run_arm(name, bench)
    path = Path(bench.results_dir) / f"{name}.json"
    atomic_write_json(path, {**record, **version_stamp(bench.version)})
    lat = record["latency"]
    print(
        f"    avg acc {_fmt(record['avg_acc'])}, {record['size']['bytes'] / 2**20:.1f} MB, decode x"
        f"{lat['decode_ratio']:.2f} / prefill x{lat['prefill_ratio']:.2f} of fp32, "
        f"{record['wall_seconds'] / 60:.1f} min -> {path}",
        flush=True,
    )
    gc.collect()


def ensure_base(bench: Bench, rebuild: bool = False) -> dict[str, Any]:
    record = None if rebuild else base_record(bench.cache, bench.settings)
    if record is None:
        print(f"=== the finished sequence ({' -> '.join(bench.settings['tasks'])})", flush=True)
        record = build_base(bench.settings, bench.data, bench.cache, bench.results_dir, bench.version)
    elif not (Path(bench.results_dir) / "base.json").is_file():
        from hf_adaptive.utils.io import atomic_write_json

        atomic_write_json(Path(bench.results_dir) / "base.json", record)
    return record


def run_all(bench: Bench, in_process: bool, max_runs: int | None, rebuild: bool) -> int:
    """The finished model if missing, then every missing or stale arm in `ARMS` order: in this process (`--quick`),
    else each in its own process (memory freed between arms; a crash loses one arm). The plan is recomputed after
    every arm, and no arm runs twice in one call."""
    if in_process:
        ensure_base(bench, rebuild)
    elif rebuild or base_record(bench.cache, bench.settings) is None:
        command = [*_self_command(bench), "--base-only"] + (["--rebuild-base"] if rebuild else [])
        if subprocess.run(command, check=False).returncode != 0:
            print("the finished sequence failed: no arm can run", flush=True)
            return 1
    attempted: set[str] = set()
    failed = 0
    while max_runs is None or len(attempted) < max_runs:
        bench.version = code_version(bench.settings)
        todo = [(n, why) for n, why in plan(bench.results_dir, bench.cache, bench.settings, bench.version)]
        todo = [(n, why) for n, why in todo if n != "base" and n not in attempted]
        if not todo:
            break
        name, why = todo[0]
        attempted.add(name)
        print(f"=== {name} ({why}); {len(todo) - 1} more after it", flush=True)
        if in_process:
            run_and_save(name, bench)
        elif subprocess.run([*_self_command(bench), "--arm", name], check=False).returncode != 0:
            print(f"    {name} failed; continuing with the next arm", flush=True)
            failed += 1
    return 1 if failed else 0


def _self_command(bench: Bench) -> list[str]:
    return [
        sys.executable,
        str(Path(__file__).resolve()),
        "--data",
        str(bench.data),
        "--results",
        str(bench.results_dir),
        "--cache",
        str(bench.cache),
    ]


# -------------------------------------------------------------------------------------------------------- report
def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _signed(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:+.{digits}f}"


def summarize(records: dict[str, dict], base: dict | None, version: CodeVersion | str) -> list[dict[str, Any]]:
    """One row per arm with a result: accuracies, size, latency, each also relative to the fp32 arm."""
    ref = records.get("fp32")
    ref_acc = ref.get("avg_acc") if ref else None
    ref_bytes = ref["size"]["bytes"] if ref else None
    rows = []
    for name, arm in ARMS.items():
        r = records.get(name)
        if r is None:
            continue
        size = r.get("size") or {}
        lat = r.get("latency") or {}
        acc = r.get("avg_acc")
        pruning = ((r.get("recovery") or {}).get("plugins") or {}).get("gradual_pruning") or {}
        rows.append(
            {
                "arm": name,
                "group": arm.group,
                "description": r.get("description", arm_description(arm)),
                "accuracy": r.get("accuracy") or {},
                "avg_acc": acc,
                "balanced_accuracy": r.get("balanced_accuracy") or {},
                "avg_balanced": r.get("avg_balanced"),
                "delta_avg_acc": acc - ref_acc if acc is not None and ref_acc is not None else None,
                "size_mb": size.get("bytes", 0) / 2**20 if size else None,
                "size_ratio": size["bytes"] / ref_bytes if size and ref_bytes else None,
                "sparse_mb": size["sparse_bytes"] / 2**20 if "sparse_bytes" in size else None,
                "sparse_ratio": size["sparse_bytes"] / ref_bytes if "sparse_bytes" in size and ref_bytes else None,
                "sparsity": pruning.get("sparsity"),
                "heads_removed": (r.get("heads") or {}).get("removed"),
                "heads_total": (r.get("heads") or {}).get("total"),
                "decode_ms": lat.get("decode_ms"),
                "decode_ratio": lat.get("decode_ratio"),
                "prefill_ms": lat.get("prefill_ms"),
                "prefill_ratio": lat.get("prefill_ratio"),
                "recovery_steps": (r.get("recovery") or {}).get("steps"),
                "wall_minutes": r.get("wall_seconds", float("nan")) / 60,
                "load_average": _mean(list((r.get("load_average") or {}).values())),
                "code_version": r.get("code_version"),
                "status": arm_status(r, version, base),
            }
        )
    return rows


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both axes (smaller x, higher y), sorted by x."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or y > front[-1][1]:
            front.append((x, y))
    return front


GROUP_COLORS = {
    "reference": "black",
    "ptq": "tab:blue",
    "qat": "tab:purple",
    "pruning": "tab:orange",
    "heads": "tab:green",
    "control": "tab:gray",
}


def _annotate(ax: Any, labelled: list[tuple[float, float, str]]) -> None:
    """Label every point; points closer than 2 % of the x range and 1 % of the y range share one label (their
    names one under the other), so coinciding arms stay readable."""
    xs, ys = [p[0] for p in labelled], [p[1] for p in labelled]
    dx = 0.02 * ((max(xs) - min(xs)) or 1.0)
    dy = 0.01 * ((max(ys) - min(ys)) or 1.0)
    groups: dict[tuple[int, int], list[tuple[float, float, str]]] = {}
    for x, y, name in labelled:
        groups.setdefault((round(x / dx), round(y / dy)), []).append((x, y, name))
    for members in groups.values():
        x, y, _ = members[0]
        text = "\n".join(name for _, _, name in members)
        ax.annotate(text, (x, y), fontsize=6, xytext=(3, 2), textcoords="offset points", va="bottom")


def plot_pareto(rows: list[dict[str, Any]], path: Path) -> bool:
    """Two panels, every arm labelled: average accuracy vs size on disk (MB; pruning arms also, hollow, at their
    size stored sparse) and vs decode latency relative to fp32; the Pareto front dashed. False: nothing to plot."""
    rows = [r for r in rows if r["avg_acc"] is not None and r["size_mb"] is not None]
    if not rows:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(14, 6.5), layout="constrained")
    panels = (("size_mb", "size on disk (MB)"), ("decode_ratio", "decode latency per token, relative to fp32"))
    for ax, (key, label) in zip(axes, panels):
        points, labelled = [], []
        for r in rows:
            x = r[key]
            if x is None:
                continue
            color = GROUP_COLORS.get(r["group"], "tab:red")
            ax.scatter(x, r["avg_acc"], color=color, s=28, zorder=3)
            labelled.append((x, r["avg_acc"], r["arm"]))
            points.append((x, r["avg_acc"]))
            if key == "size_mb" and r["sparse_mb"] is not None:
                ax.scatter(r["sparse_mb"], r["avg_acc"], facecolors="none", edgecolors=color, s=28, zorder=3)
                ax.plot([r["sparse_mb"], x], [r["avg_acc"]] * 2, color=color, lw=0.5, alpha=0.5)
                points.append((r["sparse_mb"], r["avg_acc"]))
        _annotate(ax, labelled)
        front = pareto_front(points)
        if front:
            ax.plot(*zip(*front), ls="--", color="tab:red", lw=1, drawstyle="steps-post", zorder=2)
        ax.set_xlabel(label)
        ax.set_ylabel("average accuracy over the tasks")
        ax.grid(alpha=0.3)
    handles = [
        plt.Line2D([], [], marker="o", ls="", color=c, label=g) for g, c in GROUP_COLORS.items() if g != "control"
    ]
    handles += [plt.Line2D([], [], marker="o", ls="", color=GROUP_COLORS["control"], label="control")]
    handles += [plt.Line2D([], [], marker="o", ls="", mfc="none", color="tab:orange", label="pruning, stored sparse")]
    handles += [plt.Line2D([], [], ls="--", color="tab:red", label="Pareto front")]
    fig.legend(handles=handles, fontsize=8, loc="outside lower center", ncols=len(handles))
    fig.suptitle("Compression of the finished sequence: accuracy vs size and vs CPU latency")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def report_markdown(
    rows: list[dict[str, Any]],
    base: dict | None,
    settings: dict[str, Any],
    version: CodeVersion | str,
    todo: list[tuple[str, str]],
    png: str | None,
) -> str:
    names = base["task_names"] if base else settings["tasks"]
    lat = settings["latency"]
    rec = settings["recovery"]
    lines = [
        f"# Compression of a finished task sequence: {settings['model']}, {' -> '.join(settings['tasks'])}",
        "",
        "Written by `python benchmarks/compression.py` from the arms in its results folder (one JSON file per arm; "
        "`--all` runs what is missing or stale: an arm stores the hash of every package file it loaded, of the "
        "scripts and of the settings, and is stale once one of them changed).",
        "",
    ]
    if base:
        last = base["matrix"][-1] if base.get("matrix") else []
        seq = settings["sequence"]["config"]
        lines += [
            f"The finished sequence: {settings['n_train']} training rows per task, 1 epoch, shared LoRA "
            f"(r={seq['lora_r']}, q/k/v/o, lr {seq['learning_rate']:g}) "
            f"+ {', '.join(settings['sequence']['plugins'])}, then the adapter merged into the base weights, so every "
            "method below acts on plain dense weights. Accuracy after the last task: "
            + ", ".join(f"{n} {_fmt(v)}" for n, v in zip(names, last))
            + f" (avg {_fmt((base.get('metrics') or {}).get('avg_acc'))}, BWT "
            f"{_fmt((base.get('metrics') or {}).get('bwt'))}); made in "
            f"{base.get('wall_seconds', float('nan')) / 60:.1f} min, code version `{base.get('code_version')}`, "
            f"finished model `{base.get('base_id')}`.",
            "",
        ]
    lines += [
        f"Recovery phase (QAT, gradual pruning, heads50, the `recovered` controls): full fine-tuning with "
        f"`ContinualTrainer.train_joint` on {rec['rows_per_task']} replayed training rows of every task, mixed, "
        f"{rec['num_train_epochs']} epoch, batches of {rec['per_device_train_batch_size']}, AdamW lr "
        f"{rec['learning_rate']:g} (linear decay). Accuracy: rank classification on {settings['n_eval']} held-out rows "
        f"per task ({settings['eval']['prompt_format']} prompts <= {settings['eval']['prompt_max_length']} tokens, "
        f"{settings['eval']['label_scoring']} label scoring). Size: the saved model, no tokenizer; *sparse*: the same "
        "tensors stored as non-zero values + a 1-bit position map where smaller than dense. Latency: CPU, "
        f"{settings['threads']} threads, eager; a batch of {lat['batch']} x {lat['prompt_tokens']} prompt tokens: "
        "prefill = the prompt forward, decode = one new token from the KV cache; medians of "
        f"{lat['reps']} rounds after {lat['warmup']} warm-up, interleaved with the fp32 model in the same process; "
        "ratios = median per-round ratio to fp32. Δ acc: average accuracy minus fp32's. *bal*: balanced accuracy "
        "(the mean over labels of the share of that label's rows predicted right: a model that always gives one "
        "label scores 0.5 on these 2-label tasks, whatever the eval rows' label balance; BoolQA's are 68 % True, "
        "so its accuracy rewards a True bias) averaged over the tasks.",
        "",
        "| arm | what | " + " | ".join(names) + " | avg acc | avg bal | Δ acc | size MB | size / fp32 | sparse MB | "
        "decode ms | decode / fp32 | prefill ms | prefill / fp32 | status |",
        "|---|---|" + "---|" * len(names) + "---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        accs = " | ".join(_fmt(r["accuracy"].get(n)) for n in names)
        sparse = f"{r['sparse_mb']:.1f} ({r['sparse_ratio']:.2f})" if r["sparse_mb"] is not None else ""
        lines.append(
            f"| {r['arm']} | {r['description']} | {accs} | {_fmt(r['avg_acc'])} | {_fmt(r['avg_balanced'])} | "
            f"{_signed(r['delta_avg_acc'])} | "
            f"{_fmt(r['size_mb'], 1)} | {_fmt(r['size_ratio'], 2)} | {sparse} | {_fmt(r['decode_ms'], 1)} | "
            f"{_fmt(r['decode_ratio'], 2)} | {_fmt(r['prefill_ms'], 1)} | {_fmt(r['prefill_ratio'], 2)} | "
            f"{r['status']} |"
        )
    by_arm = {r["arm"]: r for r in rows}

    def acc(arm: str) -> float | None:
        return by_arm[arm]["avg_acc"] if arm in by_arm else None

    def diff(a: float | None, b: float | None) -> str:
        return _signed(a - b) if a is not None and b is not None else "n/a"

    rates = [a for a in by_arm if ARMS[a].recovery_lr is not None or a == "recovered"]
    if rates:
        lines += [
            "",
            "The recovery phase alone, by learning rate (the `recovered` controls: nothing compressed; "
            "accuracy / balanced accuracy per task):",
            "",
            "| learning rate | " + " | ".join(names) + " | avg acc | avg bal |",
            "|---|" + "---|" * len(names) + "---|---|",
        ]
        for a in sorted(rates, key=lambda a: ARMS[a].recovery_lr or rec["learning_rate"]):
            r = by_arm[a]
            cells = " | ".join(f"{_fmt(r['accuracy'].get(n))} / {_fmt(r['balanced_accuracy'].get(n))}" for n in names)
            lr = ARMS[a].recovery_lr or rec["learning_rate"]
            lines.append(f"| {lr:g} ({a}) | {cells} | {_fmt(r['avg_acc'])} | {_fmt(r['avg_balanced'])} |")
    lines += [
        "",
        "QAT vs post-training quantization at the same scheme (average accuracy; PTQ after recovery: the same "
        "recovery phase without fake quantization, then PTQ, so that QAT's gain is told apart from the extra "
        "training):",
        "",
        "| scheme | PTQ | PTQ after recovery | QAT | QAT − PTQ | QAT − PTQ after recovery |",
        "|---|---|---|---|---|---|",
    ]
    for scheme, ptq, rptq, qat in QAT_PAIRS:
        a, b, c = acc(ptq), acc(rptq), acc(qat)
        lines.append(f"| {scheme} | {_fmt(a)} | {_fmt(b)} | {_fmt(c)} | {diff(c, a)} | {diff(c, b)} |")
    lines += [
        "",
        "Gradual pruning during the recovery phase, without and with distillation from the dense model (average "
        f"accuracy; the `recovered` control, no pruning: {_fmt(acc('recovered'))}):",
        "",
        "| target sparsity | reached | no distillation | distillation | distillation − none | sparse MB |",
        "|---|---|---|---|---|---|",
    ]
    for level in (50, 70, 90):
        plain, dist = by_arm.get(f"prune{level}"), by_arm.get(f"prune{level}_distill")
        reached = (plain or dist or {}).get("sparsity")
        sparse = (plain or dist or {}).get("sparse_mb")
        lines.append(
            f"| {level} % | {_fmt(reached)} | {_fmt(acc(f'prune{level}'))} | {_fmt(acc(f'prune{level}_distill'))} | "
            f"{diff(acc(f'prune{level}_distill'), acc(f'prune{level}'))} | {_fmt(sparse, 1)} |"
        )
    heads = by_arm.get("heads50")
    if heads is not None or "heads50_no_recovery" in by_arm:
        removed = (heads or by_arm.get("heads50_no_recovery") or {}).get("heads_removed")
        total = (heads or by_arm.get("heads50_no_recovery") or {}).get("heads_total")
        lines += [
            "",
            f"Head pruning: {removed} of {total} attention heads removed (lowest importance, ranked over all layers); "
            f"average accuracy {_fmt(acc('heads50_no_recovery'))} right after, {_fmt(acc('heads50'))} after the "
            "recovery phase.",
        ]
    lines += [
        "",
        "Caveats: quantized layers run torchao's eager CPU path (no `torch.compile`, no packed int4 kernels: 8da4w's "
        "4-bit values are stored one per int8, so it is no smaller on disk than int8); pruned zeros are stored and "
        "multiplied densely (no sparse kernels), so pruning changes neither the dense size nor the latency; the "
        "embeddings and the (tied) LM head stay float32 in every arm.",
        "",
        "Still to run (`--all` order): " + (", ".join(f"{n} ({why})" for n, why in todo) or "none."),
    ]
    if png:
        lines += ["", f"![accuracy vs size and latency]({png})"]
    return "\n".join(lines)


def build_report(bench: Bench, out: Path) -> str:
    """`<out>/compression.md` (+ `.json`) and `<out>/compression_pareto.png` from the arms stored so far."""
    records = load_arm_records(bench.results_dir)
    base = base_record(bench.cache, bench.settings) or read_json(Path(bench.results_dir) / "base.json")
    rows = summarize(records, base, bench.version)
    png = Path(out) / f"{NAME}_pareto.png"
    plotted = plot_pareto(rows, png)
    todo = plan(bench.results_dir, bench.cache, bench.settings, bench.version)
    markdown = report_markdown(rows, base, bench.settings, bench.version, todo, png.name if plotted else None)
    summary = {
        "code_version": str(bench.version),
        "settings": bench.settings,
        "arms": {n: {**dataclasses.asdict(a), "description": arm_description(a)} for n, a in ARMS.items()},
        "base": base,
        "summary": _json_safe(rows),
        "todo": [{"arm": n, "why": why} for n, why in todo],
    }
    write_results(NAME, summary, markdown, out=out)
    return markdown


# ---------------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arm", choices=list(ARMS), help="run this arm (the finished model first if missing)")
    parser.add_argument("--all", action="store_true", help="the finished model if missing, then every arm to do")
    parser.add_argument("--base-only", action="store_true", help="only make the finished model (if missing)")
    parser.add_argument("--rebuild-base", action="store_true", help="make the finished model again")
    parser.add_argument("--max-runs", type=int, default=None, help="with --all: stop after this many arms")
    parser.add_argument("--plan", action="store_true", help="print what --all would do and exit")
    parser.add_argument("--report", action="store_true", help="only rebuild the report and the plot")
    parser.add_argument("--quick", action="store_true", help="everything on the tiny Gemma and built-in tasks")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the CL benchmark folder")
    parser.add_argument("--results", type=Path, default=None, help="folder of the per-arm JSON files")
    parser.add_argument("--cache", type=Path, default=None, help="folder of the finished (and recovered) models")
    parser.add_argument("--out", type=Path, default=None, help="folder of the report (md, json, png)")
    ns = parser.parse_args(argv)
    settings = QUICK_SETTINGS if ns.quick else SETTINGS
    if ns.quick:  # never into docs/results: a temporary folder unless --out / --results / --cache say where
        base = ns.out or Path(tempfile.mkdtemp(prefix="compression_quick_"))
        results_dir, out, cache = ns.results or base / "runs", base, ns.cache or base / "cache"
    else:
        from hf_adaptive.models.gguf import cache_root

        results_dir, out = ns.results or RESULTS_DIR, ns.out or RESULTS
        cache = ns.cache or cache_root() / "compression_bench"
    bench = Bench(settings, ns.data, cache, results_dir, code_version(settings))
    if ns.plan:
        record = base_record(cache, settings)
        print(f"code version {bench.version}; finished model {base_dir(cache, settings)}: ", end="")
        print(f"present ({record['base_id']}, made by code {record['code_version']})" if record else "missing")
        todo = plan(results_dir, cache, settings, bench.version)
        print(f"{len(todo)} step(s) to do:")
        for name, why in todo:
            print(f"  {name} ({why}): {arm_description(ARMS[name]) if name in ARMS else 'the finished sequence'}")
        return 0
    status = 0
    if ns.report:
        pass
    elif ns.base_only:
        ensure_base(bench, ns.rebuild_base)
        return 0
    elif ns.arm is not None:
        ensure_base(bench, ns.rebuild_base)
        run_and_save(ns.arm, bench)
    elif ns.all or ns.quick:
        status = run_all(bench, in_process=ns.quick, max_runs=ns.max_runs, rebuild=ns.rebuild_base)
    else:
        parser.error("give --all, --arm NAME, --plan, --report, --base-only or --quick")
    if ns.report or ns.all or ns.quick:
        bench.version = code_version(settings)
        build_report(bench, out)
    return status


if __name__ == "__main__":
    sys.exit(main())
