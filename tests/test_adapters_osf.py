"""`adapter_strategy='osf'`: peft's orthogonal subspace fine-tuning over a task sequence.

Checked against slow references: the frozen subspace is the top singular directions of the merged weights
(a float64 SVD), the update of a later task is orthogonal to it on both sides, the decomposition after a task
changes nothing the model computes, and a killed sequence resumes to the very weights of the uninterrupted one.
"""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch

from hf_adaptive.adapters import (
    OSF_ADAPTER,
    OSF_OPTIONS,
    OSF_STATE_DIR,
    OSFStrategyConfig,
    adapter_for_task,
    is_osf_model,
    load_osf_state,
    osf_layers,
    prepare_osf,
    prepare_task_parameters,
    project_osf_updates,
    require_osf,
    save_osf_state,
    start_osf_task,
    wrap_osf,
)
from hf_adaptive.config import ContinualConfig
from hf_adaptive.trainer import ContinualTrainer
from hf_adaptive.utils.io import StateLoadError, load_state, save_state
from hf_adaptive.utils.options import build_config


def _has_osf() -> bool:
    try:
        require_osf()
    except ImportError:
        return False
    return True


#: the tests that build OSF models; the options and the error naming the peft release run with any peft
needs_osf = pytest.mark.skipif(not _has_osf(), reason="peft's OSF (peft >= 0.21) is not installed")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _effective(model) -> dict[str, torch.Tensor]:
    """W + (U_low S_low V_low - their initial value) of every OSF layer: the weight the model computes with (with
    `project_updates`, the factors projected as the next forward projects them)."""
    if model.osf_options.project_updates:
        for _, layer in osf_layers(model):
            project_osf_updates(layer)
    return {
        name: (layer.get_base_layer().weight + layer.get_delta_weight(OSF_ADAPTER)).detach().clone()
        for name, layer in osf_layers(model)
    }


def _train(model, steps: int, optimizer: str = "adamw", seed: int = 0) -> None:
    """A few optimizer steps on random token batches (only the OSF factors are trainable); SGD with a large rate:
    the gradients of the tiny model are small, and an update far above float32 rounding is what is measured."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2) if optimizer == "adamw" else torch.optim.SGD(params, lr=5.0)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        ids = torch.randint(3, 80, (4, 10), generator=gen)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()


def _top_directions(weight: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The slow reference of the frozen subspace: the top-k singular vectors of `weight` (float64 SVD)."""
    u, _, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    return u[:, :k], vh[:k]


def _leak(update: torch.Tensor, u_high: torch.Tensor, v_high: torch.Tensor) -> float:
    """How much of `update` lies in the frozen directions (either side), relative to its size."""
    update = update.double()
    inside = (u_high.T @ update).norm() + (update @ v_high.T).norm()
    return float(inside / update.norm())


# ------------------------------------------------------------------------------------------------------ options
def test_options_are_validated_naming_the_field():
    with pytest.raises(ValueError, match=r"OSFStrategyConfig\.effective_rank=0 is not allowed: must be > 0"):
        OSFStrategyConfig(effective_rank=0)
    with pytest.raises(ValueError, match=r"OSFStrategyConfig\.effective_rank=1\.0 is not allowed: must be > 0 and < 1"):
        OSFStrategyConfig(effective_rank=1.0)
    with pytest.raises(ValueError, match=r"OSFStrategyConfig\.rank_step=-0\.1 is not allowed: must be >= 0"):
        OSFStrategyConfig(rank_step=-0.1)
    with pytest.raises(ValueError, match=r"OSFStrategyConfig\.max_effective_rank=nan is not allowed"):
        OSFStrategyConfig(max_effective_rank=float("nan"))
    with pytest.raises(ValueError, match=r"OSFStrategyConfig\.project_updates='yes' is not allowed: must be True"):
        OSFStrategyConfig(project_updates="yes")
    with pytest.raises(
        ValueError,
        match=r"OSFStrategyConfig\.effective_rank=0\.8 is not allowed: must be <= "
        r"OSFStrategyConfig\.max_effective_rank=0\.6",
    ):
        OSFStrategyConfig(effective_rank=0.8, max_effective_rank=0.6)
    # set as options of a run: named as the run's options
    args = types.SimpleNamespace(osf_effective_rank=0.3, osf_max_effective_rank=0.2)
    with pytest.raises(
        ValueError,
        match=r"ContinualConfig\.osf_effective_rank=0\.3 is not allowed: must be <= "
        r"ContinualConfig\.osf_max_effective_rank=0\.2",
    ):
        build_config(OSF_OPTIONS[0], args, owner="ContinualConfig")
    assert OSF_OPTIONS[0].names() == {
        "effective_rank": "osf_effective_rank",
        "rank_step": "osf_rank_step",
        "max_effective_rank": "osf_max_effective_rank",
        "project_updates": "osf_project_updates",
    }


def test_the_schedule_grows_and_is_capped():
    config = OSFStrategyConfig(effective_rank=0.5, rank_step=0.15, max_effective_rank=0.8)
    assert [config.fraction(i) for i in range(4)] == [0.5, 0.65, pytest.approx(0.8), 0.8]


def test_adapter_strategy_osf_is_a_choice():
    assert ContinualConfig(output_dir="unused", report_to=[], adapter_strategy="osf").adapter_strategy == "osf"
    assert adapter_for_task("osf", "any task") == OSF_ADAPTER


@needs_osf
def test_a_fraction_that_freezes_nothing_is_refused(tiny_model):
    args = types.SimpleNamespace(osf_effective_rank=0.01, lora_target_modules=TARGETS)  # 64 x 0.01 < 1
    with pytest.raises(
        ValueError, match=r"SimpleNamespace\.osf_effective_rank=0\.01 is not allowed: freezes no direction of .*q_proj"
    ):
        prepare_osf(tiny_model, "a", args)


@needs_osf
def test_a_model_with_other_adapters_is_refused(tiny_model):
    from peft import get_peft_model

    from hf_adaptive.adapters import lora_config

    lora = get_peft_model(tiny_model, lora_config())
    with pytest.raises(ValueError, match=r"SimpleNamespace\.adapter_strategy='osf' is not allowed: the model already"):
        prepare_osf(lora, "a", types.SimpleNamespace(lora_target_modules=TARGETS))


@needs_osf
def test_changed_options_mid_sequence_are_refused(tiny_model):
    model = prepare_osf(tiny_model, "a", types.SimpleNamespace(lora_target_modules=TARGETS))
    with pytest.raises(ValueError, match=r"SimpleNamespace\.osf_rank_step=0\.2 is not allowed: the osf sequence"):
        prepare_osf(model, "b", types.SimpleNamespace(lora_target_modules=TARGETS, osf_rank_step=0.2))


def test_a_missing_or_old_peft_osf_names_the_peft_version(monkeypatch):
    import peft

    monkeypatch.setattr(peft, "__version__", "0.15.0")
    with pytest.raises(ImportError, match=r"adapter_strategy='osf' needs peft>=0\.21 .*installed peft is 0\.15\.0"):
        require_osf()
    monkeypatch.setattr(peft, "__version__", "0.21.2")
    monkeypatch.setitem(sys.modules, "peft.tuners.osf.layer", None)  # `import` of it raises ImportError
    with pytest.raises(ImportError, match=r"needs peft>=0\.21"):
        require_osf()
    assert not is_osf_model(torch.nn.Linear(2, 2))


# ------------------------------------------------------------------------------------- the protected subspace
@needs_osf
def test_wrapping_freezes_the_top_directions_and_changes_nothing(tiny_model):
    before = {n: m.weight.detach().clone() for n, m in tiny_model.named_modules() if n.endswith(tuple(TARGETS))}
    ids = torch.randint(3, 80, (2, 7), generator=torch.Generator().manual_seed(1))
    logits = tiny_model(input_ids=ids).logits.detach()
    model = wrap_osf(tiny_model, "a", OSFStrategyConfig(effective_rank=0.25), TARGETS)
    assert is_osf_model(model) and model.osf_tasks == ["a"] and model.osf_task == "a"
    torch.testing.assert_close(model(input_ids=ids).logits, logits, rtol=0, atol=1e-5)
    layers = dict(osf_layers(model))
    assert len(layers) == 8  # 2 layers x 4 projections
    for name, layer in layers.items():
        weight = before[name.removeprefix("base_model.model.")]
        k = int(min(weight.shape) * 0.25)
        assert layer.effective_rank[OSF_ADAPTER] == k
        u_high, v_high = _top_directions(weight, k)
        u_low = layer.osf_svd_params[OSF_ADAPTER]["U_low"].double()
        v_low = layer.osf_svd_params[OSF_ADAPTER]["V_low"].double()
        # the trainable factors start orthogonal to the frozen top-k directions (float32 SVD vs float64)
        assert (
            float((u_high.T @ u_low.detach()).abs().max()) < 1e-4
            and float((v_low.detach() @ v_high.T).abs().max()) < 1e-4
        )


@needs_osf
@pytest.mark.parametrize(
    ("project_updates", "optimizer", "leaks"),
    [(True, "adamw", False), (False, "sgd", False), (False, "adamw", True)],
)
def test_the_next_task_does_not_move_the_protected_directions(tiny_model, project_updates, optimizer, leaks):
    """After a task, its merged weights are decomposed again with more frozen; training the next task leaves the
    frozen directions of those weights untouched. peft projects the gradients, exact for SGD; Adam rescales them
    per entry and leaks, which `project_updates` (the default) removes."""
    options = OSFStrategyConfig(effective_rank=0.25, rank_step=0.25, project_updates=project_updates)
    model = wrap_osf(tiny_model, "a", options, TARGETS)
    _train(model, 4, optimizer, seed=0)
    after_a = _effective(model)
    start_osf_task(model, "b")
    assert model.osf_tasks == ["a", "b"]
    # going on to the next task changes no weight the model computes with: the update is merged, then decomposed
    for name, weight in _effective(model).items():
        torch.testing.assert_close(weight, after_a[name], rtol=0, atol=2e-5)
        layer = dict(osf_layers(model))[name]
        torch.testing.assert_close(layer.get_base_layer().weight, after_a[name], rtol=0, atol=2e-5)
        assert layer.effective_rank[OSF_ADAPTER] == int(min(weight.shape) * 0.5)
    _train(model, 6, optimizer, seed=1)
    leaks_seen = []
    for name, weight in _effective(model).items():
        k = int(min(weight.shape) * 0.5)
        u_high, v_high = _top_directions(after_a[name], k)  # the reference: top-k of the weights after task a
        update = weight - after_a[name]
        assert float(update.norm()) > 1e-4  # the next task did train these weights
        leaks_seen.append(_leak(update, u_high, v_high))
    if leaks:
        assert min(leaks_seen) > 1e-2, leaks_seen
    else:
        assert max(leaks_seen) < 1e-3, leaks_seen


@needs_osf
def test_the_projection_runs_only_after_a_step(tiny_model):
    model = wrap_osf(tiny_model, "a", OSFStrategyConfig(), TARGETS)
    layer = osf_layers(model)[0][1]
    u = layer.osf_svd_params[OSF_ADAPTER]["U_low"]
    version = u._version
    ids = torch.randint(3, 80, (2, 7))
    model(input_ids=ids)
    model(input_ids=ids)
    assert u._version == version  # forwards without a step between them: nothing to project
    _train(model, 1)
    version = u._version
    model(input_ids=ids)
    assert u._version == version + 1  # projected once after the step
    model(input_ids=ids)
    assert u._version == version + 1


# ------------------------------------------------------------------------------------------------ the state
@needs_osf
def test_the_state_round_trips_and_is_checked(tiny_model, tokenizer, tmp_path):
    from hf_adaptive.models import build_tiny_gemma

    model = wrap_osf(tiny_model, "a", OSFStrategyConfig(rank_step=0.2), TARGETS)
    _train(model, 2)
    start_osf_task(model, "b")
    _train(model, 2, seed=1)
    model.save_pretrained(str(tmp_path / "saved"))
    assert (tmp_path / "saved" / OSF_STATE_DIR / "state.json").is_file()
    reference = _effective(model)

    def fresh(task: str = "b"):
        """A fresh backbone set up for `task` with the same options (what a resumed run builds)."""
        backbone, _ = build_tiny_gemma(tokenizer, seed=0)
        return wrap_osf(backbone, task, OSFStrategyConfig(rank_step=0.2), TARGETS)

    loaded = fresh()
    loaded.load_adapter(str(tmp_path / "saved"), OSF_ADAPTER, is_trainable=True)
    assert loaded.osf_tasks == ["a", "b"]
    for name, weight in _effective(loaded).items():
        assert torch.equal(weight, reference[name])
    # set up for the next task: loading the snapshot of "b" goes on to "c" (merged, decomposed again)
    onward = fresh("c")
    onward.load_adapter(str(tmp_path / "saved"), OSF_ADAPTER, is_trainable=True)
    assert onward.osf_tasks == ["a", "b", "c"]
    for name, weight in _effective(onward).items():
        torch.testing.assert_close(weight, reference[name], rtol=0, atol=2e-5)

    with pytest.raises(StateLoadError, match=r"started with osf_rank_step=0\.2 and this run has 0\.3"):
        load_osf_state(_with_options(fresh(), rank_step=0.3), tmp_path / "saved" / OSF_STATE_DIR)
    with pytest.raises(StateLoadError, match=r"after 'a', the task this model is set up for"):
        load_osf_state(fresh("a"), tmp_path / "saved" / OSF_STATE_DIR)
    with pytest.raises(ValueError, match=r"holds no osf_sequence/ folder"):
        fresh().load_adapter(str(tmp_path), OSF_ADAPTER)

    state = load_state(tmp_path / "saved" / OSF_STATE_DIR)
    name = next(iter(state["layers"]))
    for change, message in (
        (lambda s: s["layers"][name].update(weight=s["layers"][name]["weight"][:3]), r"weight\.shape=\(3, "),
        (lambda s: s["layers"][name].update(rank=1), r"rank=1 is not the frozen rank"),
        (lambda s: s["layers"].pop(name), r"OSF layers do not match this model's \(missing \["),
        (lambda s: s.update(target_modules=["q_proj"]), r"target modules \['q_proj'\] differ"),
        (lambda s: s.update(tasks=[]), r"tasks=\[\] is not a non-empty list"),
        (lambda s: s.pop("options"), r"missing or malformed entry \(KeyError: 'options'\)"),
    ):
        broken = load_state(tmp_path / "saved" / OSF_STATE_DIR)
        change(broken)
        save_state(tmp_path / "broken", broken)
        target = fresh()
        weights = {n: layer.get_base_layer().weight.detach().clone() for n, layer in osf_layers(target)}
        with pytest.raises(StateLoadError, match=message) as err:
            load_osf_state(target, tmp_path / "broken")
        assert str(tmp_path / "broken" / "state.json") in str(err.value)
        # refused before anything changed
        assert all(torch.equal(layer.get_base_layer().weight, weights[n]) for n, layer in osf_layers(target))
    state["layers"][name]["weight"][0, 0] = float("nan")
    save_state(tmp_path / "nan", state)
    with pytest.raises(StateLoadError, match=r"non-finite values"):
        load_osf_state(fresh(), tmp_path / "nan")


def _with_options(model, **options):
    """`model` as if set up with other options (what a resumed run with changed `osf_*` options has)."""
    import dataclasses

    model.osf_options = dataclasses.replace(model.osf_options, **options)
    return model


@needs_osf
def test_save_osf_state_writes_safetensors_and_json(tiny_model, tmp_path):
    model = wrap_osf(tiny_model, "a", OSFStrategyConfig(), TARGETS)
    save_osf_state(model, tmp_path / "s")
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["state.json", "tensors.safetensors"]
    meta = json.loads((tmp_path / "s" / "state.json").read_text())
    assert meta["tasks"] == ["a"] and meta["target_modules"] == sorted(TARGETS)
    assert meta["options"] == {
        "effective_rank": 0.5,
        "rank_step": 0.1,
        "max_effective_rank": 0.9,
        "project_updates": True,
    }


# --------------------------------------------------------------------------------------------- in a sequence
def _sequence(tokenizer, tasks, out, make_args, crash=None, resume=None):
    from transformers import TrainerCallback

    from hf_adaptive.models import build_tiny_gemma

    class Crash(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if crash and trainer.current_task_index == crash[0] and state.global_step == crash[1]:
                raise KeyboardInterrupt("simulated kill")

    model, _ = build_tiny_gemma(tokenizer, seed=0)
    args = make_args(
        out, adapter_strategy="osf", learning_rate=5e-3, save_strategy="steps", save_steps=2, save_results_plot=False
    )
    trainer = ContinualTrainer(model=model, args=args, processing_class=tokenizer, callbacks=[Crash()])
    return trainer, trainer.train_sequence(tasks, resume_from_checkpoint=resume, evaluate_baseline=False)


@pytest.fixture(scope="module")
def two_tasks():
    from hf_adaptive.tasks import builtin_suite

    return builtin_suite(["first_color", "has_cat"], n_train=24, n_eval=8, seed=0)


@needs_osf
def test_a_sequence_runs_evaluates_both_tasks_and_resumes(tokenizer, two_tasks, make_args, tmp_path):
    trainer, reference = _sequence(tokenizer, two_tasks, tmp_path / "ref", make_args)
    model = trainer.model
    assert is_osf_model(model) and model.osf_tasks == ["first_color", "has_cat"]
    assert len(reference.matrix) == 2 and all(
        len(row) == 2 and all(0 <= v <= 1 for v in row) for row in reference.matrix
    )
    # only the OSF factors trained, and the second task was trained on the decomposition after the first
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".osf_svd_params." in n for n in trainable)
    assert model.peft_config[OSF_ADAPTER].effective_rank == pytest.approx(0.6)
    (snapshot,) = (tmp_path / "ref").glob("snapshot-after-task-*")
    assert (snapshot / OSF_STATE_DIR / "tensors.safetensors").is_file()
    final = _effective(model)

    # killed in the second task, after a checkpoint of it (snapshot of task 1 + checkpoint) and before one
    # (snapshot only: the resumed run merges the first task and decomposes again itself)
    for step in (3, 1):
        out = tmp_path / f"run{step}"
        with pytest.raises(KeyboardInterrupt):
            _sequence(tokenizer, two_tasks, out, make_args, crash=(1, step))
        resumed, result = _sequence(tokenizer, two_tasks, out, make_args, resume=True)
        assert resumed.model.osf_tasks == ["first_color", "has_cat"]
        # the very same run: the snapshot's first task merged and decomposed again as in the reference (the SVD is
        # deterministic), the checkpoint (if any) restoring the second task's factors; the data order is seeded
        assert result.matrix == reference.matrix
        layers = dict(osf_layers(resumed.model))
        for name, reference_layer in osf_layers(model):
            assert layers[name].effective_rank[OSF_ADAPTER] == reference_layer.effective_rank[OSF_ADAPTER]
            assert torch.equal(layers[name].get_base_layer().weight, reference_layer.get_base_layer().weight)
        for name, weight in _effective(resumed.model).items():
            assert torch.equal(weight, final[name]), name


@needs_osf
def test_the_trainer_strategy_goes_through_prepare_task_parameters(tiny_model):
    args = ContinualConfig(output_dir="unused", report_to=[], adapter_strategy="osf", lora_target_modules=["q_proj"])
    model = prepare_task_parameters(tiny_model, "osf", "a", args)
    assert is_osf_model(model) and [n.rsplit(".", 1)[-1] for n, _ in osf_layers(model)] == ["q_proj", "q_proj"]
    assert prepare_task_parameters(model, "osf", "a", args) is model and model.osf_tasks == ["a"]
    assert prepare_task_parameters(model, "osf", "b", args) is model and model.osf_tasks == ["a", "b"]
    with pytest.raises(ValueError, match=r"task 'a' was learned already"):
        prepare_task_parameters(model, "osf", "a", args)
