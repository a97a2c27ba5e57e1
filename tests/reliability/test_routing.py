"""Routing reliability (issues #11 §6 and #17): learned scorers are trained from the outcomes the product path
records (cosine until then), and a reuse that costs the old tasks accuracy is rolled back."""

from __future__ import annotations

import json
import math

import pytest
import torch

from hf_adaptive.experts import ExpertLibrary, ExpertRoutingPlugin, Router, RouterConfig, SignatureConfig
from hf_adaptive.experts.plugin import signature_dim

DIM = 8


def unit(i: int) -> torch.Tensor:
    v = torch.zeros(DIM)
    v[i] = 1.0
    return v


def at_cos(c: float, axis: int = 1) -> torch.Tensor:
    return c * unit(0) + math.sqrt(1 - c * c) * unit(axis)


def raw_router(**kw) -> Router:
    return Router(RouterConfig(dim=DIM, **{"normalize": "none", "reuse_threshold": 0.9, "fork_threshold": 0.7, **kw}))


# ---------------------------------------------------------------------------------------------- learned scorers
@pytest.mark.parametrize("scorer", ["linear", "mlp"])
def test_unfitted_learned_scorer_routes_by_cosine(scorer):
    """Before any fit, a learned scorer's output is meaningless against the thresholds: the router scores by
    cosine (reference: a plain loop of cosines) and decides exactly as the cosine router does."""
    learned, cosine = raw_router(scorer=scorer), raw_router()
    experts = {"a": at_cos(0.95), "b": at_cos(0.8, 2), "c": unit(3)}
    for r in (learned, cosine):
        for name, vec in experts.items():
            r.add_expert(name, vec)
    assert not learned.scorer_fitted and learned.thresholds() == (0.9, 0.7)
    names, scores = learned.scores(unit(0))
    ref = sorted(((float(torch.dot(v / v.norm(), unit(0))), n) for n, v in experts.items()), reverse=True)
    assert names == [n for _, n in ref]
    torch.testing.assert_close(scores, torch.tensor([s for s, _ in ref]))
    for q in (unit(0), at_cos(0.85, 2), unit(3), unit(5)):
        a, b = learned.route(q), cosine.route(q)
        assert (a.action, a.expert, a.score) == (b.action, b.expert, b.score)


def test_record_outcome_refits_the_scorer_from_all_outcomes():
    """`record_outcome` (what the plugin calls after each reuse) trains the scorer once `min_outcomes` outcomes
    with both labels exist; the weights are those of one fit from the seeded start on all outcomes."""
    r = raw_router(scorer="mlp", min_outcomes=4)
    r.add_expert("a", unit(0))
    r.add_expert("b", at_cos(0.9))
    outcomes = [("a", 1.0, False), ("b", 0.9, True)] * 3  # reusing the most similar expert "a" always failed
    for i, (expert, score, ok) in enumerate(outcomes):
        r.record_outcome(unit(0), expert, score, ok)
        assert r.scorer_fitted == (i + 1 >= 4)
    reference = raw_router(scorer="mlp", min_outcomes=100)  # never fits by itself
    reference.add_expert("a", unit(0))
    reference.add_expert("b", at_cos(0.9))
    for expert, score, ok in outcomes:
        reference.record_outcome(unit(0), expert, score, ok)
    assert not reference.scorer_fitted
    reference.fit_scorer()
    for key, value in reference.mlp.state_dict().items():
        assert torch.equal(r.mlp.state_dict()[key], value), key
    # the fitted scorer's score is p(reuse succeeds), compared with p_reuse / p_fork
    assert r.thresholds() == (r.config.p_reuse, r.config.p_fork)
    d = r.route(unit(0))
    assert (d.action, d.expert) == ("reuse", "b") and d.score > r.config.p_reuse
    assert raw_router().route(unit(0)).action == "create"  # (no experts) and cosine would reuse "a":
    cos = raw_router()
    cos.add_expert("a", unit(0))
    cos.add_expert("b", at_cos(0.9))
    assert cos.route(unit(0)).expert == "a"


def test_fitted_scorer_state_round_trip(tmp_path):
    r = raw_router(scorer="linear", min_outcomes=2)
    r.add_expert("a", unit(0))
    r.add_expert("b", unit(3))
    r.record_outcome(unit(0), "a", 1.0, True)
    r.record_outcome(unit(3), "a", 0.0, False)
    assert r.scorer_fitted
    r.save(tmp_path / "router")
    back = Router.load(tmp_path / "router")
    assert back.scorer_fitted
    for q in (unit(0), at_cos(0.5), unit(3)):
        assert back.route(q) == r.route(q)
    meta = json.loads((tmp_path / "router" / "state.json").read_text())
    del meta["scorer_fitted"]  # a state from before the flag: its scorer never trained in a run, so cosine
    (tmp_path / "router" / "state.json").write_text(json.dumps(meta))
    old = Router.load(tmp_path / "router")
    assert not old.scorer_fitted and old.scores(unit(0))[1][0] == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------- checked reuses
def _adapter(library: ExpertLibrary, name: str) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(library.model, adapter_name=name).items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class _FragilePlugin(ExpertRoutingPlugin):
    """Tasks that conflict by construction, whatever the training trajectory: a task's accuracy is 1 with exactly
    the adapter weights it had when it was learnt (recorded at its end) and 0 with any other weights."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.learnt: dict[str, dict[str, torch.Tensor]] = {}

    def _accuracy(self, trainer, task, expert):
        weights = _adapter(self.library, expert)
        if task.name not in self.learnt:
            self.learnt[task.name] = weights
            return 1.0
        return 1.0 if _same(weights, self.learnt[task.name]) else 0.0


def _forced_reuse_run(tiny_model, tokenizer, make_args, tmp_path, tolerance, verify=True, **router_kw):
    """first_color, then has_cat forced to reuse first_color's expert (reuse threshold -1)."""
    from hf_adaptive.tasks import builtin_suite
    from hf_adaptive.trainer import ContinualTrainer

    sig = SignatureConfig(n_examples=4, batch_size=4, sketch_dim=8, text_dim=None)
    library = ExpertLibrary(tiny_model, experiment_id="checked-reuse")
    router = Router(
        RouterConfig(
            dim=signature_dim(tiny_model, sig), normalize="none", reuse_threshold=-1.0, fork_threshold=-1.0, **router_kw
        )
    )
    extra = {} if verify else {"verify_reuse": False}  # the default checks reuses
    plugin = _FragilePlugin(library, router, sig, tolerance=tolerance, eval_limit=8, **extra)
    args = make_args(
        tmp_path,
        learning_rate=1e-2,
        adapter_strategy="full",
        evaluate_unseen_tasks=False,
        save_results_plot=False,
        continual_eval_limit=8,
        logging_strategy="no",
    )
    trainer = ContinualTrainer(model=tiny_model, args=args, processing_class=tokenizer, callbacks=[plugin])
    tasks = builtin_suite(["first_color", "has_cat"], n_train=8, n_eval=8, seed=0)
    trainer.train_sequence(tasks, evaluate_baseline=False)
    return plugin, library, router


def test_a_reuse_that_costs_the_old_task_is_rolled_back(tiny_model, tokenizer, make_args, tmp_path):
    plugin, library, router = _forced_reuse_run(tiny_model, tokenizer, make_args, tmp_path, tolerance=0.05)
    d = plugin.decisions[-1]
    assert (d["action"], d["expert"]) == ("reuse", "expert_first_color")
    # the old task's expert is bit-identical to what it was when first_color ended; has_cat got its own expert
    assert _same(_adapter(library, "expert_first_color"), plugin.learnt["first_color"])
    assert library.names == ["expert_first_color", "expert_has_cat"]
    assert d["checked"] and d["rolled_back"] and d["success"] is False
    assert d["old_task_accuracy"] == {"first_color": {"before": 1.0, "after": 0.0}}
    assert library.experts["expert_has_cat"].parent == "expert_first_color"
    assert plugin.task_expert == {"first_color": "expert_first_color", "has_cat": "expert_has_cat"}
    assert _same(_adapter(library, "expert_has_cat"), plugin.learnt["has_cat"])
    assert not _same(plugin.learnt["has_cat"], plugin.learnt["first_color"])  # the fork did train
    # the router: a failed reuse of expert_first_color; the new expert has a profile and the use
    assert [(o.expert, o.success) for o in router.outcomes] == [("expert_first_color", False)]
    assert router.names == ["expert_first_color", "expert_has_cat"]
    assert router.counts == {"expert_first_color": 1, "expert_has_cat": 1}
    torch.testing.assert_close(
        router.profiles[1], torch.nn.functional.normalize(plugin.task_signatures["has_cat"], dim=0)
    )


def test_a_harmless_reuse_keeps_one_expert_and_trains_the_scorer(tiny_model, tokenizer, make_args, tmp_path):
    """tolerance=1.0: every reuse is within tolerance, the fork's weights replace the original's and the fork
    goes. With scorer="linear", the outcome recorded by the plugin fits the scorer (product path)."""
    plugin, library, router = _forced_reuse_run(
        tiny_model, tokenizer, make_args, tmp_path, tolerance=1.0, scorer="linear", min_outcomes=2
    )
    d = plugin.decisions[-1]
    assert d["checked"] and not d["rolled_back"] and d["success"] is True
    assert library.names == ["expert_first_color"] and "expert_has_cat" not in library.model.peft_config
    assert plugin.task_expert == {"first_color": "expert_first_color", "has_cat": "expert_first_color"}
    trained = _adapter(library, "expert_first_color")
    assert _same(trained, plugin.learnt["has_cat"]) and not _same(trained, plugin.learnt["first_color"])
    assert router.names == ["expert_first_color"] and router.counts == {"expert_first_color": 2}
    assert [(o.expert, o.success) for o in router.outcomes] == [("expert_first_color", True)]
    assert not router.scorer_fitted  # one label only: still cosine
    router.record_outcome(plugin.task_signatures["has_cat"], "expert_first_color", 0.0, False)
    assert router.scorer_fitted


def test_unchecked_reuse_trains_the_expert_in_place(tiny_model, tokenizer, make_args, tmp_path):
    """verify_reuse=False: the old behaviour (no fork; the failure is only recorded)."""
    plugin, library, _ = _forced_reuse_run(tiny_model, tokenizer, make_args, tmp_path, tolerance=0.05, verify=False)
    d = plugin.decisions[-1]
    assert not d["checked"] and not d["rolled_back"] and d["success"] is False
    assert library.names == ["expert_first_color"]
    assert not _same(_adapter(library, "expert_first_color"), plugin.learnt["first_color"])


def test_verify_reuse_is_validated(tiny_model, make_args, tmp_path):
    expected = r"ExpertRoutingPlugin.verify_reuse='yes' is not allowed: must be True or False"
    with pytest.raises(ValueError, match=expected):
        ExpertRoutingPlugin(ExpertLibrary(tiny_model), Router(RouterConfig(dim=4)), verify_reuse="yes")
    with pytest.raises(ValueError, match=r"ContinualConfig.router_verify_reuse=1 is not allowed"):
        make_args(tmp_path, router_verify_reuse=1)
    args = make_args(tmp_path, router_verify_reuse=False, signature_parts=["context"], router_normalize="none")
    assert ExpertRoutingPlugin.from_config(args, model=tiny_model).verify_reuse is False


# ---------------------------------------------------------------------------------------------- benchmark verdicts
def _router_benchmark():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "router.py"
    spec = importlib.util.spec_from_file_location("router_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_router_benchmark_verdicts_follow_the_numbers():
    """benchmarks/router.py printed a fixed verdict; every sentence is now computed from the measured rows."""
    verdicts = _router_benchmark().verdicts

    def rows(exact_10k: float) -> list[dict]:
        common = {"linear_ms": 0.2, "mlp_ms": 0.3, "search_ms": 0.05}
        return [
            {"experts": 10, "dim": 198, "cosine_ms": 0.1, "loop_ms": 1.0, "speedup_vs_loop": 10.0, **common},
            {"experts": 10000, "dim": 198, "cosine_ms": exact_10k, **common},
        ]

    fast, slow = " ".join(verdicts(rows(0.5))), " ".join(verdicts(rows(2.0)))
    assert "exact search 0.500 ms per decision, under the 1 ms target" in fast
    assert "under the target everywhere" in fast
    assert "exact search 2.000 ms per decision, over the 1 ms target" in slow
    assert "over the target at 10000 experts at d=198" in slow
    assert "from 0.100 to 2.000 ms (20.0x for 1000x experts)" in slow
