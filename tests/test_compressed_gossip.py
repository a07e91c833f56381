"""Compressed gossip in the simulator: CHOCO-Gossip keeps the network average, counts the
encoded bytes, falls back to the per-agent engine, and refuses runs it cannot serve."""

import pytest
import torch

from fedmerge.config import load_config
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
        (["protocol.codec=zip"], "protocol.codec: unknown codec 'zip'"),
        (["protocol.codec=topk", "protocol.codec_params={density: 2}"],
         "protocol.codec_params: codec 'topk': parameter 'density'"),
        (["protocol.codec=topk", "protocol.name=dimat"], "protocol.name 'dimat' is not gossip"),
        (["protocol.codec=topk", "protocol.name=single_global_merge"], "schedule"),
        (["protocol.codec=topk", "protocol.aggregation=median"], "not mean"),
        (["protocol.codec=topk", "faults.byzantine.count=1"], "Byzantine"),
    ],
)  # fmt: skip
def test_runs_compressed_gossip_cannot_serve_are_refused(sets, message):
    with pytest.raises(ConfigError, match=message):
        Simulator(load_config(None, ["topology=ring-4", *sets]))
