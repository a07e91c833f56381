"""The pre-training phase: every agent alone on its own data from its own init, before round 1."""

import pytest
import torch

from fedmerge.config import load_config
from fedmerge.decentralized.pretrain import pretrain_generator
from fedmerge.decentralized.setup import build_setup
from fedmerge.errors import ConfigError
from fedmerge.models import build_model
from fedmerge.runtimes.local.simulator import Simulator

pytestmark = pytest.mark.usefixtures("one_thread")

BASE = ["model.options.hidden=[16]", "topology=ring-4", "data.partition=iid",
        "model.init=different", "rounds=1", "train.epochs=0"]  # fmt: skip
ADAM = ["pretrain.epochs=3", "pretrain.optimizer=adam", "pretrain.lr=0.01",
        "pretrain.batch_size=16"]  # fmt: skip


def test_pretrained_model_is_adam_on_the_agents_own_data_by_hand():
    cfg = load_config(None, [*BASE, *ADAM])
    setup = build_setup(cfg)
    for i in (0, 2):
        data = setup.data.agents[i]
        model = build_model("mlp", in_shape=(1, 8, 8), num_classes=10,
                            seed=cfg.seed * 10_007 + i, hidden=[16])  # fmt: skip
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        gen = pretrain_generator(cfg.seed, i)
        for _ in range(3):
            for idx in torch.randperm(data.samples, generator=gen).split(16):
                opt.zero_grad()
                loss = torch.nn.functional.cross_entropy(
                    model(data.train_x[idx]), data.train_y[idx]
                )
                loss.backward()
                opt.step()
        got = setup.model(i).state_dict()
        for key, value in model.state_dict().items():
            torch.testing.assert_close(got[key], value, rtol=0, atol=1e-6)
        bare = setup.model(i, pretrained=False).state_dict()
        assert not torch.equal(bare["fc0.weight"], got["fc0.weight"])


@pytest.mark.parametrize("vectorize", ["always", "never"])
def test_rounds_start_from_the_pretrained_models(vectorize):
    rows = {}
    for name, sets in (("none", []), ("adam", ADAM)):
        sim = Simulator(load_config(None, [*BASE, *sets, "protocol.name=local",
                                           f"vectorize={vectorize}"]))  # fmt: skip
        rows[name] = sim.run()
        setup = sim.setup
        for i, row in enumerate(rows[name]):  # no training in the round: the round-0 model
            acc = setup.model(i)(setup.data.test_x).argmax(1).eq(setup.data.test_y).double()
            assert row["global_acc"] == pytest.approx(float(acc.mean()), abs=1e-12)
    assert max(r["global_acc"] for r in rows["none"]) < 0.3  # untrained: about chance
    assert min(r["global_acc"] for r in rows["adam"]) > 0.7  # 3 epochs of Adam on ~290 digits


def test_engines_agree_with_pretraining():
    got = []
    for vectorize in ("always", "never"):
        cfg = load_config(
            None, [*BASE, *ADAM, "rounds=2", "train.steps=2", f"vectorize={vectorize}"]
        )
        got.append(Simulator(cfg).run())
    for a, b in zip(*got, strict=True):
        assert a["global_acc"] == pytest.approx(b["global_acc"], abs=1e-9)
        assert a["consensus"] == pytest.approx(b["consensus"], rel=1e-5)


def test_shared_init_reference_is_the_bare_init_and_bad_fields_are_named():
    setup = build_setup(load_config(None, [*BASE, *ADAM, "model.init=same"]))
    bare = setup.model(0, pretrained=False).state_dict()
    assert all(torch.equal(setup.reference[k], bare[k]) for k in setup.reference)
    with pytest.raises(ConfigError, match="pretrain.optimizer: must be one of sgd, adam"):
        load_config(None, ["pretrain.optimizer=lbfgs"])
    with pytest.raises(ConfigError, match=r"pretrain.epochs: must be in \[0, 10,000\], got -1"):
        load_config(None, ["pretrain.epochs=-1"])
