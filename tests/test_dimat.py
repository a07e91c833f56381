"""DIMAT: the node merge and the reference train-then-merge loop, on digits."""

import pytest
import torch
from sklearn.datasets import load_digits

from fedmerge import ConfigError, ValidationError
from fedmerge.alignment import apply_permutation, permutation_spec, random_perms, reset_bn_stats
from fedmerge.config import load_config
from fedmerge.dimat import (
    accuracy,
    broadcasts,
    dimat_merge,
    run_reference,
    train_epochs,
    uniform_over,
    weighted_average,
)
from fedmerge.models import build_model
from fedmerge.runtimes.local.simulator import Simulator
from fedmerge.topology import build_topology

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits():
    """(x (N,1,8,8) in [0,1], y) split 70/30 by a fixed shuffle."""
    x, y = load_digits(return_X_y=True)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x = torch.tensor(x / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)[order]
    y = torch.tensor(y)[order]
    cut = int(0.7 * len(y))
    return (x[:cut], y[:cut]), (x[cut:], y[cut:])


def _load(name, state, **kw):
    model = build_model(name, in_shape=(1, 8, 8), num_classes=10, seed=0, **kw)
    model.load_state_dict(state)
    return model.eval()


@pytest.mark.parametrize(("name", "kw"), [("mlp", {"hidden": (32, 16)}), ("cnn", {})])
@pytest.mark.parametrize("method", ["activation", "weight"])
def test_merging_permuted_copies_reproduces_the_model(digits, name, kw, method):
    (x, _), _ = digits
    own = build_model(name, in_shape=(1, 8, 8), num_classes=10, seed=4, **kw)
    calib = [x[:256], x[256:512]]
    reset_bn_stats(own, calib)
    spec, state = permutation_spec(own), own.state_dict()
    gen = torch.Generator().manual_seed(0)
    copies = [apply_permutation(spec, random_perms(spec, state, gen), state) for _ in range(3)]
    # unnormalized weights: renormalized to 1/4 each
    merged = dimat_merge(own, [(c, 2.0) for c in copies], 2.0, calib, method=method)
    naive = weighted_average([state, *copies], [0.25] * 4)
    with torch.no_grad():
        want = own.eval()(x)
        torch.testing.assert_close(_load(name, merged, **kw)(x), want, rtol=1e-4, atol=1e-4)
        assert (_load(name, naive, **kw)(x) - want).abs().max() > 0.1


@pytest.mark.parametrize("seed", [0, 2])
def test_aligned_merge_of_two_trained_mlps_beats_naive_averaging(digits, seed):
    (x, y), test = digits
    hidden, models = (16, 16), []
    for i in range(2):
        m = build_model(
            "mlp", in_shape=(1, 8, 8), num_classes=10, seed=10 * seed + i, hidden=hidden
        )
        gen = torch.Generator().manual_seed(i)
        train_epochs(m, x, y, epochs=10, lr=0.05, batch_size=32, generator=gen, momentum=0.9)
        models.append(m)
    a, b = (m.state_dict() for m in models)
    naive = accuracy(_load("mlp", weighted_average([a, b], [0.5, 0.5]), hidden=hidden), *test)
    for method in ("activation", "weight"):
        merged = dimat_merge(models[0], [(b, 0.5)], 0.5, [x], method=method)
        acc = accuracy(_load("mlp", merged, hidden=hidden), *test)
        # observed over seeds 0-5: endpoints 0.92-0.97, naive 0.43-0.64, aligned 0.80-0.94
        # (activation) and 0.80-0.94 (weight); the smallest gain over naive was 0.20
        assert acc > naive + 0.1, (method, acc, naive)


def test_bn_stats_after_merge_are_those_of_the_calibration_data(digits):
    (x, _), _ = digits
    a = build_model("cnn", in_shape=(1, 8, 8), num_classes=10, seed=0)
    b = build_model("cnn", in_shape=(1, 8, 8), num_classes=10, seed=1)
    merged = dimat_merge(a, [(b.state_dict(), 0.5)], 0.5, [x[:300]])
    model = _load("cnn", merged)
    feats = model.conv0(x[:300]).detach()
    torch.testing.assert_close(model.bn0.running_mean, feats.mean(dim=(0, 2, 3)))
    torch.testing.assert_close(model.bn0.running_var, feats.var(dim=(0, 2, 3)))
    assert not torch.equal(a.bn0.running_mean, model.bn0.running_mean)  # `own` left untouched


def test_dimat_merge_rejects_bad_input(digits):
    (x, _), _ = digits
    own = build_model("mlp", in_shape=(1, 8, 8), num_classes=10, seed=0)
    good = own.state_dict()
    with pytest.raises(ConfigError, match="unknown method 'zipit'"):
        dimat_merge(own, [(good, 1.0)], 1.0, [x], method="zipit")
    with pytest.raises(ConfigError, match="re-iterable"):
        dimat_merge(own, [(good, 1.0)], 1.0, iter([x]))
    with pytest.raises(ConfigError, match="mixing weights"):
        dimat_merge(own, [(good, -1.0)], 1.0, [x])
    bad = {**good, "fc0.weight": torch.zeros(3, 3)}
    with pytest.raises(ValidationError, match=r"neighbour 0: 'fc0.weight' has shape \[3, 3\]"):
        dimat_merge(own, [(bad, 1.0)], 1.0, [x])


def _shards(digits, k):
    """DIMAT's non-IID split: class c lives on agent c mod k."""
    (x, y), _ = digits
    return [(x[y % k == i], y[y % k == i]) for i in range(k)]


def test_complete_graph_round_leaves_all_agents_identical(digits):
    k = 3
    models = [build_model("cnn", in_shape=(1, 8, 8), num_classes=10, seed=i) for i in range(k)]
    run_reference(models, torch.full((k, k), 1 / k), _shards(digits, k), digits[1], rounds=1)
    states = [m.state_dict() for m in models]
    assert all(torch.equal(s[key], states[0][key]) for s in states[1:] for key in s)


def test_dimat_beats_local_training_on_non_iid_shards(digits):
    k = 4
    ring = torch.zeros(k, k)
    for i in range(k):
        ring[i, [i, (i - 1) % k, (i + 1) % k]] = 1 / 3
    finals = {}
    for protocol in ("dimat", "local"):
        models = [build_model("mlp", in_shape=(1, 8, 8), num_classes=10, seed=i) for i in range(k)]
        hist = run_reference(
            models, ring, _shards(digits, k), digits[1], rounds=8, epochs=3, protocol=protocol
        )
        finals[protocol] = hist[-1].mean
        assert [r.round for r in hist] == list(range(1, 9))
    # local-only agents know ~1/4 of the classes (≈0.25); DIMAT reached ≈0.4 here
    assert finals["local"] < 0.3
    assert finals["dimat"] > finals["local"] + 0.08, finals


def test_reference_loop_rejects_bad_arguments(digits):
    models = [build_model("mlp", in_shape=(1, 8, 8), num_classes=10, seed=i) for i in range(2)]
    with pytest.raises(ConfigError, match="unknown protocol 'fedavg'"):
        run_reference(
            models, torch.eye(2), _shards(digits, 2), digits[1], rounds=1, protocol="fedavg"
        )
    with pytest.raises(ValidationError, match=r"mixing is \(3, 3\)"):
        run_reference(models, torch.eye(3), _shards(digits, 2), digits[1], rounds=1)


def _mh_complete(k):
    """Metropolis–Hastings weights of the complete graph on k nodes, as the topology builds them."""
    plan = build_topology({"graph": "complete", "n": k}).round(0)
    return torch.tensor(plan.mixing.toarray())


def test_mh_complete_rows_differ_in_the_last_bit_but_count_as_equal():
    w = _mh_complete(5)
    assert w[0, 0] != w[1, 0]  # 0.19999999999999996 vs 0.2
    assert not bool((w == w[0]).all())
    assert broadcasts(w) and not broadcasts(w, atol=0.0)
    ring = torch.tensor(build_topology("ring-8").round(0).mixing.toarray())
    assert not broadcasts(ring)
    assert uniform_over(w[0].tolist(), 5) and not uniform_over(w[0, :4].tolist(), 5)


@pytest.mark.parametrize("broadcast", [True, False])
def test_broadcast_fires_on_a_metropolis_hastings_complete_graph(digits, broadcast):
    k = 3
    models = [build_model("mlp", in_shape=(1, 8, 8), num_classes=10, seed=i) for i in range(k)]
    run_reference(
        models, _mh_complete(k), _shards(digits, k), digits[1], rounds=1, broadcast=broadcast
    )
    states = [m.state_dict() for m in models]
    same = [all(torch.equal(s[key], states[0][key]) for key in s) for s in states[1:]]
    # each agent aligns to itself on its own shard unless the merge is broadcast
    assert same == [broadcast] * (k - 1)


@pytest.mark.parametrize("broadcast", [True, False])
def test_simulator_dimat_broadcast_on_a_complete_graph(broadcast):
    cfg = load_config(None, [
        "protocol.name=dimat", "protocol.calibration=shared", f"protocol.broadcast={broadcast}",
        "model.init=different", "model.options.hidden=[16]", "rounds=1",
        "topology={graph: complete, n: 4}", "train.steps=2",
    ])  # fmt: skip
    sim = Simulator(cfg)
    sim.run()
    flat = sim.engine.flat()
    assert bool((flat == flat[0]).all()) is broadcast
