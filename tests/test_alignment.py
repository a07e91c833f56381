"""Permutation specs, activation / weight matching and the BatchNorm reset."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fedmerge import ConfigError, ValidationError
from fedmerge.alignment import (
    activation_matching,
    apply_permutation,
    invert,
    permutation_spec,
    random_perms,
    reset_bn_stats,
    spec_from_axes,
    weight_matching,
)
from fedmerge.alignment.activation import CrossStats, assign
from fedmerge.alignment.spec import perm_sizes
from fedmerge.models import build_model

pytestmark = pytest.mark.usefixtures("one_thread")


CASES = {
    "mlp": ((1, 8, 8), {"hidden": (24, 16, 12)}),
    "cnn": ((1, 8, 8), {"channels": (8, 12, 16)}),
    "resnet20": ((3, 8, 8), {"width": 1}),
}


def _model_with_bn_stats(name: str, seed: int) -> tuple[nn.Module, torch.Tensor]:
    """A reference model in eval mode whose BN running stats are real (not 0/1)."""
    in_shape, kw = CASES[name]
    model = build_model(name, in_shape=in_shape, num_classes=5, seed=seed, **kw)
    x = torch.randn(128, *in_shape, generator=torch.Generator().manual_seed(seed))
    reset_bn_stats(model, [x[:64], x[64:]])
    return model.eval(), x


def _permuted_copy(model: nn.Module, name: str, perms) -> nn.Module:
    in_shape, kw = CASES[name]
    other = build_model(name, in_shape=in_shape, num_classes=5, seed=99, **kw).eval()
    other.load_state_dict(apply_permutation(permutation_spec(model), perms, model.state_dict()))
    return other


@pytest.mark.parametrize("name", sorted(CASES))
@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**16))
def test_random_permutation_per_group_keeps_the_function(name, seed):
    model, x = _model_with_bn_stats(name, seed % 7)
    spec = permutation_spec(model)
    perms = random_perms(spec, model.state_dict(), torch.Generator().manual_seed(seed))
    other = _permuted_copy(model, name, perms)
    changed = [
        k for k, v in model.state_dict().items() if not torch.equal(v, other.state_dict()[k])
    ]
    assert len(changed) >= len(spec.perm_to_axes)  # weights really moved
    with torch.no_grad():
        torch.testing.assert_close(other(x), model(x), rtol=1e-4, atol=1e-5)


def test_specs_cover_bn_buffers_and_classifier_input_only():
    resnet = build_model("resnet20", in_shape=(3, 8, 8), num_classes=5, seed=0)
    spec = permutation_spec(resnet)
    axes = spec.axes_to_perm
    assert axes["head.weight"] == (None, "S3") and axes["head.bias"] == (None,)
    for k in ("weight", "bias", "running_mean", "running_var"):
        assert axes[f"layer2.0.shortcut.1.{k}"] == ("S2",)
    assert axes["layer2.0.shortcut.0.weight"] == ("S2", "S1", None, None)
    # one residual stream per stage, read at the stem and at every block output
    assert spec.points["S1"] == ("relu", "layer1.0", "layer1.1", "layer1.2")
    assert spec.points["S3"] == ("layer3.0", "layer3.1", "layer3.2")
    assert "layer1.0.bn1.running_var" in spec.stats and "layer1.0.bn1.weight" not in spec.stats
    assert len(spec.perm_to_axes) == 3 + 9  # 3 streams + one inner group per block
    assert perm_sizes(spec, resnet.state_dict())["S2"] == 32


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("method", ["activation", "weight"])
def test_matching_recovers_the_inverse_of_a_random_permutation(name, method):
    model, x = _model_with_bn_stats(name, 1)
    spec = permutation_spec(model)
    perms = random_perms(spec, model.state_dict(), torch.Generator().manual_seed(3))
    other = _permuted_copy(model, name, perms)
    if method == "activation":
        (found,) = activation_matching(spec, model, [other], [x[:50], x[50:]])
    else:
        found = weight_matching(spec, model.state_dict(), other.state_dict(), seed=0)
    expected = invert(perms)
    assert all(torch.equal(found[g], expected[g]) for g in expected)
    realigned = apply_permutation(spec, found, other.state_dict())
    assert all(torch.equal(realigned[k], v) for k, v in model.state_dict().items())


def test_activation_matching_aligns_several_models_in_one_pass():
    model, x = _model_with_bn_stats("mlp", 1)  # seed 1: no unit is constant (dead) on x
    spec = permutation_spec(model)
    perms = [
        random_perms(spec, model.state_dict(), torch.Generator().manual_seed(s)) for s in (1, 2)
    ]
    others = [_permuted_copy(model, "mlp", p) for p in perms]
    found = activation_matching(spec, model, others, [x])
    for f, p in zip(found, perms, strict=True):
        assert all(torch.equal(f[g], invert(p)[g]) for g in p)


def test_cross_stats_stream_equals_numpy_corrcoef():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(300, 4, generator=gen)
    b = a[:, [2, 0, 3, 1]] * torch.tensor([2.0, 0.5, 1.0, 3.0]) + 0.1 * torch.randn(300, 4)
    stats = CrossStats(4)
    for chunk_a, chunk_b in zip(a.split(70), b.split(70), strict=True):  # uneven batches
        stats.update(chunk_a, chunk_b)
    expected = np.corrcoef(a.numpy().T, b.numpy().T)[:4, 4:]
    np.testing.assert_allclose(stats.correlation().numpy(), expected, atol=1e-6)
    assert assign(stats.correlation()).tolist() == [1, 3, 0, 2]  # a_i is b_perm[i]


def test_assign_hand_case_maximizes_total_score():
    score = torch.tensor([[1.0, 0.9, 0.0], [0.9, 0.0, 0.0], [0.0, 0.0, 0.1]])
    assert assign(score).tolist() == [1, 0, 2]  # 0.9 + 0.9 + 0.1 beats the greedy 1.0 + 0 + 0.1


def test_bn_reset_gives_the_batch_statistics_of_the_calibration_data():
    model = build_model("cnn", in_shape=(1, 8, 8), num_classes=3, seed=0, channels=(4, 6))
    bn, momentum = model.bn0, model.bn0.momentum
    x = torch.rand(32, 1, 8, 8)
    model.eval()
    reset_bn_stats(model, [(x, torch.zeros(32))])  # (x, y) batches are accepted
    feats = model.conv0(x).detach()  # what bn0 sees: (B, C, H, W)
    torch.testing.assert_close(bn.running_mean, feats.mean(dim=(0, 2, 3)))
    torch.testing.assert_close(bn.running_var, feats.var(dim=(0, 2, 3), unbiased=True))
    assert bn.momentum == momentum and not model.training  # settings restored
    # several batches: the running mean is the average of the batch means
    reset_bn_stats(model, [x[:16], x[16:]])
    halves = [model.conv0(h).detach().mean(dim=(0, 2, 3)) for h in (x[:16], x[16:])]
    torch.testing.assert_close(bn.running_mean, (halves[0] + halves[1]) / 2)


def test_bn_reset_rejects_empty_data_and_skips_models_without_bn():
    mlp = build_model("mlp", in_shape=(4,), num_classes=2, seed=0)
    assert reset_bn_stats(mlp, []) is mlp
    cnn = build_model("cnn", in_shape=(1, 8, 8), num_classes=2, seed=0)
    with pytest.raises(ValidationError, match="yielded no batch"):
        reset_bn_stats(cnn, [])


def test_user_model_with_its_own_spec():
    class Tiny(nn.Sequential):
        def permutation_spec(self):
            axes = {"0.weight": ("H", None), "0.bias": ("H",), "2.weight": (None, "H")}
            return spec_from_axes(axes, points={"H": ["1"]})

    torch.manual_seed(0)
    model = Tiny(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 2))
    spec = permutation_spec(model)
    perms = {"H": torch.tensor([5, 3, 1, 0, 2, 4])}
    other = Tiny(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 2))
    other.load_state_dict(apply_permutation(spec, perms, model.state_dict()))
    x = torch.randn(64, 3)
    assert activation_matching(spec, model, [other], [x])[0]["H"].tolist() == [3, 2, 4, 1, 5, 0]


def test_spec_errors_name_the_problem():
    with pytest.raises(ConfigError, match="no permutation spec for Linear"):
        permutation_spec(nn.Linear(2, 2))
    with pytest.raises(ConfigError, match="unknown group 'Q'"):
        spec_from_axes({"w": ("P",)}, points={"Q": ["x"]})
    spec = spec_from_axes({"a": ("P",), "b": (None, "P")})
    with pytest.raises(ValidationError, match=r"'b' axis 1 has 3 units, group 'P' has 2"):
        perm_sizes(spec, {"a": torch.zeros(2), "b": torch.zeros(2, 3)})
    with pytest.raises(ConfigError, match="group 'P' has no activation points"):
        activation_matching(spec, nn.Identity(), [nn.Identity()], [torch.zeros(1)])
