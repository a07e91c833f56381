"""Datasets and partitioners: every sample lands in exactly one place."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmerge.data.datasets import Dataset, load_dataset
from fedmerge.data.partition import federate, partition_indices
from fedmerge.errors import ConfigError


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 23),
    method=st.sampled_from(["iid", "dirichlet", "shards"]),
    seed=st.integers(0, 2**16),
    classes=st.integers(2, 12),
)
def test_partition_covers_every_index_once(n, method, seed, classes):
    y = torch.as_tensor(np.random.default_rng(seed).integers(0, classes, 400))
    parts = partition_indices(y, n, method, alpha=5.0, seed=seed, min_samples=0)
    assert len(parts) == n
    joined = np.concatenate(parts)
    assert sorted(joined.tolist()) == list(range(len(y)))


def test_shards_give_class_c_to_agent_c_mod_n():
    y = torch.arange(100) % 10
    parts = partition_indices(y, 4, "shards", seed=0)
    for a, part in enumerate(parts):
        assert set(y[part].tolist()) == {c for c in range(10) if c % 4 == a}


def test_dirichlet_small_alpha_skews_labels():
    y = torch.arange(2000) % 10
    skew = partition_indices(y, 5, "dirichlet", alpha=0.05, seed=1)
    flat = partition_indices(y, 5, "dirichlet", alpha=100.0, seed=1)
    top = lambda parts: np.mean([np.bincount(y[p], minlength=10).max() / len(p) for p in parts])  # noqa: E731
    assert top(skew) > 0.5 > 0.2 > top(flat)


@pytest.mark.parametrize("method", ["iid", "dirichlet", "shards"])
def test_federate_splits_are_disjoint_and_complete(method):
    ds = load_dataset("synthetic", samples=500, features=4, classes=5, seed=3)
    fed = federate(ds, 6, method, alpha=1.0, test_fraction=0.2, local_test_fraction=0.25, seed=2)
    key = lambda x: {tuple(r) for r in x.tolist()}  # noqa: E731 - synthetic rows are unique
    pieces = [fed.test_x] + [t for a in fed.agents for t in (a.train_x, a.test_x)]
    seen = [key(p) for p in pieces]
    assert sum(len(s) for s in seen) == 500 == len(set().union(*seen))
    assert len(fed.test_y) == 100  # stratified: 20 % of each of 5 balanced classes
    assert np.bincount(fed.test_y.numpy()).tolist() == [20] * 5


def test_digits_offline_shapes():
    ds = load_dataset("digits")
    assert ds.x.shape == (1797, 1, 8, 8) and float(ds.x.max()) <= 1.0 and ds.num_classes == 10


def test_dataset_factory_and_errors(monkeypatch, tmp_path):
    import sys
    import types

    mod = types.ModuleType("fm_user_data")
    mod.pairs = lambda n=30: (np.ones((n, 3)), np.arange(n) % 3)
    monkeypatch.setitem(sys.modules, "fm_user_data", mod)
    monkeypatch.setenv("FEDMERGE_TRUSTED_MODULES", "fm_user_data")
    assert load_dataset("fm_user_data:pairs", n=12).x.shape == (12, 3)
    with pytest.raises(
        ConfigError, match="data.options: dataset .digits. has no parameter .bogus."
    ):
        load_dataset("digits", bogus=1)
    with pytest.raises(ConfigError, match="data.name: unknown 'cifar'"):
        load_dataset("cifar")
    with pytest.raises(ConfigError, match="need x"):
        Dataset("bad", torch.ones(3, 2), torch.zeros(4, dtype=torch.int64))
