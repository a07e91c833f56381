"""Datasets that work offline, and a registry a config names them from.

A :class:`Dataset` is two tensors: ``x`` (N, *in_shape) float32 and ``y`` (N,) int64.

- ``digits``: scikit-learn's bundled 8×8 digits (1,797 images, 10 classes), x (N, 1, 8, 8)
  in [0, 1]; no download.
- ``synthetic``: a seeded Gaussian-cluster classification task, x (N, features).
- ``torchvision`` / ``hf``: real datasets for users who have them locally; the libraries are
  imported only when named (a clear :class:`ConfigError` when missing).
- ``"package.module:function"``: any factory returning a :class:`Dataset` or an (x, y) pair.

>>> ds = load_dataset("digits")
>>> ds.x.shape, ds.num_classes, ds.in_shape
(torch.Size([1797, 1, 8, 8]), 10, (1, 8, 8))
>>> load_dataset("synthetic", samples=100, features=5, classes=3, seed=1).x.shape
torch.Size([100, 5])
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedmerge.errors import ConfigError
from fedmerge.factory import import_factory
from fedmerge.registry import Entry, Param, Registry


@dataclass(frozen=True)
class Dataset:
    """Inputs ``x`` (N, *in_shape) float32 and labels ``y`` (N,) int64 in 0..num_classes-1."""

    name: str
    x: torch.Tensor
    y: torch.Tensor

    def __post_init__(self) -> None:
        if self.x.ndim < 2 or self.y.ndim != 1 or len(self.x) != len(self.y) or not len(self.y):
            raise ConfigError(
                f"dataset {self.name!r}: need x (N, ...) and y (N,), got "
                f"{tuple(self.x.shape)} and {tuple(self.y.shape)}"
            )
        if not self.x.dtype.is_floating_point or self.y.dtype != torch.int64:
            raise ConfigError(f"dataset {self.name!r}: x must be float and y int64")
        if int(self.y.min()) < 0:
            raise ConfigError(f"dataset {self.name!r}: labels must be ≥ 0")

    @property
    def num_classes(self) -> int:
        return int(self.y.max()) + 1

    @property
    def in_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])


DATASETS: Registry[Entry] = Registry("dataset", field="data.name", options_field="data.options")
"""Datasets by name (parameters: the config's ``data.options``); :func:`load_dataset` also
takes ``"package.module:function"``."""


@DATASETS.register("digits")
def digits() -> Dataset:
    """scikit-learn's bundled digits as (N, 1, 8, 8) float32 in [0, 1]."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    return Dataset("digits", x, torch.tensor(y, dtype=torch.int64))


@DATASETS.register(
    "synthetic",
    Param("samples", int, 2000, "number of examples (≥ classes)", low=1),
    Param("features", int, 20, "input dimension", low=1),
    Param("classes", int, 10, "number of classes", low=1),
    Param("noise", float, 1.0, "standard deviation around each class mean", low=0.0),
    Param("seed", int, 0, "seed of the means, labels and noise"),
)
def synthetic(samples: int, features: int, classes: int, noise: float, seed: int) -> Dataset:
    """Gaussian clusters: class means μ_c ~ N(0, I); x = μ_y + noise·N(0, I); balanced y."""
    if samples < classes:
        raise ConfigError("data.options: synthetic needs samples ≥ classes")
    rng = np.random.default_rng(seed)
    means = rng.normal(0.0, 1.0, (classes, features))
    y = np.arange(samples) % classes
    rng.shuffle(y)
    x = means[y] + noise * rng.normal(0.0, 1.0, (samples, features))
    return Dataset(
        f"synthetic-{seed}",
        torch.tensor(x, dtype=torch.float32),
        torch.tensor(y, dtype=torch.int64),
    )


@DATASETS.register(
    "torchvision",
    Param("name", str, "MNIST", "class name in torchvision.datasets"),
    Param("root", str, "data", "directory the dataset already lies in"),
    Param("train", bool, True, "the training split (false: the test split)"),
)
def torchvision_dataset(name: str, root: str, train: bool) -> Dataset:
    """A torchvision dataset already on disk under ``root`` (never downloaded here)."""
    try:
        datasets = importlib.import_module("torchvision.datasets")
    except ImportError as exc:
        raise ConfigError("data.name 'torchvision' needs torchvision installed") from exc
    cls = getattr(datasets, name, None)
    if cls is None:
        raise ConfigError(f"data.options.name: torchvision has no dataset {name!r}")
    try:
        ds = cls(root=root, train=train, download=False)
    except (RuntimeError, OSError) as exc:
        raise ConfigError(f"data: torchvision {name} not found under {root!r}: {exc}") from exc
    x = torch.as_tensor(np.asarray(ds.data), dtype=torch.float32) / 255.0
    x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
    return Dataset(name, x.contiguous(), torch.as_tensor(np.asarray(ds.targets), dtype=torch.int64))


@DATASETS.register(
    "hf",
    Param("path", str, "mnist", "dataset name or path in the local Hugging Face cache"),
    Param("split", str, "train", "split to load"),
    Param("image", str, "image", "column holding the inputs"),
    Param("label", str, "label", "column holding the labels"),
)
def hf_dataset(path: str, split: str, image: str, label: str) -> Dataset:
    """A Hugging Face ``datasets`` dataset from the local cache (offline)."""
    try:
        hf = importlib.import_module("datasets")
    except ImportError as exc:
        raise ConfigError("data.name 'hf' needs the 'datasets' package installed") from exc
    try:
        ds = hf.load_dataset(path, split=split).with_format("numpy")
    except Exception as exc:  # noqa: BLE001 - any loader failure becomes a config error
        raise ConfigError(f"data: cannot load Hugging Face dataset {path!r}: {exc}") from exc
    x = torch.as_tensor(np.stack(ds[image]), dtype=torch.float32)
    x = x / 255.0 if x.max() > 1 else x
    x = x.unsqueeze(1) if x.ndim == 3 else x
    return Dataset(path, x, torch.as_tensor(np.asarray(ds[label]), dtype=torch.int64))


def load_dataset(name: str, **options: Any) -> Dataset:
    """The dataset ``name`` built with ``options`` (the config's ``data.options``)."""
    if name in DATASETS:
        out = DATASETS.build(name, options)
    else:
        out = _call_factory(name, import_factory(name, "data.name", list(DATASETS)), options)
    if isinstance(out, Dataset):
        return out
    if isinstance(out, tuple) and len(out) == 2:
        x, y = (torch.as_tensor(np.asarray(v)) for v in out)
        return Dataset(name, x.float(), y.long())
    raise ConfigError(f"data.name: factory {name!r} returned {type(out).__name__}, not (x, y)")


def _call_factory(name: str, factory: Callable[..., Any], options: dict[str, Any]) -> Any:
    """A user's ``pkg.mod:fn`` called with ``options``, checked against its signature."""
    params = inspect.signature(factory).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        for key in options:
            if key not in params:
                raise ConfigError(
                    f"data.options.{key}: dataset {name!r} takes no such option "
                    f"(options: {sorted(params)})"
                )
    return factory(**options)
