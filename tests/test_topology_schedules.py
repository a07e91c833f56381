"""Per-round schedules, churn and RoundPlan (fedmerge.topology.schedules)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmerge.errors import ConfigError
from fedmerge.topology import RoundPlan, build_topology, stochasticity


def assert_row(plan: RoundPlan) -> dict[str, bool]:
    props = stochasticity(plan.mixing)
    assert props["row_stochastic"] and props["nonnegative"]
    return props


def test_static_round_is_the_mixing_matrix_and_plan_is_consistent():
    topo = build_topology("star-8")
    plan = topo.round(5)
    np.testing.assert_allclose(plan.mixing.toarray(), topo.mixing.toarray())
    assert plan.kind == "static" and plan.round == 5 and plan.active is None
    assert plan.edges == tuple(sorted(tuple(sorted(e)) for e in topo.graph.edges))
    assert len(plan.messages) == 2 * len(plan.edges)
    w = plan.mixing.toarray()
    for i, row in enumerate(plan.neighbors):
        assert dict(row) == {j: w[i, j] for j in np.flatnonzero(w[i])}
        assert i in dict(row)


def test_random_matching_reproducible_and_a_matching_of_the_graph():
    topo = build_topology("small-world-16", overrides=["schedule=random_matching"])
    again = build_topology("small-world-16", overrides=["schedule=random_matching"])
    other = build_topology("small-world-16", overrides=["schedule=random_matching", "seed=5"])
    graph_edges = {tuple(sorted(e)) for e in topo.graph.edges}
    plans = [topo.round(r) for r in range(6)]
    assert [p.edges for p in plans] == [again.round(r).edges for r in range(6)]
    assert [topo.round(3).edges] == [plans[3].edges]  # order of asking does not matter
    assert len({tuple(p.edges) for p in plans}) > 1
    assert plans[0].edges != other.round(0).edges
    for plan in plans:
        assert assert_row(plan)["doubly_stochastic"]
        ends = [v for e in plan.edges for v in e]
        assert len(ends) == len(set(ends))  # a matching
        assert set(plan.edges) <= graph_edges
        # maximal: no graph edge joins two unmatched nodes
        assert not any(u not in ends and v not in ends for u, v in graph_edges)
        for u, v in plan.edges:
            assert plan.mixing[u, v] == pytest.approx(0.5) == plan.mixing[u, u]


def test_random_matching_on_complete_graph_is_perfect():
    topo = build_topology("matching-8")
    for r in range(5):
        assert len(topo.round(r).edges) == 4


def test_one_peer_exponential_power_of_two_is_symmetric_and_exact_in_log_n_rounds():
    topo = build_topology("one-peer-exp-16")
    product = np.eye(16)
    for r in range(4):
        plan = topo.round(r)
        assert plan.kind == "one_peer"
        assert assert_row(plan)["symmetric"]
        assert sorted(plan.edges) == sorted((i, i + 2**r) for i in range(16) if not i & 2**r)
        product = plan.mixing.toarray() @ product
    np.testing.assert_allclose(product, np.full((16, 16), 1 / 16), atol=1e-12)
    assert topo.round(4).edges == topo.round(0).edges


def test_one_peer_exponential_other_n_is_directed_doubly_stochastic():
    topo = build_topology("ring", n=12, overrides=["schedule=one_peer_exponential"])
    for r in range(5):
        plan = topo.round(r)
        offset = 2 ** (r % 4)
        props = assert_row(plan)
        assert props["doubly_stochastic"] and not props["symmetric"]
        assert plan.messages == tuple(sorted(((i - offset) % 12, i) for i in range(12)))
        assert plan.neighbors[0] == tuple(sorted([(0, 0.5), ((-offset) % 12, 0.5)]))


def test_sparse_then_complete_merges_once_at_the_end():
    topo = build_topology("sparse-then-merge-16")
    again = build_topology("sparse-then-merge-16")
    ring_edges = {tuple(sorted(e)) for e in topo.graph.edges}
    for r in range(9):
        plan = topo.round(r, total_rounds=10)
        assert plan.kind == "sparse"
        assert set(plan.edges) <= ring_edges
        assert plan.edges == again.round(r, total_rounds=10).edges
        assert assert_row(plan)["doubly_stochastic"]
    last = topo.round(9, total_rounds=10)
    assert last.kind == "complete"
    np.testing.assert_allclose(last.mixing.toarray(), np.full((16, 16), 1 / 16))
    # with p = 0.3 about 30% of the 16 ring edges are kept on average
    kept = np.mean([len(topo.round(r, total_rounds=400).edges) for r in range(300)])
    assert 0.2 * 16 < kept < 0.4 * 16
    half = build_topology("sparse-then-merge-16", overrides=["schedule.fraction=0.5"])
    assert [half.round(r, total_rounds=10).kind for r in (4, 5, 6)] == [
        "sparse",
        "complete",
        "sparse",
    ]
    with pytest.raises(ConfigError, match="needs the number of rounds"):
        topo.round(0)
    fixed = build_topology("sparse-then-merge-16", overrides=["schedule.total_rounds=3"])
    assert fixed.round(2).kind == "complete"


def test_churn_drops_nodes_and_renormalizes_over_those_present():
    topo = build_topology("ring-8")
    present = {0, 1, 2, 3, 5, 6}
    plan = topo.round(0, active=present)
    w = plan.mixing.toarray()
    assert plan.active == frozenset(present)
    props = assert_row(plan)
    assert props["doubly_stochastic"] and props["symmetric"]
    for gone in (4, 7):
        np.testing.assert_allclose(w[gone], np.eye(8)[gone])
        assert not w[:, gone][np.arange(8) != gone].any()
        assert all(gone not in e for e in plan.edges)
    # node 0 lost neighbour 7: MH over the path 0-1-2-3 gives w01 = 1/3, w00 = 2/3
    assert w[0, 1] == pytest.approx(1 / 3) and w[0, 0] == pytest.approx(2 / 3)
    assert w[5, 6] == pytest.approx(1 / 2) and w[6, 6] == pytest.approx(1 / 2)
    uniform = build_topology("ring-8", overrides=["mixing=uniform"]).round(0, active=present)
    assert uniform.mixing[0, 0] == pytest.approx(1 / 2)
    merge = build_topology("sparse-then-merge-16").round(3, active={1, 4, 9}, total_rounds=4)
    m = merge.mixing.toarray()
    np.testing.assert_allclose(m[np.ix_([1, 4, 9], [1, 4, 9])], 1 / 3)
    assert m[0, 0] == 1.0 and m.sum() == pytest.approx(16)
    with pytest.raises(ConfigError, match=r"active nodes \[8\]"):
        topo.round(0, active={1, 8})
    with pytest.raises(ConfigError, match="round must be"):
        topo.round(-1)


@pytest.mark.parametrize(
    "schedule", ["static", "random_matching", "one_peer_exponential", "sparse_then_complete"]
)
def test_every_schedule_row_stochastic_under_churn(schedule):
    topo = build_topology("small-world-64", overrides=[f"schedule={schedule}"])
    rng = np.random.default_rng(1)
    for r in range(6):
        active = set(np.flatnonzero(rng.random(64) < 0.7).tolist())
        plan = topo.round(r, active=active, total_rounds=6)
        props = assert_row(plan)
        assert props["doubly_stochastic"] or schedule == "one_peer_exponential"
        for i in set(range(64)) - active:
            assert plan.neighbors[i] == ((i, 1.0),)
            assert all(i not in (s, d) for s, d in plan.messages)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(min_value=2, max_value=24),
    p=st.floats(min_value=0.2, max_value=1.0),
    seed=st.integers(0, 1000),
    r=st.integers(0, 50),
    schedule=st.sampled_from(
        ["static", "random_matching", "one_peer_exponential", "sparse_then_complete"]
    ),
    rule=st.sampled_from(["metropolis_hastings", "uniform", "max_degree", "edge_weights"]),
    data=st.data(),
)
def test_any_round_on_any_graph_is_stochastic(n, p, seed, r, schedule, rule, data):
    spec = {"graph": "erdos_renyi", "n": n, "p": p, "seed": seed, "allow_disconnected": True}
    topo = build_topology(spec, overrides={"schedule": schedule, "mixing": rule})
    active = data.draw(st.sets(st.integers(0, n - 1)) | st.none())
    plan = topo.round(r, active=active, total_rounds=r + 1 + data.draw(st.integers(0, 3)))
    props = assert_row(plan)
    if rule in ("metropolis_hastings", "max_degree") and (
        schedule != "one_peer_exponential" or n & (n - 1) == 0
    ):
        assert props["doubly_stochastic"] and props["symmetric"]
    w = plan.mixing.toarray()
    assert (np.diag(w) > 0).all()
    for i in set(range(n)) - (set(range(n)) if active is None else active):
        np.testing.assert_array_equal(w[i], np.eye(n)[i])
        assert not np.delete(w[:, i], i).any()


def test_measured_contraction_against_the_spectral_bound():
    for name in ("ring-16", "small-world-64", "star-8"):
        topo = build_topology(name)
        assert topo.measure_contraction(30) <= topo.analyze()["second_eigenvalue"] + 1e-9
    exact = build_topology("one-peer-exp-16").analyze()
    assert exact["measured_contraction"] < 1e-3 and exact["measured_rounds"] == 20
    sparse = build_topology("sparse-then-merge-16")  # the sparse phase only: slower than static
    static = build_topology("ring-16")
    assert static.measure_contraction(60) < sparse.measure_contraction(60) < 1.0
    assert "measured_contraction" not in static.analyze()


SCHEDULES = ["static", "random_matching", "one_peer_exponential", "sparse_then_complete"]


def same_plan(a: RoundPlan, b: RoundPlan) -> None:
    assert (a.round, a.kind, a.active) == (b.round, b.kind, b.active)
    np.testing.assert_array_equal(a.mixing.indptr, b.mixing.indptr)
    np.testing.assert_array_equal(a.mixing.indices, b.mixing.indices)
    np.testing.assert_array_equal(a.mixing.data, b.mixing.data)  # bit for bit
    assert (a.neighbors, a.messages, a.edges) == (b.neighbors, b.messages, b.edges)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_cached_plans_equal_freshly_built_ones(schedule, monkeypatch):
    """Rounds asked in any order, with repeating and changing sets of nodes present: the
    plans of a caching topology are those built from scratch (no cache) bit for bit."""
    asks = [(r, None) for r in (0, 1, 5, 0, 4, 9, 1)] + [
        (r, {0, 2, 3, 5, 7, 8}) for r in (2, 6, 2, 3, 10)
    ] + [(3, {1, 4}), (3, None), (7, {1, 4})]  # fmt: skip
    cached = build_topology("ring", n=12, overrides=[f"schedule={schedule}"])
    plans = [cached.round(r, active=a, total_rounds=11) for r, a in asks]
    monkeypatch.setattr("fedmerge.topology.build.PLAN_CACHE", 0)
    fresh = build_topology("ring", n=12, overrides=[f"schedule={schedule}"])
    for (r, a), plan in zip(asks, plans, strict=True):
        same_plan(plan, fresh.round(r, active=a, total_rounds=11))
    assert not fresh._plans


def test_a_repeating_schedule_builds_each_phase_once():
    static = build_topology("ring-8")
    assert static.round(3).mixing is static.round(7).mixing  # shared, read-only
    assert static.round(7).round == 7
    assert static.round(3, active={0, 1, 2}).mixing is not static.round(3).mixing
    one_peer = build_topology("ring", n=12, overrides=["schedule=one_peer_exponential"])
    assert one_peer.round(1).mixing is one_peer.round(5).mixing  # period ⌈log2 12⌉ = 4
    assert one_peer.round(1).messages != one_peer.round(2).messages
    matching = build_topology("ring-8", overrides=["schedule=random_matching"])
    assert matching.round(1).mixing is not matching.round(1).mixing  # random: never reused


def test_the_plan_cache_is_bounded():
    from fedmerge.topology.build import PLAN_CACHE

    topo = build_topology("ring-16")
    for k in range(1, 2**16, 397):  # many distinct sets of nodes present
        topo.round(k, active=[i for i in range(16) if k >> i & 1])
    assert len(topo._plans) == PLAN_CACHE


def test_a_plan_is_immutable_and_does_not_alias_the_callers_matrix():
    import scipy.sparse as sp

    w = sp.csr_matrix((np.array([0.5, 0.5, 0.0, 1.0]), np.array([1, 0, 1, 1]),
                       np.array([0, 2, 4])), shape=(2, 2))  # fmt: skip  # unsorted, a zero
    plan = RoundPlan(round=0, mixing=w)
    assert w.indices.tolist() == [1, 0, 1, 1] and w.nnz == 4  # the caller's W untouched
    w.data[:] = 7.0
    assert plan.mixing.toarray().tolist() == [[0.5, 0.5], [0.0, 1.0]]
    for a in (plan.mixing.data, plan.mixing.indices, plan.mixing.indptr):
        with pytest.raises(ValueError, match="read-only"):
            a[0] = 0
    with pytest.raises(ValueError, match="read-only"):
        plan.mixing.data *= 2
    assert isinstance(plan.neighbors, tuple) and isinstance(plan.neighbors[0], tuple)
    assert isinstance(plan.messages, tuple) and isinstance(plan.edges, tuple)
    later = plan.at(4)
    assert (later.round, plan.round) == (4, 0) and later.mixing is plan.mixing
