"""The router on real signatures: SmolLM2-135M and real text from the CL benchmark (issue 14).

`routing_quality.py` measures routing on a tiny Gemma and built-in synthetic tasks; this is the same
teacher-forced decision study (no expert is trained) on the real model and real text, where the question is
whether the package's `TaskSignature` (text, gradient sketch, context) tells tasks apart well enough for the
`Router` to reuse an expert when a task recurs and to leave the library alone (create or fork) for a new one.

Stream (`STREAM`, 24 occurrences of 9 tasks): sentiment (SST-2, IMDB), entailment (MNLI, RTE, CB), yes/no QA
(BoolQA), paraphrase (QQP), word sense (WiC), COPA. Tasks recur 2-3 times, and IMDB, RTE and CB first appear
after a task of their family (related new tasks). MultiRC is left out (`LEFT_OUT`: its paragraph comes before the
question, so a 96-token prompt loses the question). Every occurrence draws fresh rows: its own `seed` of
`load_cl_benchmark_task`, and rows an earlier occurrence of the task used are skipped while the split has unused
ones (`repeated_rows` in the JSON counts the rows a small split had to give twice, e.g. CB's 56 test rows on the
second pass). `--passes 2` (default) routes the stream twice; the second pass is all recurrences, and it is where
the learned scorers have outcomes to learn from.

Signatures: `TaskSignature` with the package's `SignatureConfig` defaults (text projected to 128, gradient sketch 64
on the input embeddings and the last layer's attention, 6 context statistics) on `--examples` rows (default 16);
the rows are the task's own template and label words tokenized as `cl_real.py` does (`prompt_format="plain"`,
`prompt_max_length=96`). The query of an occurrence comes from its training rows, an expert's profile from the
validation rows of the occurrences it served (mean), as `ExpertRoutingPlugin` does. Seconds per signature are
measured per part (tokenization, text, gradient, context).

Correctness is `routing_quality.py`'s: a decision is correct when it reuses the task's own expert for a recurring
task, and when it does not reuse (create or fork) for a task seen for the first time. Also counted: wrong reuses
(another task's expert; within the family or not), missed reuses (create/fork on a recurring task: an extra
expert), forks within the family on related new tasks. Teacher forcing: after each decision the library is set to
the truth (a new task gets its expert, a recurring task's expert profile becomes the mean over its occurrences), and
a reuse reports its outcome (success: the right expert) to the router (`reuse` feedback; `hindsight`: every
decision reports whether its best candidate was the right one).

Reported (docs/results/routing_real.md|json):
1. per signature part (text, gradient, context, combined): share correct at the router's defaults (threshold
   rule, cosine, standardised, reuse >= 0.5, fork >= 0.3) and at the oracle threshold (an exact sweep over the
   best-candidate scores of the stream: with the threshold rule and the cosine scorer the router's state does not
   depend on its decisions, so one trace gives every threshold's result; the part's discriminative power), and the
   mean cosine of same-task / same-family / other pairs of query signatures (raw and centred);
2. per decision rule (`routing_quality.RULES`), combined signature, both feedbacks;
3. scorers cosine / linear / mlp (threshold rule, both feedbacks) over the passes: the learned scorers are
   refitted by the router from the outcomes recorded in this run once `min_outcomes` exist with both labels;
   share correct, on the second pass, wrong reuses, decisions made with the fitted scorer, gain over cosine;
4. normalisation none / center / standardize;
5. the issue's target: share correct >= 0.9 (met / missed) and the wrong reuses, for the default router.
No expert is trained here, so whether a wrong reuse costs accuracy is not measured: it is counted.

    python benchmarks/routing_real.py              # SmolLM2-135M, the 24-occurrence stream, 2 passes
    python benchmarks/routing_real.py --smoke      # tiny Gemma, 8 occurrences x 2 passes (< 1 min)
    options: --examples N (rows per signature), --seed K (the stream's data seeds), --data DIR, --out DIR,
             --passes P, --threads T

`--smoke` writes to a temporary folder unless `--out` says where (never into docs/results). The model:
`load_model_and_tokenizer("smollm2-135m")`, converted once into the package's cache (`$HF_ADAPTIVE_CACHE`
to choose where).

Budget of the real run (an estimate, not measured: the real mode was not run when this was written): 24 x 2 passes
= 48 occurrences, 2 signatures each (query and profile) = 96 signatures of 16 rows. A signature is one forward and
backward pass over 16 rows of <= 96 tokens with full logits (the gradient sketch), one forward over their prompts
(context) and one over the instruction (text): about 3-4 LoRA training steps of 8 rows, which take 2.3-2.8 s each
on 2 quiet cores (cl_real.py), so ~8-10 s per signature, ~15 min for 96 on 2 quiet cores and 30-60 min under the
usual load (2-4x). The routing itself (23 teacher-forced runs of 48 decisions, the learned scorers refitted after
each outcome; 3 s for the smoke run's 16 decisions) adds under a minute; loading the model and the data, seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import routing_quality as rq  # noqa: E402
import torch  # noqa: E402
from common import RESULTS, write_results  # noqa: E402

from hf_adaptive.experts import Router, RouterConfig, SignatureConfig, TaskSignature  # noqa: E402

NAME = "routing_real"
MODEL = "smollm2-135m"
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cl_benchmark"
#: the prompts cl_real.py trains and scores with
PROMPT: dict[str, Any] = {"max_length": 96, "prompt_format": "plain"}
#: task -> family (related tasks share one)
FAMILY: dict[str, str] = {
    "SST-2": "sentiment",
    "IMDB": "sentiment",
    "MNLI": "entailment",
    "RTE": "entailment",
    "CB": "entailment",
    "BoolQA": "yes/no QA",
    "MultiRC": "yes/no QA",
    "QQP": "paraphrase",
    "WiC": "word sense",
    "COPA": "causal (COPA)",
}
LEFT_OUT: dict[str, str] = {
    "MultiRC": "its paragraph (~380 words) comes before the question and the answer to judge, so a 96-token prompt "
    "is cut before them (cl_real.py left it out for the same reason)",
}
#: 24 occurrences: every task recurs, IMDB / RTE / CB first appear after a task of their family
STREAM: list[str] = [
    "SST-2",
    "MNLI",
    "BoolQA",
    "IMDB",
    "SST-2",
    "RTE",
    "QQP",
    "MNLI",
    "WiC",
    "CB",
    "IMDB",
    "COPA",
    "RTE",
    "BoolQA",
    "SST-2",
    "CB",
    "QQP",
    "WiC",
    "MNLI",
    "IMDB",
    "COPA",
    "RTE",
    "BoolQA",
    "CB",
]
SMOKE_STREAM: list[str] = ["SST-2", "MNLI", "IMDB", "SST-2", "RTE", "MNLI", "IMDB", "RTE"]
EXAMPLES, SMOKE_EXAMPLES = 16, 4
#: the data seed of occurrence k of a task under `--seed s` is SEED_STRIDE * s + k
SEED_STRIDE = 1000
TARGET = 0.9
FEEDBACKS = ("reuse", "hindsight")
NORMALISATIONS = ("none", "center", "standardize")
SIGNATURE_STEPS = ("tokenize", "text", "gradient", "context")


# ------------------------------------------------------------------------------------------------------ the stream
@dataclasses.dataclass(frozen=True)
class Occurrence:
    """One appearance of a task in the stream: its data seed and where it stands."""

    task: str
    family: str
    occurrence: int  # 0 for the first appearance of the task, then 1, 2, ...
    pass_index: int
    seed: int
    position: int

    @property
    def name(self) -> str:
        return f"{self.task}@{self.occurrence}"


def build_stream(names: Sequence[str], seed: int = 0, passes: int = 1) -> list[Occurrence]:
    """`names` repeated `passes` times; occurrence k of a task gets data seed `SEED_STRIDE * seed + k`, so a
    recurrence never draws with the seed of an earlier one."""
    if isinstance(passes, bool) or not isinstance(passes, int) or passes < 1:
        raise ValueError(f"passes={passes!r} is not allowed: an integer >= 1")
    unknown = sorted(set(names) - set(FAMILY))
    if unknown:
        raise ValueError(f"stream tasks {unknown} are not allowed: each needs a family in FAMILY {sorted(FAMILY)}")
    seen: dict[str, int] = {}
    stream = []
    for p in range(passes):
        for name in names:
            k = seen.get(name, 0)
            seen[name] = k + 1
            stream.append(Occurrence(name, FAMILY[name], k, p, SEED_STRIDE * seed + k, len(stream)))
    return stream


def _fresh(data: Any, used: set[str], n: int) -> tuple[Any, int]:
    """`n` rows of `data` whose text no earlier occurrence used (then, if the split runs out, used ones);
    returns (rows, how many were used before). `used` is updated."""
    texts = data["text"]
    order = [i for i, t in enumerate(texts) if t not in used]
    order += [i for i, t in enumerate(texts) if t in used]
    chosen = order[:n]
    repeated = sum(texts[i] in used for i in chosen)
    used.update(texts[i] for i in chosen)
    return data.select(chosen), repeated


def load_occurrences(stream: Sequence[Occurrence], data: Path, n_examples: int) -> list:
    """One `Task` per occurrence (named `<task>@<k>`), `n_examples` training and validation rows each, drawn with
    the occurrence's seed; rows of earlier occurrences of the task are skipped while the split has others."""
    from hf_adaptive.tasks.cl_benchmark import load_cl_benchmark_task

    used: dict[tuple[str, str], set[str]] = {}
    tasks = []
    for occ in stream:
        used_train = used.setdefault((occ.task, "train"), set())
        used_eval = used.setdefault((occ.task, "eval"), set())
        task = load_cl_benchmark_task(
            data,
            occ.task,
            max_train=n_examples + len(used_train),
            max_eval=n_examples + len(used_eval),
            seed=occ.seed,
        )
        train, repeated_train = _fresh(task.train_dataset, used_train, n_examples)
        evaluation, repeated_eval = _fresh(task.eval_dataset, used_eval, n_examples)
        metadata = {
            **task.metadata,
            **dataclasses.asdict(occ),
            "repeated_rows": {"train": repeated_train, "eval": repeated_eval},
        }
        tasks.append(
            dataclasses.replace(task, name=occ.name, train_dataset=train, eval_dataset=evaluation, metadata=metadata)
        )
    return tasks


# -------------------------------------------------------------------------------------------- model and signatures
def load_backbone(smoke: bool, tasks: list, seed: int = 0) -> tuple:
    """(model, tokenizer): SmolLM2-135M, or for the smoke run cl_real.py's tiny Gemma with a word-level tokenizer
    over the tasks' own words (so real text is not all `<unk>`)."""
    from cl_real import load_model

    return load_model({"model": "tiny" if smoke else MODEL}, tasks, seed)


def prompt_truncation(tasks: list, tokenizer: Any) -> dict[str, float]:
    """Per task: the share of the stream's rows whose prompt is cut to fit `PROMPT["max_length"]` (the signature
    then sees the start of the input only)."""
    from hf_adaptive.tasks.prompting import PromptEncoder

    cut: dict[str, list[bool]] = {}
    for task in tasks:
        budget = PromptEncoder(task, tokenizer, PROMPT["max_length"], PROMPT["prompt_format"]).prompt_budget
        for split in (task.train_dataset, task.eval_dataset):
            prompts = [task.prompt(t) for t in split["text"]]
            lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]]
            cut.setdefault(task.metadata["task"], []).extend(n > budget for n in lengths)
    return {name: sum(v) / len(v) for name, v in cut.items()}


def shared_descriptions(tasks: list) -> list[list[str]]:
    """Groups of different tasks with the same description: their text parts are identical (e.g. MNLI and CB share
    their instruction), so the text part alone cannot tell them apart."""
    by_text: dict[str, list[str]] = {}
    for task in tasks:
        names = by_text.setdefault(task.description, [])
        if task.metadata["task"] not in names:
            names.append(task.metadata["task"])
    return [names for names in by_text.values() if len(names) > 1]


def timed_signature(signer: TaskSignature, task: Any, split: str) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """`TaskSignature.compute` on `split`, part by part so that each part is timed: (normalised parts, seconds per
    step). The rows are tokenized with `PROMPT`, as a run hands them to the routing plugin."""
    from hf_adaptive.tasks import tokenize_task

    seconds: dict[str, float] = {}
    start = time.perf_counter()
    dataset = tokenize_task(task, signer.tokenizer, split, **PROMPT)
    seconds["tokenize"] = time.perf_counter() - start
    model = signer.model
    was_training = model.training
    model.eval()
    parts: dict[str, torch.Tensor] = {}
    try:
        for part in signer.config.parts:
            start = time.perf_counter()
            if part == "text":
                parts[part] = signer.text_embedding(task.description or task.name)
            elif part == "gradient":
                parts[part] = signer.gradient_sketch(task, split, dataset)
            else:
                parts[part] = signer.context_stats(task, split, dataset)
            seconds[part] = time.perf_counter() - start
    finally:
        model.train(was_training)
    return signer.combine(parts).parts, seconds


@dataclasses.dataclass
class Signatures:
    """The stream and its signatures: `query` (training rows) and `profile` (validation rows) per occurrence,
    each a dict of normalised parts."""

    stream: list[Occurrence]
    query: list[dict[str, torch.Tensor]]
    profile: list[dict[str, torch.Tensor]]


def compute_signatures(
    tasks: list, stream: list[Occurrence], signer: TaskSignature
) -> tuple[Signatures, list[dict[str, float]]]:
    """Query and profile signatures of every occurrence, and the seconds each signature took per step."""
    query, profile, timings = [], [], []
    for i, task in enumerate(tasks):
        q, q_seconds = timed_signature(signer, task, "train")
        p, p_seconds = timed_signature(signer, task, "eval")
        query.append(q)
        profile.append(p)
        timings += [q_seconds, p_seconds]
        total = sum(q_seconds.values()) + sum(p_seconds.values())
        print(f"  signatures {i + 1}/{len(tasks)} {task.name}: {total:.2f} s", flush=True)
    return Signatures(stream, query, profile), timings


# ----------------------------------------------------------------------------------------------------- correctness
def score_decision(
    task: str, action: str, expert: str | None, expert_of: dict[str, str], family: dict[str, str] = FAMILY
) -> dict[str, Any]:
    """Whether a decision for `task` is right, given the experts of the tasks seen so far (`expert_of`: task ->
    its expert). Right: reuse of the task's own expert when it recurs; no reuse (fork or create) when it is new."""
    owner = {e: t for t, e in expert_of.items()}
    recurring = task in expert_of
    reuse = action == "reuse"
    correct = (reuse and expert == expert_of[task]) if recurring else not reuse
    other = owner.get(expert) if expert is not None else None  # the task whose expert was reused or forked
    in_family = other is not None and other != task and family.get(other) == family.get(task)
    return {
        "truth": "reuse" if recurring else "new",
        "correct": bool(correct),
        "wrong_reuse": bool(reuse and not correct),
        "wrong_reuse_in_family": bool(reuse and not correct and in_family),
        "missed_reuse": bool(recurring and not reuse),
        "related_new": bool(not recurring and any(family.get(t) == family.get(task) for t in expert_of)),
        "fork_in_family": bool(action == "fork" and not recurring and in_family),
    }


def _share(flags: Sequence[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


def summarize_steps(steps: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Shares and counts of a routed stream (None: no decision of that kind)."""
    recurring = [s for s in steps if s["truth"] == "reuse"]
    new = [s for s in steps if s["truth"] == "new"]
    related = [s for s in new if s["related_new"]]
    passes = sorted({s["pass"] for s in steps})
    return {
        "n": len(steps),
        "correct": _share([s["correct"] for s in steps]),
        "correct_first_pass": _share([s["correct"] for s in steps if s["pass"] == 0]),
        "correct_second_pass": _share([s["correct"] for s in steps if s["pass"] == 1]),
        "correct_recurring": _share([s["correct"] for s in recurring]),
        "correct_new": _share([s["correct"] for s in new]),
        "wrong_reuses": sum(s["wrong_reuse"] for s in steps),
        "wrong_reuses_in_family": sum(s["wrong_reuse_in_family"] for s in steps),
        "missed_reuses": sum(s["missed_reuse"] for s in steps),
        "related_new": len(related),
        "fork_in_family_on_related_new": _share([s["fork_in_family"] for s in related]),
        "learned_decisions": sum(s["learned_score"] for s in steps),
        "passes": len(passes),
    }


def _finite(x: float) -> float | None:
    """A score as JSON can hold it: None for -inf (no expert yet); not rounded, the oracle compares them."""
    return float(x) if math.isfinite(x) else None


def run_stream(
    sigs: Signatures,
    names: tuple[str, ...],
    rule: dict[str, Any],
    reuse: float = rq.REUSE,
    fork: float = rq.FORK,
    feedback: str = "reuse",
    normalize: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Teacher-forced routing of the stream (`routing_quality.run_stream` on this stream's tasks and families):
    the summary and every step."""
    if feedback not in FEEDBACKS:
        raise ValueError(f"feedback={feedback!r} is not allowed: one of {FEEDBACKS}")
    dim = sum(sigs.query[0][p].numel() for p in names)
    router = Router(RouterConfig(dim=dim, reuse_threshold=reuse, fork_threshold=fork, **{**(normalize or {}), **rule}))
    expert_of: dict[str, str] = {}
    members: dict[str, list[torch.Tensor]] = {}
    steps = []
    for i, occ in enumerate(sigs.stream):
        q = rq.subset(sigs.query[i], names)
        learned = router.learned_scoring
        d = router.route(q)
        best, best_score = d.candidates[0] if d.candidates else (None, float("-inf"))
        steps.append(
            {
                "task": occ.task,
                "occurrence": occ.occurrence,
                "pass": occ.pass_index,
                "action": d.action,
                "expert": d.expert,
                "score": _finite(d.score),
                "best": best,
                "best_score": _finite(best_score),
                "best_right": best is not None and best == expert_of.get(occ.task),
                "learned_score": learned,
                **score_decision(occ.task, d.action, d.expert, expert_of),
            }
        )
        name = expert_of.setdefault(occ.task, f"expert_{occ.task}")  # the truth drives the library
        router.record_decision(d, new_expert=None if d.action == "reuse" else name, query=q)
        if d.action == "reuse" and d.expert is not None:
            router.record_outcome(q, d.expert, d.score, d.expert == name)
        elif feedback == "hindsight" and d.candidates:
            router.record_outcome(q, best, best_score, best == name)
        members.setdefault(name, []).append(rq.subset(sigs.profile[i], names))
        router.update_profile(name, torch.stack(members[name]).mean(0))
    return {**summarize_steps(steps), "steps": steps}


def oracle_threshold(steps: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The best share correct of "reuse the best candidate if its score >= t, else do not reuse" over every
    threshold t (midpoints between the observed scores, and beyond both ends), from one threshold-rule trace.

    Exact for the threshold rule with the cosine scorer: teacher forcing makes the router's profiles and
    normalisation statistics independent of its decisions, so the best candidate and its score at every step are
    the same for any threshold. Ties: the lowest threshold."""
    scores = sorted({s["best_score"] for s in steps if s["best_score"] is not None})
    if not scores:
        return {"best_threshold": None, "correct": _share([s["truth"] == "new" for s in steps])}
    thresholds = [scores[0] - 1e-3] + [(a + b) / 2 for a, b in zip(scores, scores[1:])] + [scores[-1] + 1e-3]

    def correct(s: dict[str, Any], t: float) -> bool:
        reuse = s["best_score"] is not None and s["best_score"] >= t
        return reuse and s["best_right"] if s["truth"] == "reuse" else not reuse

    best_t, best = thresholds[0], -1.0
    for t in thresholds:
        share = sum(correct(s, t) for s in steps) / len(steps)
        if share > best:
            best_t, best = t, share
    return {"best_threshold": round(best_t, 6), "correct": best}


def pair_cosines(vectors: Sequence[torch.Tensor], tasks: Sequence[str], family: dict[str, str] = FAMILY) -> dict:
    """Mean cosine of the pairs of signatures of the same task, of the same family (another task), of other
    families; raw, and after subtracting the mean signature (centred: what a shared component hides)."""
    out: dict[str, dict[str, float | None]] = {}
    x = torch.stack([v.float().flatten() for v in vectors])
    for mode, m in (("raw", x), ("centred", x - x.mean(0, keepdim=True))):
        m = m / m.norm(dim=1, keepdim=True).clamp_min(1e-12)
        sims = m @ m.T
        groups: dict[str, list[float]] = {"same_task": [], "same_family": [], "other": []}
        for i in range(len(tasks)):
            for j in range(i + 1, len(tasks)):
                if tasks[i] == tasks[j]:
                    key = "same_task"
                elif family.get(tasks[i]) == family.get(tasks[j]):
                    key = "same_family"
                else:
                    key = "other"
                groups[key].append(float(sims[i, j]))
        out[mode] = {k: (statistics.mean(v) if v else None) for k, v in groups.items()}
    return out


# -------------------------------------------------------------------------------------------------------- analysis
def _without_steps(run: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in run.items() if k != "steps"}


def analyse(sigs: Signatures) -> dict[str, Any]:
    """Every routed variant of the study on the signatures (no model needed)."""
    combined = rq.PART_SETS["combined"]
    threshold = rq.RULES["threshold"]
    by_part, runs = {}, {}
    for part, names in rq.PART_SETS.items():
        run = runs[part] = run_stream(sigs, names, threshold)
        by_part[part] = {
            "threshold": _without_steps(run),
            "oracle": oracle_threshold(run["steps"]),
            "cosines": pair_cosines([rq.subset(q, names) for q in sigs.query], [o.task for o in sigs.stream]),
        }
    by_rule = {
        name: {fb: _without_steps(run_stream(sigs, combined, rule, feedback=fb)) for fb in FEEDBACKS}
        for name, rule in rq.RULES.items()
    }
    by_scorer = {
        scorer: {
            fb: _without_steps(run_stream(sigs, combined, {**threshold, "scorer": scorer}, feedback=fb))
            for fb in FEEDBACKS
        }
        for scorer in rq.SCORERS
    }
    normalisation = {}
    for mode in NORMALISATIONS:
        reuse, fork = (rq.RAW_REUSE, rq.RAW_FORK) if mode == "none" else (rq.REUSE, rq.FORK)
        run = run_stream(sigs, combined, threshold, reuse=reuse, fork=fork, normalize={"normalize": mode})
        normalisation[mode] = {
            "thresholds": [reuse, fork],
            **_without_steps(run),
            "oracle": oracle_threshold(run["steps"]),
        }
    default = runs["combined"]  # the router's defaults on the combined signature
    return {
        "by_part": by_part,
        "by_rule": by_rule,
        "by_scorer": by_scorer,
        "normalisation": normalisation,
        "decisions": default["steps"],
        "target": target(default, by_rule, by_scorer, normalisation, by_part["combined"]["oracle"]),
    }


def target(
    default: dict[str, Any], by_rule: dict, by_scorer: dict, normalisation: dict, oracle: dict
) -> dict[str, Any]:
    """The issue's target for the default router (share correct >= 0.9; wrong reuses counted), and which of the
    other variants at their own default thresholds reach it."""
    variants = {f"rule {r}, {fb} feedback": run for r, by_fb in by_rule.items() for fb, run in by_fb.items()}
    variants |= {f"scorer {s}, {fb} feedback": run for s, by_fb in by_scorer.items() for fb, run in by_fb.items()}
    variants |= {f"normalize {m}": run for m, run in normalisation.items()}
    correct = default["correct"]
    return {
        "share_correct_target": TARGET,
        "router": "threshold rule, cosine scorer, normalize=standardize, reuse >= 0.5, fork >= 0.3, combined",
        "correct": correct,
        "met": correct is not None and correct >= TARGET,
        "wrong_reuses": default["wrong_reuses"],
        "wrong_reuses_in_family": default["wrong_reuses_in_family"],
        "missed_reuses": default["missed_reuses"],
        "oracle_correct": oracle["correct"],
        "variants_meeting": {
            name: {"correct": run["correct"], "wrong_reuses": run["wrong_reuses"]}
            for name, run in variants.items()
            if run["correct"] is not None and run["correct"] >= TARGET
        },
    }


def timing_summary(timings: Sequence[dict[str, float]]) -> dict[str, Any]:
    """Mean seconds per signature, in all and per step."""
    per_step = {k: statistics.mean(t.get(k, 0.0) for t in timings) for k in SIGNATURE_STEPS} if timings else {}
    return {
        "signatures": len(timings),
        "seconds_per_signature": sum(per_step.values()) if timings else None,
        "seconds_per_signature_by_step": per_step,
        "signature_seconds_total": sum(sum(t.values()) for t in timings),
    }


# ---------------------------------------------------------------------------------------------------------- report
def _f(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def report_markdown(result: dict[str, Any]) -> str:
    """The markdown report of a result dict (`analyse` plus `meta` and `timings`)."""
    meta, timings, tgt = result["meta"], result["timings"], result["target"]
    stream = meta["stream"]
    n_new = sum(s["truth"] == "new" for s in result["decisions"])
    tasks = list(dict.fromkeys(o["task"] for o in stream))
    families = {}
    for t in tasks:
        families.setdefault(FAMILY.get(t, "?"), []).append(t)
    by_step = timings.get("seconds_per_signature_by_step") or {}
    lines = [
        f"# Routing on real signatures: {meta['model']}, {len(stream)} occurrences of CL benchmark tasks",
        "",
        f"Stream: {meta['passes']} pass(es) over {len(stream) // max(1, meta['passes'])} occurrences of "
        f"{len(tasks)} tasks ({n_new} first appearances, {len(stream) - n_new} recurrences); families: "
        + "; ".join(f"{f}: {', '.join(ts)}" for f, ts in families.items())
        + ". Left out: "
        + ("; ".join(f"{t} ({why})" for t, why in meta["left_out"].items()) or "none")
        + f". Every occurrence draws fresh rows (data seed {SEED_STRIDE} x seed + occurrence; rows given twice "
        f"when a split ran out: {meta['repeated_rows']}). Signatures (`TaskSignature`, {meta['signature_dims']}) "
        f"from {meta['examples']} rows, prompts `{PROMPT['prompt_format']}`, at most {PROMPT['max_length']} tokens; "
        f"{timings['signatures']} signatures, {_f(timings['seconds_per_signature'], 2)} s each ("
        + ", ".join(f"{k} {_f(v, 3)}" for k, v in by_step.items())
        + f"){', smoke run' if meta['smoke'] else ''}.",
        "",
        "Correct: reuse of the task's own expert when it recurs, no reuse (create or fork) when it is new; the "
        "library is set to the truth after each decision (teacher forcing; no expert is trained). Router defaults: "
        f"threshold rule, cosine scorer, standardised signatures, reuse >= {rq.REUSE}, fork >= {rq.FORK}.",
        "",
        "## The issue's target",
        "",
        f"- Share of correct reuse/create decisions >= {TARGET} (default router, combined signature): "
        f"**{_f(tgt['correct'])}, {'met' if tgt['met'] else 'missed'}**.",
        f"- Wrong reuses: **{tgt['wrong_reuses']}** ({tgt['wrong_reuses_in_family']} within the family); missed "
        f"reuses (an extra expert): {tgt['missed_reuses']}. Whether a wrong reuse costs accuracy is not measured here "
        "(no expert is trained); the routed run's checked reuse (`verify_reuse`) is what guards against it.",
        "- Best single threshold for the combined signature (oracle, chosen with the truth): "
        f"{_f(tgt['oracle_correct'])}.",
        "- Variants at their own default thresholds that reach the target: "
        + (
            ", ".join(
                f"{k} ({_f(v['correct'])}, {v['wrong_reuses']} wrong reuses)"
                for k, v in tgt["variants_meeting"].items()
            )
            or "none"
        )
        + ".",
        "",
        "## 1. Per signature part (threshold rule, cosine, default normalisation)",
        "",
        "Oracle: the best share over every reuse threshold (fork band off): the part's discriminative power. Cosines: "
        "mean over pairs of query signatures of the same task, of the same family (another task), of other families; "
        "centred: after subtracting the mean signature.",
        "",
        "| part | correct | on recurring | on new | wrong reuses | oracle correct | oracle threshold | "
        "cos same task | cos same family | cos other | centred same task | centred same family | centred other |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for part, r in result["by_part"].items():
        f, o, c = r["threshold"], r["oracle"], r["cosines"]
        lines.append(
            f"| {part} | {_f(f['correct'])} | {_f(f['correct_recurring'])} | {_f(f['correct_new'])} | "
            f"{f['wrong_reuses']} | {_f(o['correct'])} | {_f(o['best_threshold'])} | "
            + " | ".join(_f(c[mode][k]) for mode in ("raw", "centred") for k in ("same_task", "same_family", "other"))
            + " |"
        )
    lines += [
        "",
        "## 2. Per decision rule (combined signature, cosine scorer)",
        "",
        "Feedback `reuse`: only reuses report an outcome (a live run); `hindsight`: every decision reports whether "
        "its best candidate was the task's own expert (a probe of the candidate).",
        "",
        "| rule | feedback | correct | first pass | second pass | on recurring | on new | wrong reuses | "
        "of them in family | missed reuses | fork in family on related new |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, by_fb in result["by_rule"].items():
        for fb, r in by_fb.items():
            lines.append(
                f"| {name} | {fb} | {_f(r['correct'])} | {_f(r['correct_first_pass'])} | "
                f"{_f(r['correct_second_pass'])} | {_f(r['correct_recurring'])} | {_f(r['correct_new'])} | "
                f"{r['wrong_reuses']} | {r['wrong_reuses_in_family']} | {r['missed_reuses']} | "
                f"{_f(r['fork_in_family_on_related_new'])} |"
            )
    lines += [
        "",
        "## 3. Scorers (threshold rule, combined signature), learned from this run's outcomes",
        "",
        f"The learned scorers are refitted by the router from every outcome recorded so far once "
        f"{RouterConfig(dim=1).min_outcomes} exist with a success and a failure (cosine before that); then their "
        "score is p(reuse succeeds), compared with `p_reuse` / `p_fork`. An outcome is whether the reused (hindsight: "
        "the best) expert was the task's own. `learned decisions`: decisions made with the fitted scorer.",
        "",
        "| scorer | feedback | correct | second pass | on recurring | on new | wrong reuses | learned decisions |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for scorer, by_fb in result["by_scorer"].items():
        for fb, r in by_fb.items():
            lines.append(
                f"| {scorer} | {fb} | {_f(r['correct'])} | {_f(r['correct_second_pass'])} | "
                f"{_f(r['correct_recurring'])} | {_f(r['correct_new'])} | {r['wrong_reuses']} | "
                f"{r['learned_decisions']} |"
            )
    for fb in FEEDBACKS:
        cosine = result["by_scorer"]["cosine"][fb]
        gains = []
        for scorer in rq.SCORERS[1:]:
            r = result["by_scorer"][scorer][fb]
            delta = None if r["correct"] is None or cosine["correct"] is None else r["correct"] - cosine["correct"]
            gains.append(
                f"{scorer} {'n/a' if delta is None else f'{delta:+.3f}'} ({r['learned_decisions']} learned "
                f"decisions, {r['wrong_reuses'] - cosine['wrong_reuses']:+d} wrong reuses)"
            )
        lines += ["", f"Gain over cosine, {fb} feedback (share correct): " + ", ".join(gains) + "."]
    lines += [
        "",
        "## 4. Normalisation (threshold rule, combined signature)",
        "",
        "| normalize | thresholds (reuse, fork) | correct | on recurring | on new | wrong reuses | oracle correct | "
        "oracle threshold |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for mode, r in result["normalisation"].items():
        lines.append(
            f"| {mode} | {r['thresholds'][0]}, {r['thresholds'][1]} | {_f(r['correct'])} | "
            f"{_f(r['correct_recurring'])} | {_f(r['correct_new'])} | {r['wrong_reuses']} | "
            f"{_f(r['oracle']['correct'])} | {_f(r['oracle']['best_threshold'])} |"
        )
    truncation = meta.get("prompt_truncation") or {}
    lines += [
        "",
        "## Timings and prompts",
        "",
        f"Model loaded in {_f(timings.get('load_model_s'), 1)} s, data in {_f(timings.get('load_data_s'), 1)} s; "
        f"signatures {_f(timings.get('signature_seconds_total'), 1)} s in all, routing "
        f"{_f(timings.get('routing_s'), 1)} s, wall {_f(timings.get('wall_s'), 1)} s on {meta['threads']} thread(s). "
        "Share of prompts cut to fit: "
        + (", ".join(f"{t} {v:.2f}" for t, v in truncation.items()) or "n/a")
        + ". Tasks with the same instruction (identical text part): "
        + ("; ".join(", ".join(g) for g in meta.get("shared_descriptions") or []) or "none")
        + ".",
        "",
        "Decisions of the default router: "
        + ", ".join(
            f"{s['task']}@{s['occurrence']}→{s['action']}"
            + (f" {s['expert'].removeprefix('expert_')}" if s["action"] != "create" and s["expert"] else "")
            + ("" if s["correct"] else " ✗")
            for s in result["decisions"]
        )
        + ".",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny Gemma, short stream (never into docs/results)")
    parser.add_argument("--examples", type=int, default=None, help=f"rows per signature ({EXAMPLES}; smoke 4)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the stream's data draws")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the CL benchmark folder")
    parser.add_argument("--out", type=Path, default=None, help="folder of routing_real.md|json")
    parser.add_argument("--passes", type=int, default=2, help="passes over the stream (the learned scorers need 2)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default 2; smoke 1)")
    args = parser.parse_args(argv)
    examples = args.examples or (SMOKE_EXAMPLES if args.smoke else EXAMPLES)
    if examples < 1:
        parser.error(f"--examples={examples} is not allowed: an integer >= 1")
    threads = args.threads or (1 if args.smoke else 2)
    torch.set_num_threads(threads)
    out = args.out or (Path(tempfile.mkdtemp(prefix="routing_real_smoke_")) if args.smoke else RESULTS)
    wall = time.perf_counter()
    load_average = os.getloadavg()[0]

    stream = build_stream(SMOKE_STREAM if args.smoke else STREAM, args.seed, args.passes)
    start = time.perf_counter()
    tasks = load_occurrences(stream, args.data, examples)
    load_data = time.perf_counter() - start
    start = time.perf_counter()
    model, tokenizer = load_backbone(args.smoke, tasks, seed=0)
    load_model = time.perf_counter() - start
    cfg = SignatureConfig(n_examples=examples, batch_size=min(16, examples))
    signer = TaskSignature(model, tokenizer, cfg)
    print(f"{len(tasks)} occurrences, signatures {signer.part_dims} from {examples} rows", flush=True)
    sigs, timings = compute_signatures(tasks, stream, signer)
    start = time.perf_counter()
    analysis = analyse(sigs)
    routing = time.perf_counter() - start

    repeated = {"train": 0, "eval": 0}
    for task in tasks:
        for split, n in task.metadata["repeated_rows"].items():
            repeated[split] += n
    result = {
        "meta": {
            "model": "tiny-gemma (word-level tokenizer over the tasks' words)" if args.smoke else MODEL,
            "smoke": args.smoke,
            "data": str(args.data),
            "stream": [dataclasses.asdict(o) for o in stream],
            "passes": args.passes,
            "examples": examples,
            "threads": threads,
            "families": {t: FAMILY[t] for t in dict.fromkeys(o.task for o in stream)},
            "left_out": LEFT_OUT,
            "seeds": {
                "stream_seed": args.seed,
                "data_seed_rule": f"{SEED_STRIDE} * stream_seed + occurrence",
                "signature_seed": cfg.seed,
                "router_seed": RouterConfig(dim=1).seed,
                "model_seed": 0,
            },
            "settings": {
                "prompt": PROMPT,
                "signature": dataclasses.asdict(cfg),
                "reuse_threshold": rq.REUSE,
                "fork_threshold": rq.FORK,
                "raw_thresholds": [rq.RAW_REUSE, rq.RAW_FORK],
                "rules": rq.RULES,
                "scorers": list(rq.SCORERS),
                "target": TARGET,
            },
            "signature_dims": signer.part_dims,
            "repeated_rows": repeated,
            "prompt_truncation": prompt_truncation(tasks, tokenizer),
            "shared_descriptions": shared_descriptions(tasks),
        },
        "timings": {
            **timing_summary(timings),
            "load_data_s": load_data,
            "load_model_s": load_model,
            "routing_s": routing,
            "wall_s": time.perf_counter() - wall,
        },
        **analysis,
        "environment": {"load_average": {"start": load_average, "end": os.getloadavg()[0]}},
    }
    write_results(NAME, result, report_markdown(result), out=out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
