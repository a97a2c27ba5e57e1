"""Cost and accuracy of the diagonal Fisher on the tiny Gemma: vectorized vs per-sample loop vs minibatch approximation.

For N = 50 and 200 rows of a built-in task (the empirical Fisher, summed answer NLL per row), on the full
model and on a LoRA adapter (r = 8 on q/k/v/o), each first trained briefly on the task (EWC measures the
Fisher after training), it times (medians over interleaved repetitions, each method
once per round in rotating order):

* `vmap_auto`: `compute_fisher(method="vmap")`, per-sample gradients with `vmap(grad)`, default chunking
  (`chunk_size=None`: as many rows per call as fit in 1 GiB; also `ContinualConfig.fisher_chunk_size`'s default);
  `vmap_fixed`: chunks of `--chunk-size` rows (16 by default, the old default of `fisher_chunk_size`);
* `loop`: `compute_fisher(method="loop")`, one forward/backward per row (the reference);
* `minibatch`: `minibatch_fisher(batch_size=8)`, the squared gradient of each minibatch's mean loss.

Accuracy: max |vmap − loop| (should be float noise), and for the approximation its relative Frobenius error
‖F_mb − F‖ / ‖F‖, the same after the best single rescaling (a scale can be absorbed into λ), and its cosine
similarity with F. Target: vmap ≥ 4× faster than the loop. Writes docs/results/fisher.md|json itself (atomically,
the markdown from the same numbers as the JSON): the committed files are this script's output, never edited.

    python benchmarks/fisher.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402, I001  (first: sets the single-threaded, offline environment)
import torch  # noqa: E402

from hf_adaptive.consolidation.fisher import auto_chunk_size, compute_fisher, minibatch_fisher  # noqa: E402
from hf_adaptive.models import build_tiny_gemma, build_tokenizer  # noqa: E402
from hf_adaptive.tasks import builtin_suite, tokenize_task  # noqa: E402

TARGET = 4.0


def _flat(fisher: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([fisher[n].double().flatten() for n in sorted(fisher)])


def approximation_errors(approx: dict[str, torch.Tensor], exact: dict[str, torch.Tensor]) -> dict[str, float]:
    a, f = _flat(approx), _flat(exact)
    scale = float(a @ f / (a @ a)) if float(a @ a) > 0 else 0.0
    return {
        "rel_error": float((a - f).norm() / f.norm()),
        "rel_error_best_scale": float((scale * a - f).norm() / f.norm()),
        "best_scale": scale,
        "cosine": float(a @ f / (a.norm() * f.norm())),
    }


def _model(tokenizer, lora: bool):
    model, _ = build_tiny_gemma(tokenizer, seed=0)
    if not lora:
        return model
    from peft import get_peft_model

    from hf_adaptive.adapters import lora_config

    # task_type=None: a plain PeftModel, as the committed results were measured
    config = lora_config(r=8, alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type=None)
    torch.manual_seed(0)  # lora_A's initialisation draws from the global generator: fix it, whatever ran before
    peft_model = get_peft_model(model, config)
    with torch.no_grad():  # a trained adapter: B != 0, otherwise every lora_A gradient is zero
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    return peft_model


def train_briefly(model, rows: list[dict], tokenizer, steps: int, lr: float = 3e-3, batch_size: int = 16) -> float:
    """A few AdamW steps on the task, so the Fisher is measured where EWC measures it: after training."""
    from hf_adaptive.tasks import CausalLMCollator

    collator = CausalLMCollator(tokenizer)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    model.train()
    loss = torch.tensor(float("nan"))
    for step in range(steps):
        start = (step * batch_size) % len(rows)
        batch = collator([rows[(start + i) % len(rows)] for i in range(batch_size)])
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    return float(loss.detach())


def bench(model, rows: list[dict], rounds: int, chunk_size: int) -> dict:
    methods = {
        "vmap_auto": lambda: compute_fisher(model, rows, method="vmap", chunk_size=None, progress_bar=False),
        "vmap_fixed": lambda: compute_fisher(model, rows, method="vmap", chunk_size=chunk_size, progress_bar=False),
        "loop": lambda: compute_fisher(model, rows, method="loop", progress_bar=False),
        "minibatch_b8": lambda: minibatch_fisher(model, rows, batch_size=8),
    }
    outputs = {name: fn() for name, fn in methods.items()}  # warm-up, and the values compared below
    times: dict[str, list[float]] = {name: [] for name in methods}
    names = list(methods)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t0 = time.perf_counter()
            methods[name]()
            times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    exact = outputs["loop"].fisher
    diffs = [float((outputs[k].fisher[n] - exact[n]).abs().max()) for k in ("vmap_auto", "vmap_fixed") for n in exact]
    lengths = max(len(row["input_ids"]) for row in rows)
    return {
        "seconds": med,
        "speedup_vs_loop": {name: med["loop"] / med[name] for name in med},
        "auto_chunk_size": min(auto_chunk_size(model, lengths), len(rows)),
        "vmap_max_abs_diff": max(diffs),
        "fisher_max": max(float(f.max()) for f in exact.values()),
        "minibatch": approximation_errors(outputs["minibatch_b8"], exact),
        "trainable_params": sum(f.numel() for f in exact.values()),
        "vmap_method_used": outputs["vmap_auto"].method,
    }


def _markdown(results: list[dict], env: dict, chunk: int) -> str:
    worst_auto = min(r["speedup_vs_loop"]["vmap_auto"] for r in results)
    worst_fixed = min(r["speedup_vs_loop"]["vmap_fixed"] for r in results)
    lines = [
        "# Diagonal Fisher: vectorized vs per-sample loop vs minibatch approximation",
        "",
        "Empirical Fisher of the tiny Gemma on rows of the built-in `first_color` task, CPU, "
        f"{env['threads']} thread(s), torch {env['torch']}{', quick run' if env['quick'] else ''}"
        + (f", 1-minute load average {env['load_average']:.1f} at the start" if "load_average" in env else "")
        + ". "
        f"Median seconds over {env['rounds']} interleaved rounds (`python benchmarks/fisher.py`). The Fisher is "
        f"measured where EWC measures it, after training on the task ({env['train_steps']} AdamW steps of 16 rows, "
        "lr 3e-3 full / 1e-2 LoRA; "
        "near a minimum the mean gradient is small, which is what the minibatch approximation gets wrong).",
        "",
        '* `vmap auto`: `compute_fisher(method="vmap")` with its default `chunk_size=None` (as many rows per vmap '
        "call as fit in 1 GiB of per-sample gradients and logits; chunk used in brackets);",
        f"* `vmap c{chunk}`: the same with `chunk_size={chunk}` (the old default of "
        "`ContinualConfig.fisher_chunk_size`, now None = auto);",
        "* `loop`: one forward/backward per row, the reference; `minibatch b8`: `minibatch_fisher(batch_size=8)`.",
        "",
        f"| model | N | trainable | vmap auto s | vmap c{chunk} s | loop s | minibatch b8 s | vmap auto speedup "
        f"| vmap c{chunk} speedup | max \\|vmap−loop\\| (max F) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        s, sp = r["seconds"], r["speedup_vs_loop"]
        lines.append(
            f"| {r['model']} | {r['samples']} | {r['trainable_params']:,} | {s['vmap_auto']:.4f} "
            f"({r['auto_chunk_size']}) | {s['vmap_fixed']:.4f} | {s['loop']:.4f} | {s['minibatch_b8']:.4f} "
            f"| {sp['vmap_auto']:.2f}× | {sp['vmap_fixed']:.2f}× | {r['vmap_max_abs_diff']:.1e} "
            f"({r['fisher_max']:.1e}) |"
        )
    lines += [
        "",
        "Minibatch approximation (squared gradient of the mean loss of 8 rows, averaged over minibatches) against the "
        "exact Fisher: relative Frobenius error, the same after the best single rescaling of the approximation "
        "(a global scale can be absorbed into λ), and cosine similarity.",
        "",
        "| model | N | train loss | rel. error | rel. error, best scale | best scale | cosine |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        m = r["minibatch"]
        lines.append(
            f"| {r['model']} | {r['samples']} | {r['train_loss']:.3f} | {m['rel_error']:.3f} | "
            f"{m['rel_error_best_scale']:.3f} | {m['best_scale']:.2f} | {m['cosine']:.3f} |"
        )
    lines += [
        "",
        f"Target: vectorized ≥ {TARGET:.0f}× faster than the loop — default (auto chunk): "
        f"{'met' if worst_auto >= TARGET else 'NOT met'} (lowest {worst_auto:.2f}×); chunk {chunk}: "
        f"{'met' if worst_fixed >= TARGET else 'NOT met'} (lowest {worst_fixed:.2f}×). Every vmap call has a "
        "fixed dispatch cost, so few large chunks beat many small ones. Absolute seconds depend on the machine's load; "
        "the speedups are ratios of interleaved runs.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="50 rows only, 3 rounds")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--chunk-size", type=int, default=16, help="the fixed chunk size compared with auto")
    parser.add_argument("--train-steps", type=int, default=60, help="AdamW steps on the task before measuring")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    load_average = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    sizes = [50] if args.quick else [50, 200]
    rounds = args.rounds or (3 if args.quick else 7)

    tokenizer = build_tokenizer()
    (task,) = builtin_suite(["first_color"], n_train=max(sizes), n_eval=8, seed=0)
    all_rows = list(tokenize_task(task, tokenizer))
    results = []
    for lora in (False, True):
        model = _model(tokenizer, lora)
        final_loss = train_briefly(model, all_rows, tokenizer, args.train_steps, lr=1e-2 if lora else 3e-3)
        for n in sizes:
            r = bench(model, all_rows[:n], rounds, args.chunk_size)
            r.update(
                model="tiny Gemma + LoRA r8 (q,k,v,o)" if lora else "tiny Gemma (full)",
                samples=n,
                train_loss=final_loss,
            )
            results.append(r)
            print(
                f"{r['model']:32s} N={n:4d}  "
                + "  ".join(f"{k}={v * 1e3:.1f}ms" for k, v in r["seconds"].items())
                + f"  speedup auto={r['speedup_vs_loop']['vmap_auto']:.2f}x"
                + f" c{args.chunk_size}={r['speedup_vs_loop']['vmap_fixed']:.2f}x"
                + f"  mb rel.err={r['minibatch']['rel_error']:.3f}",
                flush=True,
            )

    env = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor() or "unknown",
        "rounds": rounds,
        "quick": args.quick,
        "chunk_size": args.chunk_size,
        "fisher_type": "empirical",
        "train_steps": args.train_steps,
        "date": time.strftime("%Y-%m-%d"),
    }
    if load_average is not None:
        env["load_average"] = load_average
    payload = {"environment": env, "target_speedup": TARGET, "results": results}
    write_results("fisher", payload, _markdown(results, env, args.chunk_size))


if __name__ == "__main__":
    main()
