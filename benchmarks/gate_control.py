"""Which heads to keep at a given budget: the RL gate controller vs random, magnitude and Michel importance.

A small Gemma (4 layers x 8 heads, 4 kv heads, hidden 128) is trained on the whole built-in task suite. Each
task's eval split is cut in two: a validation half (what every strategy may look at: Michel importance
gradients, the controller's rewards) and a held-out test half (what the table reports). At every budget
(fraction of heads kept) each strategy picks exactly that many heads; the model is evaluated with the others
gated to 0 (no fine-tuning after pruning, so the table measures the choice of heads alone):
  * random: a uniformly random subset (mean of 3 seeds);
  * magnitude: largest o_proj column norms;
  * michel: largest Michel et al. importance (E|dL/dgate|) on the validation half, one shot;
  * controller: `GateController` (PPO) with min = max = budget, `steps` controller steps each scored by the
    validation loss (reward = tanh of the relative improvement), then the best validated gates (Pareto pick).
A free-budget controller run (25-100 % of heads, efficiency factor 0.5) fills a Pareto archive of (validation
loss, active heads); docs/gate_control_pareto.png plots that front with the strategies' test curves.

    python benchmarks/gate_control.py [--quick]

Writes docs/results/gate_control.md|json and docs/gate_control_pareto.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, write_results  # noqa: E402, I001  (first: sets the single-threaded, offline environment)
import torch  # noqa: E402

from hf_adaptive.control.feedback import validation_loss  # noqa: E402
from hf_adaptive.control.gate_controller import GateController, GateControllerConfig  # noqa: E402
from hf_adaptive.models import (  # noqa: E402
    attention_entropy,
    build_tiny_gemma,
    build_tokenizer,
    gate_model,
    head_importance,
    o_proj_magnitude,
)
from hf_adaptive.models.tiny import TINY_PRESETS  # noqa: E402
from hf_adaptive.tasks import CausalLMCollator, builtin_suite, task_accuracy, tokenize_task  # noqa: E402

PRESET = "gates"
LAYERS, HEADS = TINY_PRESETS[PRESET]["num_hidden_layers"], TINY_PRESETS[PRESET]["num_attention_heads"]


def batches(rows, collate, bs=64):
    return [collate([rows[i] for i in range(s, min(s + bs, len(rows)))]) for s in range(0, len(rows), bs)]


def train(model, train_rows, collate, steps, lr, seed):
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * max(0.0, 1 - s / steps))
    model.train()
    for _ in range(steps):
        batch = collate([train_rows[rng.randrange(len(train_rows))] for _ in range(32)])
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
    model.eval()


def top_k_gates(score: torch.Tensor, k: int) -> torch.Tensor:
    g = torch.zeros(score.numel())
    g[score.reshape(-1).argsort(descending=True)[:k]] = 1
    return g.view_as(score)


def evaluate(model, gated, gates, test_batches, test_tasks, tokenizer):
    gated.set_gates(gates)
    loss = validation_loss(model, test_batches)
    acc = statistics.mean(task_accuracy(model, tokenizer, t, split="eval") for t in test_tasks)
    return loss, acc


def run_controller(model, gated, val_batches, stats_batches, cfg, steps):
    """Act, measure, reward: head statistics are taken under the current gates (a pruned head's importance is
    the loss sensitivity to bringing it back, the signal a regrow needs)."""
    ctrl = GateController(LAYERS, HEADS, cfg)
    gated.set_gates(ctrl.gates)
    ctrl.feedback(validation_loss(model, val_batches), step=0)
    for step in range(1, steps + 1):
        imp = head_importance(model, stats_batches)
        ent = attention_entropy(model, stats_batches)
        gated.set_gates(ctrl.act(imp, ent))
        ctrl.feedback(validation_loss(model, val_batches), step=step)
    return ctrl


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--train-steps", type=int, default=600)
    p.add_argument("--controller-steps", type=int, default=100)
    p.add_argument("--algorithm", default="ppo", choices=["reinforce", "a2c", "ppo"])
    p.add_argument("--out", default=str(RESULTS / "gate_control"))
    p.add_argument("--plot", default=str(RESULTS.parent / "gate_control_pareto.png"))
    args = p.parse_args()
    if args.quick:
        args.train_steps, args.controller_steps = 60, 6
    torch.set_num_threads(1)
    started = time.perf_counter()
    tokenizer = build_tokenizer()
    tasks = builtin_suite(n_train=256, n_eval=128, seed=0)
    collate = CausalLMCollator(tokenizer)
    val_tasks = [dataclasses.replace(t, eval_dataset=t.eval_dataset.select(range(64))) for t in tasks]
    test_tasks = [dataclasses.replace(t, eval_dataset=t.eval_dataset.select(range(64, 128))) for t in tasks]
    train_rows = [r for t in tasks for r in tokenize_task(t, tokenizer)]
    val_rows = [r for t in val_tasks for r in tokenize_task(t, tokenizer, "eval")]
    test_rows = [r for t in test_tasks for r in tokenize_task(t, tokenizer, "eval")]
    val_batches, test_batches = batches(val_rows, collate), batches(test_rows, collate)
    stats_batches = [collate(val_rows[::8])]

    model, _ = build_tiny_gemma(tokenizer, seed=0, preset=PRESET)
    train(model, train_rows, collate, args.train_steps, 3e-3, seed=0)
    gated = gate_model(model)
    full_loss, full_acc = evaluate(model, gated, torch.ones(LAYERS, HEADS), test_batches, test_tasks, tokenizer)
    print(f"trained in {time.perf_counter() - started:.0f}s: test loss {full_loss:.3f}, accuracy {full_acc:.3f}")

    gated.set_gates(torch.ones(LAYERS, HEADS))
    michel = head_importance(model, val_batches)
    magnitude = o_proj_magnitude(model)
    n = LAYERS * HEADS
    budgets = [0.75, 0.5, 0.25]
    rows = [
        {"strategy": s, "fraction_kept": 1.0, "heads": n, "test_loss": full_loss, "test_accuracy": full_acc}
        for s in ("random", "magnitude", "michel", "controller")
    ]
    controllers = {}
    for frac in budgets:
        k = round(frac * n)
        rand = []
        for seed in range(3):
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k]
            g = torch.zeros(n)
            g[perm] = 1
            rand.append(evaluate(model, gated, g.view(LAYERS, HEADS), test_batches, test_tasks, tokenizer))
        rows.append(
            {
                "strategy": "random",
                "fraction_kept": frac,
                "heads": k,
                "test_loss": statistics.mean(r[0] for r in rand),
                "test_accuracy": statistics.mean(r[1] for r in rand),
            }
        )
        for name, score in (("magnitude", magnitude), ("michel", michel)):
            loss, acc = evaluate(model, gated, top_k_gates(score, k), test_batches, test_tasks, tokenizer)
            rows.append({"strategy": name, "fraction_kept": frac, "heads": k, "test_loss": loss, "test_accuracy": acc})
        cfg = GateControllerConfig(
            algorithm=args.algorithm,
            min_active_fraction=frac,
            max_active_fraction=frac,
            max_changes=4,
            efficiency_factor=0.0,
            rollout_steps=4,
            keep_bias=1.0,
            seed=0,
        )
        t = time.perf_counter()
        ctrl = run_controller(model, gated, val_batches, stats_batches, cfg, args.controller_steps)
        best = min((pt for pt in ctrl.archive.points if pt.active_heads == k), key=lambda pt: pt.loss)
        loss, acc = evaluate(model, gated, best.gates.view(LAYERS, HEADS), test_batches, test_tasks, tokenizer)
        rows.append(
            {
                "strategy": "controller",
                "fraction_kept": frac,
                "heads": k,
                "test_loss": loss,
                "test_accuracy": acc,
                "val_loss": best.loss,
                "controller_seconds": round(time.perf_counter() - t, 1),
            }
        )
        controllers[frac] = ctrl
        print(rows[-4:])

    free_cfg = GateControllerConfig(
        algorithm=args.algorithm,
        min_active_fraction=0.25,
        max_active_fraction=1.0,
        max_changes=4,
        efficiency_factor=0.5,
        rollout_steps=4,
        keep_bias=1.0,
        seed=1,
    )
    free = run_controller(model, gated, val_batches, stats_batches, free_cfg, 2 * args.controller_steps)
    front = [{"val_loss": pt.loss, "active_heads": pt.active_heads, "step": pt.step} for pt in free.archive.points]
    preferred = free.archive.pick(1.0)
    pick_gates = preferred.gates.view(LAYERS, HEADS)
    pick_loss, pick_acc = evaluate(model, gated, pick_gates, test_batches, test_tasks, tokenizer)

    result = {
        "meta": {
            "model": f"Gemma {LAYERS} layers x {HEADS} heads (4 kv), hidden 128",
            "train_steps": args.train_steps,
            "controller_steps": args.controller_steps,
            "algorithm": args.algorithm,
            "quick": args.quick,
            "tasks": [t.name for t in tasks],
            "val_rows": len(val_rows),
            "test_rows": len(test_rows),
            "seconds": round(time.perf_counter() - started, 1),
        },
        "results": rows,
        "pareto_front": front,
        "pareto_pick_preference_1": {
            "active_heads": preferred.active_heads,
            "val_loss": preferred.loss,
            "test_loss": pick_loss,
            "test_accuracy": pick_acc,
        },
    }
    out = Path(args.out)
    plot(Path(args.plot), rows, front, n)
    write_results(out.name, result, markdown(result, Path(args.plot)), out=out.parent)


def markdown(result: dict, plot_path: Path) -> str:
    m = result["meta"]
    lines = [
        "# Gate control: which heads to keep at a budget",
        "",
        f"{m['model']}, trained {m['train_steps']} steps on the built-in suite ({', '.join(m['tasks'])}). "
        f"Validation half ({m['val_rows']} rows) for importance / controller rewards, held-out test half "
        f"({m['test_rows']} rows) reported. No fine-tuning after pruning. Controller: {m['algorithm']}, "
        f"{m['controller_steps']} steps per budget (each one validation pass), best validated gates kept. "
        f"Random: mean of 3 seeds. Total time {m['seconds']} s{' (quick run)' if m['quick'] else ''}.",
        "",
        "| fraction kept | heads | strategy | test loss | test accuracy |",
        "|---|---|---|---|---|",
    ]
    for r in sorted(result["results"], key=lambda r: (-r["fraction_kept"], r["strategy"])):
        lines.append(
            f"| {r['fraction_kept']:.2f} | {r['heads']} | {r['strategy']} | {r['test_loss']:.4f} | "
            f"{r['test_accuracy']:.3f} |"
        )
    pick = result["pareto_pick_preference_1"]
    lines += [
        "",
        f"Free-budget controller ({2 * m['controller_steps']} steps, 25-100 % of heads, efficiency 0.5): "
        f"Pareto front of (validation loss, active heads): "
        + ", ".join(f"({p['val_loss']:.3f}, {p['active_heads']})" for p in result["pareto_front"])
        + f". Pick at preference 1: {pick['active_heads']} heads, test loss {pick['test_loss']:.4f}, "
        f"accuracy {pick['test_accuracy']:.3f}.",
        "",
        f"![Pareto front](../{plot_path.name})",
    ]
    return "\n".join(lines)


def plot(path: Path, rows: list[dict], front: list[dict], n: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for strategy, marker in (("random", "x"), ("magnitude", "s"), ("michel", "^"), ("controller", "o")):
        pts = sorted((r["fraction_kept"], r["test_loss"]) for r in rows if r["strategy"] == strategy)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=f"{strategy} (test)")
    ax.step(
        [p["active_heads"] / n for p in front],
        [p["val_loss"] for p in front],
        where="post",
        color="black",
        linestyle="--",
        marker=".",
        label="controller Pareto front (val)",
    )
    ax.set_xlabel("fraction of heads kept")
    ax.set_ylabel("loss")
    ax.set_title("Heads kept vs loss on the built-in suite")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
