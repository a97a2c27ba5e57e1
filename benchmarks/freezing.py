"""Selective freezing: step time and final accuracy with and without it, measured in the same run.

The tiny Gemma is trained from scratch on a built-in task with AdamW, once plainly and once with a `Freezer`
(gradient-norm EMA per module, relative threshold, periodic probes). Both arms start from the same weights and see
the same batches. Repetitions alternate the arms (A B, B A, ...) so that both see the same machine load; the
reported step time is the median over repetitions of each run's median step time (forward + backward + freezer
update + optimizer step). Accuracy is rank classification on the task's evaluation split.

    python benchmarks/freezing.py            # full run (~3 min on one CPU core)
    python benchmarks/freezing.py --quick    # smoke run (< 1 min)

Writes docs/results/freezing.md and docs/results/freezing.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, write_results  # noqa: E402, I001  (first: sets the single-threaded, offline environment)
import torch  # noqa: E402

from hf_adaptive.models import build_tiny_gemma, build_tokenizer  # noqa: E402
from hf_adaptive.scheduling import Freezer, FreezingConfig  # noqa: E402
from hf_adaptive.tasks import CausalLMCollator, builtin_suite, task_accuracy, tokenize_task  # noqa: E402


def run_arm(
    freeze: bool, task, tokenizer, rows, steps: int, lr: float, batch_size: int, cfg: FreezingConfig, seed: int = 0
) -> dict:
    collate = CausalLMCollator(tokenizer)
    model, _ = build_tiny_gemma(tokenizer, seed=seed)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    freezer = Freezer(model, cfg) if freeze else None
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    times, fractions, losses = [], [], []
    frozen_steps: dict[str, int] = {}
    for _ in range(steps):
        if len(order) < batch_size:
            order += torch.randperm(len(rows), generator=gen).tolist()
        idx, order = order[:batch_size], order[batch_size:]
        batch = collate([rows[i] for i in idx])
        t0 = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        if freezer is not None:
            freezer.update()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
        fractions.append(freezer.frozen_fraction() if freezer is not None else 0.0)
        for name in freezer.frozen_names() if freezer is not None else []:
            frozen_steps[name] = frozen_steps.get(name, 0) + 1
    if freezer is not None:
        freezer.release()
    model.eval()
    accuracy = task_accuracy(model, tokenizer, task)
    skip = min(10, steps // 4)  # first steps include allocator warm-up
    return {
        "freeze": freeze,
        "median_step_s": statistics.median(times[skip:]),
        "accuracy": accuracy,
        "final_train_loss": statistics.fmean(losses[-10:]),
        "mean_frozen_fraction": statistics.fmean(fractions),
        "max_frozen_fraction": max(fractions),
        "steps_frozen_by_module": dict(sorted(frozen_steps.items(), key=lambda kv: -kv[1])),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few steps, one repetition: a smoke run")
    parser.add_argument("--task", default="more_colors")
    parser.add_argument("--threshold", type=float, default=0.3, help="relative gradient-norm EMA threshold")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    steps, reps, n_train = (40, 1, 128) if args.quick else (200, 5, 256)
    lr, batch_size = 3e-3, 16
    cfg = FreezingConfig(
        threshold=args.threshold,
        threshold_mode="relative",
        granularity="module",
        warmup_steps=max(steps // 10, 5),
        probe_every=max(steps // 5, 10),
        max_frozen_fraction=0.9,
    )
    start = time.perf_counter()
    tokenizer = build_tokenizer()
    (task,) = builtin_suite([args.task], n_train=n_train, n_eval=64, seed=0)
    rows = [{k: r[k] for k in ("input_ids", "attention_mask", "labels")} for r in tokenize_task(task, tokenizer)]
    runs = []
    for rep in range(reps):
        for freeze in (False, True) if rep % 2 == 0 else (True, False):  # A B, B A, ...
            r = run_arm(freeze, task, tokenizer, rows, steps, lr, batch_size, cfg)
            r["rep"] = rep
            runs.append(r)
            print(
                f"rep {rep} freeze={freeze!s:5s} step {r['median_step_s'] * 1e3:.2f} ms acc {r['accuracy']:.3f} "
                f"frozen mean {r['mean_frozen_fraction']:.2f} max {r['max_frozen_fraction']:.2f}",
                flush=True,
            )

    def arm(freeze: bool, key: str) -> float:
        return statistics.median(r[key] for r in runs if r["freeze"] == freeze)

    summary = {
        "baseline_step_ms": arm(False, "median_step_s") * 1e3,
        "freezing_step_ms": arm(True, "median_step_s") * 1e3,
        "baseline_accuracy": arm(False, "accuracy"),
        "freezing_accuracy": arm(True, "accuracy"),
        "mean_frozen_fraction": arm(True, "mean_frozen_fraction"),
    }
    summary["step_time_ratio"] = summary["freezing_step_ms"] / summary["baseline_step_ms"]
    summary["accuracy_delta"] = summary["freezing_accuracy"] - summary["baseline_accuracy"]
    meta = {
        "quick": args.quick,
        "task": args.task,
        "steps": steps,
        "repetitions": reps,
        "lr": lr,
        "batch_size": batch_size,
        "freezing": vars(cfg),
        "wall_s": time.perf_counter() - start,
        "torch": torch.__version__,
    }
    counts: dict[str, list[int]] = {}
    for r in runs:
        for name, n in r["steps_frozen_by_module"].items():
            counts.setdefault(name, []).append(n)
    often = sorted(counts, key=lambda n: -statistics.fmean(counts[n]))[:8]
    frozen = [f"`{n or '(root)'}` ({statistics.fmean(counts[n]) / steps:.0%})" for n in often]
    report = "\n".join(
        [
            "# Selective freezing",
            "",
            f"Tiny Gemma trained from scratch on `{args.task}` ({n_train} examples, batch {batch_size}, AdamW lr {lr}, "
            f"{steps} steps), with and without a `Freezer` (module granularity, relative threshold {args.threshold}, "
            f"warm-up {cfg.warmup_steps}, probe every {cfg.probe_every} steps). {reps} interleaved repetition(s) "
            f"per arm, medians. Produced by `python benchmarks/freezing.py{' --quick' if args.quick else ''}` in "
            f"{meta['wall_s']:.0f} s on a shared CPU core.",
            "",
            "| arm | median step (ms) | eval accuracy | mean fraction frozen |",
            "|---|---|---|---|",
            f"| no freezing | {summary['baseline_step_ms']:.2f} | {summary['baseline_accuracy']:.3f} | 0 |",
            f"| freezing | {summary['freezing_step_ms']:.2f} | {summary['freezing_accuracy']:.3f} | "
            f"{summary['mean_frozen_fraction']:.2f} |",
            "",
            f"Step-time ratio freezing / no freezing: **{summary['step_time_ratio']:.3f}**; accuracy change "
            f"{summary['accuracy_delta']:+.3f}.",
            "",
            f"Modules frozen longest (share of steps): {', '.join(frozen) if frozen else 'none'}.",
            "",
        ]
    )
    write_results("freezing", {"meta": meta, "summary": summary, "runs": runs}, report, out=args.out)
    return summary


if __name__ == "__main__":
    main()
