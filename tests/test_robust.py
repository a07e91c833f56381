"""Robust aggregation rules: hand-computed small cases, properties, and their wiring into
gossip, DIMAT and the simulator (non-mean rules force the per-agent path)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmerge.config import load_config
from fedmerge.decentralized.robust import (
    as_state_merge,
    clip,
    krum,
    krum_scores,
    lower_median,
    make_rule,
    mean,
    median,
    trimmed_mean,
)
from fedmerge.dimat import dimat_merge
from fedmerge.errors import ConfigError
from fedmerge.models import build_model
from fedmerge.runtimes.local.simulator import Simulator
from fedmerge.runtimes.local.stacked import why_not_stacked


def c(values, weight=1.0, **extra):
    """A contribution: {"w": values (float32)} plus extra entries, with its weight."""
    return ({"w": torch.tensor(values, dtype=torch.float32), **extra}, weight)


vectors = st.lists(st.floats(-100, 100, allow_nan=False), min_size=3, max_size=3)


def test_clip_by_lower_median_radius():
    own, a, b = c([0.0, 0.0]), c([3.0, 4.0]), c([0.0, 1.0], 2.0)
    # distances 5 and 1 → radius 1·min-median 1 → a becomes [0.6, 0.8]; total weight 4
    out = clip(own, [a, b], tau=1.0)["w"]
    assert torch.allclose(out, torch.tensor([0.15, 0.7]))
    # τ = 2: a clipped to norm 2 → [1.2, 1.6]
    assert torch.allclose(clip(own, [a, b], tau=2.0)["w"], torch.tensor([0.3, 0.9]))
    # a fixed bound above every distance: plain weighted mean
    assert torch.allclose(clip(own, [a, b], bound=10.0)["w"], mean(own, [a, b])["w"])
    assert torch.equal(clip(own, [])["w"], own[0]["w"])


def test_clip_screen_ignores_far_neighbours():
    own, a, b = c([0.0, 0.0]), c([3.0, 4.0]), c([0.0, 1.0], 2.0)
    # radius 1 (lower median of 5 and 1); screen 2: a (distance 5 > 2) counts as own
    assert torch.allclose(clip(own, [a, b], screen=2.0)["w"], torch.tensor([0.0, 0.5]))
    # screen 5: a at exactly 5 radii is kept, clipped as without screening
    assert torch.allclose(clip(own, [a, b], screen=5.0)["w"], torch.tensor([0.15, 0.7]))
    # a fixed bound 2 and screen 2: far = 4, a still ignored, b (distance 1) unclipped
    assert torch.allclose(clip(own, [a, b], bound=2.0, screen=2.0)["w"], torch.tensor([0, 0.5]))
    # three neighbours, one far: radius = lower median of (1, 2, 50) = 2, far = 4
    far = c([0.0, 50.0])
    out = clip(own, [c([1.0, 0.0]), c([0.0, 2.0]), far], screen=2.0)["w"]
    assert torch.allclose(out, torch.tensor([0.25, 0.5]))  # ([1, 0] + [0, 2]) / 4


@settings(max_examples=40, deadline=None)
@given(st.lists(vectors, min_size=3, max_size=5), vectors, st.floats(1.0, 50.0),
       st.floats(1.0, 4.0), st.floats(0.2, 3.0))  # fmt: skip
def test_clip_screen_cuts_a_far_neighbour_off(rows, direction, stretch, screen, tau):
    """However far past screen × radius a neighbour sits, the merge is the same: the
    others' merge at that radius, the far one's weight given to the node itself."""
    own = ({"w": torch.tensor(rows[0], dtype=torch.float64)}, 1.0)
    honest = [
        ({"w": torch.tensor(r, dtype=torch.float64)}, 0.5 + i) for i, r in enumerate(rows[1:])
    ]
    v = torch.tensor(direction, dtype=torch.float64)
    spread = max(float((t["w"] - own[0]["w"]).norm()) for t, _ in honest)
    if v.norm() < 1e-3 or spread < 1e-6:
        return
    # farther than every other (so not the radius) and than screen × (radius ≤ τ·spread)
    step = v / v.norm() * (tau * screen * spread + spread + 1.0)
    merged = [clip(own, [*honest, ({"w": own[0]["w"] + k * step}, 0.7)], tau=tau, screen=screen)
              for k in (1.0, stretch)]  # fmt: skip
    assert torch.allclose(merged[0]["w"], merged[1]["w"], atol=1e-9)
    dist = torch.tensor(
        [float((t["w"] - own[0]["w"]).norm()) for t, _ in honest] + [1e9], dtype=torch.float64
    )  # as the rule: a float32 radius moves the edge
    radius = tau * lower_median(dist)
    cut = clip(({"w": own[0]["w"]}, 1.7), honest, bound=radius, screen=screen)  # 1.7: 1 + 0.7
    assert torch.allclose(merged[0]["w"], cut["w"], atol=1e-9)


def test_median_even_and_odd():
    own = c([0.0, 5.0])
    assert median(own, [c([1.0, 1.0]), c([3.0, 2.0]), c([10.0, -7.0])])["w"].tolist() == [
        2.0, 1.5,
    ]  # fmt: skip
    assert median(own, [c([1.0, 1.0]), c([100.0, -100.0])])["w"].tolist() == [1.0, 1.0]


def test_trimmed_mean_drops_k_each_end():
    own, others = c([0.0]), [c([1.0]), c([5.0]), c([6.0]), c([100.0])]
    assert trimmed_mean(own, others, beta=0.1)["w"].item() == pytest.approx(4.0)  # k = 1
    assert trimmed_mean(own, others, beta=0.4)["w"].item() == pytest.approx(5.0)  # k = 2
    assert trimmed_mean(own, others, beta=0.0)["w"].item() == pytest.approx(22.4)  # mean


def test_krum_scores_and_selection():
    pts = torch.tensor([[0.0], [1.0], [2.0], [100.0]], dtype=torch.float64)
    # m = 4, f = 1: each row scored by its single nearest other
    assert krum_scores(pts, 1).tolist() == [1.0, 1.0, 1.0, 98.0**2]
    # f = 0: the m − 2 = 2 nearest
    assert krum_scores(pts, 0).tolist() == [5.0, 2.0, 5.0, 98.0**2 + 99.0**2]
    own = c([0.0], 2.0)
    out = krum(own, [c([1.0]), c([2.0]), c([100.0])], f=1)["w"].item()
    assert out == pytest.approx((0 * 2 + 1 + 2) / 4)  # 100 dropped, π-weighted mean of the rest


def test_non_floating_entries_come_from_own_and_dtypes_stay():
    steps = torch.tensor(7)
    own = c([1.0, 2.0], n=steps)
    others = [c([3.0, 4.0], n=torch.tensor(1)), c([5.0, 6.0], n=torch.tensor(2))]
    for rule in (mean, median, lambda o, x: clip(o, x), lambda o, x: krum(o, x, f=1)):
        out = rule(own, others)
        assert out["n"].item() == 7 and out["w"].dtype == torch.float32


@settings(max_examples=40, deadline=None)
@given(st.lists(vectors, min_size=1, max_size=5), vectors)
def test_rules_are_shift_equivariant_and_fix_consensus(rows, shift):
    """rule(x + s) = rule(x) + s (so τ and θ give the same merge), and identical
    contributions are a fixed point of every rule."""
    s = torch.tensor(shift, dtype=torch.float64)
    contribs = [({"w": torch.tensor(r, dtype=torch.float64)}, 1.0 + i) for i, r in enumerate(rows)]
    shifted = [({"w": t["w"] + s}, w) for t, w in contribs]
    rules = [mean, median, lambda o, x: clip(o, x, tau=0.5), lambda o, x: krum(o, x, f=1),
             lambda o, x: trimmed_mean(o, x, beta=0.3),
             lambda o, x: clip(o, x, tau=1.5, screen=2.0)]  # fmt: skip
    for i, rule in enumerate(rules):
        a = rule(contribs[0], contribs[1:])["w"]
        b = rule(shifted[0], shifted[1:])["w"]
        if i != 3:  # Krum's ties may break differently after rounding
            assert torch.allclose(a + s, b, atol=1e-6)
        same = [(contribs[0][0], w) for _, w in contribs]
        assert torch.allclose(rule(same[0], same[1:])["w"], contribs[0][0]["w"])


def test_config_picks_rule_and_rejects_unknown():
    cfg = load_config(None, ["protocol.aggregation=trimmed_mean", "protocol.trim_beta=0.4"])
    rule = make_rule(cfg.protocol)
    assert rule(c([0.0]), [c([1.0]), c([5.0]), c([6.0]), c([100.0])])["w"].item() == 5.0
    with pytest.raises(ConfigError, match="protocol.aggregation"):
        load_config(None, ["protocol.aggregation=average"])
    with pytest.raises(ConfigError, match="protocol.trim_beta"):
        load_config(None, ["protocol.trim_beta=0.5"])
    screened = make_rule(load_config(None, ["protocol.aggregation=clip",
                                            "protocol.clip_screen=2"]).protocol)  # fmt: skip
    assert screened.keywords == {"tau": 1.0, "bound": 0.0, "screen": 2.0}
    assert screened(c([0.0, 0.0]), [c([3.0, 4.0]), c([0.0, 1.0], 2.0)])["w"].tolist() == [0, 0.5]
    with pytest.raises(ConfigError, match="protocol.clip_screen"):
        load_config(None, ["protocol.clip_screen=-1"])


def test_dimat_hook_uses_the_aggregator():
    model = build_model("mlp", in_shape=(4,), num_classes=3, seed=0, hidden=[6])
    others = [build_model("mlp", in_shape=(4,), num_classes=3, seed=s, hidden=[6]).state_dict()
              for s in (1, 2)]  # fmt: skip
    calib = [torch.randn(32, 4, generator=torch.Generator().manual_seed(0))]
    neighbours = [(s, 0.25) for s in others]
    plain = dimat_merge(model, neighbours, 0.5, calib, "weight")
    hooked = dimat_merge(model, neighbours, 0.5, calib, "weight", aggregate=as_state_merge(mean))
    assert all(torch.allclose(plain[k], hooked[k], atol=1e-6) for k in plain)
    own_only = dimat_merge(
        model, neighbours, 0.5, calib, "weight", aggregate=lambda states, w: dict(states[0])
    )
    assert all(torch.equal(own_only[k], v) for k, v in model.state_dict().items())
    med = dimat_merge(model, neighbours, 0.5, calib, "weight", aggregate=as_state_merge(median))
    assert not all(torch.allclose(med[k], plain[k]) for k in plain)


def test_simulator_runs_robust_rules_per_agent():
    base = ["rounds=2", "topology=ring-4", "train.steps=1", "model.options.hidden=[8]"]
    cfg = load_config(None, [*base, "protocol.aggregation=median"])
    sim = Simulator(cfg)
    assert sim.path == "per-agent"
    assert "protocol.aggregation 'median'" in why_not_stacked(sim.setup)
    rows = sim.run()
    assert len(rows) == 8 and all(0 <= r["global_acc"] <= 1 for r in rows)
    with pytest.raises(ConfigError, match="aggregation"):
        Simulator(load_config(None, [*base, "protocol.aggregation=krum", "vectorize=always"]))
    # with every node honest and a generous radius, clipping is exactly gossip averaging
    mean_rows = Simulator(load_config(None, [*base, "vectorize=never"])).run()
    clip_rows = Simulator(
        load_config(None, [*base, "protocol.aggregation=clip", "protocol.clip_bound=1e6"])
    ).run()
    for a, b in zip(mean_rows, clip_rows, strict=True):
        assert a["consensus"] == pytest.approx(b["consensus"], rel=1e-4, abs=1e-6)
