"""Split one dataset over N agents: a global test set, then per-agent train/test splits.

Methods (every sample lands in exactly one place: the global test set, or one agent's
train or test split):

- ``iid``: a seeded shuffle cut into N near-equal parts;
- ``dirichlet``: per class, shares ~ Dirichlet(α·1_N) (small α: skewed labels), resampled
  until every agent holds at least ``min_samples``;
- ``shards``: DIMAT's non-IID split, class c goes to agent c mod N (with more agents than
  classes, class c is shared evenly by the agents a with a mod C = c).

>>> import torch
>>> y = torch.arange(20) % 4
>>> [sorted(set(y[p].tolist())) for p in partition_indices(y, 2, "shards", seed=0)]
[[0, 2], [1, 3]]
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fedmerge.data.datasets import Dataset
from fedmerge.errors import ConfigError

PARTITIONS = ("iid", "dirichlet", "shards")


@dataclass(frozen=True)
class AgentData:
    """One agent's splits: train (n_train, *in_shape)/(n_train,), test likewise (may be empty)."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor

    @property
    def samples(self) -> int:
        return len(self.train_y)


@dataclass(frozen=True)
class FederatedData:
    """Per-agent data and the global test set shared by every agent's evaluation."""

    agents: list[AgentData]
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    in_shape: tuple[int, ...]

    def union(self) -> AgentData:
        """All agents' splits concatenated: the centralized baseline's data."""
        cat = lambda attr: torch.cat([getattr(a, attr) for a in self.agents])  # noqa: E731
        return AgentData(cat("train_x"), cat("train_y"), cat("test_x"), cat("test_y"))


def partition_indices(
    y: torch.Tensor, n: int, method: str = "iid", *, alpha: float = 0.5, seed: int = 0,
    min_samples: int = 1,
) -> list[np.ndarray]:  # fmt: skip
    """Indices into ``y`` for each of ``n`` agents; disjoint, covering every index once."""
    labels = np.asarray(y)
    rng = np.random.default_rng(seed)
    if n < 1:
        raise ConfigError(f"agents: must be ≥ 1, got {n}")
    if method == "iid":
        return np.array_split(rng.permutation(len(labels)), n)
    if method == "shards":
        return _shards(labels, n, rng)
    if method == "dirichlet":
        if not alpha > 0:
            raise ConfigError(f"data.alpha: must be > 0, got {alpha}")
        return _dirichlet(labels, n, alpha, rng, min_samples)
    raise ConfigError(f"data.partition: unknown {method!r}; use one of {', '.join(PARTITIONS)}")


def _shards(labels: np.ndarray, n: int, rng: np.random.Generator) -> list[np.ndarray]:
    classes = np.unique(labels)
    m = min(n, len(classes))
    parts: list[list[np.ndarray]] = [[] for _ in range(n)]
    for c in classes:
        owners = [a for a in range(n) if a % m == int(c) % m]
        idx = rng.permutation(np.flatnonzero(labels == c))
        for a, chunk in zip(owners, np.array_split(idx, len(owners)), strict=True):
            parts[a].append(chunk)
    return [np.sort(np.concatenate(p)) if p else np.zeros(0, np.int64) for p in parts]


def _dirichlet(labels, n, alpha, rng, min_samples, tries: int = 100) -> list[np.ndarray]:
    for _ in range(tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(n)]
        for c in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == c))
            cuts = (np.cumsum(rng.dirichlet(np.full(n, alpha)))[:-1] * len(idx)).astype(int)
            for a, chunk in enumerate(np.split(idx, cuts)):
                parts[a].append(chunk)
        out = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(p) for p in out) >= min_samples:
            return out
    raise ConfigError(
        f"data.alpha: Dirichlet({alpha}) left an agent with < {min_samples} samples in "
        f"{tries} draws; raise alpha or use fewer agents"
    )


def holdout(y: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Boolean mask of a stratified ``fraction`` of the samples (round(fraction·count)/class)."""
    mask = np.zeros(len(y), dtype=bool)
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        mask[idx[: int(round(fraction * len(idx)))]] = True
    return mask


def federate(
    ds: Dataset, agents: int, method: str = "iid", *, alpha: float = 0.5,
    test_fraction: float = 0.2, local_test_fraction: float = 0.2, seed: int = 0,
) -> FederatedData:  # fmt: skip
    """Hold out a stratified global test set, partition the rest, split each part train/test."""
    for name, frac in (
        ("test_fraction", test_fraction),
        ("local_test_fraction", local_test_fraction),
    ):
        if not 0 <= frac < 1:
            raise ConfigError(f"data.{name}: must be in [0, 1), got {frac}")
    rng = np.random.default_rng(seed)
    y = ds.y.numpy()
    test = holdout(y, test_fraction, rng)
    pool = np.flatnonzero(~test)
    parts = partition_indices(ds.y[pool], agents, method, alpha=alpha, seed=seed + 1)
    out = []
    for part in parts:
        idx = pool[rng.permutation(part)]
        cut = int(len(idx) * local_test_fraction)
        tr, te = torch.as_tensor(idx[cut:]), torch.as_tensor(idx[:cut])
        out.append(AgentData(ds.x[tr], ds.y[tr], ds.x[te], ds.y[te]))
    t = torch.as_tensor(np.flatnonzero(test))
    return FederatedData(out, ds.x[t], ds.y[t], ds.num_classes, ds.in_shape)
