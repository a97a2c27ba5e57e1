"""The meta-learned initialisation (`hf_adaptive.experts.meta_init`) against slow references on the tiny Gemma.

Every reference is written out here: a copy of the model whose adapter is set to phi with peft, plain SGD steps
through `loss.backward()` and `p -= lr * p.grad`, and the outer formulas as explicit sums over the tasks.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict

from hf_adaptive.config import ContinualConfig
from hf_adaptive.experts import ExpertLibrary, ExpertRoutingPlugin, Router, RouterConfig
from hf_adaptive.experts.config import MetaInitConfig
from hf_adaptive.experts.meta_init import MetaInitializer, MetaLearner, adapter_parameters, meta_generator
from hf_adaptive.tasks import CausalLMCollator, builtin_suite, tokenize_task
from hf_adaptive.utils.io import StateLoadError, load_state, save_state

SLOT = "slot"


@pytest.fixture
def setup(tiny_model, tokenizer):
    """A library with one expert (the slot), two tasks' tokenized rows (8 each) and the collator."""
    library = ExpertLibrary(tiny_model)
    library.create(SLOT)
    tasks = builtin_suite(["has_cat", "first_color"], n_train=8, n_eval=4, seed=0)
    rows = {t.name: tokenize_task(t, tokenizer) for t in tasks}
    return library.model, rows, CausalLMCollator(tokenizer)


def _weights(model, adapter=SLOT):
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model, adapter_name=adapter).items()}


def _phi(model, seed=1):
    """The slot's weights moved off peft's init (B = 0 would give A no gradient in the first step)."""
    gen = torch.Generator().manual_seed(seed)
    return {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in _weights(model).items()}


def _hand_copy(model, phi, adapter=SLOT):
    """A copy of the model, eval mode, with the adapter's weights = phi (peft's own setter) and only they trainable."""
    copied = copy.deepcopy(model)
    copied.eval()
    set_peft_model_state_dict(copied, phi, adapter_name=adapter)
    params = [p for n, p in copied.named_parameters() if f".{adapter}." in n]
    for p in copied.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    return copied, params


def _hand_sgd(copied, params, batches, lr):
    for batch in batches:
        for p in params:
            p.grad = None
        copied(**batch).loss.backward()
        with torch.no_grad():
            for p in params:
                p -= lr * p.grad


def _hand_adapt(model, phi, batches, lr, adapter=SLOT):
    copied, params = _hand_copy(model, phi, adapter)
    _hand_sgd(copied, params, batches, lr)
    return _weights(copied, adapter)


def _hand_reptile(model, phi, plans, lr, epsilon, adapter=SLOT):
    adapted = [_hand_adapt(model, phi, batches, lr, adapter) for batches in plans]
    out = {}
    for k in phi:
        total = torch.zeros_like(phi[k])
        for w in adapted:
            total += w[k] - phi[k]
        out[k] = phi[k] + epsilon * total / len(adapted)
    return out


def _hand_fomaml(model, phi, plans, lr, beta):
    grads = []
    for support, query in plans:
        copied, params = _hand_copy(model, phi)
        _hand_sgd(copied, params, support, lr)
        for p in params:
            p.grad = None
        copied(**query).loss.backward()  # the gradient at the adapted weights (first order)
        names = [n.replace(f".{SLOT}.", ".") for n, _ in copied.named_parameters() if f".{SLOT}." in n]
        grads.append({n: p.grad.detach().clone() for n, p in zip(names, params, strict=True)})
    out = {}
    for k in phi:
        total = torch.zeros_like(phi[k])
        for g in grads:
            total += g[k]
        out[k] = phi[k] - beta * total / len(grads)
    return out


def _assert_close(got, expected, moved_from=None):
    assert set(got) == set(expected)
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], atol=1e-6, rtol=0)
    if moved_from is not None:  # the update is large next to the tolerance: a wrong formula cannot pass
        assert max(float((expected[k] - moved_from[k]).abs().max()) for k in expected) > 1e-3


def _run(learner, step, *args):
    learner.model.eval()
    with torch.no_grad():
        return step(*args)


def test_adapter_parameters_are_keyed_like_peft_state_dicts(setup):
    model, _, _ = setup
    names = adapter_parameters(model, SLOT)
    assert set(names) == set(get_peft_model_state_dict(model, adapter_name=SLOT))
    assert all(f".{SLOT}." in n for n in names.values())
    with pytest.raises(ValueError, match=r"MetaLearner.adapter='nope' is not allowed"):
        adapter_parameters(model, "nope")


def test_reptile_outer_update_equals_the_hand_computation(setup):
    model, rows, collate = setup
    phi = _phi(model)
    # 2 tasks, k = 3 inner steps, each on its own batch of 4 rows
    plans = [[collate([r[i] for i in range(j, j + 4)]) for j in (0, 2, 4)] for r in rows.values()]
    learner = MetaLearner(model, SLOT)
    before = _weights(model)
    got = _run(learner, learner.reptile_step, phi, plans, 0.1, 0.5)
    _assert_close(got, _hand_reptile(model, phi, plans, 0.1, 0.5), moved_from=phi)
    # pure: the live adapter is untouched, and no gradient was left on it
    _assert_close(_weights(model), before)
    assert all(p.grad is None for p in model.parameters())


def test_fomaml_outer_update_equals_the_hand_computation(setup):
    model, rows, collate = setup
    phi = _phi(model, seed=2)
    plans = [([collate([r[i] for i in range(4)])] * 2, collate([r[i] for i in range(4, 8)])) for r in rows.values()]
    learner = MetaLearner(model, SLOT)
    got = _run(learner, learner.fomaml_step, phi, plans, 0.1, 0.3)
    _assert_close(got, _hand_fomaml(model, phi, plans, 0.1, 0.3), moved_from=phi)


def test_reptile_initialise_end_to_end_equals_the_hand_loops(setup):
    """`initialise` with every row in every batch (support = rows kept): its sampling only permutes rows, so two
    outer steps of hand Reptile over the whole rows give phi; phi is written into the slot bit for bit, and the next
    creation continues from it."""
    model, rows, collate = setup
    config = MetaInitConfig(
        method="reptile",
        inner_steps=2,
        inner_lr=0.1,
        outer_steps=2,
        outer_lr=0.5,
        support_batch_size=6,
        rows_per_task=6,
    )
    meta = MetaInitializer(config)
    for name, data in rows.items():
        meta.remember(name, data)
    fresh = _weights(model)
    done = meta.initialise(model, SLOT, collate)
    assert done == {"method": "reptile", "tasks": list(rows), "outer_steps": 2, "round": 1}

    kept = {t: [{k: meta.rows[t][k][i] for k in meta.rows[t]} for i in range(6)] for t in rows}
    full = [[collate(kept[t])] * 2 for t in rows]  # the 6 kept rows of each task, k = 2 steps
    expected = fresh
    for _ in range(2):
        expected = _hand_reptile(model, expected, full, 0.1, 0.5)
    _assert_close(meta.phi, expected, moved_from=fresh)
    written = _weights(model)
    assert all(torch.equal(written[k], meta.phi[k]) for k in meta.phi)  # the created expert's tensors are phi

    # a second creation continues phi (not the new expert's own init), one more round
    ExpertLibrary(model).create("second")
    meta.config = MetaInitConfig(**{**config.__dict__, "outer_steps": 1})
    previous = {k: v.clone() for k, v in meta.phi.items()}
    assert meta.initialise(model, "second", collate)["round"] == 2
    _assert_close(meta.phi, _hand_reptile(model, previous, full, 0.1, 0.5, "second"), moved_from=previous)
    assert all(torch.equal(_weights(model, "second")[k], meta.phi[k]) for k in meta.phi)


def test_fomaml_initialise_follows_its_documented_sampling(setup):
    """One outer step, one task: the support / query split is `randperm` of the 'meta' generator of round 0."""
    model, rows, collate = setup
    name = "has_cat"
    config = MetaInitConfig(
        method="fomaml", inner_steps=2, inner_lr=0.1, outer_steps=1, outer_lr=0.3, support_batch_size=3,
        query_batch_size=4, rows_per_task=8, seed=5,
    )  # fmt: skip
    meta = MetaInitializer(config)
    meta.remember(name, rows[name])
    kept = [{k: meta.rows[name][k][i] for k in meta.rows[name]} for i in range(8)]
    order = torch.randperm(8, generator=meta_generator(5, "meta", 0)).tolist()
    support, query = collate([kept[i] for i in order[:3]]), collate([kept[i] for i in order[3:7]])
    fresh = _weights(model)
    meta.initialise(model, SLOT, collate)
    _assert_close(meta.phi, _hand_fomaml(model, fresh, [([support] * 2, query)], 0.1, 0.3), moved_from=fresh)


def test_reptile_over_stored_experts_is_its_closed_form(setup):
    """No inner loop: n outer steps give mean_i W_i + (1 - eps)^n (phi_0 - mean_i W_i); an expert of another shape
    (a merged, wider one) is left out."""
    model, _, _ = setup
    fresh = _weights(model)
    w1, w2 = _phi(model, seed=3), _phi(model, seed=4)
    other = {k: torch.zeros(v.shape[0] + 1, *v.shape[1:]) for k, v in w1.items()}
    meta = MetaInitializer(MetaInitConfig(method="reptile_experts", outer_steps=3, outer_lr=0.4))
    done = meta.initialise(model, SLOT, experts={"a": w1, "b": w2, "wide": other})
    assert done["tasks"] == ["a", "b"]
    expected = {k: (w1[k] + w2[k]) / 2 + 0.6**3 * (fresh[k] - (w1[k] + w2[k]) / 2) for k in fresh}
    _assert_close(meta.phi, expected, moved_from=fresh)
    assert all(torch.equal(_weights(model)[k], meta.phi[k]) for k in meta.phi)
    assert meta.rows == {}  # no rows kept without an inner loop
    meta.remember("a", [{"input_ids": [1, 2], "labels": [1, 2]}])
    assert meta.rows == {}


def test_tasks_per_step_samples_the_tasks(setup):
    """tasks_per_step=1 of 2 stored experts: each outer step moves phi towards one of them (closed form per step)."""
    model, _, _ = setup
    fresh = _weights(model)
    w = {"a": _phi(model, seed=3), "b": _phi(model, seed=4)}
    meta = MetaInitializer(MetaInitConfig(method="reptile_experts", outer_steps=2, outer_lr=0.5, tasks_per_step=1))
    meta.initialise(model, SLOT, experts=w)
    gen = meta_generator(0, "meta", 0)
    expected = fresh
    for _ in range(2):
        (pick,) = [list(w)[i] for i in torch.randperm(2, generator=gen)[:1].tolist()]
        expected = {k: expected[k] + 0.5 * (w[pick][k] - expected[k]) for k in expected}
    _assert_close(meta.phi, expected, moved_from=fresh)


def test_nothing_to_learn_from_leaves_the_expert_fresh(setup):
    model, rows, collate = setup
    fresh = _weights(model)
    for method in ("reptile", "fomaml", "reptile_experts", "fresh"):
        meta = MetaInitializer(MetaInitConfig(method=method))
        assert meta.initialise(model, SLOT, collate, experts={}) is None
        assert meta.phi is None and meta.rounds == 0
    assert all(torch.equal(_weights(model)[k], fresh[k]) for k in fresh)
    with pytest.raises(ValueError, match="collator=None is not allowed"):
        meta = MetaInitializer(MetaInitConfig(method="reptile"))
        meta.remember("has_cat", rows["has_cat"])
        meta.initialise(model, SLOT, None)


def test_a_phi_of_another_shape_is_refused(setup):
    model, _, collate = setup
    meta = MetaInitializer(MetaInitConfig(method="reptile_experts"))
    meta.phi = {k: torch.zeros(v.shape[0] + 1, *v.shape[1:]) for k, v in _weights(model).items()}
    with pytest.raises(ValueError, match=r"MetaLearner.phi\[.*\]\.shape=.* is not allowed"):
        meta.initialise(model, SLOT, experts={"a": _weights(model)})
    meta.phi = {"nope.weight": torch.zeros(2)}
    with pytest.raises(ValueError, match=r"MetaLearner.phi is not allowed: its weights differ"):
        meta.initialise(model, SLOT, experts={"a": _weights(model)})


def test_remember_keeps_a_seeded_sample(setup):
    _, rows, _ = setup
    data = rows["has_cat"]
    a, b = (MetaInitializer(MetaInitConfig(method="reptile", rows_per_task=5, support_batch_size=4)) for _ in "ab")
    a.remember("has_cat", data)
    b.remember("has_cat", data)
    assert a.rows == b.rows and len(a.rows["has_cat"]["input_ids"]) == 5
    all_ids = [list(r) for r in data["input_ids"]]
    assert all(r in all_ids for r in a.rows["has_cat"]["input_ids"])
    assert set(a.rows["has_cat"]) == {"input_ids", "attention_mask", "labels"}
    c = MetaInitializer(MetaInitConfig(method="reptile", rows_per_task=5, support_batch_size=4, seed=1))
    c.remember("has_cat", data)
    assert c.rows != a.rows  # the seed picks the rows
    d = MetaInitializer(MetaInitConfig(method="reptile", rows_per_task=50))
    d.remember("has_cat", data)
    assert len(d.rows["has_cat"]["input_ids"]) == 8  # a small task keeps what it has


def test_state_round_trips_through_safetensors_and_json(setup, tmp_path):
    model, rows, collate = setup
    meta = MetaInitializer(MetaInitConfig(method="reptile", outer_steps=1, inner_steps=1))
    for name, data in rows.items():
        meta.remember(name, data)
    meta.initialise(model, SLOT, collate)
    save_state(tmp_path / "meta", meta.state_dict())
    restored = MetaInitializer(MetaInitConfig(method="reptile"))
    restored.load_state_dict(load_state(tmp_path / "meta"))
    assert restored.rows == meta.rows and restored.rounds == meta.rounds == 1
    assert set(restored.phi) == set(meta.phi)
    assert all(torch.equal(restored.phi[k], meta.phi[k]) for k in meta.phi)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"rounds": -1}, r"MetaInitializer.rounds=-1 is not allowed"),
        ({"rounds": True}, r"MetaInitializer.rounds=True is not allowed"),
        ({"phi": {"a.weight": [1.0]}}, r"MetaInitializer.phi\['a.weight'\]=list is not allowed"),
        ({"phi": {"a.weight": torch.tensor([1, 2])}}, r"MetaInitializer.phi\['a.weight'\].dtype=torch.int64"),
        ({"phi": {"a.weight": torch.tensor([float("nan")])}}, r"MetaInitializer.phi\['a.weight'\] holds 1 NaN"),
        ({"phi": {}}, r"MetaInitializer.phi=\{\} is not allowed"),
        ({"rows": []}, r"MetaInitializer.rows=\[\] is not allowed"),
        ({"rows": {"t": {"labels": [[1]]}}}, r"MetaInitializer.rows\['t'\]=.* is not allowed: expected columns"),
        ({"rows": {"t": {"input_ids": [[1, "x"]]}}}, r"rows\['t'\]\['input_ids'\]=.* is not allowed: expected lists"),
        ({"rows": {"t": {"input_ids": [[1, 2]], "labels": [[1]]}}}, r"rows\['t'\]\['labels'\] is not allowed"),
    ],
)
def test_bad_state_is_refused_naming_the_field(change, message):
    meta = MetaInitializer(MetaInitConfig(method="reptile"))
    good = {"method": "reptile", "rounds": 0, "phi": None, "rows": {}}
    with pytest.raises(StateLoadError, match=message):
        meta.load_state_dict({**good, **change})
    assert meta.phi is None and meta.rows == {} and meta.rounds == 0  # nothing changed


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"method": "maml"}, r"MetaInitConfig.method='maml' is not allowed: choose one of"),
        ({"inner_steps": 0}, r"MetaInitConfig.inner_steps=0 is not allowed: must be >= 1"),
        ({"inner_steps": 2.0}, r"MetaInitConfig.inner_steps=2.0 is not allowed: must be an integer"),
        ({"outer_steps": 0}, r"MetaInitConfig.outer_steps=0 is not allowed"),
        ({"inner_lr": 0.0}, r"MetaInitConfig.inner_lr=0.0 is not allowed: must be > 0"),
        ({"inner_lr": float("nan")}, r"MetaInitConfig.inner_lr=nan is not allowed"),
        ({"method": "reptile", "outer_lr": 1.5}, r"MetaInitConfig.outer_lr=1.5 is not allowed: must be > 0.0 and <= 1"),
        ({"method": "fomaml", "outer_lr": -1.0}, r"MetaInitConfig.outer_lr=-1.0 is not allowed: must be > 0"),
        ({"support_batch_size": 0}, r"MetaInitConfig.support_batch_size=0 is not allowed"),
        ({"query_batch_size": 0}, r"MetaInitConfig.query_batch_size=0 is not allowed"),
        ({"rows_per_task": 0}, r"MetaInitConfig.rows_per_task=0 is not allowed"),
        ({"tasks_per_step": 0}, r"MetaInitConfig.tasks_per_step=0 is not allowed"),
        ({"seed": -1}, r"MetaInitConfig.seed=-1 is not allowed: must be >= 0"),
        (
            {"support_batch_size": 9, "rows_per_task": 8},
            r"MetaInitConfig.support_batch_size=9 is not allowed: must be <= MetaInitConfig.rows_per_task=8",
        ),
        (
            {"method": "fomaml", "support_batch_size": 5, "query_batch_size": 4, "rows_per_task": 8},
            r"MetaInitConfig.query_batch_size=4 is not allowed: must be <= MetaInitConfig.rows_per_task=8 - "
            r"MetaInitConfig.support_batch_size=5",
        ),
    ],
)
def test_bad_options_name_the_field(options, message):
    with pytest.raises(ValueError, match=message):
        MetaInitConfig(**options)


def test_valid_options_and_their_limits():
    MetaInitConfig(method="fomaml", outer_lr=3.0, support_batch_size=4, query_batch_size=4, rows_per_task=8)
    MetaInitConfig(method="reptile", outer_lr=1.0, support_batch_size=8, query_batch_size=30, rows_per_task=8)
    MetaInitConfig(method="reptile_experts", tasks_per_step=2)


def test_options_through_the_run_config_name_the_option(tmp_path, tiny_model):
    base = {"output_dir": str(tmp_path), "report_to": [], "use_cpu": True}
    with pytest.raises(ValueError, match=r"ContinualConfig.meta_init_method='maml' is not allowed"):
        ContinualConfig(**base, meta_init_method="maml")
    with pytest.raises(ValueError, match=r"ContinualConfig.meta_init_support_batch_size=40 is not allowed: must be <= "
                       r"ContinualConfig.meta_init_rows_per_task=32"):  # fmt: skip
        ContinualConfig(**base, meta_init_support_batch_size=40)
    args = ContinualConfig(**base, meta_init_method="fomaml", meta_init_outer_lr=0.2, meta_init_tasks_per_step=3)
    plugin = ExpertRoutingPlugin.from_config(args, model=tiny_model)
    assert plugin.meta_init.config == MetaInitConfig(method="fomaml", outer_lr=0.2, tasks_per_step=3)
    with pytest.raises(TypeError, match=r"ExpertRoutingPlugin.meta_init='reptile' is not allowed: a MetaInitConfig"):
        ExpertRoutingPlugin(ExpertLibrary(tiny_model), Router(RouterConfig(dim=6)), meta_init="reptile")
