"""Routing quality on a built-in stream where tasks recur and related tasks appear.

The stream is made of the built-in tasks (tiny Gemma, offline). Every occurrence of a task draws fresh
examples (a new seed), so a recurring task never has the same signature twice. Families of related tasks:
positional colour/animal questions (first_color, last_color, third_color, second_animal), presence questions
(has_cat, has_red) and counting (more_colors).

Recurrences alternate between the built-in description and a rewording, so the text part of a recurring task is
similar but not identical.

Part 1, decisions (teacher-forced): at each step the router sees the query signature (from the task's training
examples) and decides; then the library is set to the truth (a new task gets its expert, whose profile is the
signature of its validation examples; a recurring task's expert profile becomes the mean over its occurrences),
and a reuse decision is reported back as an outcome (success when it reused the right expert). A decision is
correct when it reuses the right expert for a recurring task, and when it does not reuse (create or fork) for a
new task. Reported per decision rule (combined signature, cosine scorer), and per signature part alone vs
combined (threshold rule with the same thresholds, and with the best threshold found by an oracle sweep:
the part's discriminative power).

Part 2, training (skipped with --quick): LoRA on a randomly initialised tiny Gemma barely learns the built-in
rules, so the tiny Gemma is first pretrained (full fine-tuning, seeded, about a minute on one core) on held-out
rules over the same kind of inputs (`PRETRAIN_RULES`: none is a task of the stream nor its negation), then frozen
as the base of the LoRA experts. On it, the first pass of the stream is trained through `ContinualTrainer` with the
`ExpertRoutingPlugin` (threshold rule, combined signature) against one new expert per occurrence
(`adapter_strategy="lora_per_task"`), with the same LoRA settings (`LORA`): average final accuracy over the
distinct tasks, each evaluated with the expert that learned it last, and the number of experts; the frozen base
without any expert is reported as the reference. The routed run is done twice: with the router's default thresholds,
and with the oracle reuse threshold of the pretrained base's own signatures (an upper bound).

Part 1b, scorers: the threshold rule with the `cosine`, `linear` and `mlp` scorers (combined signature). The
learned scorers are refitted by the router from all recorded outcomes once `min_outcomes` exist with both labels
(cosine before that); then their score is p(reuse succeeds), compared with `p_reuse` / `p_fork`. Both feedbacks.

Part 2b, checked reuses (skipped with --quick): the routed run with `verify_reuse` on (default: a reuse trains a
fork, rolled back into a new expert when the expert's earlier tasks lose more than `tolerance`) and off (the
reused expert trains in place), at the default thresholds and at an eager reuse threshold that makes wrong reuses.

Part 3, normalisation: the share of correct decisions (threshold rule, and the oracle threshold) with the router's
`normalize` = none (raw cosine; thresholds 0.9 / 0.75), center and standardize (default; thresholds 0.5 / 0.3), on
the random and on the pretrained base (both passes of the stream; the pretrained part is skipped with --quick).

Writes docs/results/routing_quality.md|json.

    python benchmarks/routing_quality.py [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import re
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hf_adaptive.experts import Router, RouterConfig, SignatureConfig, TaskSignature  # noqa: E402
from hf_adaptive.models import build_tiny_gemma  # noqa: E402
from hf_adaptive.tasks import make_task  # noqa: E402
from hf_adaptive.tasks.builtin import COLORS, CONTENT_WORDS, LABEL_WORDS, SEQUENCE_LENGTH  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"
STREAM = [
    "first_color",
    "has_cat",
    "more_colors",
    "first_color",
    "last_color",
    "has_red",
    "has_cat",
    "second_animal",
    "third_color",
    "last_color",
    "more_colors",
    "has_red",
    "second_animal",
    "first_color",
    "third_color",
    "has_cat",
]
FAMILY = {
    "first_color": "position",
    "last_color": "position",
    "third_color": "position",
    "second_animal": "position",
    "has_cat": "presence",
    "has_red": "presence",
    "more_colors": "count",
}
PART_SETS = {
    "text": ("text",),
    "gradient": ("gradient",),
    "context": ("context",),
    "combined": ("text", "gradient", "context"),
}
#: recurrences alternate between the built-in description and these rewordings (in the tokenizer's vocabulary),
#: so that the text part of a recurring task is similar, not identical
PARAPHRASE = {
    "first_color": "the first word is a color",
    "last_color": "the last word is a color",
    "third_color": "the third word is a color",
    "second_animal": "the second word is an animal",
    "more_colors": "there are more color words than animal words",
    "has_cat": "the word cat appears",
    "has_red": "the word red appears",
}
REUSE, FORK = 0.5, 0.3  # the router's defaults (on standardised signatures)
RAW_REUSE, RAW_FORK = 0.9, 0.75  # for normalize="none" (raw cosines are much higher)
SCORERS = ("cosine", "linear", "mlp")
#: an eager reuse threshold (part 2b): reuses that the default threshold would not make, some of them wrong
EAGER_REUSE = 0.2
RULES = {
    "threshold": dict(decision="threshold"),
    "ucb": dict(decision="ucb", ucb_c=0.05, ucb_reward_weight=0.1),
    "calibrated": dict(decision="calibrated", min_outcomes=3),
    "adaptive": dict(decision="adaptive", tau_init=REUSE, tau_lr=0.2, tau_min=0.3, tau_max=0.9),
    "bootstrap+threshold": dict(decision="threshold", bootstrap_experts=3, bootstrap_duplicate=0.9),
}


#: pretraining of the backbone (full fine-tuning on `PRETRAIN_RULES`) and the LoRA experts trained on it
PRETRAIN = dict(rows_per_rule=512, epochs=20, learning_rate=1e-3, batch_size=32)
LORA = dict(r=16, alpha=32.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], learning_rate=5e-3, epochs=20)


def _colour(word: str) -> bool:
    return word in COLORS


#: held-out rules for pretraining the backbone (none of them is a task of the stream, nor its negation); the
#: prompt prefix of each is made of tokenizer words ("odd word": the 4th word, "even word": the 6th)
PRETRAIN_RULES = {
    "dog appears": lambda w: "dog" in w,
    "blue appears": lambda w: "blue" in w,
    "gold appears": lambda w: "gold" in w,
    "odd word color": lambda w: _colour(w[3]),
    "even word color": lambda w: _colour(w[5]),
    "less colors": lambda w: sum(map(_colour, w)) <= 2,
    "same first last": lambda w: _colour(w[0]) == _colour(w[-1]),
}


def _balanced(rule, n: int, rng: random.Random) -> list[dict]:
    """`n` random word sequences with labels balanced 50/50 (rejection sampling), like the built-in tasks."""
    wanted = {True: n - n // 2, False: n // 2}
    rows: list[dict] = []
    while wanted[True] or wanted[False]:
        words = [rng.choice(CONTENT_WORDS) for _ in range(SEQUENCE_LENGTH)]
        answer = bool(rule(words))
        if wanted[answer]:
            wanted[answer] -= 1
            rows.append({"text": " ".join(words), "label": 0 if answer else 1})
    return rows


def pretrain_backbone(tokenizer, rows_per_rule: int, epochs: int, seed: int = 0) -> tuple:
    """Full fine-tuning of the random tiny Gemma on held-out rules over the same inputs; returns (model, info).

    LoRA on a randomly initialised backbone barely learns the built-in rules, so the expert comparison runs on a
    backbone that has already learnt to read these word sequences (positions, colours vs animals, counts).
    """
    from datasets import Dataset, concatenate_datasets
    from transformers import Trainer, TrainingArguments

    from hf_adaptive.tasks import CausalLMCollator, Task, task_accuracy, tokenize_task

    rng = random.Random(f"pretrain-{seed}")
    tasks = []
    for prefix, rule in PRETRAIN_RULES.items():
        tasks.append(
            Task(
                name=prefix.replace(" ", "_"),
                train_dataset=Dataset.from_list(_balanced(rule, rows_per_rule, rng)),
                eval_dataset=Dataset.from_list(_balanced(rule, 64, rng)),
                verbalizer=list(LABEL_WORDS),
                template=prefix + " : {text} ?",
            )
        )
    data = concatenate_datasets([tokenize_task(t, tokenizer, "train") for t in tasks]).shuffle(seed=seed)
    model, _ = build_tiny_gemma(tokenizer, seed=seed)
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp,
            per_device_train_batch_size=PRETRAIN["batch_size"],
            num_train_epochs=epochs,
            learning_rate=PRETRAIN["learning_rate"],
            warmup_steps=0.05,
            lr_scheduler_type="cosine",
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            disable_tqdm=True,
            logging_strategy="no",
            seed=seed,
        )
        started = time.perf_counter()
        Trainer(model=model, args=args, train_dataset=data, data_collator=CausalLMCollator(tokenizer)).train()
        seconds = time.perf_counter() - started
    model.eval()
    accs = {t.name: task_accuracy(model, tokenizer, t, "eval") for t in tasks}
    for p in model.parameters():
        p.requires_grad_(False)
    info = {
        "rules": list(PRETRAIN_RULES),
        "rows": len(data),
        "epochs": epochs,
        "seconds": seconds,
        "heldout_rule_accuracy": accs,
    }
    return model, info


def occurrences(stream: list[str], n_train: int, n_eval: int) -> list:
    seen: dict[str, int] = {}
    tasks = []
    for name in stream:
        k = seen.get(name, 0)
        seen[name] = k + 1
        task = make_task(name, n_train=n_train, n_eval=n_eval, seed=100 + k)
        description = PARAPHRASE[name] if k % 2 else task.description
        tasks.append(
            dataclasses.replace(
                task, name=f"{name}@{k}", description=description, metadata={"base": name, "occurrence": k}
            )
        )
    return tasks


def subset(parts: dict[str, torch.Tensor], names: tuple[str, ...]) -> torch.Tensor:
    vec = torch.cat([parts[p] for p in names])
    return vec / vec.norm()


def compute_signatures(tasks, model, tokenizer, cfg: SignatureConfig):
    signer = TaskSignature(model, tokenizer, cfg)
    query = [{**signer.compute(t, split="train").parts, "_base": t.metadata["base"]} for t in tasks]
    profile = [signer.compute(t, split="eval").parts for t in tasks]
    return query, profile, signer


def run_stream(
    query,
    profile,
    names: tuple[str, ...],
    rule: dict,
    reuse: float = REUSE,
    fork: float = FORK,
    feedback: str = "reuse",
    normalize: dict | None = None,
) -> dict:
    """Teacher-forced routing of the stream; returns the decisions and their correctness.

    `feedback="reuse"`: only reuse decisions report an outcome (what a live run observes). `"hindsight"`: every
    decision reports whether reusing its best candidate would have been right (what a probe of the candidate
    expert on the new task's validation examples would tell), so the calibration and τ also learn from forks
    and creations.
    """
    dim = sum(query[0][p].numel() for p in names)
    router = Router(RouterConfig(dim=dim, reuse_threshold=reuse, fork_threshold=fork, **{**(normalize or {}), **rule}))
    expert_of: dict[str, str] = {}
    members: dict[str, list[torch.Tensor]] = {}
    steps = []
    for i, base in enumerate(q["_base"] for q in query):
        q = subset(query[i], names)
        learned = router.learned_scoring
        d = router.route(q)
        recurring = base in expert_of
        truth = "reuse" if recurring else "new"
        if recurring:
            correct = d.action == "reuse" and d.expert == expert_of[base]
        else:
            correct = d.action != "reuse"
        related_seen = any(FAMILY[b] == FAMILY[base] for b in expert_of) and not recurring
        good_fork = (
            d.action == "fork" and d.expert is not None and FAMILY[d.expert.removeprefix("expert_")] == FAMILY[base]
        )
        steps.append(
            {
                "task": base,
                "truth": truth,
                "action": d.action,
                "expert": d.expert,
                "score": round(d.score, 4),
                "correct": bool(correct),
                "related_new": related_seen,
                "fork_in_family": bool(good_fork),
                "learned_score": learned,
            }
        )
        # the truth drives the library
        if recurring:
            name = expert_of[base]
        else:
            name = f"expert_{base}"
            expert_of[base] = name
        router.record_decision(d, new_expert=None if d.action == "reuse" else name, query=q)
        if d.action == "reuse" and d.expert is not None:
            router.record_outcome(q, d.expert, d.score, d.expert == name)
        elif feedback == "hindsight" and d.candidates:
            best, score = d.candidates[0]
            router.record_outcome(q, best, score, best == name)
        members.setdefault(name, []).append(subset(profile[i], names))
        router.update_profile(name, torch.stack(members[name]).mean(0))
    n = len(steps)
    rec = [s for s in steps if s["truth"] == "reuse"]
    new = [s for s in steps if s["truth"] == "new"]
    related = [s for s in new if s["related_new"]]
    return {
        "correct": sum(s["correct"] for s in steps) / n,
        "correct_recurring": sum(s["correct"] for s in rec) / max(1, len(rec)),
        "correct_new": sum(s["correct"] for s in new) / max(1, len(new)),
        "fork_in_family_on_related_new": sum(s["fork_in_family"] for s in related) / max(1, len(related)),
        "wrong_reuses": sum(s["action"] == "reuse" and not s["correct"] for s in steps),
        "learned_decisions": sum(s["learned_score"] for s in steps),
        "steps": steps,
    }


def oracle_threshold(query, profile, names: tuple[str, ...], normalize: dict | None = None) -> dict:
    """Best share of correct reuse-vs-not decisions over a sweep of reuse thresholds (fork band off)."""
    best_t, best = 1.0, -1.0
    for t in [x / 200 for x in range(0, 201)]:
        correct = run_stream(query, profile, names, RULES["threshold"], reuse=t, fork=t, normalize=normalize)["correct"]
        if correct > best:
            best_t, best = t, correct
    return {"best_threshold": best_t, "correct": best}


def normalisation_table(query, profile) -> dict:
    """Correct share per `normalize` mode: threshold rule at that mode's thresholds, and the oracle threshold."""
    out = {}
    for mode in ("none", "center", "standardize"):
        normalize = {"normalize": mode}
        reuse, fork = (RAW_REUSE, RAW_FORK) if mode == "none" else (REUSE, FORK)
        fixed = run_stream(
            query, profile, PART_SETS["combined"], RULES["threshold"], reuse=reuse, fork=fork, normalize=normalize
        )
        out[mode] = {
            "thresholds": [reuse, fork],
            "correct": fixed["correct"],
            "correct_recurring": fixed["correct_recurring"],
            "correct_new": fixed["correct_new"],
            "oracle": oracle_threshold(query, profile, PART_SETS["combined"], normalize),
        }
    return out


def _expert_base(name: str) -> str:
    """The base task of a routed run's expert name (`expert_<task>_<occurrence>`, maybe `_<n>` for a clash)."""
    return re.sub(r"(_\d+)+$", "", name.removeprefix("expert_"))


def training_comparison(
    tasks, tokenizer, cfg: SignatureConfig, base_state: dict, routed: dict[str, tuple[float, float, bool]]
) -> dict:
    """Routed library (one run per `routed` entry: name -> (reuse, fork) thresholds and `verify_reuse`) vs one
    expert per occurrence, all on the same frozen pretrained base (`base_state`)."""
    from hf_adaptive.config import ContinualConfig
    from hf_adaptive.experts import ExpertLibrary, ExpertRoutingPlugin, default_lora_config
    from hf_adaptive.tasks import task_accuracy
    from hf_adaptive.trainer import ContinualTrainer

    final = {t.metadata["base"]: t for t in tasks}  # the last occurrence's eval split
    base_model, _ = build_tiny_gemma(tokenizer, seed=0)
    base_model.load_state_dict(base_state)
    base_model.eval()
    base_accs = {b: task_accuracy(base_model, tokenizer, t, "eval") for b, t in final.items()}
    out: dict = {
        "base_without_expert": {
            "avg_accuracy": sum(base_accs.values()) / len(base_accs),
            "accuracy": base_accs,
            "experts": 0,
            "seconds": 0.0,
        }
    }
    with tempfile.TemporaryDirectory() as tmp:
        for variant in [*routed, "one_expert_per_task"]:
            is_routed = variant in routed
            model, _ = build_tiny_gemma(tokenizer, seed=0)
            model.load_state_dict(base_state)
            args = ContinualConfig(
                output_dir=f"{tmp}/{variant}",
                per_device_train_batch_size=16,
                num_train_epochs=LORA["epochs"],
                learning_rate=LORA["learning_rate"],
                save_strategy="no",
                report_to=[],
                use_cpu=True,
                disable_tqdm=True,
                adapter_strategy="full" if is_routed else "lora_per_task",
                lora_r=LORA["r"],
                lora_alpha=LORA["alpha"],
                lora_target_modules=list(LORA["target_modules"]),
                evaluate_unseen_tasks=False,
                save_results_plot=False,
                seed=0,
                logging_strategy="no",
            )
            callbacks = []
            if is_routed:
                reuse, fork, verify = routed[variant]
                lora_config = default_lora_config(LORA["r"], LORA["alpha"], list(LORA["target_modules"]))
                library = ExpertLibrary(model, lora_config=lora_config, experiment_id="routing_quality")
                dim = TaskSignature(model, tokenizer, cfg).dim
                plugin = ExpertRoutingPlugin(
                    library,
                    Router(RouterConfig(dim=dim, reuse_threshold=reuse, fork_threshold=fork)),
                    cfg,
                    eval_limit=64,
                    verify_reuse=verify,
                )
                callbacks = [plugin]
            trainer = ContinualTrainer(model=model, args=args, processing_class=tokenizer, callbacks=callbacks)
            started = time.perf_counter()
            trainer.train_sequence(tasks, evaluate_baseline=False)
            elapsed = time.perf_counter() - started
            last: dict[str, str] = {}
            for t in tasks:
                base = t.metadata["base"]
                if is_routed:
                    last[base] = plugin.task_expert[t.name]
                else:
                    from hf_adaptive.adapters import expert_name

                    last[base] = expert_name(t.name)
            accs = {}
            for base, expert in last.items():
                trainer.model.set_adapter(expert)
                accs[base] = task_accuracy(trainer.model, tokenizer, final[base], "eval")
            n_experts = len(trainer.model.peft_config)
            out[variant] = {
                "avg_accuracy": sum(accs.values()) / len(accs),
                "accuracy": accs,
                "experts": n_experts,
                "seconds": elapsed,
            }
            if is_routed:
                out[variant]["thresholds"] = {"reuse": reuse, "fork": fork}
                out[variant]["verify_reuse"] = verify
                out[variant]["decisions"] = [(d["task"], d["action"], d["expert"]) for d in plugin.decisions]
                out[variant]["reuses"] = [
                    {
                        "task": d["task"],
                        "expert": d["expert"],
                        "score": d["score"],
                        "right": _expert_base(d["expert"]) == d["task"].split("@")[0],
                        "success": d.get("success"),
                        "rolled_back": d.get("rolled_back", False),
                        "old_task_accuracy": d.get("old_task_accuracy", {}),
                    }
                    for d in plugin.decisions
                    if d["action"] == "reuse"
                ]
    return out


def _summary(run: dict) -> dict:
    return {k: v for k, v in run.items() if k != "steps"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="decisions only, fewer examples per signature")
    parser.add_argument("--passes", type=int, default=None, help="passes over the stream (default 2, quick 1)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from hf_adaptive.models import build_tokenizer

    tokenizer = build_tokenizer()
    model, _ = build_tiny_gemma(tokenizer, seed=0)
    n_examples = 8 if args.quick else 16
    cfg = SignatureConfig(n_examples=n_examples, batch_size=16)
    passes = args.passes or (1 if args.quick else 2)
    if passes < 1:
        raise ValueError(f"--passes={passes} is not allowed: an integer >= 1")
    stream = STREAM * passes
    tasks = occurrences(stream, n_train=64 if args.quick else 128, n_eval=32 if args.quick else 64)
    t0 = time.perf_counter()
    query, profile, signer = compute_signatures(tasks, model, tokenizer, cfg)
    sig_seconds = (time.perf_counter() - t0) / (2 * len(tasks))

    unknown = sorted({w for d in PARAPHRASE.values() for w in d.split()} - set(tokenizer.get_vocab()))
    if unknown:
        raise ValueError(f"paraphrases use words outside the tokenizer's vocabulary: {unknown}")
    by_rule = {name: run_stream(query, profile, PART_SETS["combined"], rule) for name, rule in RULES.items()}
    hindsight = {
        name: run_stream(query, profile, PART_SETS["combined"], rule, feedback="hindsight")
        for name, rule in RULES.items()
    }
    by_scorer = {
        scorer: {
            feedback: run_stream(
                query, profile, PART_SETS["combined"], {**RULES["threshold"], "scorer": scorer}, feedback=feedback
            )
            for feedback in ("reuse", "hindsight")
        }
        for scorer in SCORERS
    }
    rule_by_part = {
        name: {part: run_stream(query, profile, names, rule)["correct"] for part, names in PART_SETS.items()}
        for name, rule in RULES.items()
    }
    by_part = {}
    for part, names in PART_SETS.items():
        fixed = run_stream(query, profile, names, RULES["threshold"])
        by_part[part] = {
            "threshold": {k: v for k, v in fixed.items() if k != "steps"},
            "oracle": oracle_threshold(query, profile, names),
        }
    result = {
        "meta": {
            "stream": stream,
            "n_examples": n_examples,
            "signature_dims": signer.part_dims,
            "reuse_threshold": REUSE,
            "fork_threshold": FORK,
            "seconds_per_signature": sig_seconds,
            "quick": args.quick,
        },
        "by_rule": by_rule,
        "by_part": by_part,
        "rule_by_part": rule_by_part,
        "by_scorer": {s: {f: _summary(r) for f, r in by_fb.items()} for s, by_fb in by_scorer.items()},
        "by_rule_hindsight": {k: {m: v for m, v in r.items() if m != "steps"} for k, r in hindsight.items()},
        "normalisation": {"random": normalisation_table(query, profile)},
    }
    if not args.quick:
        base, pretraining = pretrain_backbone(tokenizer, PRETRAIN["rows_per_rule"], PRETRAIN["epochs"], seed=0)
        result["pretraining"] = pretraining
        result["lora"] = LORA
        full_query, full_profile, _ = compute_signatures(tasks, base, tokenizer, cfg)
        result["normalisation"]["pretrained"] = normalisation_table(full_query, full_profile)
        result["by_rule_pretrained"] = {
            name: run_stream(full_query, full_profile, PART_SETS["combined"], rule) for name, rule in RULES.items()
        }
        result["by_scorer_pretrained"] = {
            scorer: {
                feedback: _summary(
                    run_stream(
                        full_query,
                        full_profile,
                        PART_SETS["combined"],
                        {**RULES["threshold"], "scorer": scorer},
                        feedback=feedback,
                    )
                )
                for feedback in ("reuse", "hindsight")
            }
            for scorer in SCORERS
        }
        # the routed run is also reported with the oracle threshold of the pretrained base's own signatures on the
        # trained pass (fork band off): what a perfectly tuned threshold would give
        first = tasks[: len(STREAM)]
        base_query, base_profile = full_query[: len(STREAM)], full_profile[: len(STREAM)]
        oracle = oracle_threshold(base_query, base_profile, PART_SETS["combined"])
        result["pretrained_base_oracle"] = oracle
        best = oracle["best_threshold"]
        routed = {
            f"routed (reuse >= {REUSE}, fork >= {FORK})": (REUSE, FORK, True),
            f"routed (reuse >= {REUSE}, fork >= {FORK}), unchecked": (REUSE, FORK, False),
            f"routed (eager reuse >= {EAGER_REUSE}, no fork)": (EAGER_REUSE, EAGER_REUSE, True),
            f"routed (eager reuse >= {EAGER_REUSE}, no fork), unchecked": (EAGER_REUSE, EAGER_REUSE, False),
            f"routed (oracle reuse >= {best:.3f}, no fork)": (best, best, True),
        }
        result["training"] = training_comparison(first, tokenizer, cfg, base.state_dict(), routed)

    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "routing_quality.json").write_text(json.dumps(result, indent=2))
    n_rec = sum(s["truth"] == "reuse" for s in by_rule["threshold"]["steps"])
    lines = [
        "# Routing quality",
        "",
        f"Stream of {len(stream)} built-in tasks ({passes} pass(es) over {len(STREAM)}; {n_rec} recurrences, "
        f"{len(stream) - n_rec} first appearances, "
        "related tasks in families position / presence / count), tiny Gemma, signatures from "
        f"{n_examples} examples ({signer.part_dims}), {sig_seconds:.2f} s per signature"
        f"{', quick run' if args.quick else ''}. Correct: reuse of the right expert for a recurring task, no reuse "
        f"(create or fork) for a new one. Thresholds: reuse >= {REUSE}, fork >= {FORK}.",
        "",
        "## Per decision rule (combined signature, cosine scorer)",
        "",
        "Feedback `reuse`: only reuse decisions report an outcome (a live run); `hindsight`: every decision reports "
        "whether reusing its best candidate would have been right (a probe of the candidate on the new task).",
        "",
        "| base | rule | feedback | correct | on recurring | on new | wrong reuses | "
        "fork within family on related new |",
        "|---|---|---|---|---|---|---|---|",
    ]
    tables = [("random", "reuse", by_rule), ("random", "hindsight", hindsight)]
    if "by_rule_pretrained" in result:
        tables.append(("pretrained", "reuse", result["by_rule_pretrained"]))
    for base_name, feedback, table in tables:
        for name, r in table.items():
            lines.append(
                f"| {base_name} | {name} | {feedback} | {r['correct']:.3f} | {r['correct_recurring']:.3f} | "
                f"{r['correct_new']:.3f} | {r['wrong_reuses']} | {r['fork_in_family_on_related_new']:.3f} |"
            )
    lines += [
        "",
        "A wrong reuse trains a task into another task's expert (it can cost accuracy); the other errors create or "
        "fork an expert for a recurring task (it costs an extra expert).",
    ]
    lines += [
        "",
        "## Per scorer (threshold rule, combined signature)",
        "",
        "Learned scorers are refitted from all recorded outcomes once "
        f"{RouterConfig(dim=1).min_outcomes} exist with both a success and a failure (cosine before); "
        "`learned decisions`: how many decisions used the fitted scorer.",
        "",
        "| base | scorer | feedback | correct | on recurring | on new | wrong reuses | learned decisions |",
        "|---|---|---|---|---|---|---|---|",
    ]
    scorer_tables = [("random", result["by_scorer"])]
    if "by_scorer_pretrained" in result:
        scorer_tables.append(("pretrained", result["by_scorer_pretrained"]))
    for base_name, table in scorer_tables:
        for scorer, by_fb in table.items():
            for feedback, r in by_fb.items():
                lines.append(
                    f"| {base_name} | {scorer} | {feedback} | {r['correct']:.3f} | {r['correct_recurring']:.3f} | "
                    f"{r['correct_new']:.3f} | {r['wrong_reuses']} | {r['learned_decisions']} |"
                )
    for base_name, table in scorer_tables:
        for feedback in ("reuse", "hindsight"):
            cos = table["cosine"][feedback]["correct"]
            deltas = ", ".join(
                f"{s} {table[s][feedback]['correct'] - cos:+.3f} ({table[s][feedback]['learned_decisions']} "
                "learned decisions)"
                for s in SCORERS[1:]
            )
            lines.append("")
            lines.append(f"Learned vs cosine, {base_name} base, {feedback} feedback (share correct): {deltas}.")
    lines += [
        "",
        "## Share of correct decisions per rule and signature part",
        "",
        "| rule | " + " | ".join(PART_SETS) + " |",
        "|---|" + "---|" * len(PART_SETS),
    ]
    for name, r in rule_by_part.items():
        lines.append(f"| {name} | " + " | ".join(f"{r[p]:.3f}" for p in PART_SETS) + " |")
    lines += [
        "",
        "## Per signature part (threshold rule; oracle = best single threshold for that part)",
        "",
        "| part | correct (fixed thresholds) | on recurring | on new | oracle correct | oracle threshold |",
        "|---|---|---|---|---|---|",
    ]
    for part, r in by_part.items():
        f, o = r["threshold"], r["oracle"]
        lines.append(
            f"| {part} | {f['correct']:.3f} | {f['correct_recurring']:.3f} | {f['correct_new']:.3f} | "
            f"{o['correct']:.3f} | {o['best_threshold']:.3f} |"
        )
    lines += [
        "",
        "## Normalisation of the signatures (threshold rule, combined signature)",
        "",
        "Signatures from a pretrained backbone share a large common component (raw cosine between different tasks "
        "close to 1), so the router standardises them against the signatures it has seen (`normalize`).",
        "",
        "| base | normalize | thresholds (reuse, fork) | correct | on recurring | on new | oracle correct | "
        "oracle threshold |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for base_name, table in result["normalisation"].items():
        for mode, r in table.items():
            lines.append(
                f"| {base_name} | {mode} | {r['thresholds'][0]}, {r['thresholds'][1]} | {r['correct']:.3f} | "
                f"{r['correct_recurring']:.3f} | {r['correct_new']:.3f} | {r['oracle']['correct']:.3f} | "
                f"{r['oracle']['best_threshold']:.3f} |"
            )
    if "training" in result:
        tr, pt = result["training"], result["pretraining"]
        heldout = ", ".join(f"{k} {v:.2f}" for k, v in pt["heldout_rule_accuracy"].items())
        lines += [
            "",
            "## Trained: routed library vs one expert per occurrence (pretrained frozen base)",
            "",
            f"Base: the tiny Gemma pretrained by full fine-tuning on {len(pt['rules'])} held-out rules over the same "
            f"kind of word sequences ({', '.join(repr(r) for r in pt['rules'])}; {pt['rows']} rows, {pt['epochs']} "
            f"epochs, {pt['seconds']:.0f} s; held-out eval accuracy: {heldout}), then frozen. None of these rules is "
            "a task of the stream. Experts: LoRA r={r}, alpha={alpha:g} on {mods}, lr {lr:g}, {ep} epochs per "
            "occurrence ({n} occurrences of the first pass, 128 training rows each). Accuracy: final, on the last "
            "occurrence's eval split of each distinct task, with the expert that learned it last (chance 0.5).".format(
                r=LORA["r"],
                alpha=LORA["alpha"],
                mods="/".join(LORA["target_modules"]),
                lr=LORA["learning_rate"],
                ep=LORA["epochs"],
                n=len(STREAM),
            ),
            "",
            "| variant | average final accuracy | experts | seconds |",
            "|---|---|---|---|",
        ]
        for name, r in tr.items():
            lines.append(f"| {name} | {r['avg_accuracy']:.3f} | {r['experts']} | {r['seconds']:.1f} |")
        lines += [
            "",
            "### Checked reuses: rollback vs none",
            "",
            "Checked (`verify_reuse`, default): a reuse trains a fork; if an earlier task of the expert loses more "
            "than the tolerance (0.05) with it, the original stays and the fork becomes the task's own expert "
            "(rolled back). Unchecked: the reused expert trains in place. Right: the reused expert learned the same "
            "base task.",
            "",
            "| variant | reuses | right | wrong | rolled back | rolled back of wrong | worst old-task drop kept |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, r in tr.items():
            if "reuses" not in r:
                continue
            reuses = r["reuses"]
            wrong = [u for u in reuses if not u["right"]]
            kept_drops = [
                a["before"] - a["after"]
                for u in reuses
                if not u["rolled_back"]
                for a in u["old_task_accuracy"].values()
            ]
            worst = f"{max(kept_drops):+.3f}" if kept_drops else "-"
            lines.append(
                f"| {name} | {len(reuses)} | {len(reuses) - len(wrong)} | {len(wrong)} | "
                f"{sum(u['rolled_back'] for u in reuses)} | {sum(u['rolled_back'] for u in wrong)} | {worst} |"
            )
        for checked, unchecked in (
            (f"routed (reuse >= {REUSE}, fork >= {FORK})", f"routed (reuse >= {REUSE}, fork >= {FORK}), unchecked"),
            (
                f"routed (eager reuse >= {EAGER_REUSE}, no fork)",
                f"routed (eager reuse >= {EAGER_REUSE}, no fork), unchecked",
            ),
        ):
            a, b = tr[checked], tr[unchecked]
            diff = a["avg_accuracy"] - b["avg_accuracy"]
            verdict = "gains" if diff > 0 else "loses" if diff < 0 else "neither gains nor loses"
            lines.append("")
            lines.append(
                f"Checking reuses at {checked.removeprefix('routed ')} {verdict} {abs(diff):.3f} average final "
                f"accuracy ({a['avg_accuracy']:.3f} vs {b['avg_accuracy']:.3f} unchecked) for "
                f"{a['experts'] - b['experts']:+d} experts."
            )
        names = list(tr["one_expert_per_task"]["accuracy"])
        lines += [
            "",
            "| task | " + " | ".join(tr) + " |",
            "|---|" + "---|" * len(tr),
        ]
        for task in names:
            lines.append(f"| {task} | " + " | ".join(f"{r['accuracy'][task]:.3f}" for r in tr.values()) + " |")
        lines += [
            "",
            "The routed run computes its signatures on the pretrained base, so its decisions can differ from the "
            "tables above (which use the random base).",
            "",
            "The routed run is repeated with the oracle threshold of the pretrained base's combined signatures on "
            "this pass (teacher-forced share of correct decisions "
            f"{result['pretrained_base_oracle']['correct']:.3f}; an upper bound, chosen with the truth).",
            "",
            *(
                f"Decisions, {name}: "
                + ", ".join(f"{t}: {a}" + (f" {e}" if a != "create" else "") for t, a, e in r["decisions"])
                + "."
                for name, r in tr.items()
                if "decisions" in r
            ),
        ]
    lines += [
        "",
        "Decisions of the threshold rule: "
        + ", ".join(f"{s['task']}→{s['action']}{'' if s['correct'] else ' ✗'}" for s in by_rule["threshold"]["steps"])
        + ".",
    ]
    (RESULTS / "routing_quality.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
