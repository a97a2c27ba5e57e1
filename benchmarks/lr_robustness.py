"""How sensitive is training to the base learning rate? Adaptive scheduler vs constant vs cosine vs ReduceLROnPlateau.

The tiny Gemma is trained from scratch on built-in tasks (each separately: jointly, the five tasks are not learned
within a CPU budget) with AdamW, from the same initial weights and the same batch order, for base learning rates
spanning 100x. For each (method, base LR) we record the final
held-out loss (answer tokens of the eval splits), the final training loss (mean of the last 10 steps) and the steps
until the EMA of the training loss first reaches a target loss. The spread of the final eval loss across base LRs
(max - min, and the ratio to the constant-LR spread) measures robustness: smaller is better.

    python benchmarks/lr_robustness.py            # full run (~5 min on one CPU core)
    python benchmarks/lr_robustness.py --quick    # smoke run (< 1 min)

Writes docs/results/lr_robustness.md and docs/results/lr_robustness.json.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, write_results  # noqa: E402, I001  (first: sets the single-threaded, offline environment)
import torch  # noqa: E402

from hf_adaptive.models import build_tiny_gemma, build_tokenizer  # noqa: E402
from hf_adaptive.scheduling import AdaptiveScheduler, AdaptiveSchedulerConfig  # noqa: E402
from hf_adaptive.tasks import (  # noqa: E402
    IGNORE_INDEX,
    CausalLMCollator,
    answer_cross_entropy,
    builtin_suite,
    tokenize_task,
)

METHODS = ("constant", "cosine", "plateau", "adaptive")


def load_data(tokenizer, names: list[str], n_train: int, n_eval: int, seed: int) -> dict[str, tuple[list, list]]:
    """Training and evaluation rows of each task (padding happens per batch)."""
    keep = ("input_ids", "attention_mask", "labels")
    data = {}
    for task in builtin_suite(names, n_train=n_train, n_eval=n_eval, seed=seed):
        rows = [[{k: r[k] for k in keep} for r in tokenize_task(task, tokenizer, split)] for split in ("train", "eval")]
        data[task.name] = (rows[0], rows[1])
    return data


@torch.no_grad()
def eval_loss(model, rows, collate, batch_size: int = 128) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(rows), batch_size):
        batch = collate(rows[i : i + batch_size])
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        total += float(answer_cross_entropy(logits, batch["labels"], reduction="sum"))
        count += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    model.train()
    return total / max(count, 1)


def train_one(
    method: str, base_lr: float, steps: int, seed: int, tokenizer, train_rows, eval_rows, target: float, batch_size: int
) -> dict:
    collate = CausalLMCollator(tokenizer)
    model, _ = build_tiny_gemma(tokenizer, seed=seed)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=base_lr, weight_decay=0.0)
    adaptive = AdaptiveScheduler(optimizer, AdaptiveSchedulerConfig()) if method == "adaptive" else None
    if method == "cosine":
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    elif method == "plateau":
        schedule = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5, patience=10)
    else:
        schedule = None
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    losses, ema, hit, diverged = [], None, None, False
    for step in range(1, steps + 1):
        if len(order) < batch_size:
            order += torch.randperm(len(train_rows), generator=gen).tolist()
        idx, order = order[:batch_size], order[batch_size:]
        batch = collate([train_rows[i] for i in idx])
        loss = model(**batch).loss
        loss.backward()
        value = float(loss.detach())
        if adaptive is not None:
            adaptive.step(loss)  # skips the step itself on a non-finite loss
        else:
            if not math.isfinite(value):
                diverged = True
                break
            optimizer.step()
            if method == "cosine":
                schedule.step()
            elif method == "plateau":
                schedule.step(value)
        optimizer.zero_grad(set_to_none=True)
        if math.isfinite(value):
            losses.append(value)
            ema = value if ema is None else 0.9 * ema + 0.1 * value
            if hit is None and ema <= target:
                hit = step
    final_eval = float("nan") if diverged else eval_loss(model, eval_rows, collate)
    if not math.isfinite(final_eval):
        diverged = True
    return {
        "method": method,
        "base_lr": base_lr,
        "seed": seed,
        "final_eval_loss": final_eval,
        "final_train_loss": statistics.fmean(losses[-10:]) if losses and not diverged else float("nan"),
        "steps_to_target": hit,
        "final_lr": float(optimizer.param_groups[0]["lr"]),
        "diverged": diverged,
        "skipped_steps": adaptive.num_skipped if adaptive is not None else 0,
    }


def summarize(runs: list[dict], lrs: list[float], steps: int) -> dict:
    summary = {}
    for method in METHODS:
        per_lr = []
        for lr in lrs:
            rs = [r for r in runs if r["method"] == method and r["base_lr"] == lr]
            evals = [r["final_eval_loss"] for r in rs]
            hits = [r["steps_to_target"] if r["steps_to_target"] is not None else steps + 1 for r in rs]
            per_lr.append(
                {
                    "base_lr": lr,
                    "final_eval_loss": statistics.fmean(evals)
                    if all(math.isfinite(e) for e in evals)
                    else float("inf"),
                    "steps_to_target": statistics.median(hits),
                    "final_lr": statistics.median(r["final_lr"] for r in rs),
                    "diverged": sum(r["diverged"] for r in rs),
                }
            )
        finals = [p["final_eval_loss"] for p in per_lr]
        summary[method] = {
            "per_lr": per_lr,
            "spread": max(finals) - min(finals),
            "worst": max(finals),
            "best": min(finals),
            "mean": statistics.fmean(finals),
        }
    base = summary["constant"]["spread"]
    for method in METHODS:
        s = summary[method]["spread"]
        summary[method]["spread_vs_constant"] = s / base if base > 0 and math.isfinite(base) else float("nan")
    return summary


def _fmt(x, digits=3):
    if x is None:
        return "-"
    if isinstance(x, float) and not math.isfinite(x):
        return "diverged" if x == float("inf") else "nan"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def write_report(summary: dict, meta: dict) -> str:
    lrs = meta["base_lrs"]
    lines = [
        "# Learning-rate robustness",
        "",
        f"Tiny Gemma trained from scratch on each of the built-in tasks {meta['tasks']} separately "
        f"({meta['n_train']} train / {meta['n_eval']} eval rows, batch {meta['batch_size']}), AdamW, {meta['steps']} "
        f"steps, base LRs {lrs} ({lrs[-1] / lrs[0]:.0f}x), seeds {meta['seeds']}. Same initial weights and batch order "
        "for every method. Losses are means over tasks and seeds; steps are medians. "
        f"Produced by `python benchmarks/lr_robustness.py{' --quick' if meta['quick'] else ''}` "
        f"in {meta['wall_s']:.0f} s.",
        "",
        "Final held-out loss (answer tokens; chance is about 0.35) per base LR; spread = max - min across base LRs "
        "(smaller = more robust).",
        "",
        "| method | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | spread | spread / constant | worst |",
        "|---|" + "---|" * (len(lrs) + 3),
    ]
    for method in METHODS:
        s = summary[method]
        cells = [_fmt(p["final_eval_loss"]) for p in s["per_lr"]]
        lines.append(
            f"| {method} | "
            + " | ".join(cells)
            + f" | {_fmt(s['spread'])} | {_fmt(s['spread_vs_constant'], 2)} | {_fmt(s['worst'])} |"
        )
    lines += [
        "",
        f"Steps until the training-loss EMA reaches {meta['target']} ({meta['steps'] + 1} = never):",
        "",
        "| method | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |",
        "|---|" + "---|" * len(lrs),
    ]
    for method in METHODS:
        lines.append(
            f"| {method} | " + " | ".join(_fmt(p["steps_to_target"], 0) for p in summary[method]["per_lr"]) + " |"
        )
    lines += [
        "",
        "LR in force at the end:",
        "",
        "| method | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |",
        "|---|" + "---|" * len(lrs),
    ]
    for method in METHODS:
        lines.append(f"| {method} | " + " | ".join(f"{p['final_lr']:.2e}" for p in summary[method]["per_lr"]) + " |")
    ranked = sorted(METHODS, key=lambda m: summary[m]["spread"])
    lines += ["", f"Smallest spread: **{ranked[0]}** (ranking: {', '.join(ranked)}).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few steps, two LRs, one seed: a smoke run")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--target", type=float, default=0.1, help="training loss that counts as reached")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    quick = args.quick
    lrs = [3e-4, 3e-3, 3e-2] if quick else [3e-4, 1e-3, 3e-3, 1e-2, 3e-2]
    names = ["has_cat"] if quick else ["last_color", "more_colors", "has_cat"]
    seeds = [0]
    steps = args.steps or (60 if quick else 150)
    n_train, n_eval, batch_size = (128, 32, 16) if quick else (256, 64, 16)
    start = time.perf_counter()
    tokenizer = build_tokenizer()
    data = load_data(tokenizer, names, n_train, n_eval, seed=0)
    runs = []
    for seed in seeds:
        for name, (train_rows, eval_rows) in data.items():
            for lr in lrs:
                for method in METHODS:  # interleaved: every method sees the same machine state
                    r = train_one(method, lr, steps, seed, tokenizer, train_rows, eval_rows, args.target, batch_size)
                    r["task"] = name
                    runs.append(r)
                    print(
                        f"{name} seed {seed} lr {lr:g} {method:9s} eval {r['final_eval_loss']:.4f} "
                        f"train {r['final_train_loss']:.4f} to-target {r['steps_to_target']} "
                        f"final lr {r['final_lr']:.2e}",
                        flush=True,
                    )
    summary = summarize(runs, lrs, steps)
    meta = {
        "quick": quick,
        "steps": steps,
        "base_lrs": lrs,
        "seeds": seeds,
        "target": args.target,
        "tasks": names,
        "n_train": n_train,
        "n_eval": n_eval,
        "batch_size": batch_size,
        "wall_s": time.perf_counter() - start,
        "torch": torch.__version__,
    }
    report = write_report(summary, meta)
    write_results("lr_robustness", {"meta": meta, "summary": summary, "runs": runs}, report, out=args.out)
    return summary


if __name__ == "__main__":
    main()
