"""Step time of `ContinualTrainer` vs plain `Trainer` on the same model and data, as ratios measured in one run.

Variants (each a fresh trainer; repetitions interleaved A/B/C so that machine noise hits all alike; the first
steps of every run are warm-up and dropped; the ratio is of medians of per-step times):

* `trainer`: `transformers.Trainer` (the baseline);
* `continual`: `ContinualTrainer` with no plugins (target ratio <= 1.02);
* `continual+ewc`, `continual+replay`, `continual+ewc+replay`: with an EWC penalty over every weight (Fisher of a
  finished task) and/or exact replay of `replay_batch_size` extra rows per step (target ratio <= 1.15).

Replay trains on more rows per step by design (batch + replay batch). So the replay variants are also compared
with `trainer@rows`, a plain Trainer whose batch holds as many rows as batch + replay batch, measured in the same
run: the same compute, which isolates the machinery's overhead from the extra rows' forward/backward.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import StepTimer, median, write_results  # noqa: E402
from transformers import Trainer, TrainingArguments  # noqa: E402

from hf_adaptive.config import ContinualConfig  # noqa: E402
from hf_adaptive.models import build_tiny_gemma, build_tokenizer  # noqa: E402
from hf_adaptive.models.tiny import tiny_layout  # noqa: E402
from hf_adaptive.plugins import TaskContext  # noqa: E402
from hf_adaptive.tasks import CausalLMCollator, builtin_suite, tokenize_task  # noqa: E402
from hf_adaptive.trainer import ContinualTrainer  # noqa: E402

PRESET = "bench"
MODEL = tiny_layout(PRESET)


def plugin_callbacks(names, args, tasks, tokenizer, model):
    """The named plugins, primed with a finished task so that their terms are active from the first step."""
    from hf_adaptive.registry import build_plugins

    plugins = build_plugins(names, args, model=model)
    stub = ContinualTrainer(model=model, args=args, processing_class=tokenizer)
    context = TaskContext.build(tasks[0], 0, tokenizer)
    for plugin in plugins:
        plugin.on_task_end(stub, context)
    return plugins


def run_variant(variant, steps, batch, tasks, tokenizer, out):
    model, _ = build_tiny_gemma(tokenizer, seed=0, preset=PRESET)
    data = tokenize_task(tasks[1], tokenizer)
    timer = StepTimer()
    common = dict(
        output_dir=out,
        per_device_train_batch_size=batch,
        max_steps=steps,
        logging_steps=10_000,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
        learning_rate=1e-4,
    )
    if variant.startswith("trainer"):
        if variant == "trainer@rows":
            common["per_device_train_batch_size"] = batch + batch // 2
        trainer = Trainer(
            model=model,
            args=TrainingArguments(**common),
            train_dataset=data,
            data_collator=CausalLMCollator(tokenizer),
            callbacks=[timer],
        )
    else:
        args = ContinualConfig(
            **common, ewc_lambda=100.0, replay_alpha=0.5, replay_batch_size=batch // 2, fisher_samples=16
        )
        names = [n for n in ("ewc", "replay") if n in variant.split("+")]
        callbacks = [timer] + (plugin_callbacks(names, args, tasks, tokenizer, model) if names else [])
        trainer = ContinualTrainer(
            model=model,
            args=args,
            train_dataset=data,
            processing_class=tokenizer,
            data_collator=CausalLMCollator(tokenizer),
            callbacks=callbacks,
        )
    trainer.train()
    warmup = max(2, steps // 5)
    return timer.times[warmup:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--no-plugins", action="store_true", help="skip the EWC + replay variants")
    parser.add_argument("--name", default="overhead", help="output name under docs/results/")
    ns = parser.parse_args()
    steps, repeats = (20, 2) if ns.quick else (ns.steps, ns.repeats)
    tokenizer = build_tokenizer()
    tasks = builtin_suite(["first_color", "last_color"], n_train=512, n_eval=32)
    variants = ["trainer", "continual"]
    if not ns.no_plugins:
        try:
            from hf_adaptive.registry import plugin_class

            plugin_class("ewc"), plugin_class("replay")
            variants += ["trainer@rows", "continual+ewc", "continual+replay", "continual+ewc+replay"]
        except (ImportError, AttributeError) as err:
            print(f"skipping the plugin variant: {err}")
    times = {v: [] for v in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(repeats):
            order = variants if r % 2 == 0 else variants[::-1]
            for v in order:
                times[v].extend(run_variant(v, steps, ns.batch, tasks, tokenizer, tmp))
    base = median(times["trainer"])

    def processed(v):
        return ns.batch + (ns.batch // 2 if "replay" in v or v == "trainer@rows" else 0)

    same_rows = median(times["trainer@rows"]) if "trainer@rows" in times else None
    rows = {}
    for v, t in times.items():
        equal = same_rows if processed(v) != ns.batch else base
        rows[v] = {
            "median_step_ms": 1000 * median(t),
            "ratio_vs_trainer": median(t) / base,
            "steps": len(t),
            "rows_per_step": processed(v),
            "ratio_vs_trainer_same_rows": median(t) / equal,
        }
    targets = {"continual": 1.02, "continual+ewc": 1.15, "continual+ewc+replay": 1.15}
    lines = [
        "# ContinualTrainer step-time overhead",
        "",
        f"Model: Gemma {MODEL}, batch {ns.batch}, {steps} steps x {repeats} interleaved repeats per variant, "
        "1 thread; median per-step wall time (warm-up steps dropped).",
        "",
        "| variant | rows/step | median step (ms) | ratio vs Trainer (batch) | ratio vs Trainer, same rows | target |",
        "|---|---|---|---|---|---|",
    ]
    for v, row in rows.items():
        target = targets.get(v)
        met = row["ratio_vs_trainer_same_rows"] <= target if target is not None else None
        verdict = "" if target is None else f"<= {target} ({'met' if met else 'MISSED'})"
        lines.append(
            f"| {v} | {row['rows_per_step']} | {row['median_step_ms']:.2f} | {row['ratio_vs_trainer']:.3f} | "
            f"{row['ratio_vs_trainer_same_rows']:.3f} | {verdict} |"
        )
    write_results(
        ns.name, {"model": MODEL, "batch": ns.batch, "steps": steps, "repeats": repeats, "rows": rows}, "\n".join(lines)
    )


if __name__ == "__main__":
    main()
