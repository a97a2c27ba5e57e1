"""benchmarks/routing_real.py: the stream, the correctness scoring, the exact oracle and the report without a model,
and the whole `--smoke` pipeline on a tiny model over a made-up dataset in the CL benchmark layout."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from benchmark_loader import load_benchmark

SST2, IMDB, MNLI, QQP = "SST-2", "IMDB", "MNLI", "QQP"


@pytest.fixture(scope="module")
def rr():
    yield from load_benchmark("routing_real")


# ------------------------------------------------------------------------------------------------- fixture data
#: made-up rows (no benchmark text): a few words combined, so that every row is different
_SUBJECTS = ["the film", "this show", "our trip", "the meal", "a song"]
_VERBS = ["was", "felt", "seemed", "looked"]
_ADJECTIVES = ["great", "dull", "bright", "slow", "warm"]
_LABELS = {
    "SST-2": ["Good", "Bad"],
    "IMDB": ["Good", "Bad"],
    "MNLI": ["neutral", "entailment", "contradiction"],
    "RTE": ["contradiction", "entailment"],
}


def _sentences(n: int, offset: int, pair: bool) -> list[str]:
    rows = []
    for i in range(offset, offset + n):
        words = f"{_SUBJECTS[i % 5]} {_VERBS[(i // 5) % 4]} {_ADJECTIVES[(i // 20) % 5]} number {i}"  # all differ
        rows.append(f"sentence 1: {words}\nsentence 2: {_SUBJECTS[(i + 2) % 5]} was fine" if pair else words)
    return rows


def _write_task(root: Path, name: str, n_train: int, n_test: int) -> None:
    folder = root / name
    folder.mkdir(parents=True)
    labels = _LABELS[name]
    pair = name in ("MNLI", "RTE")
    for file, n, offset in (("train.json", n_train, 0), ("test.json", n_test, 1000)):
        rows = [{"sentence": s, "label": labels[i % len(labels)]} for i, s in enumerate(_sentences(n, offset, pair))]
        (folder / file).write_text(json.dumps(rows))
    (folder / "labels.json").write_text(json.dumps(labels))


@pytest.fixture
def bench(tmp_path: Path) -> Path:
    for name in _LABELS:
        _write_task(tmp_path / "data", name, 20, 20)
    return tmp_path / "data"


# ------------------------------------------------------------------------------------------------------ stream
def test_stream_recurrences_draw_new_seeds_and_related_tasks_follow_their_family(rr):
    stream = rr.build_stream(rr.STREAM, seed=0, passes=2)
    assert len(rr.STREAM) == 24 and len(stream) == 48
    assert [o.position for o in stream] == list(range(48))
    assert [o.pass_index for o in stream] == [0] * 24 + [1] * 24
    assert "MultiRC" not in rr.STREAM and "MultiRC" in rr.LEFT_OUT
    by_task: dict[str, list] = {}
    for o in stream:
        by_task.setdefault(o.task, []).append(o)
        assert o.family == rr.FAMILY[o.task]
    assert set(by_task) == {"SST-2", "IMDB", "MNLI", "RTE", "CB", "BoolQA", "QQP", "WiC", "COPA"}
    for task, occs in by_task.items():
        assert [o.occurrence for o in occs] == list(range(len(occs)))
        assert [o.seed for o in occs] == list(range(len(occs)))  # one seed per occurrence, never repeated
        assert occs[0].position < min(o.position for o in occs[1:])  # the first appearance comes first
        assert sum(o.pass_index == 0 for o in occs) >= 2, task  # every task recurs within one pass
    # the tasks that first appear after a task of their family: IMDB (SST-2), RTE (MNLI), CB (MNLI, RTE)
    seen: list[str] = []
    related = []
    for o in stream:
        if o.occurrence == 0 and any(rr.FAMILY[t] == o.family for t in seen):
            related.append(o.task)
        seen.append(o.task)
    assert related == ["IMDB", "RTE", "CB"]
    assert {rr.FAMILY[t] for t in ("MNLI", "RTE", "CB")} == {"entailment"}
    assert rr.FAMILY["SST-2"] == rr.FAMILY["IMDB"] == "sentiment"
    assert [o.seed for o in rr.build_stream(["SST-2", "SST-2"], seed=3)] == [3000, 3001]


def test_stream_refuses_bad_passes_and_unknown_tasks(rr):
    with pytest.raises(ValueError, match="passes=0"):
        rr.build_stream(rr.STREAM, passes=0)
    with pytest.raises(ValueError, match=r"\['AGNews'\]"):
        rr.build_stream(["SST-2", "AGNews"])


def test_recurrences_get_fresh_rows_until_the_split_runs_out(rr, bench):
    stream = rr.build_stream(["SST-2"] * 7)
    tasks = rr.load_occurrences(stream, bench, 3)
    assert [t.name for t in tasks] == [f"SST-2@{k}" for k in range(7)]
    texts = [set(t.train_dataset["text"]) for t in tasks]
    assert all(len(s) == 3 for s in texts)
    first_six = set().union(*texts[:6])
    assert len(first_six) == 18  # six occurrences, 18 different rows of the 20
    assert [t.metadata["repeated_rows"]["train"] for t in tasks] == [0, 0, 0, 0, 0, 0, 1]  # 7 x 3 > 20 rows
    assert [t.metadata["seed"] for t in tasks] == list(range(7))
    assert tasks[0].metadata["task"] == "SST-2" and tasks[0].template == tasks[6].template
    assert rr.shared_descriptions(tasks) == []  # one task, however often it recurs
    mixed = rr.load_occurrences(rr.build_stream(["MNLI", "SST-2", "MNLI"]), bench, 2)
    assert rr.shared_descriptions(mixed) == []
    cb_like = [*mixed, rr.dataclasses.replace(mixed[0], metadata={**mixed[0].metadata, "task": "CB"})]
    assert rr.shared_descriptions(cb_like) == [["MNLI", "CB"]]


# ------------------------------------------------------------------------------------------------- correctness
def _scored(rr, task, action, expert, expert_of):
    return rr.score_decision(task, action, expert, expert_of)


def test_score_decision_on_hand_made_decisions(rr):
    lib = {SST2: "expert_SST-2", MNLI: "expert_MNLI"}
    base = {
        "truth": "reuse",
        "correct": False,
        "wrong_reuse": False,
        "wrong_reuse_in_family": False,
        "missed_reuse": False,
        "related_new": False,
        "fork_in_family": False,
    }
    # recurring task: its own expert is right; another task's expert is a wrong reuse; create / fork miss a reuse
    assert _scored(rr, SST2, "reuse", "expert_SST-2", lib) == {**base, "correct": True}
    assert _scored(rr, SST2, "reuse", "expert_MNLI", lib) == {**base, "wrong_reuse": True}
    assert _scored(rr, SST2, "create", None, lib) == {**base, "missed_reuse": True}
    assert _scored(rr, SST2, "fork", "expert_SST-2", lib) == {**base, "missed_reuse": True}
    with_imdb = {**lib, IMDB: "expert_IMDB"}
    assert _scored(rr, IMDB, "reuse", "expert_SST-2", with_imdb) == {
        **base,
        "wrong_reuse": True,
        "wrong_reuse_in_family": True,
    }
    # new task with a family-mate seen (related): a reuse is wrong; fork within the family or create are right
    new = {**base, "truth": "new", "related_new": True}
    assert _scored(rr, IMDB, "reuse", "expert_SST-2", lib) == {
        **new,
        "wrong_reuse": True,
        "wrong_reuse_in_family": True,
    }
    assert _scored(rr, IMDB, "reuse", "expert_MNLI", lib) == {**new, "wrong_reuse": True}
    assert _scored(rr, IMDB, "fork", "expert_SST-2", lib) == {**new, "correct": True, "fork_in_family": True}
    assert _scored(rr, IMDB, "fork", "expert_MNLI", lib) == {**new, "correct": True}
    assert _scored(rr, IMDB, "create", None, lib) == {**new, "correct": True}
    # new task without a family-mate
    assert _scored(rr, QQP, "fork", "expert_SST-2", lib) == {**base, "truth": "new", "correct": True}
    assert _scored(rr, QQP, "reuse", "expert_SST-2", lib) == {**base, "truth": "new", "wrong_reuse": True}
    assert _scored(rr, SST2, "create", None, {}) == {**base, "truth": "new", "correct": True}


def test_summary_counts_and_shares(rr):
    lib = {SST2: "expert_SST-2", MNLI: "expert_MNLI"}
    decisions = [  # (task, action, expert, library, pass, learned)
        (SST2, "create", None, {}, 0, False),  # right
        (IMDB, "fork", "expert_SST-2", lib, 0, False),  # right, fork in family
        (IMDB, "reuse", "expert_SST-2", lib, 0, False),  # wrong reuse in family (new task)
        (SST2, "create", None, lib, 1, True),  # missed reuse
        (SST2, "reuse", "expert_SST-2", lib, 1, True),  # right
        (MNLI, "reuse", "expert_SST-2", lib, 1, False),  # wrong reuse across families
    ]
    steps = [
        {"pass": p, "learned_score": learned, **rr.score_decision(t, a, e, library)}
        for t, a, e, library, p, learned in decisions
    ]
    s = rr.summarize_steps(steps)
    assert s == {
        "n": 6,
        "correct": 3 / 6,
        "correct_first_pass": 2 / 3,
        "correct_second_pass": 1 / 3,
        "correct_recurring": 1 / 3,
        "correct_new": 2 / 3,
        "wrong_reuses": 2,
        "wrong_reuses_in_family": 1,
        "missed_reuses": 1,
        "related_new": 2,
        "fork_in_family_on_related_new": 1 / 2,
        "learned_decisions": 2,
        "passes": 2,
    }
    one_pass = rr.summarize_steps(steps[:1])
    assert one_pass["correct_second_pass"] is None and one_pass["correct_recurring"] is None
    assert one_pass["fork_in_family_on_related_new"] is None and one_pass["correct"] == 1.0


def test_oracle_threshold_is_the_best_cut_of_the_trace(rr):
    def step(truth, score, right=False):
        return {"truth": truth, "best_score": score, "best_right": right}

    trace = [
        step("new", None),  # the first task: no expert, never a reuse
        step("new", 0.2),
        step("reuse", 0.8, right=True),
        step("reuse", 0.5, right=True),
        step("reuse", 0.9, right=False),  # its best candidate is another task's expert: right at no threshold
        step("new", 0.6),
    ]
    # cuts 0.199: 3/6, 0.35: 4/6, 0.55: 3/6, 0.7: 4/6, 0.85: 3/6, 0.901: 3/6 -> the lowest of the best
    assert rr.oracle_threshold(trace) == {"best_threshold": 0.35, "correct": 4 / 6}
    assert rr.oracle_threshold([step("new", None)]) == {"best_threshold": None, "correct": 1.0}


def _synthetic(rr, stream, noise: float, seed: int = 0):
    """Signatures without a model: a direction per task (family-mates share half of it) plus noise."""
    g = torch.Generator().manual_seed(seed)
    dims = {"text": 12, "gradient": 10, "context": 6}
    centre = {p: {t: torch.randn(d, generator=g) for t in rr.FAMILY} for p, d in dims.items()}
    family = {p: {f: torch.randn(d, generator=g) for f in set(rr.FAMILY.values())} for p, d in dims.items()}

    def sig(task):
        parts = {}
        for p, d in dims.items():
            v = centre[p][task] + family[p][rr.FAMILY[task]] + noise * torch.randn(d, generator=g)
            parts[p] = v / v.norm()
        return parts

    return rr.Signatures(stream, [sig(o.task) for o in stream], [sig(o.task) for o in stream])


def test_oracle_equals_the_router_at_that_threshold(rr):
    """The exact sweep is what the router does at that threshold (its trace does not depend on the threshold)."""
    sigs = _synthetic(rr, rr.build_stream(rr.STREAM), noise=1.5)
    combined = rr.rq.PART_SETS["combined"]
    rule = rr.rq.RULES["threshold"]
    trace = rr.run_stream(sigs, combined, rule)["steps"]
    oracle = rr.oracle_threshold(trace)
    t = oracle["best_threshold"]
    assert rr.run_stream(sigs, combined, rule, reuse=t, fork=t)["correct"] == pytest.approx(oracle["correct"])
    for grid in (-0.5, 0.0, 0.2, 0.4, 0.6, 0.8):
        assert rr.run_stream(sigs, combined, rule, reuse=grid, fork=grid)["correct"] <= oracle["correct"] + 1e-12


def test_pair_cosines_by_relation(rr):
    e = torch.eye(3)
    vectors = [e[0], e[0], (e[0] + e[1]) / math.sqrt(2), e[2]]
    c = rr.pair_cosines(vectors, [SST2, SST2, IMDB, MNLI])
    assert c["raw"]["same_task"] == pytest.approx(1.0)
    assert c["raw"]["same_family"] == pytest.approx(1 / math.sqrt(2))
    assert c["raw"]["other"] == pytest.approx(0.0)
    assert set(c["centred"]) == {"same_task", "same_family", "other"}
    assert rr.pair_cosines([e[0], e[1]], [SST2, MNLI])["raw"]["same_task"] is None


# ------------------------------------------------------------------------------------------------------ report
def test_report_states_the_target_and_every_table(rr):
    stream = rr.build_stream(rr.STREAM, passes=1)
    result = {
        **rr.analyse(_synthetic(rr, stream, noise=0.3)),
        "meta": {
            "model": "fake",
            "smoke": False,
            "stream": [{"task": o.task} for o in stream],
            "passes": 1,
            "examples": 16,
            "threads": 2,
            "left_out": rr.LEFT_OUT,
            "repeated_rows": {"train": 0, "eval": 3},
            "signature_dims": {"text": 12, "gradient": 10, "context": 6},
            "prompt_truncation": {"SST-2": 0.0, "IMDB": 0.75},
            "shared_descriptions": [["MNLI", "CB"]],
        },
        "timings": {
            "signatures": 48,
            "seconds_per_signature": 8.5,
            "seconds_per_signature_by_step": {"tokenize": 0.1, "text": 0.2, "gradient": 6.0, "context": 2.2},
            "signature_seconds_total": 408.0,
            "load_model_s": 3.0,
            "load_data_s": 1.0,
            "routing_s": 30.0,
            "wall_s": 450.0,
        },
    }
    result["target"] = {
        **result["target"],
        "correct": 0.875,
        "met": False,
        "wrong_reuses": 2,
        "wrong_reuses_in_family": 1,
        "missed_reuses": 1,
        "oracle_correct": 0.958,
        "variants_meeting": {"scorer mlp, hindsight feedback": {"correct": 0.917, "wrong_reuses": 0}},
    }
    md = rr.report_markdown(result)
    assert md.startswith("# Routing on real signatures: fake, 24 occurrences of CL benchmark tasks")
    assert ">= 0.9 (default router, combined signature): **0.875, missed**" in md
    assert "Wrong reuses: **2** (1 within the family); missed reuses (an extra expert): 1." in md
    assert "(oracle, chosen with the truth): 0.958." in md
    assert "reach the target: scorer mlp, hindsight feedback (0.917, 0 wrong reuses)." in md
    assert "8.50 s each (tokenize 0.100, text 0.200, gradient 6.000, context 2.200)" in md
    assert "9 tasks (9 first appearances, 15 recurrences)" in md
    assert "sentiment: SST-2, IMDB; entailment: MNLI, RTE, CB" in md
    assert "Share of prompts cut to fit: SST-2 0.00, IMDB 0.75. Tasks with the same instruction" in md
    assert "(identical text part): MNLI, CB." in md
    lines = md.splitlines()
    for part in ("text", "gradient", "context", "combined"):
        assert sum(line.startswith(f"| {part} | ") for line in lines) == 1
    for rule in rr.rq.RULES:
        for fb in rr.FEEDBACKS:
            (row,) = [line for line in lines if line.startswith(f"| {rule} | {fb} | ")]
            assert row.split(" | ")[4] == "n/a"  # one pass: no second-pass share
    assert sum(line.startswith(("| cosine | ", "| linear | ", "| mlp | ")) for line in lines) == 6
    assert sum(line.startswith(("| none | ", "| center | ", "| standardize | ")) for line in lines) == 3
    assert md.count("Gain over cosine") == 2
    decisions = next(line for line in lines if line.startswith("Decisions of the default router: "))
    assert decisions.count("→") == 24 and decisions.startswith("Decisions of the default router: SST-2@0→create")
    result["target"]["met"], result["target"]["correct"] = True, 0.92
    assert "**0.920, met**" in rr.report_markdown(result)


# ------------------------------------------------------------------------------------------------------- smoke
def test_smoke_pipeline_writes_the_report(rr, bench, tmp_path):
    out = tmp_path / "out"
    assert rr.main(["--smoke", "--data", str(bench), "--out", str(out)]) == 0
    data = json.loads((out / "routing_real.json").read_text())
    md = (out / "routing_real.md").read_text()
    assert md.startswith("# Routing on real signatures: tiny-gemma")
    assert data["meta"]["smoke"] is True and len(data["meta"]["stream"]) == 2 * len(rr.SMOKE_STREAM)
    assert data["timings"]["signatures"] == 4 * len(rr.SMOKE_STREAM)
    assert data["meta"]["repeated_rows"] == {"train": 0, "eval": 0}
    assert "environment" in data and "load_average" in data["environment"]

    shares = []

    def collect(summary):
        for key in ("correct", "correct_first_pass", "correct_second_pass", "correct_recurring", "correct_new"):
            shares.append(summary[key])

    for r in data["by_part"].values():
        collect(r["threshold"])
        shares.append(r["oracle"]["correct"])
    for table in (data["by_rule"], data["by_scorer"]):
        for by_fb in table.values():
            for r in by_fb.values():
                collect(r)
    for r in data["normalisation"].values():
        collect(r)
    shares.append(data["target"]["correct"])
    assert len(shares) > 50 and all(s is not None and 0.0 <= s <= 1.0 for s in shares)
    assert data["target"]["met"] == (data["target"]["correct"] >= 0.9)
    assert len(data["decisions"]) == 16 and data["decisions"][0]["action"] == "create"
