"""Continual dissemination: delivery within the diameter, folds exactly once, duplicates
skipped, loss never double-folds, and every node's merge equals a direct fold in its order."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import networkx as nx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmerge.continual import ContinualMerger
from fedmerge.decentralized.dissemination import Arrival, disseminate, fold_directly
from fedmerge.decentralized.payload import Payload
from fedmerge.errors import ConfigError
from fedmerge.topology import build_topology


def tiny(num_experts: int, seed: int = 0):
    """A base (one Linear layer) and experts = base + small task vectors."""
    gen = torch.Generator().manual_seed(seed)
    base = {"fc.weight": torch.randn(6, 5, generator=gen), "fc.bias": torch.randn(6, generator=gen)}
    experts = {
        f"e{k}": {key: v + 0.1 * torch.randn(v.shape, generator=gen) for key, v in base.items()}
        for k in range(num_experts)
    }
    return base, experts


def spread_arrivals(experts, n: int) -> list[Arrival]:
    return [Arrival(e, (3 * k) % n, 1 + k) for k, e in enumerate(experts)]


@pytest.fixture
def fold_log(monkeypatch):
    """Every call of ContinualMerger.add as (merger id, expert name)."""
    calls: list[tuple[int, str]] = []
    original = ContinualMerger.add

    def add(self, expert, name="expert"):
        calls.append((id(self), name))
        return original(self, expert, name)

    monkeypatch.setattr(ContinualMerger, "add", add)
    return calls


@pytest.mark.parametrize("spec", ["ring-8", "torus-4x4", "small-world-16", "star-8", "line"])
def test_lossless_delivery_hop_by_hop_within_diameter(spec, fold_log):
    topo = build_topology(spec, n=7 if spec == "line" else None)
    base, experts = tiny(4)
    arrivals = spread_arrivals(experts, topo.n)
    res = disseminate(topo, base, experts, arrivals, rounds=4 + topo.n)
    hops = dict(nx.all_pairs_shortest_path_length(topo.graph))
    for a in arrivals:  # node at distance d ≥ 1 first holds it in round r0 + d − 1
        want = [a.round + max(hops[a.node][i] - 1, 0) for i in range(topo.n)]
        assert res.first_held[a.expert] == want
        assert res.spread_rounds()[a.expert] == res.eccentricity[a.expert] <= res.diameter
    assert res.diameter == nx.diameter(topo.graph)
    assert res.complete_round == max(max(rounds) for rounds in res.first_held.values())
    # each node's merger was asked to add each expert exactly once
    per_node = Counter(fold_log)
    assert set(per_node.values()) == {1}
    assert len(per_node) == topo.n * len(experts)
    assert all(node.merger.step == len(experts) for node in res.nodes)


@settings(max_examples=15, deadline=None)
@given(n=st.integers(3, 9), p=st.floats(0.2, 0.9), seed=st.integers(0, 1000))
def test_random_connected_graphs_reach_everyone_within_diameter_plus_one(n, p, seed):
    g = nx.gnp_random_graph(n, p, seed=seed)
    for u in range(n - 1):  # make it connected: add a path
        g.add_edge(u, u + 1)
    base, experts = tiny(2, seed)
    arrivals = [Arrival("e0", seed % n, 1), Arrival("e1", (seed + 1) % n, 2)]
    res = disseminate(build_topology(g), base, experts, arrivals, rounds=n + 2)
    for a in arrivals:
        assert res.spread_rounds()[a.expert] <= res.diameter + 1
    assert [len(node.order) for node in res.nodes] == [2] * n


def test_duplicates_recognized_by_hash_and_skipped():
    # ring of 4, one expert at node 0 in round 1. Round 1: nodes 1, 3 fold it. Round 2: they
    # forward to 0 (2 duplicates) and 2 (folds the first, skips the second). Round 3: node 2
    # forwards to 1 and 3 (2 duplicates). Total 5, and nothing afterwards.
    base, experts = tiny(1)
    res = disseminate(build_topology("ring", n=4), base, experts, [Arrival("e0", 0, 1)], rounds=6)
    assert [node.duplicates for node in res.nodes] == [2, 1, 1, 1]
    assert [r["bytes_sent"] > 0 for r in res.rows if r["round"] == 4] == [False] * 4
    # the same content under another id is a duplicate too; a new content under a held id
    # is rejected; a tampered payload is rejected; none of them changes the merge
    node = res.nodes[0]
    before = {k: v.clone() for k, v in node.merger.merged().items()}
    held = node.held["e0"]
    alias = Payload.make(held.tensors, sender=1, round=9, samples=0, kind="delta", expert="x")
    assert node.offer(alias, base, lambda p: None) == "duplicate"
    other = {k: v + 1e-3 for k, v in held.tensors.items()}
    clash = Payload.make(other, sender=1, round=9, samples=0, kind="delta", expert="e0")
    assert node.offer(clash, base, lambda p: None) == "rejected"
    tampered = Payload(other, 1, 9, 0, "delta", "0" * len(held.hash), "e9")
    check = res_check(base)
    assert node.offer(tampered, base, check) == "rejected"
    assert "hash mismatch" in node.rejected[-1]
    assert node.merger.step == 1 and node.order == ["e0"]
    assert all(torch.equal(v, before[k]) for k, v in node.merger.merged().items())


def res_check(base):
    from fedmerge.decentralized.payload import validate_payload
    from fedmerge.statedict import global_norm, specs_of

    def check(p):
        validate_payload(p, kind="delta", specs=specs_of(base), own_norm=global_norm(base),
                         max_norm_ratio=10.0, max_bytes=10**9)  # fmt: skip

    return check


@settings(max_examples=10, deadline=None)
@given(
    loss=st.floats(0.1, 0.9),
    seed=st.integers(0, 10_000),
    forward=st.sampled_from(["once", "always"]),
)
def test_message_loss_never_folds_twice(loss, seed, forward):
    topo = build_topology("small-world-16")
    base, experts = tiny(3, seed)
    res = disseminate(topo, base, experts, spread_arrivals(experts, topo.n), rounds=8,
                      message_loss=loss, forward=forward, seed=seed)  # fmt: skip
    for node in res.nodes:
        assert len(node.order) == len(set(node.order)) == node.merger.step
        assert node.merger.step <= len(experts)
    for row in res.rows:
        assert row["folds"] == row["experts_known"] <= row["experts_appeared"]


def test_loss_delays_and_always_forwarding_recovers():
    topo = build_topology("ring-8")
    base, experts = tiny(2)
    arrivals = [Arrival("e0", 0, 1), Arrival("e1", 4, 1)]
    clean = disseminate(topo, base, experts, arrivals, rounds=30)
    lossy = disseminate(topo, base, experts, arrivals, rounds=30, message_loss=0.5,
                        forward="always", seed=3)  # fmt: skip
    assert clean.complete_round == 4
    assert lossy.complete_round is not None and lossy.complete_round > clean.complete_round
    sent = sum(r["bytes_sent"] for r in lossy.rows)
    assert sent > sum(r["bytes_sent"] for r in clean.rows)


@pytest.mark.parametrize("method", ["opcm", "continual_task_arithmetic", "magmax"])
def test_each_node_equals_direct_fold_in_its_arrival_order(method):
    topo = build_topology("ring-8")
    base, experts = tiny(4, seed=1)
    res = disseminate(topo, base, experts, [Arrival(e, 0 if k % 2 else 4, 1) for k, e in
                      enumerate(experts)], rounds=6, method=method)  # fmt: skip
    orders = {tuple(node.order) for node in res.nodes}
    assert len(orders) > 1  # nodes saw different orders, so the check is not trivial
    for node in res.nodes:
        direct = fold_directly(base, experts, node.order, method)
        got = node.merger.merged()
        assert all(torch.equal(got[k], direct[k]) for k in base)
    if method == "opcm":  # order matters for OPCM: two orders give two merges
        a, b = (fold_directly(base, experts, list(o), method) for o in list(orders)[:2])
        assert not torch.equal(a["fc.weight"], b["fc.weight"])


def test_bad_arrivals_are_config_errors():
    topo = build_topology("ring", n=4)
    base, experts = tiny(1)
    with pytest.raises(ConfigError, match=r"arrivals.e0.node: must be in 0..3"):
        disseminate(topo, base, experts, [Arrival("e0", 9, 1)], rounds=2)
    with pytest.raises(ConfigError, match=r"arrivals.zz: no such expert"):
        disseminate(topo, base, experts, [Arrival("zz", 0, 1)], rounds=2)
    with pytest.raises(ConfigError, match=r"forward"):
        disseminate(topo, base, experts, [Arrival("e0", 0, 1)], rounds=2, forward="never")


TINY = [
    "experts.tasks=[rot90,hflip,invert]",
    "experts.model={hidden: [16], features: 8}",
    "experts.pretrain={steps: 30}",
    "experts.probe={steps: 30}",
    "experts.finetune={steps: 30}",
    "topology=ring-4",
    "rounds=5",
]


RECIPE_DIR = Path(__file__).parents[1] / "simulations" / "dissemination"


def test_recipe_end_to_end_through_fedmerge_sweep(tmp_path, capsys):
    from fedmerge.cli import main

    argv = ["sweep", str(RECIPE_DIR / "ring.yaml"), "--out", str(tmp_path)]
    assert main(argv + [x for item in TINY for x in ("--set", item)]) == 0
    out = capsys.readouterr().out
    assert "Continual dissemination (opcm) on ring-4" in out
    summary = json.loads((tmp_path / "summary.json").read_text())
    # arrivals at nodes 0, 1, 2 in rounds 1, 2, 3 on a 4-ring (every eccentricity 2)
    assert summary["spread_rounds"] == {"rot90": 2, "hflip": 2, "invert": 2}
    assert summary["complete_round"] == 4 and summary["diameter"] == 2
    assert summary["folds_per_node"] == [3, 3, 3, 3]
    assert summary["experts_known"][0] == [1, 1, 0, 1]
    assert 0.0 <= summary["final_acc_min"] <= summary["final_acc_max"] <= 1.0
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 5 * 4
    assert (tmp_path / "dissemination.png").read_bytes()[:4] == b"\x89PNG"


def test_recipe_config_errors(capsys):
    from fedmerge.recipe import load_script

    main = load_script(RECIPE_DIR / "run.py").RECIPE.main
    assert main(["--set", "experts.orders=3"]) == 2
    assert "experts.orders: unknown field" in capsys.readouterr().err
    assert main(["--set", "arrivals={rot90: {node: 0}}"]) == 2
    assert "arrivals.rot90: expected {node: N, round: R}" in capsys.readouterr().err
    assert main(["--set", "method=nope"]) == 2
    assert "method: unknown continual method 'nope'; use one of opcm," in capsys.readouterr().err
    assert main(["--set", "method=running_average", "--set", "params={alpha: 0.5}"]) == 2
    assert "method 'running_average' has no parameter 'alpha'" in capsys.readouterr().err
    assert main(["--set", "experts.model.hidden=oops"]) == 2
    assert "experts.model.hidden" in capsys.readouterr().err
