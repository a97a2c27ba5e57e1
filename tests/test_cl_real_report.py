"""benchmarks/cl_real.py's pure parts: the code version, stale detection, the run plan and the report, on fake
result files (no model, no data)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from benchmark_loader import load_benchmark


@pytest.fixture(scope="module")
def cl_real():
    yield from load_benchmark("cl_real")


def _package(tmp_path: Path) -> tuple[Path, Path]:
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "a.py").write_text("x = 1\n")
    (package / "sub" / "b.py").write_text("y = 2\n")
    script = tmp_path / "script.py"
    script.write_text("# the benchmark\n")
    return package, script


def test_code_version_follows_sources_script_and_settings(cl_real, tmp_path):
    package, script = _package(tmp_path)
    settings = {"tasks": ["A", "B"], "n_train": 8}
    version = cl_real.code_version(settings, package, [script])
    assert len(version) == 16
    assert cl_real.code_version(dict(settings), package, [script]) == version  # deterministic
    (package / "__pycache__").mkdir()
    (package / "__pycache__" / "a.cpython-311.py").write_text("junk")
    (package / "notes.txt").write_text("not a source file")
    assert cl_real.code_version(settings, package, [script]) == version  # caches and other files do not count
    changes = []
    (package / "sub" / "b.py").write_text("y = 3\n")  # an uncommitted edit of the package
    changes.append(cl_real.code_version(settings, package, [script]))
    script.write_text("# the benchmark, edited\n")
    changes.append(cl_real.code_version(settings, package, [script]))
    changes.append(cl_real.code_version({**settings, "n_train": 16}, package, [script]))
    (package / "c.py").write_text("")  # a new file
    changes.append(cl_real.code_version({**settings, "n_train": 16}, package, [script]))
    assert len({version, *changes}) == 5


def _record(cl_real, method, seed, version, avg, bwt=None, forgetting=None, tasks=("A", "B"), **extra):
    kind = cl_real.METHODS[method].kind
    if kind == "sequence":
        matrix = [[avg + 0.1, None], [avg + 0.1 + (bwt or 0.0), avg - 0.1 - (bwt or 0.0)]]
    else:
        matrix = [[avg, avg]]
    return {
        "method": method,
        "seed": seed,
        "kind": kind,
        "code_version": version,
        "task_names": list(tasks),
        "matrix": matrix,
        "metrics": {"avg_acc": avg, "bwt": bwt, "forgetting": forgetting, "fwt": None},
        "wall_seconds": 600.0,
        "options": dict(cl_real.METHODS[method].options),
        "extra": extra,
    }


def _write(folder: Path, record: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{record['method']}_seed{record['seed']}.json").write_text(json.dumps(record))


def test_status_and_plan_order(cl_real, tmp_path):
    runs_dir = tmp_path / "runs"
    assert cl_real.plan({}, "v1")[0] == (("naive", 0), "missing")
    # before any result: seed 0 of every method in PLAN_ORDER, then the second seeds of naive, joint, the default best
    keys = [key for key, _ in cl_real.plan({}, "v1")]
    assert keys[: len(cl_real.PLAN_ORDER)] == [(m, 0) for m in cl_real.PLAN_ORDER]
    assert keys[len(cl_real.PLAN_ORDER) :] == [("naive", 1), ("joint", 1), (cl_real.DEFAULT_BEST, 1)]
    assert set(keys) >= {(m, 0) for m in cl_real.METHODS}

    _write(runs_dir, _record(cl_real, "naive", 0, "v1", 0.6, bwt=-0.2, forgetting=0.2))
    _write(runs_dir, _record(cl_real, "replay", 0, "v0", 0.7, bwt=-0.05, forgetting=0.05))  # older code
    _write(runs_dir, _record(cl_real, "lora_per_task", 0, "v1", 0.8, bwt=0.0, forgetting=0.0))
    (runs_dir / "broken_seed0.json").write_text("{not json")  # skipped, not fatal
    runs = cl_real.load_results(runs_dir)
    assert set(runs) == {("naive", 0), ("replay", 0), ("lora_per_task", 0)}
    assert cl_real.run_status(runs, ("naive", 0), "v1") == "current"
    assert cl_real.run_status(runs, ("replay", 0), "v1") == "stale"
    assert cl_real.run_status(runs, ("ewc", 0), "v1") == "missing"
    todo = dict(cl_real.plan(runs, "v1"))
    assert ("naive", 0) not in todo and ("lora_per_task", 0) not in todo
    assert todo[("replay", 0)] == "stale"
    # the best current sequential method gets the second seed (a stale result does not count, nor the bounds)
    assert cl_real.best_method(runs, "v1") == "lora_per_task"
    assert ("lora_per_task", 1) in todo and (cl_real.DEFAULT_BEST, 1) not in todo
    _write(runs_dir, _record(cl_real, "joint", 0, "v1", 0.95))
    assert cl_real.best_method(cl_real.load_results(runs_dir), "v1") == "lora_per_task"
    assert cl_real.best_method(cl_real.load_results(runs_dir), "v0") == "replay"


def test_report_from_fake_results(cl_real, tmp_path):
    runs_dir, out = tmp_path / "runs", tmp_path / "out"
    _write(runs_dir, _record(cl_real, "naive", 0, "v1", 0.6, bwt=-0.2, forgetting=0.2))
    _write(runs_dir, _record(cl_real, "naive", 1, "v0", 0.7, bwt=-0.1, forgetting=0.1))
    _write(runs_dir, _record(cl_real, "zero_shot", 0, "v1", 0.5))
    routed = {"task_experts": {"A": "expert_A", "B": "expert_A"}}
    _write(runs_dir, _record(cl_real, "expert_routing", 0, "v1", 0.75, bwt=0.0, forgetting=0.0, **routed))
    _write(runs_dir, _record(cl_real, "lora_per_task", 0, "v1", 0.76, bwt=0.0, forgetting=0.0))
    settings = {**cl_real.SETTINGS, "tasks": ["A", "B"]}
    markdown = cl_real.build_report(runs_dir, out, "v1", settings, name="report")
    assert (out / "report.md").read_text().strip() == markdown.strip()
    assert (out / "report_matrices.png").stat().st_size > 0
    summary = json.loads((out / "report.json").read_text())
    assert summary["code_version"] == "v1" and "environment" in summary
    table = markdown.split("Final accuracy per task")[0]
    lines = {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines() if line.startswith("| ")}
    # naive: two seeds, mean [min, max]; one of them from older code, so the row is marked stale
    assert "| naive | 0, 1 | 0.650 [0.600, 0.700] | -0.150 [-0.200, -0.100] |" in lines["naive"]
    assert "v0, v1 (stale)" in lines["naive"]
    assert "(stale)" not in lines["zero_shot"] and "| 0.500 | n/a | n/a | 0 |" in lines["zero_shot"]
    # adapters: routing kept one expert for two tasks, one LoRA per task kept two
    assert "| 1 |" in lines["expert_routing"] and "| 2 |" in lines["lora_per_task"]
    assert "min-max" in markdown or "[min, max]" in markdown
    assert "naive/seed1 (stale)" in markdown and "joint/seed0 (missing)" in markdown
    # methods without results are absent from the table; the table follows METHODS' order
    assert "ewc" not in lines
    order = [m for m in lines if m in cl_real.METHODS]
    assert order == [m for m in cl_real.METHODS if m in order]


def test_report_with_no_results(cl_real, tmp_path):
    markdown = cl_real.build_report(tmp_path / "none", tmp_path / "out", "v1", name="empty")
    assert "naive/seed0 (missing)" in markdown
    assert not (tmp_path / "out" / "empty_matrices.png").exists()


def test_spread(cl_real):
    assert cl_real.spread([]) == "n/a"
    assert cl_real.spread([None, float("nan")]) == "n/a"
    assert cl_real.spread([0.5]) == "0.500"
    assert cl_real.spread([0.5, 0.7, None]) == "0.600 [0.500, 0.700]"


def _loaded(*paths: Path) -> dict:
    modules = {}
    for path in paths:
        module = type(sys)(f"fake_{path.stem}")
        module.__file__ = str(path)
        modules[module.__name__] = module
    modules["elsewhere"] = type(sys)("elsewhere")  # no __file__ (builtins): ignored
    return modules


def test_manifest_holds_what_the_run_loaded_and_decides_staleness_file_by_file(cl_real, tmp_path):
    package, script = _package(tmp_path)
    (package / "card.md").write_text("template\n")
    outside = tmp_path / "other.py"
    outside.write_text("z = 0\n")
    settings = {"tasks": ["A"], "n_train": 8}
    version = cl_real.CodeVersion(settings, package, [script])
    loaded = _loaded(package / "a.py", outside)
    manifest = cl_real.source_manifest(package, [script], loaded)
    # the loaded module of the package, its data file and the script; not the unloaded sub/b.py nor other.py
    assert set(manifest) == {"pkg/a.py", "pkg/card.md", "script.py"}
    assert manifest["pkg/a.py"] == cl_real._file_digest(package / "a.py")
    record = version.stamp(loaded)
    assert record["code_files"] == manifest
    assert record["code_version"] == cl_real.manifest_version(manifest, settings)
    assert version.matches(record) and cl_real.is_current(record, version)

    (package / "sub" / "b.py").write_text("y = 3\n")  # a module the run never loaded: still current
    (package / "new.py").write_text("")
    assert version.matches(record)
    (package / "a.py").write_text("x = 2\n")  # a loaded module changed: stale
    assert not version.matches(record)
    (package / "a.py").write_text("x = 1\n")  # back as it was: current again
    assert version.matches(record)
    for edit in (lambda: (package / "card.md").write_text("edited\n"), lambda: script.write_text("# edited\n")):
        edit()
        assert not version.matches(record)
    (package / "card.md").write_text("template\n")
    script.write_text("# the benchmark\n")
    assert version.matches(record)
    assert not cl_real.CodeVersion({**settings, "n_train": 16}, package, [script]).matches(record)
    (package / "a.py").unlink()  # a loaded module removed: stale
    assert not version.matches(record)


def test_records_without_a_manifest_fall_back_to_the_whole_package(cl_real, tmp_path):
    package, script = _package(tmp_path)
    settings = {"tasks": ["A"]}
    version = cl_real.CodeVersion(settings, package, [script])
    legacy = {"code_version": cl_real.code_version(settings, package, [script])}
    assert str(version) == legacy["code_version"] and f"{version:.4}" == legacy["code_version"][:4]
    assert version.matches(legacy)
    (package / "sub" / "b.py").write_text("y = 3\n")  # any edit of the package
    assert not cl_real.CodeVersion(settings, package, [script]).matches(legacy)


def test_a_saved_run_carries_its_manifest_and_plans_follow_it(cl_real, tmp_path):
    package, script = _package(tmp_path)
    settings = {"tasks": ["A", "B"]}
    version = cl_real.CodeVersion(settings, package, [script])
    runs_dir = tmp_path / "runs"
    record = _record(cl_real, "naive", 0, "unused", 0.6, bwt=-0.2, forgetting=0.2)
    path = cl_real.save_run(runs_dir, record, version)
    stored = json.loads(path.read_text())
    assert stored["code_files"] and stored["code_version"] == version.now(stored)
    runs = cl_real.load_results(runs_dir)
    assert cl_real.run_status(runs, ("naive", 0), version) == "current"
    assert ("naive", 0) not in dict(cl_real.plan(runs, version))
    script.write_text("# edited\n")
    version = cl_real.CodeVersion(settings, package, [script])
    assert cl_real.run_status(runs, ("naive", 0), version) == "stale"
    assert dict(cl_real.plan(runs, version))[("naive", 0)] == "stale"
