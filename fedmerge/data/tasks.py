"""Task families derived from scikit-learn's bundled ``digits`` (offline, seeded).

The continual-merging experiments need several *related but conflicting* tasks
that share one input space, so that experts fine-tuned from one pretrained body
pull the shared weights in different directions. Each task here applies a fixed
transformation to the same 8×8 digit images (rotations, flips, the transpose,
inversion 16 − x, seeded pixel permutations, seeded additive noise) or to the
labels (a seeded label permutation); pixel permutations and rotations move the
evidence for a class to different input pixels and so genuinely conflict in a
shared first layer.

Data layout. The 1797 digits are first split (stratified, seeded) into a
*pretraining pool* (``pretrain_fraction`` of the images, identity transform) and
a *task pool* (the rest). Every task uses the whole task pool, transformed, and
splits it into train/test (stratified, seeded per task); ``train_index`` and
``test_index`` are positions in the task pool, disjoint, and together cover it.

For pretraining a body that is a good starting point for every task (as CLIP is for
the OPCM paper's tasks), :meth:`TaskFamily.pretraining_data` adds randomly distorted
copies of the pretraining pool (:func:`augment`); :meth:`TaskFamily.multitask_data`
is the union of the tasks' training sets, for a multi-task reference.

Shapes: ``X`` is ``(N, 64)`` float32 in ``[0, 1]`` (row-major flattening of the
8×8 image, pixel value / 16); ``y`` is ``(N,)`` int64 in ``0..9``.

>>> family = make_task_family(["identity", "rot90"], seed=0)
>>> [t.name for t in family.tasks], family.tasks[0].X_train.shape[1]
(['identity', 'rot90'], 64)
>>> img = family.task_pool_images[family.tasks[1].train_index[0]]
>>> bool((family.tasks[1].X_train[0].reshape(8, 8) == img.rot90(1, (0, 1))).all())
True
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fedmerge.errors import ConfigError

# (N, 8, 8) images in [0, 1], seeded generator -> transformed (N, 8, 8) images.
ImageTransform = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def _permute_pixels(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    perm = torch.randperm(64, generator=gen)
    return images.reshape(-1, 64)[:, perm].reshape(-1, 8, 8)


def _add_noise(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    noise = 0.25 * torch.randn(images.shape, generator=gen)
    return (images + noise).clamp(0.0, 1.0)


IMAGE_TRANSFORMS: dict[str, ImageTransform] = {
    "identity": lambda x, g: x.clone(),
    "rot90": lambda x, g: x.rot90(1, (1, 2)),
    "rot180": lambda x, g: x.rot90(2, (1, 2)),
    "rot270": lambda x, g: x.rot90(3, (1, 2)),
    "transpose": lambda x, g: x.transpose(1, 2).clone(),
    "hflip": lambda x, g: x.flip(2),
    "vflip": lambda x, g: x.flip(1),
    "invert": lambda x, g: 1.0 - x,
    "permute_a": _permute_pixels,
    "permute_b": _permute_pixels,
    "noise": _add_noise,
    "label_permute": lambda x, g: x.clone(),
}
TASK_NAMES: tuple[str, ...] = tuple(IMAGE_TRANSFORMS)
DEFAULT_TASKS: tuple[str, ...] = (
    "rot90",
    "rot180",
    "rot270",
    "hflip",
    "vflip",
    "invert",
    "permute_a",
    "permute_b",
)


@dataclass(frozen=True)
class Task:
    """One classification task: ``X_*`` ``(N, 64)`` float32 in [0, 1], ``y_*`` ``(N,)`` int64."""

    name: str
    X_train: torch.Tensor
    y_train: torch.Tensor
    X_test: torch.Tensor
    y_test: torch.Tensor
    train_index: np.ndarray  # positions in the task pool
    test_index: np.ndarray


@dataclass(frozen=True)
class TaskFamily:
    """The pretraining pool (identity digits) and the tasks built on the task pool."""

    X_pretrain: torch.Tensor  # (P, 64) float32
    y_pretrain: torch.Tensor  # (P,) int64
    task_pool_images: torch.Tensor  # (M, 8, 8) float32, untransformed
    task_pool_labels: torch.Tensor  # (M,) int64
    tasks: list[Task]

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def pretraining_data(self, copies: int = 0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """The pretraining pool plus ``copies`` augmented copies of it (:func:`augment`):
        ``X`` ((1 + copies)·P, 64), ``y`` ((1 + copies)·P,). Augmentation gives the body
        the broad, transform-tolerant features a CLIP-like pretrained encoder has."""
        images = self.X_pretrain.reshape(-1, 8, 8)
        gen = torch.Generator().manual_seed(seed * 1_000_003 + 11)
        extra = [augment(images, gen) for _ in range(copies)]
        X = torch.cat([images, *extra]).reshape(-1, 64)
        return X, self.y_pretrain.repeat(1 + copies)

    def multitask_data(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every task's training set concatenated (the multi-task reference trains on it):
        ``X`` (ΣN_t, 64), ``y`` (ΣN_t,), ``task`` (ΣN_t,) int64, the index of the sample's task."""
        X = torch.cat([t.X_train for t in self.tasks])
        y = torch.cat([t.y_train for t in self.tasks])
        task = torch.cat([torch.full_like(t.y_train, k) for k, t in enumerate(self.tasks)])
        return X, y, task


def augment(
    images: torch.Tensor, gen: torch.Generator, degrees: float = 15.0, shift: float = 1.0,
    scale: float = 0.1, noise: float = 0.05,
) -> torch.Tensor:  # fmt: skip
    """A random small affine distortion of every image (N, 8, 8) in [0, 1]: rotation in
    ±``degrees``, zoom in 1 ± ``scale``, translation in ±``shift`` pixels (bilinear, zero
    outside), then Gaussian noise of std ``noise``, clamped to [0, 1]. Seeded by ``gen``."""
    n = images.shape[0]
    u = lambda: 2 * torch.rand(n, generator=gen) - 1  # noqa: E731 - uniform in [-1, 1]
    angle, zoom = u() * degrees * torch.pi / 180, 1 + u() * scale
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    tx, ty = u() * shift * 2 / 8, u() * shift * 2 / 8  # pixels → normalized coordinates
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = torch.nn.functional.affine_grid(theta, (n, 1, 8, 8), align_corners=False)
    out = torch.nn.functional.grid_sample(images[:, None], grid, align_corners=False)[:, 0]
    return (out + noise * torch.randn(out.shape, generator=gen)).clamp(0.0, 1.0)


def _task_seed(seed: int, name: str) -> int:
    """A per-task seed that depends on the name, not on the task's position in the list."""
    return seed * 1_000_003 + TASK_NAMES.index(name) * 7919 + 1


def _split(index: np.ndarray, labels: np.ndarray, seed: int, **size: float) -> list[np.ndarray]:
    """Stratified, seeded, sorted ``(train, test)`` split of ``index`` (``train_size=`` or
    ``test_size=`` as in scikit-learn's ``train_test_split``)."""
    from sklearn.model_selection import train_test_split  # lazy: keeps `import fedmerge` fast

    parts = train_test_split(index, stratify=labels, random_state=seed, **size)
    return [np.sort(part) for part in parts]


def _make_task(
    name: str, images: torch.Tensor, labels: torch.Tensor, seed: int, test_fraction: float
) -> Task:
    gen = torch.Generator().manual_seed(_task_seed(seed, name))
    X = IMAGE_TRANSFORMS[name](images, gen).reshape(-1, 64).contiguous()
    y = labels.clone()
    if name == "label_permute":
        y = torch.randperm(10, generator=gen)[y]
    train_index, test_index = _split(
        np.arange(len(y)), y.numpy(), _task_seed(seed, name), test_size=test_fraction
    )
    return Task(
        name, X[train_index], y[train_index], X[test_index], y[test_index], train_index, test_index
    )


def make_task_family(
    names: Sequence[str] = DEFAULT_TASKS,
    seed: int = 0,
    test_fraction: float = 0.3,
    pretrain_fraction: float = 0.3,
) -> TaskFamily:
    """Build the tasks ``names`` (see :data:`TASK_NAMES`); deterministic in ``seed``."""
    unknown = [n for n in names if n not in IMAGE_TRANSFORMS]
    if unknown:
        raise ConfigError(f"tasks: unknown task(s) {unknown}; choose from {list(TASK_NAMES)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"tasks: duplicate task names in {list(names)}")
    for field, value in (
        ("test_fraction", test_fraction),
        ("pretrain_fraction", pretrain_fraction),
    ):
        if not 0.0 < value < 1.0:
            raise ConfigError(f"data.{field}: must be in (0, 1), got {value}")
    from sklearn.datasets import load_digits  # lazy: keeps `import fedmerge` fast

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32) / 16.0  # (1797, 8, 8)
    labels = torch.tensor(digits.target, dtype=torch.int64)
    pre_idx, pool_idx = _split(
        np.arange(len(labels)), labels.numpy(), seed, train_size=pretrain_fraction
    )
    pool_images, pool_labels = images[pool_idx], labels[pool_idx]
    tasks = [_make_task(n, pool_images, pool_labels, seed, test_fraction) for n in names]
    return TaskFamily(
        X_pretrain=images[pre_idx].reshape(-1, 64).contiguous(),
        y_pretrain=labels[pre_idx],
        task_pool_images=pool_images,
        task_pool_labels=pool_labels,
        tasks=tasks,
    )
