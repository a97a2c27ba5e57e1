"""The console script: `run CONFIG.yaml` with flag overrides, the demo, and a real 2-process accelerate launch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hf_adaptive.cli import main, parse_run_arguments

ROOT = Path(__file__).resolve().parents[1]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_yaml_and_flags(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(
        yaml.safe_dump(
            {"output_dir": str(tmp_path / "o"), "tasks": ["has_cat"], "ewc_lambda": 5.0, "report_to": "none"}
        )
    )
    model_args, task_args, args = parse_run_arguments([str(config), "--ewc_lambda", "7", "--n_train", "16"])
    assert model_args.model_name_or_path == "tiny-gemma"
    assert task_args.tasks == ["has_cat"] and task_args.n_train == 16
    assert args.ewc_lambda == 7.0 and args.output_dir == str(tmp_path / "o")
    _, _, args = parse_run_arguments([str(config)])
    assert args.ewc_lambda == 5.0
    config.write_text(yaml.safe_dump({"output_dir": "x", "no_such_option": 1}))
    with pytest.raises(SystemExit, match="no_such_option"):
        parse_run_arguments([str(config)])
    config.write_text(yaml.safe_dump({"output_dir": "x", "replay_alpha": 3}))
    with pytest.raises(ValueError, match="replay_alpha"):
        parse_run_arguments([str(config)])


def test_run_writes_results(tmp_path, capsys):
    config = yaml.safe_load((ROOT / "examples" / "sequence.yaml").read_text())
    config.update(
        output_dir=str(tmp_path),
        tasks=["first_color", "has_cat"],
        n_train=16,
        n_eval=8,
        save_strategy="no",
        ddp_backend=None,
    )
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["run", str(path)]) == 0
    out = capsys.readouterr().out
    assert "=== task 2/2: has_cat ===" in out and "avg_acc=" in out and "bwt=" in out
    assert json.loads((tmp_path / "results.json").read_text())["task_names"] == ["first_color", "has_cat"]


def test_unknown_plugin_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="unknown plugin name='nope'"):
        main(
            [
                "run",
                "--output_dir",
                str(tmp_path),
                "--plugins",
                "nope",
                "--report_to",
                "none",
                "--n_train",
                "8",
                "--n_eval",
                "4",
                "--tasks",
                "has_cat",
            ]
        )


def test_demo_quick_in_a_fresh_process(tmp_path):
    """The main job side by side: naive and the best method each in a resumable subfolder, one comparison plot, a
    table and a summary of both; `--resume` of the finished run trains nothing and gives the same figures."""
    from hf_adaptive.cli import DEMO_BEST, method_folder

    command = [sys.executable, "-m", "hf_adaptive.cli", "demo", "--quick", "--output-dir", str(tmp_path)]
    out = subprocess.run(command, capture_output=True, text=True, env=_env(), timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "avg_acc=" in out.stdout and "| after \\ on |" in out.stdout
    assert "| method | avg_acc | bwt |" in out.stdout and f"| {DEMO_BEST} | " in out.stdout
    for method in ("naive", DEMO_BEST):
        result = json.loads((tmp_path / method_folder(method) / "results.json").read_text())
        assert len(result["matrix"]) == 5 and (tmp_path / method_folder(method) / "accuracy_matrix.png").exists()
    comparison = json.loads((tmp_path / "comparison.json").read_text())
    assert comparison["best"] == DEMO_BEST and set(comparison["methods"]) == {"naive", DEMO_BEST}
    assert all(set(m["metrics"]) >= {"avg_acc", "bwt"} for m in comparison["methods"].values())
    assert (tmp_path / "comparison.png").stat().st_size > 10_000

    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True, env=_env(), timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "=== task" not in resumed.stdout  # both runs were finished: nothing is trained again
    again = json.loads((tmp_path / "comparison.json").read_text())
    assert {m: v["metrics"] for m, v in again["methods"].items()} == {
        m: v["metrics"] for m, v in comparison["methods"].items()
    }


def _free_port() -> str:
    """A port free now on localhost, for the launcher's rendezvous."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def test_accelerate_launch_two_processes(tmp_path):
    """A real 2-process run (torch.distributed, gloo, CPU) of a LoRA-per-task sequence."""
    config = yaml.safe_load((ROOT / "examples" / "sequence.yaml").read_text())
    config.update(output_dir=str(tmp_path / "out"), tasks=["first_color", "has_cat"], n_train=32, n_eval=16)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        _free_port(),  # not "0": accelerate < 1.7 passes port 0 to every rank as is and the ranks never meet
        "-m",
        "hf_adaptive.cli",
        "run",
        str(path),
        "--ddp_backend",
        "gloo",  # CPU processes: the README's command line
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-4000:]
    state = json.loads((tmp_path / "out" / "sequence_state.json").read_text())
    # 32 rows, batch 8 per process, 2 processes, 2 epochs -> 4 optimizer steps per task (8 with one process)
    assert state["extra"]["steps"] == [4, 4]
    assert out.stdout.count('"metrics"') == 1  # the summary is printed by the main process only
    assert len(json.loads((tmp_path / "out" / "results.json").read_text())["matrix"]) == 2


def test_run_with_plugins_from_the_registry(tmp_path, monkeypatch):
    """`--plugins ewc replay` builds both from the ContinualConfig options; their terms are logged."""
    config = tmp_path / "c.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "output_dir": str(tmp_path / "o"),
                "tasks": ["first_color", "has_cat"],
                "n_train": 16,
                "n_eval": 8,
                "plugins": ["ewc", "replay"],
                "ewc_lambda": 10.0,
                "fisher_samples": 8,
                "replay_alpha": 0.5,
                "replay_batch_size": 4,
                "report_to": "none",
                "logging_steps": 1,
                "save_strategy": "no",
                "per_device_train_batch_size": 8,
                "disable_tqdm": True,
            }
        )
    )
    trainers = _spy_on_trainers(monkeypatch)
    assert main(["run", str(config)]) == 0
    state = json.loads((tmp_path / "o" / "results.json").read_text())
    assert len(state["matrix"]) == 2
    from hf_adaptive.consolidation import EWCPlugin
    from hf_adaptive.replay import ReplayPlugin

    (trainer,) = trainers
    ewc, replay = trainer.plugins
    assert isinstance(ewc, EWCPlugin) and (ewc.ewc_lambda, ewc.fisher_samples) == (10.0, 8)
    assert isinstance(replay, ReplayPlugin) and (replay.alpha, replay.batch_size) == (0.5, 4)
    assert [e["task"] for e in ewc.entries] == ["first_color", "has_cat"] and replay.memory.counts()
    # the trainer's state covers the second task: 16 rows / batch 8 = 2 steps per epoch, one log each
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 * int(trainer.args.num_train_epochs)
    assert all(h["loss_replay"] > 0 and h["weight_replay"] == 0.5 and h["weight_ewc"] == 1.0 for h in logs)
    # the first step starts at the anchors (penalty exactly 0); once the weights move, it pulls back
    assert logs[0]["loss_ewc"] == 0.0 and all(h["loss_ewc"] > 0 for h in logs[1:])


def _spy_on_trainers(monkeypatch) -> list:
    """Every ContinualTrainer that runs a sequence inside `main`, recorded (its behaviour is unchanged)."""
    from hf_adaptive.trainer import ContinualTrainer

    trainers = []
    original = ContinualTrainer.train_sequence

    def recording(self, *args, **kwargs):
        trainers.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ContinualTrainer, "train_sequence", recording)
    return trainers


def test_registry_names_resolve():
    from hf_adaptive.config import ContinualConfig
    from hf_adaptive.models import build_tiny_gemma, gate_model
    from hf_adaptive.registry import PLUGINS, build_plugins

    args = ContinualConfig(output_dir="unused", report_to=[], early_stopping_patience=2)
    model, _ = build_tiny_gemma()
    gate_model(model, mode="fixed")
    # head_l0 trains hard-concrete gates and gate_feedback sets fixed ones: one model cannot carry both kinds,
    # so head_l0 is built on a model of its own (and refuses the model with fixed gates, below)
    names = [name for name in PLUGINS if name != "head_l0"]
    plugins = build_plugins(names, args, model=model)
    by_name = dict(zip(names, plugins))
    other, _ = build_tiny_gemma()
    (by_name["head_l0"],) = build_plugins(["head_l0"], args, model=other)
    assert by_name["gate_feedback"].controller.num_heads == 4 and by_name["gate_feedback"].controller.num_layers == 2
    assert by_name["expert_routing"].library.model is model  # the experts go on the model the trainer gets
    assert [type(by_name[name]).__name__ for name in PLUGINS] == [
        spec.plugin.split(":")[1] for spec in PLUGINS.values()
    ]
    with pytest.raises(ValueError, match="hard_concrete"):
        build_plugins(["head_l0"], args, model=model)
    with pytest.raises(ValueError, match="unique"):
        build_plugins(["ewc", "ewc"], args)
    # without the model: the gate controller cannot be sized, the experts have nothing to go on
    with pytest.raises(ValueError, match=r"FeedbackCallback: give controller=.* or model="):
        build_plugins(["gate_feedback"], args)
    with pytest.raises(ValueError, match="model=None is not allowed"):
        build_plugins(["expert_routing"], args)


def test_run_with_gated_heads_and_feedback_controller(tmp_path, monkeypatch):
    """`gate_mode: fixed` + plugin `gate_feedback`: the RL controller is built for the model's heads and reports."""
    config = tmp_path / "c.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "output_dir": str(tmp_path / "o"),
                "tasks": ["has_cat"],
                "n_train": 32,
                "n_eval": 16,
                "plugins": ["gate_feedback"],
                "gate_mode": "fixed",
                "gate_feedback_every": 2,
                "gate_eval_size": 8,
                "gate_max_active_fraction": 0.75,
                "report_to": "none",
                "logging_steps": 1,
                "save_strategy": "no",
                "per_device_train_batch_size": 8,
                "disable_tqdm": True,
            }
        )
    )
    trainers = _spy_on_trainers(monkeypatch)
    assert main(["run", str(config)]) == 0
    assert json.loads((tmp_path / "o" / "results.json").read_text())["task_names"] == ["has_cat"]
    from hf_adaptive.control import FeedbackCallback
    from hf_adaptive.models.gated import find_gates

    (trainer,) = trainers
    (feedback,) = trainer.plugins
    controller = feedback.controller
    assert isinstance(feedback, FeedbackCallback) and (controller.num_layers, controller.num_heads) == (2, 4)
    steps = trainer.state.global_step
    assert steps == 4 * int(trainer.args.num_train_epochs)  # 32 rows / batch 8 per epoch
    # one report every 2 steps, in the log history and in the controller's own log (plus its baseline at step 0)
    reports = [h for h in trainer.state.log_history if "gate_reward" in h]
    assert [r["step"] for r in reports] == list(range(2, steps + 1, 2))
    assert [e["step"] for e in controller.log] == [0, *range(2, steps + 1, 2)]
    assert [r["gate_loss"] for r in reports] == [e["loss"] for e in controller.log[1:]]
    assert all(r["gate_active_fraction"] <= 0.75 for r in reports)  # the budget of gate_max_active_fraction
    # the controller learned from its rewards, and the model runs with the gates it chose last
    assert controller.updates > 0
    assert find_gates(trainer.model).deterministic_gates().cpu().equal(controller.gates.detach().cpu().float())
    with pytest.raises(ValueError, match="gate_max_active_fraction"):
        parse_run_arguments([str(config), "--gate_min_active_fraction", "0.9", "--gate_max_active_fraction", "0.5"])


def test_recurring_task_names_get_a_suffix():
    from hf_adaptive.cli import TaskArguments, build_tasks

    tasks = build_tasks(TaskArguments(tasks=["first_color", "has_cat", "first_color"], n_train=8, n_eval=4))
    assert [t.name for t in tasks] == ["first_color", "has_cat", "first_color_2"]
    first, again = tasks[0], tasks[2]
    assert (again.template, again.description) == (first.template, first.description)
    assert again.train_dataset["text"] != first.train_dataset["text"]  # new examples of the same rule


def test_run_with_expert_routing(tmp_path, capsys):
    """`plugins: [expert_routing]` from examples/expert_routing.yaml: a recurring task reuses its expert, a new
    one does not, and the decisions reach the printed summary and results.json."""
    config = yaml.safe_load((ROOT / "examples" / "expert_routing.yaml").read_text())
    config.update(
        output_dir=str(tmp_path), n_train=16, n_eval=8, num_train_epochs=1, signature_n_examples=4,
        save_strategy="no", save_results_plot=False, evaluate_unseen_tasks=False, disable_tqdm=True,
        continual_eval_limit=8,
    )  # fmt: skip
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["run", str(path)]) == 0
    out = capsys.readouterr().out
    summary = json.loads(out[out.rindex("\n{\n") :])
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["task_names"] == ["first_color", "has_cat", "first_color_2"]
    for found in (summary, results["extra"]):
        decisions = [(d["task"], d["action"], d["expert"]) for d in found["routing_decisions"]]
        assert decisions[0] == ("first_color", "create", "expert_first_color")
        assert decisions[1][1] in ("create", "fork") and decisions[1][2] == "expert_has_cat"
        assert decisions[2] == ("first_color_2", "reuse", "expert_first_color")
        assert found["routing_decisions"][2]["success"] in (True, False)
        assert found["task_experts"] == {
            "first_color": "expert_first_color",
            "has_cat": "expert_has_cat",
            "first_color_2": "expert_first_color",
        }
    assert len(results["matrix"]) == 3


def test_expert_routing_needs_the_full_strategy(tmp_path):
    with pytest.raises(ValueError, match="ContinualConfig.adapter_strategy='shared_lora' is not allowed"):
        main(
            ["run", str(ROOT / "examples" / "expert_routing.yaml"), "--output_dir", str(tmp_path),
             "--adapter_strategy", "shared_lora", "--n_train", "8", "--n_eval", "4"]
        )  # fmt: skip


@pytest.mark.parametrize("name", ["sequence.yaml", "expert_routing.yaml"])
def test_the_example_configs_parse_in_a_single_process(name):
    from hf_adaptive.cli import parse_run_arguments

    model_args, task_args, config = parse_run_arguments([str(ROOT / "examples" / name)])
    assert model_args.model_name_or_path == "tiny-gemma" and task_args.tasks and config.output_dir
