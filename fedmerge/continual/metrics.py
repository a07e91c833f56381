"""Continual-learning metrics over an accuracy matrix.

``R`` is a ``(T, T)`` array for one task order: ``R[t, j]`` is the accuracy on the
``j``-th task *of that order* after step ``t`` (the merge of the first ``t + 1``
experts); entries with ``j > t`` (tasks not yet merged) may hold anything.

* average accuracy after step ``t``: ``mean_{j ≤ t} R[t, j]``;
* final average accuracy: the above at ``t = T − 1``;
* backward transfer (GEM, Lopez-Paz & Ranzato 2017; the OPCM paper uses the same):
  ``BWT = 1/(T−1) · Σ_{j < T−1} (R[T−1, j] − R[j, j])`` — how much a task's accuracy
  moved between the step that added it and the end (negative = forgetting).

>>> R = np.array([[0.9, 0.0, 0.0], [0.8, 0.7, 0.0], [0.6, 0.5, 0.4]])
>>> avg_seen(R).round(3).tolist(), round(backward_transfer(R), 3)
([0.9, 0.75, 0.5], -0.25)
"""

from __future__ import annotations

import math

import numpy as np


def avg_seen(R: np.ndarray) -> np.ndarray:
    """``(T,)``: mean accuracy over the tasks merged so far, after each step."""
    T = _check_square(R)
    return np.array([R[t, : t + 1].mean() for t in range(T)])


def backward_transfer(R: np.ndarray) -> float:
    """GEM's BWT of a ``(T, T)`` accuracy matrix; NaN when ``T == 1`` (nothing to transfer to)."""
    T = _check_square(R)
    if T == 1:
        return math.nan
    return float(np.mean([R[T - 1, j] - R[j, j] for j in range(T - 1)]))


def mean_std(values: np.ndarray | list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof = 1; 0 for a single value) along axis 0."""
    arr = np.asarray(values, dtype=float)
    std = arr.std(axis=0, ddof=1) if len(arr) > 1 else np.zeros_like(arr[0])
    return arr.mean(axis=0), std


def _check_square(R: np.ndarray) -> int:
    if R.ndim != 2 or R.shape[0] != R.shape[1] or R.shape[0] == 0:
        raise ValueError(f"accuracy matrix must be (T, T) with T >= 1, got shape {R.shape}")
    return R.shape[0]
