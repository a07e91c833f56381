"""Compressed gossip in the simulator: CHOCO-Gossip keeps the network average, counts the
encoded bytes, falls back to the per-agent engine, and refuses runs it cannot serve."""

import pytest
import torch

from fedmerge.config import load_config
from fedmerge.decentralized.delivery import Delivery
from fedmerge.decentralized.payload import Payload
from fedmerge.decentralized.setup import build_setup
from fedmerge.errors import ConfigError
from fedmerge.runtimes.local.simulator import Simulator

RING = ["topology=ring-8", "model.options.hidden=[16]", "model.init=different", "train.lr=1e-12",
        "train.steps=1"]  # fmt: skip
TOPK = ["protocol.codec=topk", "protocol.codec_params={density: 0.1}",
        "protocol.consensus_step=0.4"]  # fmt: skip


def test_choco_gossip_keeps_the_network_average_and_contracts(one_thread):
    """No learning (lr 1e-12), different inits: gossip alone moves the models. Each round the
    average of θ over the ring is unchanged (symmetric Metropolis–Hastings W) while the
    agents approach it."""
    sim = Simulator(load_config(None, [*RING, *TOPK, "rounds=30"]))
    start = sim.engine.flat()
    sim.run()
    end = sim.engine.flat()
    assert sim.engine.name == "per-agent"
    assert torch.allclose(end.mean(0), start.mean(0), atol=1e-5)
    spread = [float((x - x.mean(0)).norm()) for x in (start, end)]
    assert spread[1] < 0.5 * spread[0]


def test_encoded_bytes_are_counted(one_thread):
    dense = Simulator(load_config(None, [*RING, "rounds=2"])).run()
    small = Simulator(load_config(None, [*RING, *TOPK, "rounds=2"])).run()
    for d, s in zip(dense, small, strict=True):
        assert s["bytes_sent"] == s["bytes_received"] > 0  # every node: 2 neighbours, 1 size
        assert d["bytes_sent"] / s["bytes_sent"] > 5


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["protocol.codec=zip"], "protocol.codec: unknown.*'zip'"),
        (["protocol.codec=topk", "protocol.codec_params={density: 2}"],
         "codec 'topk': parameter 'density'"),
        (["protocol.codec=topk", "protocol.name=dimat"], "protocol.name 'dimat' is not gossip"),
        (["protocol.codec=topk", "protocol.name=single_global_merge"], "schedule"),
        (["protocol.codec=topk", "protocol.aggregation=median"], "not mean"),
        (["protocol.codec=topk", "faults.byzantine.count=1"], "Byzantine"),
    ],
)  # fmt: skip
def test_runs_compressed_gossip_cannot_serve_are_refused(sets, message):
    with pytest.raises(ConfigError, match=message):
        Simulator(load_config(None, ["topology=ring-4", *sets]))


def test_a_malformed_compressed_payload_is_one_counted_rejection(one_thread):
    """A validly hashed payload whose index stream runs past the tensor: rejected with the
    sender and the key named, the receiver's model and CHOCO copies untouched."""
    setup = build_setup(load_config(None, ["topology=ring-4", *TOPK]))
    receiver, sender = setup.agent(0), setup.agent(1)
    for a in (receiver, sender):
        a.train()
    good = sender.publish(0)
    key = next(k for k in good.tensors if k.endswith("#gaps"))
    bad_gaps = good.tensors[key].clone()
    bad_gaps[-1] = 127  # the last gap jumps past the end
    bad = Payload.make({**good.tensors, key: bad_gaps}, sender=1, round=0, samples=1,
                       kind=good.kind)  # fmt: skip
    before = {k: v.clone() for k, v in receiver.state().items()}
    assert receiver.receive([Delivery(1, 1 / 3, bad)]) == []
    assert len(receiver.rejected) == 1
    assert "agent 1" in receiver.rejected[0] and key.split("#")[0] in receiver.rejected[0]
    assert all(torch.equal(v, receiver.state()[k]) for k, v in before.items())
    assert receiver.choco.copies == {}
    accepted = receiver.receive([Delivery(1, 1 / 3, good)])
    assert len(accepted) == 1 and set(accepted[0][0].tensors) == set(receiver.tensors())
