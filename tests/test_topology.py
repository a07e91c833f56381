"""Topology graphs, mixing rules, analysis and checks (fedmerge.topology)."""

from __future__ import annotations

import math

import networkx as nx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmerge.errors import ConfigError
from fedmerge.topology import (
    analysis,
    build_topology,
    list_presets,
    mixing_matrix,
    resolve_spec,
    second_eigenvalue_modulus,
    stochasticity,
    write_graph,
)

REQUIRED_PRESETS = {
    "ring-4",
    "ring-8",
    "ring-16",
    "complete-8",
    "torus-4x4",
    "exponential-16",
    "small-world-16",
    "small-world-64",
    "star-8",
}


def test_metropolis_hastings_ring_is_one_third_everywhere():
    topo = build_topology("ring-8")
    w = topo.mixing.toarray()
    for i in range(8):
        assert w[i, i] == pytest.approx(1 / 3)
        assert w[i, (i + 1) % 8] == pytest.approx(1 / 3)
        assert w[i, (i - 1) % 8] == pytest.approx(1 / 3)
    assert np.count_nonzero(w) == 24
    assert [j for j, _ in topo.round(0).neighbors[0]] == [0, 1, 7]


def test_complete_graph_uniform_has_spectral_gap_one():
    report = build_topology("complete-8", overrides={"mixing": "uniform"}).analyze()
    assert report["spectral_gap"] == pytest.approx(1.0, abs=1e-12)
    assert report["rounds_to_shrink"] == 1
    np.testing.assert_allclose(
        build_topology("complete", n=5, overrides=["mixing=uniform"]).mixing.toarray(), 0.2
    )


def test_presets_exist_connected_and_doubly_stochastic_under_mh():
    names = set(list_presets())
    assert names >= REQUIRED_PRESETS
    for name in names:
        topo = build_topology(name, overrides={"mixing": "metropolis_hastings"})
        report = topo.analyze()
        assert report["connected"], name
        assert report["doubly_stochastic"] and report["symmetric"], name
        assert 0 < report["spectral_gap"] <= 1, name


def test_preset_sizes_and_hand_computed_gaps():
    # ring of n under MH: eigenvalues 1/3 + 2/3 cos(2πk/n); ring-4: {1, 1/3, -1/3} -> gap 2/3
    assert build_topology("ring-4").analyze()["spectral_gap"] == pytest.approx(2 / 3)
    ring8 = build_topology("ring-8").analyze()
    assert ring8["spectral_gap"] == pytest.approx(1 - (1 / 3 + 2 / 3 * math.cos(2 * math.pi / 8)))
    assert ring8["diameter"] == 4
    # hypercube dim 4, MH weight 1/5: eigenvalues 1 - 2k/5 -> |λ2| = 0.6
    assert build_topology("hypercube", n=16).analyze()["spectral_gap"] == pytest.approx(0.4)
    torus = build_topology("torus-4x4")
    assert torus.n == 16 and {d for _, d in torus.graph.degree()} == {4}


@pytest.mark.parametrize("dim", [1, 2, 3, 5])
def test_hypercube_degrees(dim):
    topo = build_topology("hypercube", n=2**dim)
    assert {d for _, d in topo.graph.degree()} == {dim}
    for u, v in topo.graph.edges:
        assert bin(u ^ v).count("1") == 1


@pytest.mark.parametrize("n", [8, 12, 16, 33])
def test_exponential_degrees(n):
    offsets = {(s * 2**k) % n for k in range(n.bit_length()) if 2**k < n for s in (1, -1)}
    topo = build_topology("exponential", n=n)
    assert {d for _, d in topo.graph.degree()} == {len(offsets - {0})}
    if n == 16:
        assert topo.graph.degree(0) == 2 * 4 - 1


def test_disconnected_graph_refused_with_clear_message():
    spec = {"graph": "erdos_renyi", "n": 12, "p": 0.0}
    with pytest.raises(ConfigError, match=r"disconnected: 12 components.*allow_disconnected"):
        build_topology(spec)
    topo = build_topology({**spec, "allow_disconnected": True})
    report = topo.analyze()
    assert not report["connected"] and report["spectral_gap"] == 0.0
    assert report["rounds_to_shrink"] is None and report["diameter"] is None
    np.testing.assert_allclose(topo.mixing.toarray(), np.eye(12))


@pytest.mark.parametrize(
    ("spec", "kwargs", "pattern"),
    [
        ("no-such-topology", {}, r"unknown topology 'no-such-topology'.*ring-8"),
        ({"graph": "moebius_strip"}, {}, r"unknown graph generator 'moebius_strip'.*'graph'"),
        ({"graph": "write_graphml"}, {}, r"unknown graph generator 'write_graphml'"),
        ("ring", {"n": 8, "overrides": {"mixing": "magic"}}, r"unknown mixing rule 'magic'"),
        ("ring", {"n": 8, "overrides": ["schedule=sometimes"]}, r"unknown schedule 'sometimes'"),
        ("ring", {"n": 8, "overrides": ["schedule.q=1"]}, r"schedule.q"),
        ("watts_strogatz", {"n": 8, "overrides": ["kk=2"]}, r"does not take 'kk'.*n, k, p, seed"),
        ("erdos_renyi", {"n": 8}, r"graph 'erdos_renyi' needs 'p'"),
        ("ring", {"n": 0}, r"field 'n' must be a positive integer"),
        ("hypercube", {"n": 12}, r"power of two"),
        ("torus", {"n": 10}, r"rows and cols"),
        ("petersen_graph", {"n": 11}, r"has 10 nodes but n = 11"),
        ("ring", {"n": 8, "overrides": ["allow_disconnected=maybe"]}, r"allow_disconnected"),
        ("ring", {"n": 8, "overrides": ["oops"]}, r"key=value"),
        ("star", {"n": 6, "overrides": ["mixing=uniform", "stochastic=doubly"]}, r"not doubly"),
        ("ring", {"n": 6, "overrides": ["stochastic=triply"]}, r"'stochastic'"),
        ("ring", {"n": 6, "overrides": ["schedule.p=2"]}, r"'static' does not take schedule.p"),
        (
            "ring-8",
            {"overrides": ["schedule=sparse_then_complete", "schedule.p=2"]},
            r"in \[0, 1\]",
        ),
    ],
)
def test_bad_specs_name_the_field(spec, kwargs, pattern):
    with pytest.raises(ConfigError, match=pattern):
        build_topology(spec, **kwargs)


def test_empty_graph_and_self_loops_refused(tmp_path):
    empty = tmp_path / "empty.adjlist"
    empty.write_text("# nothing\n")
    with pytest.raises(ConfigError, match="has no nodes"):
        build_topology(empty)
    loops = tmp_path / "loops.edgelist"
    loops.write_text("0 1\n1 2\n2 2\n")
    with pytest.raises(ConfigError, match=r"self-loops at node\(s\) 2"):
        build_topology(loops)
    bad_weight = tmp_path / "neg.edgelist"
    bad_weight.write_text("0 1 -1.0\n")
    with pytest.raises(ConfigError, match=r"weight -1.0"):
        build_topology(bad_weight)


def test_networkx_generator_by_name_and_relabelling():
    petersen = build_topology("petersen_graph")
    assert petersen.n == 10 and petersen.labels is None
    grid = build_topology({"graph": "grid_2d_graph", "m": 2, "n": 3})
    assert grid.n == 6 and sorted(grid.graph.nodes) == list(range(6))
    assert grid.labels[0] == (0, 0) and grid.labels[5] == (1, 2)
    # relabelling keeps the structure: node i's neighbours map to the original lattice
    for u, v in grid.graph.edges:
        (a, b), (c, d) = grid.labels[u], grid.labels[v]
        assert abs(a - c) + abs(b - d) == 1


def test_other_rules_hand_computed():
    star = nx.star_graph(3)  # hub 0, leaves 1..3
    w = mixing_matrix(star, "max_degree").toarray()
    np.testing.assert_allclose(w[0], [1 / 4, 1 / 4, 1 / 4, 1 / 4])
    np.testing.assert_allclose(w[1], [1 / 4, 3 / 4, 0, 0])
    u = mixing_matrix(star, "uniform").toarray()
    np.testing.assert_allclose(u[0], [1 / 4] * 4)
    np.testing.assert_allclose(u[1], [1 / 2, 1 / 2, 0, 0])
    assert stochasticity(u) == {
        "nonnegative": True,
        "row_stochastic": True,
        "doubly_stochastic": False,
        "symmetric": False,
    }
    mh = mixing_matrix(star).toarray()  # 1 / (1 + max(3, 1)) = 1/4 on every edge
    np.testing.assert_allclose(mh[1], [1 / 4, 3 / 4, 0, 0])
    np.testing.assert_allclose(mh[0], [1 / 4] * 4)


def test_edge_weights_rule_and_graphml_round_trip(tmp_path):
    g = nx.Graph()
    g.add_edge(0, 1, weight=2.0)
    g.add_edge(1, 2, weight=1.0)
    g.add_edge(2, 0, weight=1.0)
    g.nodes[2]["self_weight"] = 2.0
    path = write_graph(g, tmp_path / "tri.graphml")
    topo = build_topology(path, overrides={"mixing": "edge_weights"})
    w = topo.mixing.toarray()
    # node 0: edges 2 and 1, own = mean 1.5 -> [1.5, 2, 1] / 4.5
    np.testing.assert_allclose(w[0], np.array([1.5, 2.0, 1.0]) / 4.5)
    np.testing.assert_allclose(w[2], np.array([1.0, 1.0, 2.0]) / 4.0)
    assert topo.properties["row_stochastic"] and not topo.properties["doubly_stochastic"]
    # round trip: write the loaded graph again, read it again, same weights and W
    again = build_topology(
        write_graph(topo.graph, tmp_path / "again.graphml"), overrides=["mixing=edge_weights"]
    )
    assert sorted(again.graph.edges(data="weight")) == sorted(topo.graph.edges(data="weight"))
    np.testing.assert_allclose(again.mixing.toarray(), w)


def test_edge_list_and_adjacency_list_files(tmp_path):
    edges = tmp_path / "net.edgelist"
    edges.write_text("# u v weight\nalice bob 3\nbob carol, 1\ncarol alice 1\n")
    topo = build_topology(edges, overrides=["mixing=edge_weights"])
    assert topo.n == 3 and topo.labels == ["alice", "bob", "carol"]
    assert topo.graph[0][1]["weight"] == 3.0
    adj = tmp_path / "net.adjlist"
    adj.write_text("0 1 2\n1 2\n2\n3 0\n")
    topo = build_topology(adj)
    assert topo.n == 4 and topo.labels is None
    assert sorted(topo.graph.edges) == [(0, 1), (0, 2), (0, 3), (1, 2)]
    # a written edge list / adjacency list reads back to the same graph
    for suffix in ("edgelist", "adjlist"):
        back = build_topology(write_graph(topo.graph, tmp_path / f"copy.{suffix}"))
        assert sorted(back.graph.edges) == sorted(topo.graph.edges)
    with pytest.raises(ConfigError, match="cannot tell the format"):
        build_topology({"graph": "file", "path": str(adj), "format": "dot"})
    with pytest.raises(ConfigError, match="graph file not found"):
        build_topology({"graph": "file", "path": str(tmp_path / "missing.graphml")})


def test_yaml_spec_file_with_relative_graph_path(tmp_path):
    nx.write_graphml(nx.cycle_graph(5), tmp_path / "c5.graphml")
    spec = tmp_path / "mine.yaml"
    spec.write_text("graph: file\npath: c5.graphml\nmixing: uniform\nstochastic: doubly\n")
    topo = build_topology(spec)
    assert topo.name == "mine" and topo.n == 5 and topo.rule == "uniform"
    np.testing.assert_allclose(topo.mixing.toarray()[0], [1 / 3, 1 / 3, 0, 0, 1 / 3])


def test_overrides_and_n_win_over_the_preset():
    spec = resolve_spec(
        "small-world-64", n=100, overrides=["p=0.3", "schedule.kind=random_matching"]
    )
    assert spec["n"] == 100 and spec["params"] == {"k": 6, "p": 0.3}
    assert spec["schedule"] == {"kind": "random_matching"}
    a = build_topology("small-world-64", seed=1)
    b = build_topology("small-world-64", seed=1)
    c = build_topology("small-world-64", seed=2)
    assert sorted(a.graph.edges) == sorted(b.graph.edges) != sorted(c.graph.edges)


def test_gossip_contracts_no_slower_than_spectral_bound():
    rng = np.random.default_rng(0)
    for name in ("ring-16", "torus-4x4", "star-8", "small-world-64", "exponential-16"):
        topo = build_topology(name)
        slem = topo.analyze()["second_eigenvalue"]
        x = rng.standard_normal((topo.n, 3))
        d0 = np.linalg.norm(x - x.mean(0))
        for t in range(1, 40):
            x = topo.mixing @ x
            assert np.linalg.norm(x - x.mean(0)) <= slem**t * d0 * (1 + 1e-9) + 1e-12, (name, t)
        predicted = analysis.rounds_to_shrink(slem)
        assert slem**predicted <= 1e-3 < slem ** (predicted - 1)


def test_sparse_eigensolver_and_diameter_estimate_match_dense(monkeypatch):
    topo = build_topology("small-world-64")
    dense = second_eigenvalue_modulus(topo.mixing)
    rowwise = build_topology("star-8", overrides={"mixing": "uniform"})
    dense_row = second_eigenvalue_modulus(rowwise.mixing)
    exact = topo.analyze()["diameter"]
    monkeypatch.setattr(analysis, "DENSE_MAX_N", 4)
    monkeypatch.setattr(analysis, "EXACT_DIAMETER_MAX_N", 4)
    assert second_eigenvalue_modulus(topo.mixing) == pytest.approx(dense, rel=1e-6)
    assert second_eigenvalue_modulus(rowwise.mixing) == pytest.approx(dense_row, rel=1e-6)
    report = topo.analyze()
    assert not report["diameter_exact"] and 0 < report["diameter"] <= exact


@st.composite
def random_graphs(draw):
    n = draw(st.integers(min_value=1, max_value=30))
    p = draw(st.floats(min_value=0.0, max_value=1.0))
    return nx.gnp_random_graph(n, p, seed=draw(st.integers(0, 2**31 - 1)))


@settings(max_examples=60, deadline=None)
@given(random_graphs())
def test_mh_is_symmetric_doubly_stochastic_nonnegative(g):
    w = mixing_matrix(g).toarray()
    assert (w >= 0).all()
    np.testing.assert_allclose(w, w.T, atol=1e-12)
    np.testing.assert_allclose(w.sum(0), 1.0, atol=1e-12)
    np.testing.assert_allclose(w.sum(1), 1.0, atol=1e-12)
    assert (np.diag(w) > 0).all()
    adjacency = nx.to_numpy_array(g, nodelist=range(g.number_of_nodes())) > 0
    assert ((w > 0) & ~np.eye(len(w), dtype=bool) == adjacency).all()
    for rule in ("uniform", "max_degree", "edge_weights"):
        props = stochasticity(mixing_matrix(g, rule))
        assert props["row_stochastic"] and props["nonnegative"]
    assert stochasticity(mixing_matrix(g, "max_degree"))["doubly_stochastic"]


def test_networkx_graph_in_hand():
    topo = build_topology(nx.petersen_graph(), overrides=["mixing=uniform"])
    assert topo.n == 10 and topo.rule == "uniform" and topo.properties["doubly_stochastic"]
    # Petersen graph adjacency eigenvalues 3, 1, -2 -> W = (I + A)/4 has |λ2| = 1/2
    assert topo.analyze()["spectral_gap"] == pytest.approx(0.5)
    with pytest.raises(ConfigError, match="used as given"):
        build_topology(nx.petersen_graph(), n=3)
