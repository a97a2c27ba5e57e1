"""Router: search, every decision rule, scorers, calibration and persistence."""

from __future__ import annotations

import json
import math

import pytest
import torch

from hf_adaptive.experts import Router, RouterConfig, faiss_available, fit_logistic

DIM = 8


def unit(i: int) -> torch.Tensor:
    v = torch.zeros(DIM)
    v[i] = 1.0
    return v


def at_cos(c: float, axis: int = 1) -> torch.Tensor:
    """A unit vector with cosine `c` to e0 (rotated towards e_axis)."""
    return c * unit(0) + math.sqrt(max(0.0, 1 - c * c)) * unit(axis)


def router(**kw) -> Router:
    """A router on raw cosine (the rule tests place vectors at given cosines); normalisation is tested apart."""
    return Router(RouterConfig(dim=DIM, **{"normalize": "none", "reuse_threshold": 0.9, "fork_threshold": 0.7, **kw}))


@pytest.mark.parametrize(
    "field, value",
    [
        ("dim", 0),
        ("scorer", "knn"),
        ("decision", "vote"),
        ("index", "annoy"),
        ("fork_threshold", 0.95),
        ("reuse_threshold", 1.5),
        ("p_fork", 0.9),
        ("tau_init", 0.1),
        ("tau_lr", 0.0),
        ("ucb_c", -1.0),
        ("bootstrap_experts", -1),
        ("top_k", 0),
        ("normalize", "whiten"),
        ("normalize_prior", 0.0),
    ],
)
def test_config_validation(field, value):
    with pytest.raises(ValueError, match=f"RouterConfig.{field}="):
        RouterConfig(**{"dim": DIM, field: value})


def test_dimension_is_checked():
    r = router()
    with pytest.raises(ValueError, match="does not match RouterConfig.dim=8"):
        r.add_expert("a", torch.ones(5))
    with pytest.raises(ValueError, match="does not match RouterConfig.dim=8"):
        r.route(torch.ones(9))


def test_exact_search_matches_brute_force_with_growth_and_removal():
    gen = torch.Generator().manual_seed(0)
    r = router(top_k=5)
    vecs = {f"e{i}": torch.randn(DIM, generator=gen) for i in range(40)}  # grows the buffer past 16 and 32
    for name, v in vecs.items():
        r.add_expert(name, v)
    r.remove_expert("e3")
    del vecs["e3"]
    r.update_profile("e7", -vecs["e7"])
    vecs["e7"] = -vecs["e7"]
    q = torch.randn(DIM, generator=gen)
    ref = sorted(((float(torch.dot(v / v.norm(), q / q.norm())), n) for n, v in vecs.items()), reverse=True)[:5]
    names, sims = r.nearest(q)
    assert names == [n for _, n in ref]
    torch.testing.assert_close(sims, torch.tensor([s for s, _ in ref]))
    assert len(r) == 39 and "e3" not in r


def test_empty_router_creates():
    assert router().route(unit(0)).action == "create"


@pytest.mark.parametrize("cos, action", [(0.95, "reuse"), (0.9, "reuse"), (0.8, "fork"), (0.5, "create")])
def test_threshold_rule(cos, action):
    r = router(reuse_threshold=0.9, fork_threshold=0.7)
    r.add_expert("near", at_cos(cos))
    r.add_expert("far", unit(3))
    d = r.route(unit(0))
    assert d.action == action and d.rule == "threshold"
    assert d.expert == (None if action == "create" else "near")
    assert math.isclose(d.score, cos, abs_tol=1e-6)


def test_ucb_explores_the_less_used_expert_and_follows_rewards():
    r = router(decision="ucb", ucb_c=0.2, ucb_reward_weight=0.2, reuse_threshold=0.9, fork_threshold=0.7)
    r.add_expert("a", at_cos(0.85, 1))
    r.add_expert("b", at_cos(0.85, 2))
    r.counts.update(a=5, b=0)
    d = r.route(unit(0))
    # by hand: total 5 uses; a: 0.85 + 0.2*(0/5 - 0.5) + 0.2*sqrt(ln 6 / 6); b: 0.85 + 0.2*sqrt(ln 6 / 1)
    va = 0.85 + 0.2 * (0 - 0.5) + 0.2 * math.sqrt(math.log(6) / 6)
    vb = 0.85 + 0.2 * math.sqrt(math.log(6))
    assert d.expert == "b" and math.isclose(d.score, vb, rel_tol=1e-5) and vb > va
    assert d.action == "reuse"  # the bonus lifts 0.85 (a fork under the plain threshold) over 0.9
    r.counts.update(a=5, b=5)
    r.rewards.update(a=5.0, b=0.0)
    d = r.route(unit(0))
    assert d.expert == "a"  # same similarity and counts: the rewarded one wins
    assert d.rule == "ucb"


def test_fit_logistic_matches_sklearn():
    from sklearn.linear_model import LogisticRegression

    gen = torch.Generator().manual_seed(1)
    x = torch.rand(60, generator=gen)
    y = (torch.rand(60, generator=gen) < torch.sigmoid(8 * (x - 0.6))).float()
    a, b = fit_logistic(x, y, l2=1e-3)
    ref = LogisticRegression(C=1e3, tol=1e-10, max_iter=10000).fit(x.numpy()[:, None], y.numpy())
    assert math.isclose(a, float(ref.coef_[0, 0]), rel_tol=1e-3)
    assert math.isclose(b, float(ref.intercept_[0]), rel_tol=1e-3)


def test_calibrated_rule():
    r = router(decision="calibrated", min_outcomes=4, p_reuse=0.5, p_fork=0.25)
    r.add_expert("e", at_cos(0.8))
    d = r.route(unit(0))
    assert d.rule == "calibrated(uncalibrated)" and d.action == "fork"  # threshold fallback
    # reuse succeeded for similar tasks, failed for dissimilar ones (with overlap, so the fit is finite)
    for score, ok in [
        (0.95, True),
        (0.9, True),
        (0.85, True),
        (0.75, False),
        (0.8, True),
        (0.6, False),
        (0.5, False),
        (0.78, False),
        (0.88, False),
    ]:
        r.record_outcome(at_cos(score), "e", score, ok)
    assert r.calibration is not None
    a, b = r.calibration
    assert a > 0
    d = r.route(unit(0))
    p = 1 / (1 + math.exp(-(a * 0.8 + b)))
    assert d.rule == "calibrated" and math.isclose(d.probability, p, rel_tol=1e-6)
    assert d.action == ("reuse" if p >= 0.5 else "fork" if p >= 0.25 else "create")
    r.update_profile("e", at_cos(0.3))
    assert r.route(unit(0)).action == "create"
    r.update_profile("e", at_cos(0.99))
    assert r.route(unit(0)).action == "reuse"


def test_adaptive_threshold_moves_with_outcomes():
    r = router(
        decision="adaptive",
        tau_init=0.9,
        tau_lr=0.5,
        tau_min=0.5,
        tau_max=0.99,
        reuse_threshold=0.9,
        fork_threshold=0.7,
    )
    r.add_expert("e", at_cos(0.8))
    assert r.route(unit(0)).action == "fork"  # 0.8 < τ = 0.9, within the band of 0.2
    r.record_outcome(unit(0), "e", 0.8, True)
    assert math.isclose(r.tau, 0.9 - 0.5 * (0.9 - 0.5))  # 0.7
    d = r.route(unit(0))
    assert d.action == "reuse" and d.rule == "adaptive"
    r.record_outcome(unit(0), "e", 0.8, False)
    assert math.isclose(r.tau, 0.7 + 0.5 * (0.99 - 0.7))  # 0.845
    assert r.route(unit(0)).action == "fork"
    for _ in range(30):
        r.record_outcome(unit(0), "e", 0.8, False)
    assert 0.98 < r.tau <= 0.99  # bounded by tau_max
    r.update_profile("e", at_cos(0.75))
    assert r.route(unit(0)).action == "create"  # 0.75 < τ - band = 0.79; it was a reuse at τ = 0.7


def test_bootstrap_creates_diverse_experts_first():
    r = router(bootstrap_experts=3, bootstrap_duplicate=0.98, reuse_threshold=0.9)
    r.add_expert("e", at_cos(0.95))
    d = r.route(unit(0))
    assert d.rule == "bootstrap" and d.action == "create"  # would be a reuse under the threshold rule
    r.update_profile("e", at_cos(0.99))
    d = r.route(unit(0))
    assert d.action == "reuse" and d.expert == "e"  # near-duplicates are reused even while bootstrapping
    r.update_profile("e", at_cos(0.95))
    r.add_expert("f", unit(4))
    r.add_expert("g", unit(5))
    d = r.route(unit(0))
    assert d.rule == "threshold" and d.action == "reuse"


def test_linear_scorer_is_linear_in_the_profile_and_learns(test_seed):
    r = router(scorer="linear", top_k=4, seed=test_seed)
    gen = torch.Generator().manual_seed(0)
    profiles = torch.nn.functional.normalize(torch.randn(6, DIM, generator=gen), dim=1)
    q = torch.nn.functional.normalize(torch.randn(DIM, generator=gen), dim=0)
    torch.testing.assert_close(r.linear.all_scores(q, profiles), r.linear(q.unsqueeze(0), profiles))
    # outcomes that depend only on coordinate 0 agreeing, not on the overall cosine
    r.add_expert("pos", unit(0) + 0.1 * unit(1))
    r.add_expert("neg", unit(1))
    for i in range(12):
        q = unit(0) + 0.05 * i * unit(2)
        r.record_outcome(q, "pos", 0.0, True)
        r.record_outcome(q, "neg", 0.0, False)
    before = r.fit_scorer(epochs=1, lr=0.0)
    after = r.fit_scorer(epochs=300, lr=0.05)
    assert after < before
    names, scores = r.scores(unit(0) + 0.5 * unit(1))
    assert names[0] == "pos" and scores[0] > 0.5 > scores[1], (names, scores)


def test_mlp_scorer_learns_and_reranks(test_seed):
    r = router(scorer="mlp", top_k=4, seed=test_seed)
    r.add_expert("a", unit(0))
    r.add_expert("b", at_cos(0.9))
    for _ in range(6):  # reuse of the most similar expert ("a") always failed, of "b" always worked
        r.record_outcome(unit(0), "a", 1.0, False)
        r.record_outcome(unit(0), "b", 0.9, True)
    assert r.fit_scorer(epochs=300) < 0.1  # a separable, noise-free set of outcomes: fitted from any seed
    names, scores = r.scores(unit(0))
    assert names[0] == "b" and scores[0] > 0.9, (names, scores)


def test_state_round_trip(tmp_path):
    r = router(decision="calibrated", scorer="linear", min_outcomes=2)
    r.add_expert("a", at_cos(0.9))
    r.add_expert("b", unit(3))
    r.record_decision(r.route(unit(0)))
    r.record_outcome(unit(0), "a", 0.9, True)
    r.record_outcome(unit(3), "a", 0.1, False)
    r.record_outcome(unit(2), "b", 0.4, False)
    r.fit_scorer(epochs=20)
    r.save(tmp_path / "router")
    assert (tmp_path / "router" / "tensors.safetensors").is_file()
    meta = json.loads((tmp_path / "router" / "state.json").read_text())
    assert meta["version"] == 2
    back = Router.load(tmp_path / "router")
    assert back.names == r.names and back.counts == r.counts and back.rewards == r.rewards
    assert back.tau == r.tau and back.calibration == r.calibration and back.n_decisions == 1
    torch.testing.assert_close(back.profiles, r.profiles)
    assert [(o.expert, o.score, o.success) for o in back.outcomes] == [
        (o.expert, o.score, o.success) for o in r.outcomes
    ]
    for q in [unit(0), at_cos(0.5), unit(3)]:
        assert back.route(q) == r.route(q)
    meta["version"] = 99
    (tmp_path / "router" / "state.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="version=99"):
        Router.load(tmp_path / "router")
    meta["version"] = 1  # before normalisation existed: loads, and keeps routing on raw cosine
    (tmp_path / "router" / "state.json").write_text(json.dumps(meta))
    old = Router.load(tmp_path / "router")
    assert old.config.normalize == "none" and old.n_observed == 0 and old.names == r.names
    with pytest.raises(ValueError, match="dim=8 does not match RouterConfig.dim=4"):
        Router(RouterConfig(dim=4)).load_state_dict(r.state_dict())


@pytest.mark.skipif(faiss_available(), reason="faiss is installed")
def test_faiss_index_needs_faiss():
    with pytest.raises(ValueError, match="RouterConfig.index='faiss'"):
        RouterConfig(dim=DIM, index="faiss")
    assert Router(RouterConfig(dim=DIM, index="auto")).route(unit(0)).action == "create"


@pytest.mark.skipif(not faiss_available(), reason="faiss is not installed")
def test_faiss_search_matches_exact():
    gen = torch.Generator().manual_seed(0)
    profiles = torch.randn(300, DIM, generator=gen)
    exact = router(top_k=5)
    flat = router(top_k=5, index="faiss")
    hnsw = router(top_k=5, index="faiss", ann_min_experts=100)
    for r in (exact, flat, hnsw):
        r.add_experts([f"e{i}" for i in range(300)], profiles)
    recall = []
    for _ in range(20):
        q = torch.randn(DIM, generator=gen)
        names, sims = exact.nearest(q)
        flat_names, flat_sims = flat.nearest(q)
        assert flat_names == names
        torch.testing.assert_close(flat_sims, sims, atol=1e-5, rtol=1e-5)
        recall.append(len(set(hnsw.nearest(q)[0]) & set(names)) / 5)
        a, b = flat.route(q), exact.route(q)
        assert (a.action, a.expert) == (b.action, b.expert) and math.isclose(a.score, b.score, abs_tol=1e-5)
    assert sum(recall) / len(recall) >= 0.9  # HNSW is approximate, but close on 300 points
    flat.remove_expert(names[0])  # the index is rebuilt after a change
    assert names[0] not in flat.nearest(q)[0]


@pytest.mark.skipif(not faiss_available(), reason="faiss is not installed")
def test_faiss_searches_the_normalised_profiles():
    gen = torch.Generator().manual_seed(1)
    profiles = torch.randn(50, DIM, generator=gen) + 2 * unit(0)
    exact = Router(RouterConfig(dim=DIM, top_k=5, normalize="standardize"))
    flat = Router(RouterConfig(dim=DIM, top_k=5, normalize="standardize", index="faiss"))
    for r in (exact, flat):
        r.add_experts([f"e{i}" for i in range(50)], profiles)
    q = torch.randn(DIM, generator=gen) + 2 * unit(0)
    assert flat.nearest(q)[0] == exact.nearest(q)[0]
    more = torch.randn(30, DIM, generator=gen) * 3
    for r in (exact, flat):  # new statistics change the ranking space; the index follows
        r.observe(more)
    names, sims = exact.nearest(q)
    flat_names, flat_sims = flat.nearest(q)
    assert flat_names == names
    torch.testing.assert_close(flat_sims, sims, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------- normalisation


def reference_transform(observed: torch.Tensor, x: torch.Tensor, k: float, mode: str) -> torch.Tensor:
    """Slow reference of the router's normalisation: shrunk mean and variance over unit rows, loop by dimension."""
    unit_rows = [v / v.norm() for v in observed.double()]
    n, d = len(unit_rows), observed.size(1)
    x = x.double() / x.double().norm()
    out = torch.zeros(d, dtype=torch.float64)
    for j in range(d):
        col = [float(v[j]) for v in unit_rows]
        mean_hat = sum(col) / n
        var_hat = sum((c - mean_hat) ** 2 for c in col) / n
        mean = sum(col) / (n + k)
        var = (n * var_hat + k / d) / (n + k) if mode == "standardize" else 1.0
        out[j] = (float(x[j]) - mean) / math.sqrt(var)
    return (out / out.norm()).float()


@pytest.mark.parametrize("mode", ["center", "standardize"])
def test_normalisation_matches_reference_and_search_uses_it(mode):
    gen = torch.Generator().manual_seed(3)
    r = Router(RouterConfig(dim=DIM, normalize=mode, normalize_prior=1.5, top_k=4))
    profiles = torch.randn(12, DIM, generator=gen) + 3 * unit(1)  # a shared component
    queries = torch.randn(5, DIM, generator=gen) + 3 * unit(1)
    r.add_experts([f"e{i}" for i in range(12)], profiles)
    for q in queries:
        r.record_decision(r.route(q), new_expert="e0", query=q)
    assert r.n_observed == 17
    observed = torch.cat([profiles, queries])
    q = torch.randn(DIM, generator=gen) + 3 * unit(1)
    zq = reference_transform(observed, q, 1.5, mode)
    torch.testing.assert_close(r.transform(q), zq, atol=1e-5, rtol=1e-5)
    ref = sorted(
        ((float(reference_transform(observed, p, 1.5, mode) @ zq), f"e{i}") for i, p in enumerate(profiles)),
        reverse=True,
    )[:4]
    names, sims = r.nearest(q)
    assert names == [n for _, n in ref]
    torch.testing.assert_close(sims, torch.tensor([s for s, _ in ref]), atol=1e-5, rtol=1e-5)


def test_normalisation_without_observations_is_plain_cosine():
    r = Router(RouterConfig(dim=DIM))  # standardize by default
    torch.testing.assert_close(r.transform(at_cos(0.3)), at_cos(0.3))
    plain = router()
    plain.add_expert("a", at_cos(0.97))
    assert r.config.normalize == "standardize" and plain.route(unit(0)).action == "reuse"


def signatures_with_a_common_component(n_tasks: int, per_task: int, seed: int = 0):
    """Unit signatures of `n_tasks` tasks that all share one dominant direction (as on a pretrained backbone):
    raw cosine between different tasks ≈ 0.98, the task-specific part is small."""
    gen = torch.Generator().manual_seed(seed)
    common = torch.nn.functional.normalize(torch.randn(64, generator=gen), dim=0)
    centres = torch.randn(n_tasks, 64, generator=gen) * 0.02
    sigs = {
        t: [
            torch.nn.functional.normalize(common + centres[t] + 0.004 * torch.randn(64, generator=gen), dim=0)
            for _ in range(per_task)
        ]
        for t in range(n_tasks)
    }
    return sigs


@pytest.mark.parametrize("normalize, expect_right", [("none", False), ("standardize", True)])
def test_standardisation_separates_tasks_sharing_a_common_component(normalize, expect_right):
    """A stream of 8 tasks, each seen twice: with raw cosine every different task looks like a recurrence
    (cosine ≈ 0.98); standardised against the signatures seen so far, only true recurrences are reused."""
    sigs = signatures_with_a_common_component(8, 2)
    raw = torch.stack([sigs[0][0], sigs[1][0]])
    assert float(raw[0] @ raw[1]) > 0.95
    r = Router(RouterConfig(dim=64, normalize=normalize))  # default thresholds 0.5 / 0.3
    correct = []
    stream = [(t, 0) for t in range(8)] + [(t, 1) for t in range(8)]
    for t, occurrence in stream:
        q = sigs[t][occurrence]
        d = r.route(q)
        right = d.action == "reuse" and d.expert == f"t{t}" if occurrence else d.action != "reuse"
        correct.append(right)
        r.record_decision(d, new_expert=None if occurrence else f"t{t}", query=q)
        if not occurrence:
            r.add_expert(f"t{t}", q)
    share = sum(correct) / len(correct)
    assert (share >= 0.9) if expect_right else (share <= 0.6)


def test_normalisation_statistics_persist(tmp_path):
    r = Router(RouterConfig(dim=DIM, normalize="standardize"))
    gen = torch.Generator().manual_seed(0)
    r.add_experts(["a", "b", "c"], torch.randn(3, DIM, generator=gen) + unit(2))
    r.observe(torch.randn(4, DIM, generator=gen))
    r.save(tmp_path / "router")
    back = Router.load(tmp_path / "router")
    assert back.n_observed == 7
    q = torch.randn(DIM, generator=gen)
    torch.testing.assert_close(back.transform(q), r.transform(q))
    assert back.route(q) == r.route(q)
    with pytest.raises(ValueError, match="do not match RouterConfig.dim=8"):
        r.observe(torch.ones(3))
