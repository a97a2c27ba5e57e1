"""The routing plugin's created experts start from the meta-learned initialisation, through the real trainer."""

from __future__ import annotations

import json

import pytest
import torch
from peft import get_peft_model_state_dict
from transformers import TrainerCallback

from hf_adaptive.experts import ExpertRoutingPlugin
from hf_adaptive.models import build_tiny_gemma
from hf_adaptive.plugins import ContinualPlugin
from hf_adaptive.tasks import builtin_suite
from hf_adaptive.trainer import ContinualTrainer
from hf_adaptive.utils.io import StateLoadError, load_state, load_state_into, save_state


class _Probe(ContinualPlugin):
    """Records the weights of the adapter that is about to train each task (after `setup_task`, before training)."""

    name = "probe"

    def __init__(self) -> None:
        self.started: dict[str, dict[str, torch.Tensor]] = {}

    def on_task_begin(self, trainer, context):
        model = trainer.model
        active = model.active_adapter
        weights = get_peft_model_state_dict(model, adapter_name=active)
        self.started[context.task.name] = {k: v.detach().cpu().clone() for k, v in weights.items()}


class _Crash(TrainerCallback):
    """A killed run: raises once task `task_index` reaches `step`."""

    def __init__(self, task_index: int, step: int) -> None:
        self.trainer = None
        self.task_index, self.step = task_index, step

    def on_step_end(self, args, state, control, **kwargs):
        if self.trainer.current_task_index == self.task_index and state.global_step == self.step:
            raise KeyboardInterrupt("simulated kill")


def _tasks():
    return builtin_suite(["first_color", "has_cat", "last_color"], n_train=16, n_eval=8, seed=0)


def _run(make_args, tokenizer, output_dir, plugin_cls=ExpertRoutingPlugin, crash=None, resume=None, **options):
    """A routed 3-task sequence whose router creates an expert for every task (thresholds 1 on raw cosine)."""
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
        router_reuse_threshold=1.0,
        router_fork_threshold=1.0,
        router_eval_limit=8,
        signature_text_dim=None,
        signature_sketch_dim=8,
        signature_n_examples=4,
        signature_batch_size=4,
        **options,
    )
    plugin = plugin_cls.from_config(args, model=model)
    probe = _Probe()
    callbacks = [plugin, probe] + ([crash] if crash else [])
    trainer = ContinualTrainer(model=model, args=args, processing_class=tokenizer, callbacks=callbacks)
    if crash is not None:
        crash.trainer = trainer
    result = trainer.train_sequence(_tasks(), resume_from_checkpoint=resume, evaluate_baseline=False)
    return plugin, probe, result


REPTILE = {
    "meta_init_method": "reptile",
    "meta_init_inner_steps": 2,
    "meta_init_inner_lr": 0.1,
    "meta_init_outer_steps": 2,
    "meta_init_support_batch_size": 4,
    "meta_init_rows_per_task": 8,
}


def test_created_experts_start_from_phi_and_the_state_resumes(make_args, tokenizer, tmp_path):
    """Reptile: the first expert is fresh (nothing learned yet), the second and third start from phi, meta-learned
    over the tasks before them; killed inside the third task and resumed, the run ends as the uninterrupted one."""
    plugin, probe, result = _run(make_args, tokenizer, tmp_path / "ref", **REPTILE)
    assert [d["action"] for d in plugin.decisions] == ["create"] * 3
    assert "init" not in plugin.decisions[0]
    assert plugin.decisions[1]["init"] == {"method": "reptile", "tasks": ["first_color"], "outer_steps": 2, "round": 1}
    assert plugin.decisions[2]["init"]["tasks"] == ["first_color", "has_cat"]
    assert plugin.meta_init.rounds == 2 and list(plugin.meta_init.rows) == ["first_color", "has_cat", "last_color"]
    assert all(len(c["input_ids"]) == 8 for c in plugin.meta_init.rows.values())
    # the third expert started exactly at phi (both factors: B is not zero), and phi differs from a fresh LoRA
    started = probe.started["last_color"]
    assert set(started) == set(plugin.meta_init.phi)
    assert all(torch.equal(started[k], plugin.meta_init.phi[k]) for k in started)
    assert all(bool(started[k].abs().sum() > 0) for k in started if "lora_B" in k)
    assert all(float(v.abs().max()) == 0 for k, v in probe.started["first_color"].items() if "lora_B" in k)
    # the routing decisions, with what the initialisation did, reach results.json
    saved = json.loads((tmp_path / "ref" / "results.json").read_text())
    assert saved["extra"]["routing_decisions"][2]["init"]["tasks"] == ["first_color", "has_cat"]

    # killed at the first step of the third task, resumed with a fresh model and plugin: the same phi and experts
    with pytest.raises(KeyboardInterrupt):
        _run(make_args, tokenizer, tmp_path / "run", crash=_Crash(task_index=2, step=1), **REPTILE)
    resumed, resumed_probe, again = _run(make_args, tokenizer, tmp_path / "run", resume=True, **REPTILE)
    assert resumed.decisions == plugin.decisions
    assert resumed.meta_init.rows == plugin.meta_init.rows and resumed.meta_init.rounds == 2
    for k, v in plugin.meta_init.phi.items():
        torch.testing.assert_close(resumed.meta_init.phi[k], v)
    ref_state, state = plugin.state_dict(), resumed.state_dict()
    for name in plugin.library.names:
        for key, value in ref_state["adapters"][name]["weights"].items():
            torch.testing.assert_close(state["adapters"][name]["weights"][key], value)
    torch.testing.assert_close(torch.tensor(again.matrix), torch.tensor(result.matrix), equal_nan=True)


def test_the_plugin_state_round_trips_and_is_checked_at_load(make_args, tokenizer, tmp_path):
    fomaml = {**REPTILE, "meta_init_method": "fomaml", "meta_init_query_batch_size": 4}
    plugin, _, _ = _run(make_args, tokenizer, tmp_path / "o", **fomaml)
    save_state(tmp_path / "state", plugin.state_dict())
    fresh, _ = build_tiny_gemma(tokenizer, seed=0)
    args = make_args(tmp_path, signature_text_dim=None, signature_sketch_dim=8, router_normalize="none")
    restored = ExpertRoutingPlugin.from_config(args, model=fresh)
    load_state_into(restored, tmp_path / "state")
    assert restored.meta_init.rows == plugin.meta_init.rows and restored.meta_init.rounds == 2
    assert all(torch.equal(restored.meta_init.phi[k], v) for k, v in plugin.meta_init.phi.items())

    # a phi of another LoRA shape matches no expert of the library: refused at load, naming the folder and phi
    state = load_state(tmp_path / "state")
    state["meta_init"]["phi"] = {k: torch.zeros(v.shape[0] + 1, *v.shape[1:]) for k, v in plugin.meta_init.phi.items()}
    save_state(tmp_path / "bad", state)
    again = ExpertRoutingPlugin.from_config(args, model=build_tiny_gemma(tokenizer, seed=0)[0])
    with pytest.raises(StateLoadError, match=r"bad/state.json .* MetaInitializer.phi .* matches the weights of no"):
        load_state_into(again, tmp_path / "bad")
    state = load_state(tmp_path / "state")
    state["meta_init"]["rows"]["first_color"]["labels"] = [[1]]
    save_state(tmp_path / "bad_rows", state)
    with pytest.raises(StateLoadError, match=r"MetaInitializer.rows\['first_color'\]\['labels'\] is not allowed"):
        load_state_into(again, tmp_path / "bad_rows")


class _Before(ExpertRoutingPlugin):
    """The plugin as it was before the meta-learned initialisation: no hook at creation, no rows kept."""

    def _meta_initialise(self, trainer, context, expert):
        return None

    def on_task_end(self, trainer, context):
        remember, self.meta_init.remember = self.meta_init.remember, lambda *a, **k: None
        try:
            super().on_task_end(trainer, context)
        finally:
            self.meta_init.remember = remember


def test_fresh_is_bitwise_the_behaviour_of_before(make_args, tokenizer, tmp_path):
    """'fresh' (the default): the same experts, weights, decisions, results and saved state, bit for bit, as the
    plugin without the meta-learning hooks."""
    plugin, probe, result = _run(make_args, tokenizer, tmp_path / "fresh")
    before, before_probe, reference = _run(make_args, tokenizer, tmp_path / "before", plugin_cls=_Before)
    assert plugin.meta_init.config.method == "fresh" and plugin.meta_init.rows == {} and plugin.meta_init.phi is None
    assert plugin.decisions == before.decisions and all("init" not in d for d in plugin.decisions)
    torch.testing.assert_close(
        torch.tensor(result.matrix), torch.tensor(reference.matrix), atol=0, rtol=0, equal_nan=True
    )
    state, ref_state = plugin.state_dict(), before.state_dict()
    assert set(state) == set(ref_state) and "meta_init" not in state
    for name in before.library.names:
        for key, value in ref_state["adapters"][name]["weights"].items():
            assert torch.equal(state["adapters"][name]["weights"][key], value), (name, key)
    for task, weights in before_probe.started.items():
        assert all(torch.equal(probe.started[task][k], v) for k, v in weights.items())
