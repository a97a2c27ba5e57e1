"""O-LoRA (`OLoRAPlugin`): the orthogonality loss against an explicit loop over modules and matrix entries, where
its gradient goes, the forward as base + the sum of every task's LoRA (merged by hand), the options, the state, and
a task sequence through `ContinualTrainer.train_sequence` that keeps the old adapters and resumes."""

from __future__ import annotations

import json
import types

import pytest
import torch
from transformers import TrainerCallback

from hf_adaptive.config import ContinualConfig
from hf_adaptive.orthogonal import OLORA_OPTIONS, OLoRAConfig, OLoRAPlugin, olora_adapter_name, orthogonality_loss
from hf_adaptive.orthogonal.olora import lora_layers
from hf_adaptive.plugins import ContinualPlugin
from hf_adaptive.trainer import ContinualTrainer
from hf_adaptive.utils.io import StateLoadError, load_state, load_state_into, save_state
from hf_adaptive.utils.options import build_config

TARGETS = ["q_proj", "v_proj"]
TASKS = ["task one", "task-two", "task_3"]


def _args(**overrides):
    """What the plugin reads of the trainer's options: the strategy and the LoRA shape (rank 2: a short loop)."""
    values = dict(adapter_strategy="full", lora_r=2, lora_alpha=4.0, lora_dropout=0.0, lora_target_modules=TARGETS)
    values.update(overrides)
    return types.SimpleNamespace(**values)


@pytest.fixture
def backbone(tokenizer):
    """A factory of fresh tiny Gemmas with the same weights (peft wraps a model in place: one per use)."""
    from hf_adaptive.models import build_tiny_gemma

    return lambda: build_tiny_gemma(tokenizer, seed=0)[0]


def _context(name: str):
    return types.SimpleNamespace(task=types.SimpleNamespace(name=name))


def _randomize(model, adapter: str, seed: int) -> None:
    """Non-zero A and B for `adapter` (what training would leave), so that every update counts."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for matrix in (layer.lora_A[adapter].weight, layer.lora_B[adapter].weight):
                matrix.copy_(torch.randn(matrix.shape, generator=gen) * 0.1)


def _three_tasks(model, plugin=None):
    """The plugin set up for three tasks in turn on `model`, each adapter given weights before the next task."""
    plugin = plugin or OLoRAPlugin()
    trainer = types.SimpleNamespace(model=model, args=_args())
    for seed, name in enumerate(TASKS):
        setup = plugin.setup_task(trainer, _context(name))
        trainer.model = setup.model
        setup.model.set_adapter(setup.adapter)  # what the trainer does with the request
        _randomize(setup.model, setup.adapter, seed)
    return plugin, trainer.model


def _slow_orthogonality(model, new: str, old: list[str]) -> float:
    """Σ over modules, earlier adapters i and entries (j, k) of |Σ_d A_i[j, d] A_new[k, d]|, element by element."""
    total = 0.0
    for _, layer in lora_layers(model):
        if new not in layer.lora_A:
            continue
        a_new = layer.lora_A[new].weight.detach().double().tolist()
        for name in old:
            a_old = layer.lora_A[name].weight.detach().double().tolist()
            for row_old in a_old:
                for row_new in a_new:
                    total += abs(sum(x * y for x, y in zip(row_old, row_new, strict=True)))
    return total


# --------------------------------------------------------------------------------------------------- the loss
def test_the_orthogonality_term_matches_a_slow_double_loop(backbone):
    plugin = OLoRAPlugin()
    trainer = types.SimpleNamespace(model=backbone(), args=_args())
    setup = plugin.setup_task(trainer, _context(TASKS[0]))
    assert float(plugin.orthogonality(setup.model)) == 0.0  # no earlier task: nothing to be orthogonal to
    assert plugin.loss_terms(trainer, setup.model, {}, None)[0].value.item() == 0.0
    plugin, model = _three_tasks(backbone())
    names = [olora_adapter_name(t) for t in TASKS]
    assert names == ["olora_task_one", "olora_task_two", "olora_task_3"]
    expected = _slow_orthogonality(model, names[2], names[:2])
    assert expected > 0
    assert float(plugin.orthogonality(model).detach()) == pytest.approx(expected, rel=1e-5)
    assert float(orthogonality_loss(model, names[2], names[:2]).detach()) == pytest.approx(expected, rel=1e-5)
    # one earlier adapter only: the term of that pair
    assert float(orthogonality_loss(model, names[2], names[:1]).detach()) == pytest.approx(
        _slow_orthogonality(model, names[2], names[:1]), rel=1e-5
    )
    # orthogonal A's make it vanish: the new A's rows moved into the complement of the old rows' span
    with torch.no_grad():
        for _, layer in lora_layers(model):
            old = torch.cat([layer.lora_A[n].weight for n in names[:2]]).double()
            q, _ = torch.linalg.qr(old.T)  # an orthonormal basis of the old rows
            new = layer.lora_A[names[2]].weight.double()
            layer.lora_A[names[2]].weight.copy_((new - (new @ q) @ q.T).float())
    assert float(orthogonality_loss(model, names[2], names[:2]).detach()) < 1e-5
    plugin._pairs_cache = None  # the cached earlier A's are constants: the new A is read live
    assert float(plugin.orthogonality(model).detach()) < 1e-5


def test_the_l2_term_matches_the_sum_of_frobenius_norms(backbone):
    plugin, model = _three_tasks(backbone(), OLoRAPlugin(l2_lambda=0.1))
    new = olora_adapter_name(TASKS[-1])
    expected = 0.0
    for _, layer in lora_layers(model):
        for matrix in (layer.lora_A[new].weight, layer.lora_B[new].weight):
            expected += sum(x * x for x in matrix.detach().double().flatten().tolist()) ** 0.5
    assert float(plugin.l2(model).detach()) == pytest.approx(expected, rel=1e-5)
    terms = {t.name: t for t in plugin.loss_terms(None, model, {}, None)}
    assert set(terms) == {"olora", "olora_l2"} == set(plugin.term_names)
    assert terms["olora"].weight == 0.5 and terms["olora_l2"].weight == 0.1
    assert OLoRAPlugin(orth_lambda=0.0).term_names == ()


def test_the_gradient_reaches_only_the_new_adapters_a(backbone):
    plugin, model = _three_tasks(backbone())
    names = [olora_adapter_name(t) for t in TASKS]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(f".{names[2]}." in n for n in trainable)  # the earlier adapters are frozen
    (term,) = plugin.loss_terms(None, model, {}, None)
    (term.weight * term.value).backward()
    for name, param in model.named_parameters():
        if f"lora_A.{names[2]}." in name:
            assert param.grad is not None and float(param.grad.abs().sum()) > 0, name
        else:  # the new B, the earlier adapters and the base weights get nothing from the term
            assert param.grad is None or float(param.grad.abs().sum()) == 0.0, name


def test_the_forward_is_the_base_plus_every_tasks_lora(backbone):
    """The model after three tasks computes with W + Σ_i (alpha / r) B_i A_i: the earlier adapters merged into the
    weights, the newest active. The reference adds the three updates into a fresh backbone by hand."""
    _, model = _three_tasks(backbone())
    names = [olora_adapter_name(t) for t in TASKS]
    assert model.active_adapters == [names[2]]
    ids = torch.randint(3, 80, (2, 9), generator=torch.Generator().manual_seed(0))
    model.eval()
    logits = model(input_ids=ids).logits

    def by_hand(adapters):
        reference = backbone().eval()
        modules = dict(reference.named_modules())
        with torch.no_grad():
            for name, layer in lora_layers(model):
                target = modules[name.removeprefix("base_model.model.")]
                for adapter in adapters:
                    a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
                    target.weight += (4.0 / 2) * (b @ a)
            return reference(input_ids=ids).logits

    torch.testing.assert_close(logits, by_hand(names), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(logits, by_hand(names[2:]), rtol=1e-4, atol=1e-5)  # not the newest one alone


# ------------------------------------------------------------------------------------------------- options
def test_bad_options_are_named():
    with pytest.raises(ValueError, match=r"OLoRAConfig\.orth_lambda=-1 is not allowed: must be >= 0"):
        OLoRAConfig(orth_lambda=-1)
    with pytest.raises(ValueError, match=r"OLoRAConfig\.l2_lambda=inf is not allowed: must be finite"):
        OLoRAConfig(l2_lambda=float("inf"))
    with pytest.raises(ValueError, match=r"OLoRAPlugin\.orth_lambda='x' is not allowed: must be a number"):
        OLoRAPlugin(orth_lambda="x")
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['lambda_1'\]"):
        OLoRAPlugin(lambda_1=0.1)
    options = types.SimpleNamespace(olora_orth_lambda=-2.0)
    with pytest.raises(ValueError, match=r"ContinualConfig\.olora_orth_lambda=-2\.0 is not allowed"):
        build_config(OLORA_OPTIONS[0], options, owner="ContinualConfig")
    assert OLORA_OPTIONS[0].names() == {"orth_lambda": "olora_orth_lambda", "l2_lambda": "olora_l2_lambda"}


def test_the_trainer_must_add_no_adapter_of_its_own(tiny_model):
    config = ContinualConfig(output_dir="unused", report_to=[], adapter_strategy="shared_lora")
    with pytest.raises(ValueError, match=r"ContinualConfig\.adapter_strategy='shared_lora' is not allowed: use 'full'"):
        OLoRAPlugin.from_config(config)
    trainer = types.SimpleNamespace(model=tiny_model, args=_args(adapter_strategy="lora_per_task"))
    with pytest.raises(ValueError, match=r"adapter_strategy='lora_per_task' is not allowed"):
        OLoRAPlugin().setup_task(trainer, _context("a"))


def test_adapters_it_did_not_add_are_refused(tiny_model):
    from peft import get_peft_model

    from hf_adaptive.adapters import lora_config

    trainer = types.SimpleNamespace(model=get_peft_model(tiny_model, lora_config()), args=_args())
    with pytest.raises(ValueError, match=r"peft adapters \['default'\] that O-LoRA did not add"):
        OLoRAPlugin().setup_task(trainer, _context("a"))


def test_built_by_name_once_registered(monkeypatch):
    """The registry line of the report, in memory: `plugins: [olora]` builds it from the `olora_*` options."""
    from hf_adaptive import registry

    monkeypatch.setitem(
        registry.PLUGINS,
        "olora",
        registry.PluginSpec("hf_adaptive.orthogonal.olora:OLoRAPlugin", "hf_adaptive.orthogonal.config:OLORA_OPTIONS"),
    )
    options = types.SimpleNamespace(adapter_strategy="full", olora_orth_lambda=0.25, olora_l2_lambda=0.01)
    (plugin,) = registry.build_plugins(["olora"], options)
    assert isinstance(plugin, OLoRAPlugin) and (plugin.config.orth_lambda, plugin.config.l2_lambda) == (0.25, 0.01)
    assert registry.plugin_options("olora") == OLORA_OPTIONS == OLoRAPlugin.options


# --------------------------------------------------------------------------------------------------- state
def test_the_state_round_trips_and_is_checked(backbone, tmp_path):
    plugin, model = _three_tasks(backbone())
    save_state(tmp_path / "ok", plugin.state_dict())
    restored = OLoRAPlugin()
    load_state_into(restored, tmp_path / "ok")
    rebuilt = restored.rebuild(backbone())
    for key, value in model.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[key], value), key
    with pytest.raises(ValueError, match=r"cannot rebuild the adapters .* on a model that has peft adapters"):
        restored.rebuild(rebuilt)
    for change, message in (
        (lambda s: s.update(merged=["olora_task_two"]), r"merged=\['olora_task_two'\]: expected the first adapters"),
        (lambda s: s.update(merged=[]), r"merged=\[\]: expected the first adapters"),
        (lambda s: s.update(adapters=["a", "a"]), r"adapters=\['a', 'a'\]: expected a list of unique"),
        (lambda s: s["weights"].pop("olora_task_3"), r"weights has entries for"),
        (lambda s: s.pop("configs"), r"missing key 'configs'"),
    ):
        state = load_state(tmp_path / "ok")
        change(state)
        save_state(tmp_path / "bad", state)
        with pytest.raises(StateLoadError, match=message) as err:
            load_state_into(OLoRAPlugin(), tmp_path / "bad")
        assert str(tmp_path / "bad") in str(err.value)


# ------------------------------------------------------------------------------------------- in a sequence
class EndOfTask(ContinualPlugin):
    """Records, at every task end, the adapters' weights and the LoRA layers' base weights."""

    name = "end_of_task"

    def __init__(self) -> None:
        self.adapters: list[dict[str, torch.Tensor]] = []
        self.bases: list[dict[str, torch.Tensor]] = []

    def on_task_end(self, trainer, context) -> None:
        model = trainer.model
        self.adapters.append(
            {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n}
        )
        self.bases.append({n: layer.get_base_layer().weight.detach().clone() for n, layer in lora_layers(model)})


def _sequence(tokenizer, tasks, out, make_args, crash=None, resume=None, recorder=None):
    from hf_adaptive.models import build_tiny_gemma

    class Crash(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if crash and trainer.current_task_index == crash[0] and state.global_step == crash[1]:
                raise KeyboardInterrupt("simulated kill")

    model, _ = build_tiny_gemma(tokenizer, seed=0)
    args = make_args(
        out, learning_rate=5e-3, save_strategy="steps", save_steps=2, save_results_plot=False, lora_r=4, lora_alpha=8.0
    )
    plugins = [OLoRAPlugin.from_config(args), recorder or EndOfTask(), Crash()]
    trainer = ContinualTrainer(model=model, args=args, processing_class=tokenizer, callbacks=plugins)
    return trainer, trainer.train_sequence(tasks, resume_from_checkpoint=resume, evaluate_baseline=False)


@pytest.fixture(scope="module")
def three_tasks():
    from hf_adaptive.tasks import builtin_suite

    return builtin_suite(["first_color", "has_cat", "last_color"], n_train=24, n_eval=8, seed=0)


def test_a_sequence_keeps_the_old_adapters_and_resumes(tokenizer, three_tasks, make_args, tmp_path):
    from hf_adaptive.models import build_tiny_gemma

    recorder = EndOfTask()
    trainer, reference = _sequence(tokenizer, three_tasks, tmp_path / "ref", make_args, recorder=recorder)
    plugin = next(p for p in trainer.plugins if isinstance(p, OLoRAPlugin))
    names = [olora_adapter_name(t.name) for t in three_tasks]
    assert plugin.adapters == names and plugin.merged == names[:2]
    assert sorted(trainer.model.peft_config) == sorted(names) and trainer.model.active_adapters == [names[2]]
    assert len(reference.matrix) == 3 and all(len(row) == 3 for row in reference.matrix)
    assert reference.extra["olora_adapters"] == {t.name: n for t, n in zip(three_tasks, names, strict=True)}
    # the orthogonality loss acted while the last task trained (the trainer's log covers the last task)
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert logged and all(h["loss_olora"] > 0 for h in logged)

    # training a task leaves every earlier adapter exactly as its own task ended
    for t, name in enumerate(names):
        own = {k: v for k, v in recorder.adapters[t].items() if f".{name}." in k}
        assert own
        for later in recorder.adapters[t + 1 :]:
            assert all(torch.equal(later[k], v) for k, v in own.items()), name
    # ... and the weights under the adapters are the backbone plus the finished tasks' updates (slow reference)
    backbone, _ = build_tiny_gemma(tokenizer, seed=0)
    modules = dict(backbone.named_modules())
    scaling = 8.0 / 4
    for t in range(3):
        for layer_name, base in recorder.bases[t].items():
            expected = modules[layer_name.removeprefix("base_model.model.")].weight.detach().clone()
            for done in names[:t]:
                a = recorder.adapters[t][f"{layer_name}.lora_A.{done}.weight"]
                b = recorder.adapters[t][f"{layer_name}.lora_B.{done}.weight"]
                expected += scaling * (b @ a)
            torch.testing.assert_close(base, expected, rtol=0, atol=1e-6)
    # the plugin's state is in the end-of-task snapshot
    (snapshot,) = (tmp_path / "ref").glob("snapshot-after-task-*")
    saved = json.loads((snapshot / "continual" / "olora" / "state.json").read_text())
    assert saved["adapters"] == names and saved["merged"] == names[:2]

    # killed in the last task after a checkpoint of it: the same run; before one: the same old adapters and weights
    final = trainer.model.state_dict()
    for step in (3, 1):
        out = tmp_path / f"run{step}"
        with pytest.raises(KeyboardInterrupt):
            _sequence(tokenizer, three_tasks, out, make_args, crash=(2, step))
        resumed, result = _sequence(tokenizer, three_tasks, out, make_args, resume=True)
        assert result.matrix[:2] == reference.matrix[:2]
        state = resumed.model.state_dict()
        assert set(state) == set(final)
        for key, value in final.items():
            if step == 3 or f".{names[2]}." not in key:  # the new adapter restarts from its own init otherwise
                assert torch.equal(state[key], value), key
        if step == 3:
            assert result.matrix == reference.matrix
