"""Payloads on the wire and the agent's validation: bad payloads are dropped and counted,
the agent's state is untouched."""

import pytest
import torch

from fedmerge.config import TrainConfig, ValidationConfig
from fedmerge.data.partition import AgentData
from fedmerge.decentralized.agent import Agent, batch_plan
from fedmerge.decentralized.delivery import Delivery, Refused
from fedmerge.decentralized.payload import Payload
from fedmerge.decentralized.protocols import MergeContext, get_protocol, gossip
from fedmerge.decentralized.receive import Receipt, receive_and_merge
from fedmerge.errors import ValidationError
from fedmerge.models import build_model


def make_agent(i=0, reference=None):
    model = build_model("mlp", in_shape=(4,), num_classes=3, seed=i, hidden=[5])
    x, y = torch.randn(10, 4, generator=torch.Generator().manual_seed(i)), torch.arange(10) % 3
    data = AgentData(x, y, x[:0], y[:0])
    return Agent(i, model, data, train=TrainConfig(), validation=ValidationConfig(), seed=0,
                 reference=reference)  # fmt: skip


def test_payload_roundtrip_and_tampering():
    p = make_agent(1).publish(round=3)
    q = Payload.from_bytes(p.to_bytes())
    assert (q.sender, q.round, q.samples, q.kind, q.hash) == (1, 3, 10, "full", p.hash)
    assert all(torch.equal(q.tensors[k], p.tensors[k]) for k in p.tensors)
    blob = bytearray(p.to_bytes())
    blob[-1] ^= 0xFF  # flip bits in the last tensor's data
    with pytest.raises(ValidationError, match="hash mismatch"):
        Payload.from_bytes(bytes(blob))
    with pytest.raises(ValidationError, match="unreadable payload"):
        Payload.from_bytes(bytes(blob[:20]))
    with pytest.raises(ValidationError, match="exceeds the 10 limit"):
        Payload.from_bytes(p.to_bytes(), max_bytes=10)


def forged(good: Payload, **change) -> Payload:
    tensors = {k: v.clone() for k, v in good.tensors.items()}
    fields = dict(sender=good.sender, round=good.round, samples=good.samples, kind=good.kind)
    mutate = change.pop("mutate", None)
    if mutate:
        mutate(tensors)
    fields.update(change)
    return Payload.make(tensors, **fields)


def _nan(t):
    t["head.bias"][0] = float("nan")


def _shape(t):
    t["head.bias"] = torch.zeros(4)


def _missing(t):
    del t["head.bias"]


def _extra(t):
    t["spy"] = torch.zeros(1)


def _dtype(t):
    t["head.bias"] = t["head.bias"].double()


def _huge(t):
    t["head.weight"] *= 1e6


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"mutate": _nan}, "non-finite"),
        ({"mutate": _shape}, "shape"),
        ({"mutate": _missing}, "missing"),
        ({"mutate": _extra}, "unexpected|extra"),
        ({"mutate": _dtype}, "dtype"),
        ({"mutate": _huge}, "norm"),
        ({"kind": "delta"}, "kind"),
    ],
)
def test_bad_payloads_are_dropped_counted_and_harmless(change, reason):
    me, other = make_agent(0), make_agent(1)
    good = other.publish(round=1)
    bad = forged(good, **change)
    before = {k: v.clone() for k, v in me.state().items()}
    accepted = me.receive([Delivery(1, 0.5, bad), Delivery(1, 0.25, good)])
    assert [p.sender for p, _ in accepted] == [1] and accepted[0][0] is good
    assert len(me.rejected) == 1
    assert "agent 1" in me.rejected[0]
    assert __import__("re").search(reason, me.rejected[0], flags=__import__("re").I)
    assert all(torch.equal(before[k], v) for k, v in me.state().items())


def test_hash_mismatch_is_rejected():
    me, other = make_agent(0), make_agent(1)
    p = other.publish(round=1)
    p.tensors["head.bias"].add_(1.0)  # tampered after hashing
    assert me.receive([Delivery(1, 1.0, p)]) == [] and "hash" in me.rejected[0]


def test_a_payload_must_name_the_sender_it_arrived_from():
    me, other = make_agent(0), make_agent(1)
    p = other.publish(round=1)
    assert me.receive([Delivery(2, 1.0, p)]) == []
    assert me.rejected == ["payload from agent 2 (round 1): its header names sender 1"]
    assert me.receive([Delivery(1, 1.0, p)]) == [(p, 1.0)] and me.last_round == {1: 1}


def test_receive_and_merge_counts_refusals_bytes_and_merges():
    agents = [make_agent(i) for i in range(3)]
    before = {k: v.clone() for k, v in agents[0].state().items()}
    good = agents[1].publish(0)
    inbox = [Delivery(1, 0.25, good), Delivery(2, 0.25, Refused(40, "payload from agent 2: x"))]
    got = receive_and_merge(agents[0], inbox, 0.5, get_protocol("gossip"), MergeContext(0, None))
    assert got == Receipt(received=good.nbytes + 40, rejected=1)
    assert agents[0].rejected == ["payload from agent 2: x"]
    for k, v in agents[0].state().items():  # merged with the one that arrived: (2θ0 + θ1) / 3
        want = (2 * before[k] + agents[1].state()[k]) / 3 if v.is_floating_point() else before[k]
        assert torch.allclose(v, want, atol=1e-7), k


def test_gossip_merge_is_the_weighted_average_over_what_arrived():
    agents = [make_agent(i) for i in range(3)]
    states = [{k: v.clone() for k, v in a.state().items()} for a in agents]
    received = [(agents[1].publish(0), 0.25), (agents[2].publish(0), 0.25)]
    inbox = [Delivery(p.sender, w, p) for p, w in received]
    gossip(agents[0], agents[0].receive(inbox), 0.5, MergeContext(0, None))
    for k, v in agents[0].state().items():
        want = 0.5 * states[0][k] + 0.25 * states[1][k] + 0.25 * states[2][k]
        assert torch.allclose(v, want, atol=1e-7)
    gossip(agents[1], [received[1]], 0.5, MergeContext(0, None))  # one neighbour lost
    for k, v in agents[1].state().items():
        assert torch.allclose(v, (2 * states[1][k] + states[2][k]) / 3, atol=1e-7)


def test_delta_payloads_are_task_vectors_against_the_reference():
    ref_model = build_model("mlp", in_shape=(4,), num_classes=3, seed=0, hidden=[5])
    ref = {k: v.clone() for k, v in ref_model.state_dict().items()}
    a = make_agent(0, reference=ref)
    assert a.kind == "delta" and all(float(v.abs().max()) == 0 for v in a.tensors().values())
    a.train()
    p = a.publish(1)
    assert all(torch.equal(p.tensors[k], a.state()[k] - ref[k]) for k in p.tensors)


def test_batch_plan_epochs_and_steps():
    gen = torch.Generator().manual_seed(0)
    plan = batch_plan(10, TrainConfig(epochs=2, steps=0, batch_size=4), gen)
    assert [len(b) for b in plan] == [4, 4, 2, 4, 4, 2]
    assert sorted(torch.cat(plan[:3]).tolist()) == list(range(10))
    steps = batch_plan(10, TrainConfig(steps=5, batch_size=4), gen)
    assert [len(b) for b in steps] == [4, 4, 2, 4, 4]
    assert batch_plan(0, TrainConfig(), gen) == []
