"""benchmarks/cross_task_real.py: its methods build valid configs, the run plan, the report on hand-made records
(no model) with cl_real's reference rows, and a `--smoke` run of every method on a tiny model over a made-up dataset
in the CL benchmark layout (each mechanism must have acted)."""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path

import pytest
from benchmark_loader import load_benchmark
from test_routing_real import _LABELS, _write_task  # made-up rows in the CL benchmark layout

NEW = [
    "olora",
    "osf",
    "distillation",
    "grad_aggregation",
    "meta_init",
    "olora_replay",
    "osf_replay",
    "distillation_replay",
    "meta_init_replay",
]


@pytest.fixture(scope="module")
def ct():
    yield from load_benchmark("cross_task_real")


# --------------------------------------------------------------------------------------------- methods, options
def test_methods_are_the_issue_s_and_run_on_cl_real_s_recipe(ct):
    assert list(ct.METHODS) == NEW
    assert ct.SETTINGS is ct.cl_real.SETTINGS  # the same sequence and budgets as EWC + replay and joint
    assert set(ct.METHODS).isdisjoint(ct.cl_real.METHODS)
    assert "grad_aggregation_replay" in ct.LEFT_OUT and "grad_aggregation_replay" not in ct.METHODS
    # the alone form of grad_aggregation is with replay; the others' replay forms add cl_real's replay, unchanged
    assert ct.METHODS["grad_aggregation"].plugins == ("replay", "grad_aggregation")
    for method in ("olora", "osf", "distillation", "meta_init"):
        alone, combined = ct.METHODS[method], ct.METHODS[f"{method}_replay"]
        assert combined.plugins == (*alone.plugins, "replay")
        assert combined.options == {**alone.options, **ct.cl_real.REPLAY}
        assert "replay" not in alone.plugins and not any(k.startswith("replay_") for k in alone.options)
    assert ct.METHODS["osf"].options["adapter_strategy"] == "osf"
    assert ct.METHODS["distillation"].options["distill_teacher"] == "previous_task"
    assert ct.METHODS["distillation"].options["distill_divergence"] == "forward_kl"
    assert ct.METHODS["distillation"].options["distill_positions"] == "answer"
    assert ct.METHODS["grad_aggregation"].options["grad_aggregation_aggregator"] == "upgrad"
    # Reptile on cl_real's expert routing (which starts each created expert fresh)
    assert ct.METHODS["meta_init"].options == {**ct.cl_real.ROUTING, **ct.META_INIT}
    assert ct.METHODS["meta_init"].options["meta_init_method"] == "reptile"
    assert ct.cl_real.METHODS["expert_routing"].options.get("meta_init_method", "fresh") == "fresh"
    assert set(ct.EST_MINUTES) == set(ct.COUNTERPART) == set(ct.DESCRIPTION) == set(NEW)


@pytest.mark.parametrize("smoke", [False, True])
def test_every_method_builds_a_valid_continual_config(ct, smoke):
    from hf_adaptive.config import ContinualConfig
    from hf_adaptive.registry import PLUGINS

    fields = {f.name for f in dataclasses.fields(ContinualConfig)}
    settings = ct.SMOKE_SETTINGS if smoke else ct.SETTINGS
    for method, spec in ct.METHODS.items():
        assert set(spec.plugins) <= set(PLUGINS), method
        options = ct.method_options(method, smoke)
        assert set(options) <= fields, (method, set(options) - fields)
        config = ContinualConfig(
            output_dir=tempfile.mkdtemp(), use_cpu=True, report_to=[], **{**settings["config"], **options}
        )
        for name, value in options.items():
            assert getattr(config, name) == value, (method, name)
    # the smoke budgets scale only what a method sets; cl_real's registry is left as it was
    assert ct.method_options("meta_init", smoke=True)["meta_init_outer_steps"] == 2
    assert ct.method_options("meta_init_replay", smoke=True)["replay_buffer_size"] == 16
    assert "meta_init_outer_steps" not in ct.method_options("olora", smoke=True)
    assert set(ct.cl_real.METHODS).isdisjoint(NEW) and "meta_init_outer_steps" not in ct.cl_real.SMOKE_OPTIONS


# --------------------------------------------------------------------------------------------------------- plan
def test_plan_on_an_empty_folder_lists_every_method_and_seed(ct, tmp_path, capsys):
    assert ct.main(["--plan", "--results", str(tmp_path / "empty")]) == 0
    out = capsys.readouterr().out
    assert "18 run(s) to do (of 18)" in out
    for seed in (0, 1):
        for method in NEW:
            assert f"  {method} seed {seed} (missing; ~" in out
    listed = [line.split()[0] for line in out.splitlines()[1:]]
    assert listed == ct.PLAN_ORDER * 2  # seed 0 of every method first, the Reptile runs last
    assert [s for _, s in ct.wanted_runs()] == [0] * 9 + [1] * 9


# ------------------------------------------------------------------------------------------------------- report
def _record(method: str, seed: int, version: str, avg: float, bwt: float | None = 0.0, **extra) -> dict:
    """A record shaped like cl_real's (`run_one` + `save_run`) on 2 tasks."""
    joint = method == "joint"
    matrix = [[avg + 0.05, avg - 0.05]] if joint else [[avg + 0.05, None], [avg + 0.05 + bwt, avg - 0.05 - bwt]]
    return {
        "method": method,
        "seed": seed,
        "code_version": version,
        "task_names": ["A", "B"],
        "matrix": matrix,
        "metrics": {"avg_acc": avg, "bwt": None if joint else bwt, "forgetting": None if joint else -bwt},
        "wall_seconds": 600.0,
        "load_average": {"start": 1.0, "end": 2.0},
        "kind": "joint" if joint else "sequence",
        "extra": {},
        **extra,
    }


def _write(folder: Path, record: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{record['method']}_seed{record['seed']}.json").write_text(json.dumps(record))


def test_report_on_fake_records_has_the_reference_rows_the_verdicts_and_not_run_yet(ct, tmp_path):
    runs, ref, out = tmp_path / "runs", tmp_path / "cl_real", tmp_path / "out"
    _write(runs, _record("olora", 0, "v1", 0.70))
    _write(runs, _record("olora", 1, "v1", 0.72))
    _write(runs, _record("distillation", 0, "v1", 0.60, bwt=-0.1))
    _write(runs, _record("osf_replay", 0, "old", 0.99))  # stale: made by other code, not in the table
    for seed, avg in ((0, 0.644), (1, 0.670)):
        _write(ref, _record("ewc_replay", seed, "cl_real_old", avg, bwt=0.03))
        _write(ref, _record("joint", seed, "cl_real_old", avg - 0.02))
    _write(ref, _record("naive", 0, "cl_real_old", 0.55, bwt=-0.09))
    markdown = ct.build_report(runs, out, "v1", ct.SETTINGS, ref)
    assert (out / "cross_task_real.md").read_text().strip() == markdown.strip()
    lines = markdown.splitlines()

    def row(label: str) -> str:
        return next(line for line in lines if line.startswith(f"| {label} |"))

    assert "| 2/2 | 0.710 [0.700, 0.720] |" in row("olora")
    assert "| 1/2 | 0.600 | -0.100 | 0.100 |" in row("distillation")
    assert "| 0/2 (+1 stale) | n/a |" in row("osf_replay")
    ewc = row("*EWC + replay* (reference)")
    assert "cl_real's record, cl_real_, stale by cl_real's rule" in ewc and "0.657 [0.644, 0.670]" in ewc
    assert "0.637 [0.624, 0.650] | n/a |" in row("*joint* (reference)")
    assert "no record in cl_real's folder" in row("*replay* (reference)")
    verdicts = {line[2:].split(":")[0]: line for line in lines if line.startswith("- ") and ":" in line}
    assert "**helps** vs EWC + replay (avg acc 0.710" in verdicts["olora"]
    assert "highest seed 0.670" in verdicts["olora"] and "vs cl_real's naive" in verdicts["olora"]
    assert "+16.0 points" in verdicts["olora"]  # against naive's 0.550
    assert "**does not help** vs EWC + replay" in verdicts["distillation"]
    assert "(provisional: 1 of 2 seeds)" in verdicts["distillation"]
    for method in ("osf", "grad_aggregation", "meta_init", "olora_replay", "osf_replay", "meta_init_replay"):
        assert verdicts[method] == f"- {method}: not run yet"
    assert "osf_replay/seed0 (stale)" in markdown and "olora/seed0" not in markdown.split("Still to run")[1]
    summary = json.loads((out / "cross_task_real.json").read_text())
    assert summary["verdicts"]["olora"]["verdict"] == "helps"
    assert summary["verdicts"]["distillation"]["verdict"] == "does not help"
    assert summary["verdicts"]["osf"]["verdict"] == "not run yet"
    assert summary["references"]["ewc_replay"]["current"] == [False, False]
    assert len(summary["todo"]) == 15


# -------------------------------------------------------------------------------------------------- smoke runs
@pytest.fixture(scope="module")
def bench(ct, tmp_path_factory) -> Path:
    """The smoke settings' tasks (SST-2 and QQP), made-up rows."""
    assert ct.SMOKE_SETTINGS["tasks"] == ["SST-2", "QQP"]
    root = tmp_path_factory.mktemp("bench")
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(_LABELS, "QQP", ["False", "True"])  # the real QQP's label words
        for name in ct.SMOKE_SETTINGS["tasks"]:
            _write_task(root, name, 20, 20)
    return root


#: what shows in a record that the method's mechanism ran (besides its options)
def _acted(method: str, extra: dict) -> None:
    if method.startswith("olora"):
        assert extra["olora_adapters"] == {"SST-2": "olora_SST_2", "QQP": "olora_QQP"}
    elif method.startswith("distillation"):
        assert extra["distillation_teacher"] == "previous_task" and extra["distillation_snapshot_bytes"] > 0
    elif method == "grad_aggregation":
        stats = extra["grad_aggregation"]
        assert stats["aggregator"] == "upgrad" and stats["calls"] == 4 and stats["mean_objectives"] == 2.0
    elif method.startswith("meta_init"):
        decisions = extra["routing_decisions"]
        assert [d["action"] for d in decisions] == ["create", "create"]
        assert "init" not in decisions[0] and "init" in decisions[1]  # the second expert started from Reptile's phi


@pytest.mark.parametrize("method", NEW)
def test_smoke_run_end_to_end(ct, bench, tmp_path, method):
    out = tmp_path / "smoke"
    assert ct.main(["--smoke", "--method", method, "--data", str(bench), "--out", str(out)]) == 0
    record = json.loads((out / "runs" / f"{method}_seed0.json").read_text())
    assert record["method"] == method and record["task_names"] == ["SST-2", "QQP"]
    assert record["total_steps"] == 8  # 2 tasks x 16 rows in batches of 4
    assert record["options"] == ct.method_options(method, smoke=True)
    assert record["plugins"] == list(ct.METHODS[method].plugins)
    assert 0.0 <= record["metrics"]["avg_acc"] <= 1.0
    assert "benchmarks/cross_task_real.py" in record["code_files"]
    _acted(method, record["extra"])
    assert ct.cl_real.is_current(record, ct.code_version(ct.SMOKE_SETTINGS))
    assert f"| {method} |" in (out / "cross_task_real.md").read_text()
    assert set(ct.cl_real.METHODS).isdisjoint(NEW)  # cl_real's registry restored after the run


def test_smoke_never_writes_into_docs_results(ct, capsys):
    target = ct.RESULTS / "cross_task_smoke_should_not_exist"
    with pytest.raises(SystemExit):
        ct.main(["--smoke", "--out", str(target)])
    assert f"--out {target} is not allowed with --smoke" in capsys.readouterr().err
    assert not target.exists()


# ------------------------------------------------------------------------------------------------ OSF's LR probe
def test_osf_lr_probe_trains_the_first_task_at_each_rate_and_picks_the_lowest_training_loss(ct, bench, tmp_path):
    out = tmp_path / "probe"
    assert ct.main(["--smoke", "--osf-lr-probe", "--data", str(bench), "--out", str(out)]) == 0
    probe = json.loads((out / "cross_task_real_osf_lr_probe.json").read_text())
    assert [r["learning_rate"] for r in probe["rows"]] == list(ct.OSF_LR_CANDIDATES)
    assert probe["task"] == "SST-2" and probe["smoke"] is True
    assert probe["chosen"] == min(probe["rows"], key=lambda r: r["train_loss"])["learning_rate"]
    losses = [r["train_loss"] for r in probe["rows"]]
    assert len(set(losses)) == len(losses)  # the rate really reached the trainer
    assert "(chosen)" in (out / "cross_task_real_osf_lr_probe.md").read_text()
    assert set(ct.cl_real.METHODS).isdisjoint(f"osf_lr_probe_{lr:g}" for lr in ct.OSF_LR_CANDIDATES)


def test_osf_runs_at_the_committed_probes_choice(ct):
    """`OSF_LEARNING_RATE` is the committed probe's choice (or None, the recipe's, while no probe is committed)."""
    path = ct.RESULTS / "cross_task_real_osf_lr_probe.json"
    if not path.exists():
        assert ct.OSF_LEARNING_RATE is None and "learning_rate" not in ct.OSF
        return
    probe = json.loads(path.read_text())
    assert probe["smoke"] is False and ct.OSF_LEARNING_RATE == probe["chosen"]
    assert ct.METHODS["osf"].options["learning_rate"] == ct.METHODS["osf_replay"].options["learning_rate"]
