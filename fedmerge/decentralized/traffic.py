"""Traffic: per-agent byte and rejection counts of one round, as every runtime reports them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Traffic:
    """Per-agent counts of one round's communication: (n,) int64 arrays."""

    sent: np.ndarray
    received: np.ndarray
    rejected: np.ndarray

    @classmethod
    def zeros(cls, n: int) -> Traffic:
        return cls(np.zeros(n, np.int64), np.zeros(n, np.int64), np.zeros(n, np.int64))
