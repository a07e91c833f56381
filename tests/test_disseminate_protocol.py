"""The ``disseminate`` protocol of the round kit: each agent's expert floods the graph and
every node folds each expert exactly once, in arrival order, into its continual merge."""

from __future__ import annotations

import json
import math

import networkx as nx
import pytest
import torch

from fedmerge.codecs import is_packed, unpack_tensors
from fedmerge.config import load_config
from fedmerge.decentralized.continual_agent import ContinualAgent, bundle
from fedmerge.decentralized.delivery import Delivery
from fedmerge.decentralized.dissemination import fold_directly
from fedmerge.decentralized.payload import Payload
from fedmerge.decentralized.persist import restore_agent, save_agent
from fedmerge.errors import ConfigError
from fedmerge.runtimes.local import Simulator
from fedmerge.statedict import add_task_vector, specs_of

BASE = ["topology={graph: ring, n: 6}", "rounds=5", "model.options.hidden=[16]", "train.steps=3",
        "protocol.name=disseminate"]  # fmt: skip


@pytest.fixture(scope="module")
def sim():
    torch.set_num_threads(1)
    s = Simulator(load_config(None, BASE))
    s.run()
    return s


def test_every_expert_reaches_every_node_once_in_hop_order(sim):
    hops = dict(nx.all_pairs_shortest_path_length(sim.setup.topology.graph))
    by = {(r["round"], r["agent"]): r for r in sim.rows}
    for i in range(6):
        order = by[5, i]["experts"]
        assert sorted(order) == list(range(6)) and order[0] == i  # all, once; its own first
        assert [hops[i][e] for e in order] == sorted(hops[i][e] for e in order)  # by distance
        for r in range(1, 6):  # an expert at distance d arrives in round d (ring-6: d ≤ 3)
            assert set(by[r, i]["experts"]) == {e for e in range(6) if hops[i][e] <= r}
    assert all(by[5, i]["rejected"] == 0 for i in range(6))
    assert all(r["bytes_sent"] == 0 for r in sim.rows if r["round"] == 5)  # nothing left


def test_each_node_holds_the_direct_fold_of_the_experts_in_its_order(sim):
    agents: list[ContinualAgent] = sim.engine.agents
    ref = sim.setup.reference
    experts = {str(a.id): add_task_vector(ref, a.node.held[str(a.id)].tensors) for a in agents}
    orders = {tuple(a.node.order) for a in agents}
    assert len(orders) == 6  # every node saw its own order: the check is not trivial
    for a in agents:
        direct = fold_directly(ref, experts, a.node.order, "opcm")
        assert all(torch.equal(a.state()[k], direct[k]) for k in ref)


def test_bad_bundles_and_bad_experts_are_rejected_and_counted(sim):
    me, other = sim.engine.agents[0], sim.engine.agents[3]
    before = {k: v.clone() for k, v in me.state().items()}
    good = other.node.held["3"].tensors
    bad_key = Payload.make({"x/w": torch.zeros(1)}, sender=3, round=9, samples=0, kind="delta")
    nan = {k: v.clone() for k, v in good.items()}
    next(iter(nan.values())).view(-1)[0] = float("nan")
    poisoned = Payload.make(bundle({5: nan}), sender=3, round=10, samples=0, kind="delta")
    dup = Payload.make(bundle({3: good}), sender=3, round=11, samples=0, kind="delta")
    n = len(me.rejected)
    for p in (bad_key, poisoned, dup):
        got = me.receive([Delivery(3, 0.5, p)])
        sim.setup.protocol.merge(me, got, 0.5, None)
    assert len(me.rejected) - n == 2 and "bundle key 'x/w'" in me.rejected[n]
    assert "non-finite" in me.rejected[n + 1]
    assert me.node.order == [str(e) for e in sim.rows[-6]["experts"]]  # nothing folded
    assert all(torch.equal(v, before[k]) for k, v in me.state().items())


def test_agent_state_file_carries_the_continual_merge(sim, tmp_path):
    a = sim.engine.agents[2]
    a.node.fresh = [a.node.held["4"]]
    save_agent(a, tmp_path, 5)
    b = sim.setup.agent(2)
    assert restore_agent(b, tmp_path) == 5
    assert b.node.order == a.node.order and [p.expert for p in b.node.fresh] == ["4"]
    assert b.made_expert and b.node.hashes == a.node.hashes
    merged_a, merged_b = a.node.merger.merged(), b.node.merger.merged()
    assert all(torch.equal(merged_a[k], merged_b[k]) for k in merged_a)
    assert all(torch.equal(v, a.state()[k]) for k, v in b.state().items())


def test_forward_always_sends_more_and_folds_the_same(sim):
    again = Simulator(load_config(None, [*BASE, "protocol.forward=always"])).run()
    assert [r["experts"] for r in again] == [r["experts"] for r in sim.rows]
    assert sum(r["bytes_sent"] for r in again) > sum(r["bytes_sent"] for r in sim.rows)


@pytest.fixture(scope="module")
def compeft():
    torch.set_num_threads(1)
    s = Simulator(load_config(None, [*BASE, "protocol.codec=ternary",
                                     "protocol.codec_params={density: 0.1}"]))  # fmt: skip
    s.run()
    return s


def test_compeft_experts_travel_encoded_and_every_node_folds_the_decoded_ones(sim, compeft):
    agents: list[ContinualAgent] = compeft.engine.agents
    ref = compeft.setup.reference
    own = {str(a.id): a.node.held[str(a.id)] for a in agents}
    assert all(is_packed(p.tensors) for p in own.values())  # held and forwarded encoded
    specs = specs_of(next(iter(agents)).tensors())
    decoded = {e: unpack_tensors(p.tensors, specs, source="test") for e, p in own.items()}
    for e, tau in decoded.items():  # ComPEFT: 10% of each tensor's entries, ± one scale
        plain = sim.engine.agents[int(e)].node.held[e].tensors  # the same expert, uncompressed
        for k, t in tau.items():
            assert t.count_nonzero() == math.ceil(0.1 * t.numel())
            assert t.abs().unique().numel() <= 2 and torch.equal(t.sign() * plain[k].sign(),
                                                                   t.sign().abs())  # fmt: skip
    experts = {e: add_task_vector(ref, tau) for e, tau in decoded.items()}
    for a in agents:
        assert sorted(a.node.order) == sorted(experts) and not a.rejected
        direct = fold_directly(ref, experts, a.node.order, "opcm")
        assert all(torch.equal(a.state()[k], direct[k]) for k in ref)
    # bytes: every node forwards each expert's encoded bytes once to both ring neighbours
    encoded = sum(p.nbytes for p in own.values())
    assert sum(r["bytes_sent"] for r in compeft.rows) == 6 * 2 * encoded
    dense = sum(r["bytes_sent"] for r in sim.rows)
    assert dense > 8 * 2 * encoded


def test_a_hostile_compressed_expert_is_rejected_and_state_untouched(compeft):
    me, other = compeft.engine.agents[0], compeft.engine.agents[3]
    before = {k: v.clone() for k, v in me.state().items()}
    forged = dict(other.node.held["3"].tensors)
    meta = json.loads(bytes(forged["#codec"].tolist()))
    meta["codec_specs"] = meta["codec_specs"].replace("16", "1600000", 1)  # a lying shape
    forged["#codec"] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
    n = len(me.rejected)
    got = me.receive([Delivery(3, 0.5, Payload.make(bundle({7: forged}), sender=3, round=20,
                                                    samples=0, kind="delta"))])  # fmt: skip
    compeft.setup.protocol.merge(me, got, 0.5, None)
    assert len(me.rejected) == n + 1 and "has shape" in me.rejected[-1]
    assert "7" not in me.node.held
    assert all(torch.equal(v, before[k]) for k, v in me.state().items())


def test_disseminate_needs_a_shared_init():
    with pytest.raises(ConfigError, match="model.init: same"):
        Simulator(load_config(None, [*BASE, "model.init=different"]))
