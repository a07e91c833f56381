"""Users' own model, data and loss through the config, including a Hugging Face model."""

import pytest

from fedmerge.config import load_config
from fedmerge.runtimes.local.simulator import Simulator


@pytest.fixture(autouse=True)
def trusted(monkeypatch):
    """The person running these tests trusts the factories in tests/user_factories.py."""
    monkeypatch.setenv("FEDMERGE_TRUSTED_MODULES", "tests.user_factories")


def test_user_data_model_and_loss_factories():
    cfg = load_config(None, ["data.name=tests.user_factories:blobs", "data.options={samples: 400}",
                             "data.partition=iid", "model.options.hidden=[8]", "rounds=5",
                             "train.loss=tests.user_factories:SmoothedCE", "topology=ring-4",
                             "train.lr=0.2", "train.epochs=2"])  # fmt: skip
    sim = Simulator(cfg)
    assert sim.path == "per-agent"  # a custom loss leaves the vectorized path
    rows = sim.run()
    assert sum(r["global_acc"] for r in rows[-4:]) / 4 > 0.9  # four separable blobs


def test_hugging_face_transformer_agents_gossip():
    pytest.importorskip("transformers")
    cfg = load_config(None, ["model.name=tests.user_factories:tiny_bert", "model.options={}",
                             "topology=ring-4", "rounds=2", "data.partition=iid",
                             "train.steps=3"])  # fmt: skip
    sim = Simulator(cfg)
    assert sim.path == "per-agent"
    before = sim.engine.flat().clone()
    rows = sim.run()
    assert len(rows) == 8 and all(r["rejected"] == 0 for r in rows)
    assert (sim.engine.flat() - before).abs().max() > 0
    # shared init + gossip: the agents' average moved only by training, and they stay close
    assert max(r["consensus"] for r in rows[-4:]) < 0.5 * before.norm(dim=1).mean()
