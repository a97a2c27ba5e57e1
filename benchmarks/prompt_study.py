"""Which prompt format and label scoring to use on a real LM: measured, zero-shot and after a short LoRA training.

Issue 13 asks whether prompts work better with the chat template or without, and whether label scores should be
length-normalised or calibrated. On SmolLM2-135M-Instruct (`smollm2-135m`) and five tasks of the CL benchmark
collection (`../shared/data/cl_benchmark/`, measurement only), for each prompt format (`bos`, `plain`, `chat`):

* zero-shot accuracy on each task's eval subset under the three label scorings (`sum`, `mean`, `pmi`), from one
  packed scoring pass (mean and PMI are derived from the same label log-likelihoods, as `rank_classify` does);
* the accuracy after training one shared LoRA adapter on each task alone for the same short budget (a fresh
  adapter per task), scored the three ways.

Everything goes through the public API (`rank_classify`, `ContinualTrainer.train_sequence` on one task). Budgets:
`--n-eval` examples per task, `--n-train` rows, 1 epoch, batch 8, LoRA r=8 on q,v, lr 1e-3 (the `cl_real` recipe).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write_results  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cl_benchmark"
TASKS = ["SST-2", "QQP", "IMDB", "MNLI", "WiC"]
FORMATS = ("bos", "plain", "chat")
SCORINGS = ("sum", "mean", "pmi")


def _scores(model, tokenizer, task, prompt_format: str, max_length: int) -> dict[str, float]:
    """Accuracy of each label scoring, from one packed pass (and one for the empty-input prompt)."""
    import torch

    from hf_adaptive.tasks import rank_classify
    from hf_adaptive.tasks.prompting import PromptEncoder
    from hf_adaptive.tasks.scoring import score_label_continuations

    data = task.eval_dataset
    _, raw = rank_classify(model, tokenizer, task, data, max_length=max_length, prompt_format=prompt_format)
    raw = torch.tensor(raw)
    encoder = PromptEncoder(task, tokenizer, max_length, prompt_format)
    lengths = torch.tensor([float(len(a)) for a in encoder.answers])
    pad = tokenizer.pad_token_id or 0
    model.eval()
    null = score_label_continuations(model, [encoder.null_prompt()], encoder.answers, pad)
    labels = torch.tensor([task.label_index(x) for x in data["label"]])
    variants = {"sum": raw, "mean": raw / lengths, "pmi": raw - null}
    return {name: float((s.argmax(-1) == labels).float().mean()) for name, s in variants.items()}


def _train_one(model, tokenizer, task, prompt_format: str, max_length: int, n_eval: int, seed: int):
    """A fresh shared LoRA adapter trained on `task` alone; returns the adapted model."""
    from hf_adaptive import ContinualConfig, ContinualTrainer

    with tempfile.TemporaryDirectory() as out:
        config = ContinualConfig(
            output_dir=out,
            adapter_strategy="shared_lora",
            lora_r=8,
            lora_alpha=16.0,
            lora_target_modules=["q_proj", "v_proj"],
            per_device_train_batch_size=8,
            num_train_epochs=1,
            learning_rate=1e-3,
            lr_scheduler_type="constant_with_warmup",
            warmup_steps=2,
            weight_decay=0.0,
            prompt_max_length=max_length,
            prompt_format=prompt_format,
            continual_eval_limit=1,  # the sequence's own evaluation is not what is measured here
            evaluate_unseen_tasks=False,
            evaluate_baseline=False,
            save_strategy="no",
            report_to=[],
            logging_steps=1000,
            disable_tqdm=True,
            seed=seed,
            use_cpu=True,
        )
        trainer = ContinualTrainer(model=model, args=config, processing_class=tokenizer)
        trainer.train_sequence([task])
        return trainer.model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--n-eval", type=int, default=100)
    parser.add_argument("--n-train", type=int, default=128)
    parser.add_argument("--max-length", type=int, default=96)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tasks", nargs="+", default=TASKS)
    parser.add_argument("--no-train", action="store_true", help="zero-shot only")
    args = parser.parse_args()

    import torch

    from hf_adaptive.models import load_model_and_tokenizer
    from hf_adaptive.tasks.cl_benchmark import load_cl_benchmark_task

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    _, tokenizer = load_model_and_tokenizer(args.model)
    tasks = [load_cl_benchmark_task(DATA, name, args.n_train, args.n_eval, seed=0) for name in args.tasks]
    results: dict[str, dict] = {}
    for fmt in FORMATS:
        results[fmt] = {"zero_shot": {}, "trained": {}}
        for task in tasks:
            model, _ = load_model_and_tokenizer(args.model)
            results[fmt]["zero_shot"][task.name] = _scores(model, tokenizer, task, fmt, args.max_length)
            if not args.no_train:
                model = _train_one(model, tokenizer, task, fmt, args.max_length, args.n_eval, seed=0)
                results[fmt]["trained"][task.name] = _scores(model, tokenizer, task, fmt, args.max_length)
            print(fmt, task.name, results[fmt]["zero_shot"][task.name], results[fmt]["trained"].get(task.name))

    def mean_over_tasks(fmt: str, phase: str, scoring: str) -> float:
        return statistics.mean(results[fmt][phase][t.name][scoring] for t in tasks)

    phases = ["zero_shot"] + ([] if args.no_train else ["trained"])
    lines = [
        "# Prompt format and label scoring on SmolLM2-135M (`benchmarks/prompt_study.py`)",
        "",
        f"Tasks {', '.join(t.name for t in tasks)}; {args.n_eval} eval examples each, prompts cut to "
        f"{args.max_length} tokens; trained: a fresh LoRA (r=8, q/v) per task, {args.n_train} rows, 1 epoch, "
        f"batch 8, lr 1e-3. One seed. Mean accuracy over the tasks:",
        "",
        "| format | phase | sum | mean | pmi |",
        "|---|---|---|---|---|",
    ]
    for fmt in FORMATS:
        for phase in phases:
            cells = " | ".join(f"{mean_over_tasks(fmt, phase, s):.3f}" for s in SCORINGS)
            lines.append(f"| {fmt} | {phase} | {cells} |")
    lines += ["", "Per task (accuracy under sum / mean / pmi):", "", "| format | phase | task | sum | mean | pmi |"]
    lines.append("|---|---|---|---|---|---|")
    for fmt in FORMATS:
        for phase in phases:
            for t in tasks:
                r = results[fmt][phase][t.name]
                lines.append(f"| {fmt} | {phase} | {t.name} | {r['sum']:.2f} | {r['mean']:.2f} | {r['pmi']:.2f} |")
    best = max(((f, p, s) for f in FORMATS for p in phases for s in SCORINGS), key=lambda x: mean_over_tasks(*x))
    lines += ["", f"Best (format, phase, scoring): {best} = {mean_over_tasks(*best):.3f}."]
    lines += ["", f"Wall time {time.perf_counter() - started:.0f} s, {args.threads} threads."]
    write_results("prompt_study", {"results": results, "args": vars(args), "env": environment()}, "\n".join(lines))


if __name__ == "__main__":
    main()
