"""Forgetting on the built-in suite: every consolidation method vs naive fine-tuning and joint training.

One table, 3 seeds, mean ± std of average accuracy and BWT. Every method uses the main job's training recipe
(`hf_adaptive.cli.demo_arguments`: tiny Gemma, full fine-tuning, 20 epochs per task, AdamW 2e-3 cosine) and
changes only its own options; `lora_per_task` trains one LoRA expert per task instead (scored with the task's
own expert). Results are written after every run (`docs/results/cl_quality.json`). Each run is stored with the
code version it came from (`code_version`: a hash of the `hf_adaptive` package sources and of this file); a
re-run skips only runs of the current code version and re-runs stale ones (or every run with `--fresh`), so no
figure of older code stands in the table.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, write_results  # noqa: E402

from hf_adaptive.cli import TaskArguments, _replace, build_tasks, demo_arguments  # noqa: E402
from hf_adaptive.models import build_tiny_gemma  # noqa: E402
from hf_adaptive.registry import build_plugins  # noqa: E402
from hf_adaptive.trainer import ContinualTrainer  # noqa: E402

EWC = dict(ewc_lambda=1e4, fisher_samples=128, fisher_normalization="max")
#: in the hybrid, replay carries the old tasks and a light EWC only damps drift (a stiff one blocks learning)
HYBRID_EWC = dict(EWC, ewc_lambda=1.0)
REPLAY = dict(replay_alpha=1.0, replay_buffer_size=1024, replay_policy="balanced", replay_batch_size=16)
METHODS: dict[str, tuple[list[str], dict]] = {
    "naive": ([], {}),
    "ewc": (["ewc"], dict(EWC)),
    "online_ewc": (["ewc"], dict(EWC, ewc_mode="online", ewc_gamma=0.9)),
    "gamma_gated_ewc": (["ewc"], dict(EWC, gamma_gated_ewc=True)),
    "replay": (["replay"], dict(REPLAY)),
    "generative_replay": (["generative_replay"], dict(REPLAY, generative_replay_ratio=1.0)),
    "feature_replay": (["feature_replay"], dict(feature_replay_alpha=1.0)),
    "ewc+replay": (["ewc", "replay"], dict(HYBRID_EWC, **REPLAY)),
    "lora_per_task": ([], dict(adapter_strategy="lora_per_task", lora_r=16, learning_rate=5e-3)),
    "joint": ([], {}),
}


PACKAGE = Path(__file__).resolve().parents[1] / "hf_adaptive"
SCRIPTS = (Path(__file__).resolve(), Path(__file__).resolve().with_name("common.py"))


def code_version(package: Path = PACKAGE, scripts: tuple[Path, ...] = SCRIPTS) -> str:
    """SHA-256 (first 16 hex digits) of every source file of `package` (`*.py`, `*.md`, `*.json`, `*.yaml`, by
    relative path) and of `scripts` (this file, `common.py`): a cached run is reused only if nothing it could
    depend on changed."""
    digest = hashlib.sha256()
    files = sorted(p for p in package.rglob("*") if p.is_file() and p.suffix in {".py", ".md", ".json", ".yaml"})
    for path in [*files, *scripts]:
        name = path.relative_to(package).as_posix() if path.is_relative_to(package) else path.name
        digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def cached_runs(path: Path, version: str, fresh: bool) -> tuple[dict, list[str]]:
    """The runs in `path` made by code `version` (none with `fresh`), and the keys of the stale ones dropped."""
    if fresh or not path.exists():
        return {}, []
    runs = json.loads(path.read_text()).get("runs", {})
    kept = {k: r for k, r in runs.items() if r.get("code_version") == version}
    return kept, sorted(set(runs) - set(kept))


def run(method: str, seed: int, quick: bool) -> dict:
    _, task_args, config = demo_arguments("unused", quick=quick, seed=seed)
    plugins, overrides = METHODS[method]
    tasks = build_tasks(TaskArguments(n_train=task_args.n_train, n_eval=task_args.n_eval, task_seed=seed))
    model, tokenizer = build_tiny_gemma(seed=seed)
    with tempfile.TemporaryDirectory() as tmp:
        config = _replace(
            config, output_dir=tmp, save_strategy="no", disable_tqdm=True, logging_steps=10_000, **overrides
        )
        if method == "joint":
            config = _replace(
                config, num_train_epochs=task_args.joint_num_train_epochs, learning_rate=task_args.joint_learning_rate
            )
        trainer = ContinualTrainer(
            model=model, args=config, processing_class=tokenizer, callbacks=build_plugins(plugins, config)
        )
        start = time.perf_counter()
        if method == "joint":
            accuracies = trainer.train_joint(tasks)
            out = {"avg_acc": sum(accuracies) / len(accuracies), "bwt": None, "row": accuracies}
        else:
            result = trainer.train_sequence(tasks)
            out = {"avg_acc": result.avg_acc, "bwt": result.bwt, "matrix": result.matrix}
    out["seconds"] = time.perf_counter() - start
    return out


def mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {std:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="1 seed, smaller tasks, 2 epochs (a smoke run)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--fresh", action="store_true", help="ignore results already in the JSON file")
    ns = parser.parse_args()
    seeds = ns.seeds[:1] if ns.quick else ns.seeds
    name = "cl_quality_quick" if ns.quick else "cl_quality"
    path = RESULTS / f"{name}.json"
    version = code_version()
    runs, stale = cached_runs(path, version, ns.fresh)
    if stale:
        print(f"re-running {len(stale)} run(s) of older code: {', '.join(stale)}", flush=True)
    for method in ns.methods:
        for seed in seeds:
            key = f"{method}/{seed}"
            if key in runs:
                continue
            print(f"--- {key}", flush=True)
            runs[key] = {**run(method, seed, ns.quick), "code_version": version}
            print(
                f"    avg_acc={runs[key]['avg_acc']:.4f} bwt={runs[key]['bwt']} ({runs[key]['seconds']:.0f} s)",
                flush=True,
            )
            write_results(name, payload(runs, version), table(runs, seeds, version))
    write_results(name, payload(runs, version), table(runs, seeds, version))


def payload(runs: dict, version: str) -> dict:
    return {"code_version": version, "runs": runs, "methods": {m: METHODS[m] for m in METHODS}}


def table(runs: dict, seeds: list[int], version: str) -> str:
    lines = [
        "# Forgetting on the built-in suite (5 tasks, tiny Gemma)",
        "",
        f"Seeds {seeds}; mean ± std over the seeds that finished. Recipe: `hf-adaptive demo` (full fine-tuning, "
        f"20 epochs/task, AdamW 2e-3 cosine); options per method in the JSON file. Code version {version} "
        "(`code_version()`: hash of the `hf_adaptive` sources and of `benchmarks/cl_quality.py`, `common.py`).",
        "",
        "| method | avg accuracy | BWT | seeds | seconds/run |",
        "|---|---|---|---|---|",
    ]
    for method in METHODS:
        done = [runs[k] for k in runs if k.split("/")[0] == method]
        if not done:
            continue
        seconds = statistics.mean(r["seconds"] for r in done)
        lines.append(
            f"| {method} | {mean_std([r['avg_acc'] for r in done])} | "
            f"{mean_std([r['bwt'] for r in done])} | {len(done)} | {seconds:.0f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
