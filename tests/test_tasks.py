"""The digits task family: deterministic, exact transforms, clean stratified splits."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from fedmerge.data.tasks import TASK_NAMES, Task, TaskFamily, augment, make_task_family
from fedmerge.errors import ConfigError

GEOMETRIC = {  # independent numpy definitions of the image tasks
    "identity": lambda img: img,
    "rot90": lambda img: np.rot90(img, 1),
    "rot180": lambda img: np.rot90(img, 2),
    "rot270": lambda img: np.rot90(img, 3),
    "transpose": lambda img: img.T,
    "hflip": np.fliplr,
    "vflip": np.flipud,
    "invert": lambda img: 1.0 - img,
}


@pytest.fixture(scope="module")
def family() -> TaskFamily:
    return make_task_family(TASK_NAMES, seed=3)


def full_pool(task: Task) -> tuple[np.ndarray, np.ndarray]:
    """The task's transformed task pool ``(M, 64)`` and labels, reassembled from its split."""
    M = len(task.train_index) + len(task.test_index)
    X, y = np.full((M, 64), np.nan, dtype=np.float32), np.full(M, -1)
    X[task.train_index], y[task.train_index] = task.X_train.numpy(), task.y_train.numpy()
    X[task.test_index], y[task.test_index] = task.X_test.numpy(), task.y_test.numpy()
    return X, y


def test_shapes_and_ranges(family):
    assert family.names == list(TASK_NAMES)
    assert len(family.y_pretrain) + len(family.task_pool_labels) == 1797
    assert family.X_pretrain.shape == (len(family.y_pretrain), 64)
    for task in family.tasks:
        for X, y in ((task.X_train, task.y_train), (task.X_test, task.y_test)):
            assert X.dtype == torch.float32 and y.dtype == torch.int64
            assert X.shape == (len(y), 64)
            assert float(X.min()) >= 0.0 and float(X.max()) <= 1.0
            assert set(y.tolist()) == set(range(10))


def test_split_covers_pool_without_overlap_and_is_stratified(family):
    pool_size = len(family.task_pool_labels)
    counts = np.bincount(family.task_pool_labels.numpy(), minlength=10)
    for task in family.tasks:
        train, test = set(task.train_index.tolist()), set(task.test_index.tolist())
        assert not train & test
        assert train | test == set(range(pool_size))
        test_counts = np.bincount(task.y_test.numpy(), minlength=10)
        if task.name != "label_permute":  # stratified: every class ~30% in test
            assert np.all(np.abs(test_counts - 0.3 * counts) <= 1.0)


@pytest.mark.parametrize("name", sorted(GEOMETRIC))
def test_image_tasks_are_exact_transforms(family, name):
    task = family.tasks[family.names.index(name)]
    X, y = full_pool(task)
    images = family.task_pool_images.numpy()
    expected = np.stack([GEOMETRIC[name](img).reshape(64) for img in images])
    np.testing.assert_array_equal(X, expected)
    np.testing.assert_array_equal(y, family.task_pool_labels.numpy())


@pytest.mark.parametrize("name", ["permute_a", "permute_b"])
def test_pixel_permutation_is_one_fixed_nontrivial_permutation(family, name):
    X, _ = full_pool(family.tasks[family.names.index(name)])
    ident = family.task_pool_images.numpy().reshape(-1, 64)
    # every output pixel column is some input pixel column, and the multiset per image is kept
    for j in range(64):
        assert any(np.array_equal(X[:, j], ident[:, i]) for i in range(64))
    np.testing.assert_array_equal(np.sort(X, axis=1), np.sort(ident, axis=1))
    assert not np.array_equal(X, ident)


def test_label_permutation_is_a_bijection(family):
    _, y = full_pool(family.tasks[family.names.index("label_permute")])
    mapping = dict(zip(family.task_pool_labels.tolist(), y.tolist(), strict=True))
    assert sorted(mapping) == sorted(mapping.values()) == list(range(10))
    assert any(k != v for k, v in mapping.items())


def test_noise_task_is_clipped_perturbation(family):
    X, _ = full_pool(family.tasks[family.names.index("noise")])
    ident = family.task_pool_images.numpy().reshape(-1, 64)
    diff = np.abs(X - ident)
    assert 0.05 < diff.mean() < 0.3 and X.min() >= 0 and X.max() <= 1


def test_tasks_differ_pairwise(family):
    pools = {t.name: full_pool(t) for t in family.tasks}
    for a, b in itertools.combinations(pools, 2):
        (Xa, ya), (Xb, yb) = pools[a], pools[b]
        assert not (np.array_equal(Xa, Xb) and np.array_equal(ya, yb)), (a, b)


def test_deterministic_in_seed_and_independent_of_position():
    a = make_task_family(["rot90", "permute_a"], seed=7)
    b = make_task_family(["permute_a", "rot90"], seed=7)
    c = make_task_family(["rot90", "permute_a"], seed=8)
    for name in ("rot90", "permute_a"):
        ta, tb = a.tasks[a.names.index(name)], b.tasks[b.names.index(name)]
        assert torch.equal(ta.X_train, tb.X_train) and torch.equal(ta.y_test, tb.y_test)
        np.testing.assert_array_equal(ta.test_index, tb.test_index)
    assert not torch.equal(a.X_pretrain, c.X_pretrain)
    assert not np.array_equal(a.tasks[1].test_index, c.tasks[1].test_index)


def test_permutations_differ_between_tasks(family):
    Xa, _ = full_pool(family.tasks[family.names.index("permute_a")])
    Xb, _ = full_pool(family.tasks[family.names.index("permute_b")])
    assert not np.array_equal(Xa, Xb)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"names": ["rot45"]}, "rot45"),
        ({"names": ["rot90", "rot90"]}, "duplicate"),
        ({"names": ["rot90"], "test_fraction": 1.5}, "data.test_fraction"),
        ({"names": ["rot90"], "pretrain_fraction": 0.0}, "data.pretrain_fraction"),
    ],
)
def test_bad_arguments_name_the_culprit(kwargs, needle):
    with pytest.raises(ConfigError, match=needle):
        make_task_family(**kwargs)


def test_augment_is_seeded_bounded_and_the_identity_with_zero_strength(family):
    images = family.X_pretrain[:50].reshape(-1, 8, 8)
    same = augment(images, torch.Generator().manual_seed(0), 0.0, 0.0, 0.0, 0.0)
    torch.testing.assert_close(same, images, rtol=0, atol=1e-6)
    a = augment(images, torch.Generator().manual_seed(1))
    b = augment(images, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == images.shape
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    assert float((a - images).abs().mean()) > 0.02  # distorted, not copied


def test_pretraining_and_multitask_data(family):
    P = len(family.y_pretrain)
    X, y = family.pretraining_data(copies=2, seed=0)
    assert X.shape == (3 * P, 64) and torch.equal(y, family.y_pretrain.repeat(3))
    assert torch.equal(X[:P], family.X_pretrain)  # the originals come first
    assert torch.equal(family.pretraining_data(0)[0], family.X_pretrain)
    X, y, task = family.multitask_data()
    sizes = [len(t.y_train) for t in family.tasks]
    assert X.shape == (sum(sizes), 64) and len(y) == len(task) == sum(sizes)
    assert torch.bincount(task).tolist() == sizes
    k = family.names.index("rot90")
    assert torch.equal(X[task == k], family.tasks[k].X_train)
