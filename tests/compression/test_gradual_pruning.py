"""`GradualPruningPlugin` on the tiny Gemma: the sparsity it reaches after every update is the schedule's, pruned
weights stay exactly zero under AdamW, masks only grow across tasks, survive save/resume, and end as plain zeros."""

from __future__ import annotations

import copy
import dataclasses
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from transformers import TrainingArguments

from hf_adaptive.compression.config import DEFAULT_TARGETS, GRADUAL_PRUNING_OPTIONS, GradualPruningConfig
from hf_adaptive.compression.gradual_pruning import GradualPruningPlugin, mlp_groups, target_weights
from hf_adaptive.compression.schedule import cubic_sparsity, prune_count
from hf_adaptive.plugins import ContinualPlugin
from hf_adaptive.utils.io import StateLoadError, load_state, save_state
from hf_adaptive.utils.options import build_config, check_unique_options, options_dataclass
from hf_adaptive.utils.validation import OptionError

PROJECTIONS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


# ------------------------------------------------------------------------------------------------------ helpers
def _plugin(model, **options) -> GradualPruningPlugin:
    plugin = GradualPruningPlugin(**options)
    plugin.bind(SimpleNamespace(model=model))  # what the plugin reads of a trainer: `.model`
    return plugin


def _targets(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if n.split(".")[-2] in PROJECTIONS}


def _train_steps(plugin, model, optimizer, batch, steps, record=None):
    """What the Trainer does per optimizer step, with the plugin's hooks where the Trainer calls them."""
    for _ in range(steps):
        model(**batch).loss.backward()
        plugin.on_pre_optimizer_step(None, None, None, model=model)
        optimizer.step()
        optimizer.zero_grad()
        plugin.on_step_end(None, None, None, model=model)
        if record is not None:
            record(plugin.step)


def _zeros(model) -> dict[str, torch.Tensor]:
    return {n: (p.detach() == 0) for n, p in _targets(model).items()}


# ------------------------------------------------------------------------------------------------------ options
def test_defaults_and_option_names():
    config = GradualPruningConfig()
    assert (config.initial_sparsity, config.final_sparsity, config.scope, config.structured) == (
        0.0,
        0.5,
        "layer",
        "none",
    )
    assert (config.begin_step, config.num_updates, config.frequency) == (0, 10, 10)
    assert config.target_modules == DEFAULT_TARGETS and set(DEFAULT_TARGETS) == PROJECTIONS
    assert (config.allow_regrowth, config.schedule_per_task, config.permanent_at_end) == (False, False, True)
    names = GRADUAL_PRUNING_OPTIONS[0].names()
    assert all(option == f"prune_{name}" for name, option in names.items())
    # no other plugin's option and no TrainingArguments field has one of these names
    from hf_adaptive.registry import all_option_sources

    reserved = [f.name for f in dataclasses.fields(TrainingArguments)]
    check_unique_options([*all_option_sources(), *GRADUAL_PRUNING_OPTIONS], reserved=reserved)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("initial_sparsity", -0.1),
        ("initial_sparsity", 1.0),
        ("initial_sparsity", float("nan")),
        ("final_sparsity", 1.0),
        ("final_sparsity", "0.5"),
        ("begin_step", -1),
        ("begin_step", 1.5),
        ("num_updates", 0),
        ("frequency", 0),
        ("frequency", True),
        ("scope", "row"),
        ("target_modules", []),
        ("target_modules", [""]),
        ("structured", "heads"),
        ("allow_regrowth", "no"),
        ("schedule_per_task", 1),
        ("permanent_at_end", None),
    ],
)
def test_every_bad_option_names_its_field(field, value):
    with pytest.raises(OptionError, match=rf"GradualPruningConfig\.{field}=.* is not allowed"):
        GradualPruningConfig(**{field: value})


def test_initial_above_final_names_both():
    with pytest.raises(OptionError, match=r"initial_sparsity=0\.6 is not allowed: .*final_sparsity=0\.5"):
        GradualPruningConfig(initial_sparsity=0.6, final_sparsity=0.5)


def test_the_config_module_stays_light():
    code = (
        "import sys, hf_adaptive.compression.config; "
        "print(sorted(m for m in sys.modules if m.startswith('hf_adaptive.compression.')), 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['hf_adaptive.compression.config'] False"


def test_the_options_parse_as_flags():
    from transformers import HfArgumentParser

    mixin = options_dataclass("PruningOptions", GRADUAL_PRUNING_OPTIONS)
    flags = ["--prune_final_sparsity", "0.8", "--prune_target_modules", "up_proj", "down_proj"]
    flags += ["--prune_allow_regrowth", "true", "--prune_structured", "mlp_channels"]
    (parsed,) = HfArgumentParser(mixin).parse_args_into_dataclasses(flags)
    config = build_config(GRADUAL_PRUNING_OPTIONS[0], parsed, owner="ContinualConfig")
    assert (config.final_sparsity, config.target_modules) == (0.8, ("up_proj", "down_proj"))
    assert (config.allow_regrowth, config.structured, config.frequency) == (True, "mlp_channels", 10)


def test_from_config_reads_the_prefixed_options():
    plugin = GradualPruningPlugin.from_config(SimpleNamespace(prune_final_sparsity=0.8, prune_scope="global"))
    assert (plugin.config.final_sparsity, plugin.config.scope) == (0.8, "global")
    with pytest.raises(OptionError, match=r"SimpleNamespace\.prune_final_sparsity=1\.5 is not allowed"):
        GradualPruningPlugin.from_config(SimpleNamespace(prune_final_sparsity=1.5))


def test_targets_default_to_the_projections_and_refuse_embeddings(tiny_model):
    assert set(target_weights(tiny_model, DEFAULT_TARGETS)) == set(_targets(tiny_model))
    assert set(target_weights(tiny_model, ["model.layers.1.mlp.up_proj"])) == {"model.layers.1.mlp.up_proj.weight"}
    with pytest.raises(OptionError, match=r"target_modules=\['nothing'\] is not allowed: they match no Linear"):
        target_weights(tiny_model, ["nothing"])
    with pytest.raises(OptionError, match=r"target_modules=\['lm_head'\] .*'lm_head' is an embedding or the LM"):
        target_weights(tiny_model, ["lm_head"])


def test_lora_is_refused_naming_the_frozen_weights(tiny_model):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    plugin = _plugin(model)
    with pytest.raises(OptionError, match=r"requires_grad=False.*adapter_strategy='full'"):
        plugin.on_train_begin(None, None, None, model=model)


# ----------------------------------------------------------------------------------------------- the schedule
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_sparsity_after_each_update_is_the_scheduled_one(tiny_model, tiny_batch, scope):
    """AdamW with weight decay; after every optimizer step the zeros of the targeted weights are exactly the
    scheduled count (per matrix, or over all of them), a superset of the step before's, and nothing else is zero."""
    options = dict(initial_sparsity=0.1, final_sparsity=0.7, begin_step=1, num_updates=3, frequency=2, scope=scope)
    plugin = _plugin(tiny_model, **options)
    optimizer = torch.optim.AdamW(tiny_model.parameters(), lr=1e-2, weight_decay=0.1)
    plugin.on_train_begin(None, None, None, model=tiny_model)
    assert not plugin.masks and not any(z.any() for z in _zeros(tiny_model).values())  # t0 = 1: nothing yet
    before = {n: p.detach().clone() for n, p in tiny_model.named_parameters()}
    previous = _zeros(tiny_model)
    moments_on_pruned = []

    def check(step):
        nonlocal previous
        s = cubic_sparsity(step, 0.1, 0.7, 1, 3, 2)
        zeros = _zeros(tiny_model)
        if scope == "layer":
            for name, z in zeros.items():
                assert int(z.sum()) == prune_count(s, z.numel()), (step, name)
                assert abs(float(z.float().mean()) - s) <= 0.5 / z.numel() + 1e-9
        else:
            total = sum(z.numel() for z in zeros.values())
            assert sum(int(z.sum()) for z in zeros.values()) == prune_count(s, total), step
        assert all(bool((zeros[n] | ~previous[n]).all()) for n in zeros)  # what was pruned stays pruned
        assert all(torch.equal(zeros[n], ~plugin.masks[n]) for n in zeros)  # the zeros are the masks
        previous = zeros
        for name, p in _targets(tiny_model).items():  # AdamW would move these: its moments are not zero there
            moments_on_pruned.append(float(optimizer.state[p]["exp_avg"][zeros[name]].abs().sum()))

    _train_steps(plugin, tiny_model, optimizer, tiny_batch, 9, record=check)
    assert [h["step"] for h in plugin.history] == [1, 3, 5, 7]
    assert [h["scheduled"] for h in plugin.history] == pytest.approx(
        [cubic_sparsity(t, 0.1, 0.7, 1, 3, 2) for t in (1, 3, 5, 7)]
    )
    assert plugin.history[-1]["scheduled"] == pytest.approx(0.7)
    assert max(moments_on_pruned) > 0  # so the re-applied masks, not the optimizer, keep them at zero
    # the other parameters (embeddings, norms) trained and hold no zeros
    others = [n for n in before if n not in plugin.masks]
    assert others and all(not torch.equal(before[n], p) for n, p in tiny_model.named_parameters() if n in others)
    assert not any(bool((p == 0).any()) for n, p in tiny_model.named_parameters() if n in others)


def test_gradients_of_pruned_weights_are_zeroed_before_the_step(tiny_model, tiny_batch):
    plugin = _plugin(tiny_model, initial_sparsity=0.5, final_sparsity=0.5, num_updates=1, frequency=1)
    plugin.on_train_begin(None, None, None, model=tiny_model)
    tiny_model(**tiny_batch).loss.backward()
    params = dict(tiny_model.named_parameters())
    assert any(bool(params[n].grad[~m].abs().sum() > 0) for n, m in plugin.masks.items())
    plugin.on_pre_optimizer_step(None, None, None, model=tiny_model)
    for name, mask in plugin.masks.items():
        assert not params[name].grad[~mask].any() and params[name].grad[mask].abs().sum() > 0


def test_masks_rank_by_magnitude(tiny_model):
    """The first update's pruned set is the smallest |w| of each matrix (layer) or of all of them (global)."""
    weights = {n: p.detach().abs().reshape(-1).tolist() for n, p in _targets(tiny_model).items()}
    layer = _plugin(copy.deepcopy(tiny_model), scope="layer")
    layer.update_masks(sparsity=0.3)
    for name, values in weights.items():
        order = sorted(range(len(values)), key=values.__getitem__)
        pruned = set(order[: prune_count(0.3, len(values))])
        assert (~layer.masks[name]).reshape(-1).nonzero().reshape(-1).tolist() == sorted(pruned)
    glob = _plugin(copy.deepcopy(tiny_model), scope="global")
    glob.update_masks(sparsity=0.3)
    entries = sorted((v, n, i) for n, values in weights.items() for i, v in enumerate(values))
    pruned = {(n, i) for _, n, i in entries[: prune_count(0.3, len(entries))]}
    assert {(n, i) for n, m in glob.masks.items() for i in (~m).reshape(-1).nonzero().reshape(-1).tolist()} == pruned


def test_mlp_channels_prunes_whole_channels(tiny_model, tiny_batch):
    """gate/up rows and the down column of a channel go together, the lowest joint L2 norms first; attention is
    untouched; the next update only adds channels."""
    plugin = _plugin(
        tiny_model, structured="mlp_channels", initial_sparsity=0.25, final_sparsity=0.5, num_updates=1, frequency=1
    )
    groups = mlp_groups(tiny_model, DEFAULT_TARGETS)
    assert [g.name for g in groups] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    params = dict(tiny_model.named_parameters())

    def norms(layer):
        mlp = f"model.layers.{layer}.mlp"
        gate, up, down = (params[f"{mlp}.{p}.weight"].detach() for p in ("gate_proj", "up_proj", "down_proj"))
        return [
            sum(v * v for v in gate[c].tolist() + up[c].tolist() + down[:, c].tolist()) ** 0.5
            for c in range(gate.shape[0])
        ]

    def pruned_channels(layer):
        mlp = f"model.layers.{layer}.mlp"
        gate, up, down = (params[f"{mlp}.{p}.weight"].detach() for p in ("gate_proj", "up_proj", "down_proj"))
        rows = {c for c in range(gate.shape[0]) if not gate[c].any()}
        assert rows == {c for c in range(up.shape[0]) if not up[c].any()}
        assert rows == {c for c in range(down.shape[1]) if not down[:, c].any()}
        # nothing else is zero: whole channels, not single weights
        assert int((gate == 0).sum()) == len(rows) * gate.shape[1] and int((down == 0).sum()) == len(rows) * 64
        return rows

    expected = {}
    for layer in (0, 1):
        values = norms(layer)
        expected[layer] = set(sorted(range(128), key=values.__getitem__)[:32])
    plugin.on_train_begin(None, None, None, model=tiny_model)  # t0 = 0: prune to s_i = 0.25
    first = {layer: pruned_channels(layer) for layer in (0, 1)}
    assert first == expected
    optimizer = torch.optim.AdamW(tiny_model.parameters(), lr=1e-2, weight_decay=0.1)
    _train_steps(plugin, tiny_model, optimizer, tiny_batch, 2)  # t = 1: s_f = 0.5
    for layer in (0, 1):
        now = pruned_channels(layer)
        assert len(now) == prune_count(0.5, 128) and first[layer] <= now
    assert plugin.sparsity() == pytest.approx(0.5)
    attention = [p for n, p in params.items() if "self_attn" in n]
    assert not any(bool((p == 0).any()) for p in attention)


# -------------------------------------------------------------------------------------------------- tasks
def test_per_task_schedule_restarts_from_the_sparsity_reached(tiny_model, tiny_batch):
    options = dict(final_sparsity=0.5, begin_step=0, num_updates=2, frequency=1, schedule_per_task=True)
    plugin = _plugin(tiny_model, **options)
    optimizer = torch.optim.SGD(tiny_model.parameters(), lr=1e-2)
    plugin.on_task_begin(plugin.trainer, SimpleNamespace(index=0))
    plugin.on_train_begin(None, None, None, model=tiny_model)
    _train_steps(plugin, tiny_model, optimizer, tiny_batch, 1)  # task 1 ends after one step, mid-ramp
    reached = cubic_sparsity(1, 0.0, 0.5, 0, 2, 1)
    assert plugin.sparsity() == pytest.approx(reached, abs=0.01)
    plugin.on_task_begin(plugin.trainer, SimpleNamespace(index=1))
    assert plugin.task_step == 0 and plugin.task_initial == pytest.approx(plugin.sparsity())
    plugin.on_train_begin(None, None, None, model=tiny_model)
    _train_steps(plugin, tiny_model, optimizer, tiny_batch, 2)
    restart = plugin.task_initial
    scheduled = [h["scheduled"] for h in plugin.history]
    expected = [0.0, reached] + [cubic_sparsity(t, restart, 0.5, 0, 2, 1) for t in (0, 1, 2)]
    assert scheduled == pytest.approx(expected)
    assert [h["task_step"] for h in plugin.history] == [0, 1, 0, 1, 2]
    assert [h["step"] for h in plugin.history] == [0, 1, 1, 2, 3]


@pytest.mark.parametrize("regrowth", [False, True])
def test_regrowth_across_tasks(tiny_model, tiny_batch, regrowth):
    """A pruned weight that grows large in a later task comes back only with `allow_regrowth`."""
    plugin = _plugin(
        tiny_model, initial_sparsity=0.5, final_sparsity=0.5, num_updates=1, frequency=2, allow_regrowth=regrowth
    )
    optimizer = torch.optim.SGD(tiny_model.parameters(), lr=1e-3)
    plugin.on_task_begin(plugin.trainer, SimpleNamespace(index=0))
    plugin.on_train_begin(None, None, None, model=tiny_model)
    _train_steps(plugin, tiny_model, optimizer, tiny_batch, 1)
    name = "model.layers.0.mlp.up_proj.weight"
    first = plugin.masks[name].clone()
    plugin.on_task_begin(plugin.trainer, SimpleNamespace(index=1))
    assert (plugin.masks == {}) == regrowth and plugin.released == regrowth
    plugin.on_train_begin(None, None, None, model=tiny_model)
    weight = dict(tiny_model.named_parameters())[name]
    with torch.no_grad():  # what training the new task could do to the pruned weights
        weight[~first] = 1.0
    _train_steps(plugin, tiny_model, optimizer, tiny_batch, 1)  # step 2: an update point (held s_f)
    zeros = weight.detach() == 0
    assert int(zeros.sum()) == prune_count(0.5, weight.numel())
    if regrowth:
        assert not zeros[~first].any()  # all came back, the smallest live ones went instead
    else:
        assert torch.equal(zeros, ~first)
    # an update to a lower sparsity (e.g. restored masks above the schedule) un-prunes only with regrowth
    plugin.update_masks(sparsity=0.2)
    kept = int((~plugin.masks[name]).sum())
    assert kept == (prune_count(0.2, weight.numel()) if regrowth else prune_count(0.5, weight.numel()))


def test_a_task_sequence_keeps_masks_across_tasks(tiny_model, tokenizer, tmp_path, make_args):
    """Through `ContinualTrainer.train_sequence`: one schedule over both tasks' steps (updates at 1, 3 in task 1 and
    5, 7 in task 2), the zeros only grow across the boundary, every checkpoint holds the masks of its step, and
    the last task ends with plain zeros."""
    from hf_adaptive.tasks import builtin_suite
    from hf_adaptive.trainer import ContinualTrainer

    class Zeros(ContinualPlugin):
        name = "zeros"

        def __init__(self):
            self.steps: list[dict[str, torch.Tensor]] = []

        def on_step_end(self, args, state, control, model=None, **kwargs):
            self.steps.append({n: z.clone() for n, z in _zeros(model).items()})

    tasks = builtin_suite(["first_color", "last_color"], n_train=32, n_eval=8, seed=0)
    args = make_args(
        tmp_path,
        learning_rate=5e-3,
        weight_decay=0.1,
        evaluate_unseen_tasks=False,
        save_results_plot=False,
        save_strategy="steps",
        save_steps=2,
    )
    plugin = GradualPruningPlugin(initial_sparsity=0.0, final_sparsity=0.6, begin_step=1, num_updates=3, frequency=2)
    zeros = Zeros()
    trainer = ContinualTrainer(model=tiny_model, args=args, processing_class=tokenizer, callbacks=[plugin, zeros])
    result = trainer.train_sequence(tasks, evaluate_baseline=False)

    assert len(zeros.steps) == 8  # 32 rows / batch 8, two tasks
    assert [h["step"] for h in plugin.history] == [1, 3, 5, 7]
    for step, (before, after) in enumerate(zip(zeros.steps, zeros.steps[1:]), start=2):
        s = cubic_sparsity(step, 0.0, 0.6, 1, 3, 2)
        for name, z in after.items():
            assert bool((z | ~before[name]).all()), (step, name)  # nothing regrows, across the task boundary too
            assert int(z.sum()) == prune_count(s, z.numel())
    # the checkpoints of task 1 and task 2 hold the masks of their step (the weights' zeros then)
    for folder, step in (("task-00-first_color/checkpoint-2", 2), ("task-01-last_color/checkpoint-2", 6)):
        (saved,) = [p for p in tmp_path.glob(f"{folder}/continual/gradual_pruning")]
        state = load_state(saved)
        assert state["step"] == step and not state["permanent"]
        assert all(torch.equal(~state["masks"][n], z) for n, z in zeros.steps[step - 1].items())
    # the end of the sequence: masks dropped, the zeros are plain weights, the results report the sparsity
    assert plugin.permanent and plugin.masks == {}
    final = _zeros(trainer.model)
    assert all(torch.equal(final[n], z) for n, z in zeros.steps[-1].items())
    report = result.extra["gradual_pruning"]
    total = sum(z.numel() for z in final.values())
    assert report["sparsity"] == pytest.approx(sum(int(z.sum()) for z in final.values()) / total)
    assert report["permanent"] and report["step"] == 8 and len(report["updates"]) == 4
    assert report["modules"] == pytest.approx({n[: -len(".weight")]: float(z.float().mean()) for n, z in final.items()})
    assert all(abs(v - 0.6) <= 0.5 / 2048 for v in report["modules"].values())


# -------------------------------------------------------------------------------------------------- state
def test_save_and_resume_continue_the_schedule_with_the_same_masks(tiny_model, tiny_batch, tmp_path):
    options = dict(initial_sparsity=0.2, final_sparsity=0.8, begin_step=0, num_updates=4, frequency=2)
    first = _plugin(tiny_model, **options)
    optimizer = torch.optim.AdamW(tiny_model.parameters(), lr=1e-2, weight_decay=0.1)
    first.on_train_begin(None, None, None, model=tiny_model)
    _train_steps(first, tiny_model, optimizer, tiny_batch, 2)  # step 2 is an update point, already made
    save_state(tmp_path / "gradual_pruning", first.state_dict())

    model = copy.deepcopy(tiny_model)
    second = _plugin(model, **options)
    second.load_state_dict(load_state(tmp_path / "gradual_pruning"))
    assert (second.step, second.last_update, second.history) == (first.step, 2, first.history)
    assert second.masks.keys() == first.masks.keys()
    assert all(m.dtype == torch.bool and torch.equal(m, first.masks[n]) for n, m in second.masks.items())

    # both continue from the same weights with the same (fresh) optimizer: same updates, same masks at every step
    second.on_train_begin(None, None, None, model=model)  # no second update at step 2
    assert len(second.history) == len(first.history)
    opt_a, opt_b = (torch.optim.SGD(m.parameters(), lr=1e-2) for m in (tiny_model, model))
    for _ in range(4):
        _train_steps(first, tiny_model, opt_a, tiny_batch, 1)
        _train_steps(second, model, opt_b, tiny_batch, 1)
        assert second.step == first.step
        assert all(torch.equal(second.masks[n], m) for n, m in first.masks.items())
    assert [h["step"] for h in second.history] == [0, 2, 4, 6]
    assert second.sparsity() == pytest.approx(cubic_sparsity(6, 0.2, 0.8, 0, 4, 2), abs=0.01)


def test_loading_masks_of_another_model_names_the_module(tiny_model, tmp_path):
    plugin = _plugin(tiny_model)
    plugin.update_masks(sparsity=0.5)
    state = plugin.state_dict()
    name = "model.layers.1.self_attn.k_proj.weight"

    bad = {**state, "masks": {**state["masks"], name: torch.ones(3, 3, dtype=torch.bool)}}
    with pytest.raises(
        StateLoadError,
        match=r"masks\['model\.layers\.1\.self_attn\.k_proj\.weight'\]\.shape=\(3, 3\) "
        r"is not allowed: module 'model\.layers\.1\.self_attn\.k_proj'",
    ):
        _plugin(tiny_model).load_state_dict(bad)
    unknown = {
        **state,
        "masks": {**state["masks"], "model.layers.7.mlp.up_proj.weight": torch.ones(2, dtype=torch.bool)},
    }
    with pytest.raises(StateLoadError, match=r"no parameter 'model\.layers\.7\.mlp\.up_proj\.weight'"):
        _plugin(tiny_model).load_state_dict(unknown)
    floats = {**state, "masks": {name: torch.ones(32, 64)}}
    with pytest.raises(StateLoadError, match=r"masks\['model\.layers\.1\.self_attn\.k_proj\.weight'\]=torch\.float32"):
        _plugin(tiny_model).load_state_dict(floats)
    with pytest.raises(OptionError, match=r"GradualPruningPlugin\.structured='mlp_channels' is not allowed"):
        _plugin(tiny_model, structured="mlp_channels").load_state_dict(state)
    # an unbound plugin checks when it meets the model
    loose = GradualPruningPlugin()
    loose.load_state_dict(bad)
    with pytest.raises(StateLoadError, match=r"module 'model\.layers\.1\.self_attn\.k_proj'"):
        loose.on_train_begin(None, None, None, model=tiny_model)


def test_make_permanent_leaves_an_ordinary_model(tiny_model, tiny_batch, tmp_path):
    from transformers import AutoModelForCausalLM

    fresh_keys = set(tiny_model.state_dict())
    plugin = _plugin(tiny_model, initial_sparsity=0.6, final_sparsity=0.6, num_updates=1, frequency=1)
    plugin.on_train_begin(None, None, None, model=tiny_model)
    _train_steps(plugin, tiny_model, torch.optim.AdamW(tiny_model.parameters(), lr=1e-2), tiny_batch, 1)
    zeros = _zeros(tiny_model)
    plugin.on_train_end(None, None, None, model=tiny_model)  # a plain train() (no task sequence): its end is the end
    assert plugin.permanent and plugin.masks == {} and plugin.state_dict()["masks"] == {}
    assert set(tiny_model.state_dict()) == fresh_keys  # no weight_orig / weight_mask, no hooks
    assert plugin.extra_results()["gradual_pruning"]["sparsity"] == pytest.approx(0.6, abs=1e-3)

    tiny_model.save_pretrained(tmp_path / "pruned")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")
    assert all(torch.equal(z, _zeros(loaded)[n]) for n, z in zeros.items())
    assert all(torch.equal(p, dict(loaded.named_parameters())[n]) for n, p in tiny_model.named_parameters())
    # after it, the plugin prunes nothing: a training step moves the former zeros
    before = _zeros(tiny_model)
    _train_steps(plugin, tiny_model, torch.optim.SGD(tiny_model.parameters(), lr=1e-2), tiny_batch, 1)
    assert plugin.step == 1 and sum(int(z.sum()) for z in _zeros(tiny_model).values()) < sum(
        int(z.sum()) for z in before.values()
    )
