"""Consensus measures: plain, alignment-aware, prediction disagreement; rows that carry them."""

import pytest
import torch

from fedmerge.alignment import apply_permutation, permutation_spec, random_perms
from fedmerge.config import load_config
from fedmerge.decentralized.consensus import aligned_distances, disagreement, distances, flat_state
from fedmerge.models import build_model
from fedmerge.runtimes.local.simulator import Simulator

pytestmark = pytest.mark.usefixtures("one_thread")


def _permuted_copies(model, k, seed=0):
    spec, state = permutation_spec(model), model.state_dict()
    gen = torch.Generator().manual_seed(seed)
    return spec, [state] + [apply_permutation(spec, random_perms(spec, state, gen), state)
                            for _ in range(k)]  # fmt: skip


@pytest.mark.parametrize(("name", "kw"), [("mlp", {"hidden": (32, 16)}), ("cnn", {})])
def test_aligned_distance_is_zero_for_a_model_and_its_permuted_copies(name, kw):
    model = build_model(name, in_shape=(1, 8, 8), num_classes=10, seed=3, **kw)
    spec, states = _permuted_copies(model, 4)
    plain = distances(torch.stack([flat_state(s) for s in states]))
    aligned = aligned_distances(states, spec)
    assert min(plain[1:]) > 1.0  # the copies are far apart in parameter space ...
    assert max(aligned) < 1e-6  # ... and the same model once aligned


def test_aligned_distance_equals_the_plain_distance_for_a_shared_init():
    base = build_model("mlp", in_shape=(1, 8, 8), num_classes=10, seed=0, hidden=(32,))
    spec, gen = permutation_spec(base), torch.Generator().manual_seed(1)
    states = [
        {k: v + 1e-3 * torch.randn(v.shape, generator=gen) for k, v in base.state_dict().items()}
        for _ in range(5)
    ]
    plain = distances(torch.stack([flat_state(s) for s in states]))
    assert min(plain) > 1e-3
    assert aligned_distances(states, spec) == pytest.approx(plain, rel=1e-12)


def test_disagreement_by_hand():
    preds = torch.tensor([[1, 1, 1, 1], [1, 1, 2, 2], [3, 1, 1, 1]])
    # pairs: (0,1) differ 2/4, (0,2) 1/4, (1,2) 3/4 → agent 0: (0.5+0.25)/2, 1: (0.5+0.75)/2 ...
    assert disagreement(preds) == pytest.approx([0.375, 0.625, 0.5])
    assert disagreement(preds[:1]) == [0.0]
    assert disagreement(torch.zeros(4, 7, dtype=torch.long)) == [0.0] * 4


SMALL = ["model.options.hidden=[16]", "train.batch_size=16", "rounds=2"]


def test_dimat_rows_carry_every_measure_and_both_accuracies():
    cfg = load_config(None, [*SMALL, "protocol.name=dimat", "model.init=different",
                             "topology=ring-4", "train.epochs=1"])  # fmt: skip
    rows = Simulator(cfg).run()
    for r in rows:
        assert 0 <= r["acc_trained"] <= 1 and 0 <= r["global_acc"] <= 1
        assert 0 <= r["disagreement"] <= 1
        # after a DIMAT merge the agents are much closer once aligned than in raw coordinates
        assert r["consensus_aligned"] < r["consensus"]
    assert any(r["acc_trained"] != r["global_acc"] for r in rows)  # two evaluation points


@pytest.mark.parametrize("vectorize", ["always", "never"])
def test_shared_init_gossip_aligned_equals_plain_and_engines_agree(vectorize):
    cfg = load_config(None, [*SMALL, "protocol.name=gossip", "metrics.aligned_consensus=always",
                             f"vectorize={vectorize}", "train.steps=3"])  # fmt: skip
    rows = Simulator(cfg).run()
    for r in rows:
        assert r["consensus_aligned"] == pytest.approx(r["consensus"], rel=1e-9)
    local = Simulator(load_config(None, [*SMALL, "protocol.name=local", f"vectorize={vectorize}"]))
    rows_local = local.run()
    assert all(r["acc_trained"] == r["global_acc"] for r in rows_local)
    assert all(r["consensus_aligned"] is None for r in rows_local)  # auto: shared init → off


def test_engines_give_the_same_disagreement():
    got = []
    for vectorize in ("always", "never"):
        cfg = load_config(None, [*SMALL, "protocol.name=gossip", f"vectorize={vectorize}"])
        got.append([r["disagreement"] for r in Simulator(cfg).run()])
    assert got[0] == pytest.approx(got[1], abs=1e-9)


def test_flat_state_in_its_own_dtype_holds_every_value_exactly():
    """``dtype=None`` (what a Flower node ships): float16 and bfloat16 entries meet in
    float32, exactly; integer entries are left out as with float64."""
    torch.manual_seed(0)
    state = {"a": torch.randn(3, 4).half(), "n": torch.tensor(7), "b": torch.randn(5).bfloat16()}
    own = flat_state(state, None)
    assert own.dtype == torch.float32 and own.shape == (17,)
    assert torch.equal(own.double(), flat_state(state))
    assert flat_state({"w": torch.randn(4)}, None).dtype == torch.float32
