"""Meta-learned initialisation of a new expert: how fast, and how well, a new task is learned from each start.

Per seed, LoRA experts are first trained on the source tasks (one fresh expert per task, one recipe). A new task is
then learned by a new expert that starts from
  (a) `fresh`: peft's LoRA initialisation (B = 0: the base model);
  (b) `fork`: a copy of the nearest expert (the router's nearest: task signatures as the routing plugin computes
      them, profiles from the eval split, the query from the train split, `Router.nearest`);
  (c) `reptile`: phi meta-learned by Reptile over the source tasks' kept rows;
  (d) `fomaml`: phi meta-learned by first-order MAML over them;
  (e) `reptile_experts`: Reptile over the stored source experts' weights (no inner loop; cheap);
(c)-(e) through `MetaInitializer.initialise`, the code the routing plugin runs when it creates an expert, starting
from the same fresh initialisation as (a) (the global seed is reset before each new expert). Every start then trains
with the same recipe (AdamW, learning rate, batch, steps, data order), and its accuracy on the new task's eval split
is measured at step 0 and every `eval_every` steps: the steps to reach `target` (the first evaluation at or above
it; None: never within the budget), the final accuracy, and the seconds the initialisation cost. Writes
`<out>/meta_init.md|json` (tiny mode) or `<out>/meta_init_real.md|json` (`--real`), through `common.write_results`
(default `docs/results/`), so neither mode overwrites the other's numbers. Each finished seed is first stored on its
own (`<out>/<name>/seed<k>.json`, written atomically and stamped with cl_real's `CodeVersion`: the manifest of the
package files it loaded, this script, cl_real.py, common.py and the settings), and a later call reuses every stored
seed that is still current and covers the requested starts: a run stopped between seeds (a real seed took 79 min on
2 cores) resumes at the next seed.

    python benchmarks/meta_init.py --quick --out /tmp/meta_init    # smoke: the whole pipeline in seconds
    python benchmarks/meta_init.py                                 # tiny Gemma, built-in tasks, 2 seeds
    python benchmarks/meta_init.py --real [--data DIR]             # SmolLM2-135M, CL benchmark tasks (slow on CPU)

Tiny mode: the embedded tiny Gemma (random weights) and the built-in tasks (`hf_adaptive.tasks.builtin_suite`);
sources first_color, last_color, has_cat, new task third_color (a rule of the sources' family: "is the k-th word a
colour"). Real mode: `load_model_and_tokenizer("smollm2-135m")` and tasks of `load_cl_benchmark_task` (sources
SST-2, MNLI, WiC; new task IMDB, which shares SST-2's skill and label words, so forking has its best case there).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, write_results  # noqa: E402, I001  (first: sets the single-threaded, offline environment)

import cl_real  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "cl_benchmark"
STARTS = ("fresh", "fork", "reptile", "fomaml", "reptile_experts")
SCRIPTS = (Path(__file__).resolve(), Path(cl_real.__file__).resolve(), Path(__file__).resolve().with_name("common.py"))

#: the settings of each mode (the meta-init ones are `MetaInitConfig` fields)
SETTINGS: dict[str, dict[str, Any]] = {
    "tiny": {
        "model": "tiny-gemma",
        "sources": ["first_color", "last_color", "has_cat"],
        "new_task": "third_color",
        "n_train": 128,
        "n_eval": 64,
        "lora_r": 8,
        "lora_target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
        "batch_size": 8,
        "lr": 5e-3,
        "source_steps": 160,
        "steps": 160,
        "eval_every": 10,
        "target": 0.8,
        "seeds": [0, 1],
        "threads": 1,
        "meta": {
            "inner_steps": 5,
            "inner_lr": 0.05,
            "outer_steps": 10,
            "outer_lr": 0.5,
            "support_batch_size": 8,
            "query_batch_size": 8,
            "rows_per_task": 32,
        },
    },  # fmt: skip
    "real": {
        "model": "smollm2-135m",
        "sources": ["SST-2", "MNLI", "WiC"],
        "new_task": "IMDB",
        "n_train": 128,
        "n_eval": 64,
        "lora_r": 8,
        "lora_target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
        "batch_size": 8,
        "lr": 2e-3,
        "source_steps": 48,
        "steps": 48,
        "eval_every": 8,
        "target": 0.75,
        "seeds": [0, 1],
        "threads": 2,  # cl_real's: the real model on both cores
        "meta": {
            "inner_steps": 3,
            "inner_lr": 0.05,
            "outer_steps": 4,
            "outer_lr": 0.5,
            "support_batch_size": 4,
            "query_batch_size": 4,
            "rows_per_task": 16,
        },
    },  # fmt: skip
}

#: --quick: the tiny mode shrunk to a smoke test of the whole pipeline (seconds; the numbers mean nothing)
QUICK = {
    "n_train": 16,
    "n_eval": 8,
    "source_steps": 2,
    "steps": 4,
    "eval_every": 2,
    "meta": {"inner_steps": 1, "inner_lr": 0.05, "outer_steps": 1, "outer_lr": 0.5, "support_batch_size": 4,
             "query_batch_size": 4, "rows_per_task": 8},
}  # fmt: skip


def load(settings: dict[str, Any], data: Path, seed: int):
    """(model, tokenizer, source tasks, new task) of a mode."""
    from hf_adaptive.models import load_model_and_tokenizer

    if settings["model"] == "tiny-gemma":
        from hf_adaptive.tasks import builtin_suite

        model, tokenizer = load_model_and_tokenizer("tiny-gemma", seed=seed)
        tasks = builtin_suite(
            [*settings["sources"], settings["new_task"]], n_train=settings["n_train"], n_eval=settings["n_eval"]
        )
    else:
        from hf_adaptive.tasks.cl_benchmark import load_cl_benchmark_task

        model, tokenizer = load_model_and_tokenizer(settings["model"])
        tasks = [
            load_cl_benchmark_task(data, name, max_train=settings["n_train"], max_eval=settings["n_eval"], seed=0)
            for name in [*settings["sources"], settings["new_task"]]
        ]
    return model, tokenizer, tasks[:-1], tasks[-1]


def accuracy(library, tokenizer, task, settings) -> float:
    from hf_adaptive.tasks import task_accuracy

    return task_accuracy(library.model, tokenizer, task, "eval", batch_size=32, limit=settings["n_eval"])


def train(library, name: str, rows, collate, settings, steps: int, seed: int, evaluate=None) -> list[list[float]]:
    """`steps` AdamW steps of expert `name` (the only trainable weights) on `rows`; `evaluate()` at step 0 and every
    `eval_every` steps (and at the end): [[step, accuracy], ...]."""
    library.activate(name)
    model = library.model
    params = [p for n, p in model.named_parameters() if f".{name}." in n]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=settings["lr"], weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    curve = [[0, evaluate()]] if evaluate else []
    model.train()
    for step in range(1, steps + 1):
        if len(order) < settings["batch_size"]:
            order += torch.randperm(len(rows), generator=gen).tolist()
        batch = collate([rows[i] for i in order[: settings["batch_size"]]])
        del order[: settings["batch_size"]]
        loss = model(**{k: v.to(params[0].device) for k, v in batch.items()}).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if evaluate and (step % settings["eval_every"] == 0 or step == steps):
            model.eval()
            curve.append([step, evaluate()])
            model.train()
    model.eval()
    return curve


def nearest_expert(library, tokenizer, sources, new_task, rows_by_task) -> str:
    """The source expert the router finds nearest to the new task (profiles: eval-split signatures)."""
    from hf_adaptive.experts import Router, RouterConfig, SignatureConfig, TaskSignature
    from hf_adaptive.tasks import tokenize_task

    signer = TaskSignature(library.model, tokenizer, SignatureConfig(n_examples=8, batch_size=8))
    router = Router(RouterConfig(dim=signer.dim))
    for task in sources:
        evaluation = tokenize_task(task, tokenizer, "eval")
        router.add_expert(f"src_{task.name}", signer.compute(task, split="eval", dataset=evaluation).vector)
    query = signer.compute(new_task, split="train", dataset=rows_by_task[new_task.name]).vector
    names, _ = router.nearest(query, k=1)
    return names[0]


def run_seed(settings: dict[str, Any], data: Path, seed: int, starts: list[str]) -> dict[str, Any]:
    from peft import get_peft_model_state_dict

    from hf_adaptive.experts import ExpertLibrary, MetaInitConfig, MetaInitializer, default_lora_config
    from hf_adaptive.tasks import CausalLMCollator, tokenize_task

    torch.manual_seed(seed)
    model, tokenizer, sources, new_task = load(settings, data, seed)
    library = ExpertLibrary(model, default_lora_config(settings["lora_r"], 2.0 * settings["lora_r"],
                                                       settings["lora_target_modules"]))  # fmt: skip
    collate = CausalLMCollator(tokenizer)
    rows = {t.name: tokenize_task(t, tokenizer, "train") for t in [*sources, new_task]}
    out: dict[str, Any] = {"seed": seed, "sources": {}, "starts": {}}
    for i, task in enumerate(sources):  # the earlier tasks' experts
        name = f"src_{task.name}"
        torch.manual_seed(seed * 1000 + i)
        library.create(name)
        t0 = time.perf_counter()
        train(library, name, rows[task.name], collate, settings, settings["source_steps"], seed)
        out["sources"][task.name] = {
            "accuracy": accuracy(library, tokenizer, task, settings),
            "train_s": time.perf_counter() - t0,
        }
    nearest = nearest_expert(library, tokenizer, sources, new_task, rows) if "fork" in starts else None
    out["nearest"] = nearest
    for start in starts:
        name = f"new_{start}"
        t0 = time.perf_counter()
        info: dict[str, Any] = {}
        if start == "fork":
            library.fork(nearest, name)
        else:
            torch.manual_seed(seed * 1000 + 999)  # every non-fork start from the same fresh LoRA
            library.create(name)
            if start != "fresh":
                meta = MetaInitializer(MetaInitConfig(method=start, seed=seed, **settings["meta"]))
                experts = None
                if start == "reptile_experts":
                    experts = {
                        t.name: get_peft_model_state_dict(library.model, adapter_name=f"src_{t.name}") for t in sources
                    }
                for task in sources:
                    meta.remember(task.name, rows[task.name])
                info = meta.initialise(library.model, name, collate, experts=experts) or {}
        init_s = time.perf_counter() - t0

        def evaluate(name: str = name) -> float:
            library.model.set_adapter(name)
            return accuracy(library, tokenizer, new_task, settings)

        curve = train(library, name, rows[new_task.name], collate, settings, settings["steps"], seed, evaluate)
        reached = next((step for step, acc in curve if acc >= settings["target"]), None)
        out["starts"][start] = {
            "init_s": init_s,
            "curve": curve,
            "start_accuracy": curve[0][1],
            "final_accuracy": curve[-1][1],
            "best_accuracy": max(acc for _, acc in curve),
            "steps_to_target": reached,
            "meta_tasks": info.get("tasks"),
        }
        library.delete(name)
        print(f"seed {seed} {start:>15}: start {curve[0][1]:.3f} final {curve[-1][1]:.3f} "
              f"target@{reached} init {init_s:.1f}s", flush=True)  # fmt: skip
    return out


def seed_version(settings: dict[str, Any], seed: int) -> cl_real.CodeVersion:
    """The code version of one seed's record: cl_real's file manifest over this mode's settings and seed."""
    return cl_real.CodeVersion({**settings, "seeds": [seed]}, scripts=SCRIPTS)


def run_or_load(settings: dict[str, Any], data: Path, seed: int, starts: list[str], folder: Path) -> dict[str, Any]:
    """Seed `seed`'s run: the stored record `<folder>/seed<seed>.json` when it is current (same code files and
    settings) and holds every start of `starts` (only those are returned), else a new run (its seconds in `wall_s`),
    stored before returning."""
    path = folder / f"seed{seed}.json"
    version = seed_version(settings, seed)
    if path.exists():
        record = json.loads(path.read_text())
        if version.matches(record) and set(starts) <= set(record.get("starts", {})):
            print(f"seed {seed}: stored run reused ({path})", flush=True)
            kept = {k: v for k, v in record.items() if k != "code_files"}  # the manifest stays in the seed's file
            return {**kept, "starts": {k: record["starts"][k] for k in starts}}
        print(f"seed {seed}: stored run {path} is stale or lacks a start; running it again", flush=True)
    t0 = time.perf_counter()
    out = run_seed(settings, data, seed, starts)
    out["wall_s"] = time.perf_counter() - t0
    cl_real.write_stamped(path, out, version)
    return out


def summarize(runs: list[dict[str, Any]], starts: list[str], settings: dict[str, Any]) -> tuple[dict, list[str]]:
    """Per start: mean final accuracy and steps to target over seeds (None counts as not reached), and the verdicts
    computed from them (nothing asserted ahead of the numbers)."""
    summary = {}
    for start in starts:
        finals = [r["starts"][start]["final_accuracy"] for r in runs]
        reached = [r["starts"][start]["steps_to_target"] for r in runs]
        summary[start] = {
            "final_mean": statistics.mean(finals),
            "final_min": min(finals),
            "final_max": max(finals),
            "start_mean": statistics.mean(r["starts"][start]["start_accuracy"] for r in runs),
            "steps_to_target": reached,
            "reached": sum(s is not None for s in reached),
            "init_s_mean": statistics.mean(r["starts"][start]["init_s"] for r in runs),
        }
    verdicts = []
    budget = settings["steps"]
    for start in starts:
        if start == "fresh" or "fresh" not in summary:
            continue
        s, f = summary[start], summary["fresh"]
        delta = s["final_mean"] - f["final_mean"]
        pairs = [
            (a, b)
            for a, b in zip(s["steps_to_target"], f["steps_to_target"], strict=True)
            if a is not None or b is not None
        ]
        faster = sum((a if a is not None else budget + 1) < (b if b is not None else budget + 1) for a, b in pairs)
        slower = sum((a if a is not None else budget + 1) > (b if b is not None else budget + 1) for a, b in pairs)
        verdicts.append(
            f"{start} vs fresh: final accuracy {s['final_mean']:.3f} vs {f['final_mean']:.3f} ({delta:+.3f}); "
            f"target {settings['target']} reached in {s['reached']}/{len(runs)} seeds vs {f['reached']}/{len(runs)}, "
            f"sooner in {faster}, later in {slower} of {len(runs)} seeds; initialisation {s['init_s_mean']:.1f} s."
        )
    if all(v["reached"] == 0 for v in summary.values()):
        verdicts.append(
            f"No start reached the target {settings['target']} within {budget} steps: the comparison rests on the "
            "final accuracies only."
        )
    return summary, verdicts


def markdown(settings, runs, summary, verdicts, mode: str) -> str:
    seeds = ", ".join(str(r["seed"]) for r in runs)
    lines = [
        "# Meta-learned initialisation of a new expert",
        "",
        f"Mode `{mode}`: {settings['model']}, sources {', '.join(settings['sources'])}, new task "
        f"{settings['new_task']} ({settings['n_train']} train / {settings['n_eval']} eval rows), LoRA r="
        f"{settings['lora_r']} on {', '.join(settings['lora_target_modules'])}, AdamW lr {settings['lr']}, batch "
        f"{settings['batch_size']}, {settings['source_steps']} steps per source, {settings['steps']} on the new task, "
        f"accuracy every {settings['eval_every']} steps, target {settings['target']}, seeds {seeds}. Meta-init: "
        + ", ".join(f"{k}={v}" for k, v in settings["meta"].items())
        + ". Produced by `benchmarks/meta_init.py`.",
        "",
        "| start | accuracy at step 0 | final accuracy (mean, min-max) | steps to target per seed | init s |",
        "|---|---|---|---|---|",
    ]
    for start, s in summary.items():
        steps = ", ".join("never" if x is None else str(x) for x in s["steps_to_target"])
        lines.append(
            f"| {start} | {s['start_mean']:.3f} | {s['final_mean']:.3f} ({s['final_min']:.3f}-{s['final_max']:.3f}) "
            f"| {steps} | {s['init_s_mean']:.1f} |"
        )
    lines += ["", "Source experts (accuracy on their own task): "]
    for r in runs:
        accs = ", ".join(f"{t} {v['accuracy']:.3f}" for t, v in r["sources"].items())
        lines.append(f"- seed {r['seed']}: {accs}; nearest expert to {settings['new_task']}: {r['nearest']}")
    lines += ["", "## Verdicts", "", *[f"- {v}" for v in verdicts]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--quick", action="store_true", help="a smoke run of the tiny mode (seconds; numbers mean nothing)"
    )
    mode.add_argument("--real", action="store_true", help="SmolLM2-135M on CL benchmark tasks (slow on CPU)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the CL benchmark folder (--real)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder of meta_init.md|json (default docs/results)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default: the mode's, 0 1)")
    parser.add_argument("--starts", nargs="+", choices=STARTS, default=list(STARTS), help="starts to compare")
    parser.add_argument("--target", type=float, default=None, help="target accuracy (default: the mode's)")
    args = parser.parse_args(argv)
    mode_name = "real" if args.real else "tiny"
    settings = {**SETTINGS[mode_name], **(QUICK if args.quick else {})}
    if args.seeds is not None:
        settings["seeds"] = args.seeds
    if args.target is not None:
        if not 0.0 <= args.target <= 1.0:
            parser.error(f"--target={args.target} is not allowed: an accuracy in [0, 1]")
        settings["target"] = args.target
    if args.real and not (args.data / settings["new_task"]).is_dir():
        parser.error(f"--data={args.data} is not allowed: it holds no {settings['new_task']} folder (CL benchmark)")
    if "fork" in args.starts and len(settings["sources"]) == 0:
        parser.error("--starts fork needs at least one source task")
    torch.set_num_threads(settings["threads"])
    name = "meta_init_real" if args.real else "meta_init"
    runs = [run_or_load(settings, args.data, seed, list(args.starts), args.out / name) for seed in settings["seeds"]]
    summary, verdicts = summarize(runs, list(args.starts), settings)
    label = f"{mode_name}{' (quick)' if args.quick else ''}"
    wall_s = sum(r["wall_s"] for r in runs)  # the seeds' own run times, a reused seed's included
    data = {"mode": label, "settings": settings, "runs": runs, "summary": summary, "verdicts": verdicts,
            "wall_s": wall_s}  # fmt: skip
    seed_minutes = ", ".join(f"seed {r['seed']} {r['wall_s'] / 60:.1f}" for r in runs)
    text = (
        markdown(settings, runs, summary, verdicts, label) + f"\n\nRun time: {wall_s / 60:.1f} min ({seed_minutes}).\n"
    )
    write_results(name, data, text, out=args.out)


if __name__ == "__main__":
    main()
