"""Reference models and user factories: shapes, determinism, errors."""

import sys
import types

import pytest
import torch
from torch import nn

from fedmerge import ConfigError
from fedmerge.models import MODELS, build_model


@pytest.mark.parametrize(
    ("name", "in_shape", "kwargs", "x_shape"),
    [
        ("mlp", (1, 8, 8), {}, (3, 1, 8, 8)),
        ("mlp", (64,), {"hidden": [16, 8, 4]}, (3, 64)),
        ("mlp", (64,), {"hidden": []}, (3, 64)),
        ("cnn", (1, 8, 8), {}, (3, 1, 8, 8)),
        ("cnn", (3, 32, 32), {"channels": (8, 16, 32)}, (3, 3, 32, 32)),
        ("resnet20", (3, 32, 32), {"width": 1}, (2, 3, 32, 32)),
        ("resnet20", (1, 8, 8), {"width": 2}, (2, 1, 8, 8)),
    ],
)
def test_builtin_models_output_logits(name, in_shape, kwargs, x_shape):
    model = build_model(name, in_shape=in_shape, num_classes=7, seed=0, **kwargs)
    assert model(torch.randn(x_shape)).shape == (x_shape[0], 7)


def test_mlp_hidden_sizes_and_resnet20_depth():
    mlp = build_model("mlp", in_shape=(64,), num_classes=10, seed=0, hidden=(20, 30))
    assert [m.out_features for m in mlp if isinstance(m, nn.Linear)] == [20, 30, 10]
    resnet = build_model("resnet20", in_shape=(3, 32, 32), num_classes=10, seed=0, width=2)
    convs = [
        m for n, m in resnet.named_modules() if isinstance(m, nn.Conv2d) and "shortcut" not in n
    ]
    assert len(convs) + 1 == 20  # 19 convs + the head: ResNet-20
    assert resnet.head.in_features == 128
    assert sum(isinstance(m, nn.BatchNorm2d) for m in resnet.modules()) == 19 + 2


@pytest.mark.parametrize("name", sorted(MODELS))
def test_same_seed_same_weights_different_seed_different(name):
    kw = {"in_shape": (3, 8, 8), "num_classes": 4}
    state = torch.get_rng_state()
    a, b = build_model(name, seed=5, **kw), build_model(name, seed=5, **kw)
    c = build_model(name, seed=6, **kw)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is untouched
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


def _install_factory_module(monkeypatch):
    mod = types.ModuleType("fm_user_models")

    def tiny(*, in_shape, num_classes, seed, bias=True):
        return nn.Sequential(nn.Flatten(), nn.Linear(in_shape[-1], num_classes, bias=bias))

    mod.tiny = tiny
    mod.not_a_model = lambda **kw: "nope"
    mod.value = 3
    monkeypatch.setitem(sys.modules, "fm_user_models", mod)
    monkeypatch.setenv("FEDMERGE_TRUSTED_MODULES", "fm_user_models,no_such_pkg_xyz")


def test_factory_gets_kwargs_and_is_seeded(monkeypatch):
    _install_factory_module(monkeypatch)
    a = build_model("fm_user_models:tiny", in_shape=(5,), num_classes=2, seed=1, bias=False)
    b = build_model("fm_user_models:tiny", in_shape=(5,), num_classes=2, seed=1, bias=False)
    assert a[1].bias is None and a[1].weight.shape == (2, 5)
    assert torch.equal(a[1].weight, b[1].weight)


@pytest.mark.parametrize(
    ("name", "kwargs", "match"),
    [
        ("transformer", {}, "model.name: unknown 'transformer'.*mlp"),
        ("no_such_pkg_xyz:f", {}, "cannot import 'no_such_pkg_xyz'"),
        ("fm_user_models:missing", {}, "no callable 'missing'"),
        ("fm_user_models:value", {}, "no callable 'value'"),
        ("fm_user_models:not_a_model", {}, "returned str, not nn.Module"),
        (
            "mlp",
            {"hiden": (3,)},
            "model.options: model 'mlp' has no parameter 'hiden' \\(parameters: hidden",
        ),
        ("mlp", {"hidden": (3, 0)}, r"'hidden' must be in \[1, inf\), got 0"),
        ("cnn", {"channels": "ab"}, "'channels' must be a list of int"),
        ("cnn", {"channels": []}, "'channels' must list at least one block"),
        ("resnet20", {"width": 0}, r"'width' must be in \[1, inf\), got 0"),
    ],
)
def test_errors_name_the_problem(monkeypatch, name, kwargs, match):
    _install_factory_module(monkeypatch)
    with pytest.raises(ConfigError, match=match):
        build_model(name, in_shape=(1, 8, 8), num_classes=3, seed=0, **kwargs)


def test_cnn_needs_image_shape():
    with pytest.raises(ConfigError, match=r"needs in_shape \(C, H, W\)"):
        build_model("cnn", in_shape=(64,), num_classes=3, seed=0)
