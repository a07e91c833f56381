"""Consensus distance: how far each agent is from the mean model, ‖θ_i − θ̄‖.

>>> import torch
>>> distances(torch.tensor([[0.0, 0.0], [2.0, 0.0]]))
[1.0, 1.0]
"""

from __future__ import annotations

import torch

from fedmerge.statedict import StateDict, is_mergeable


def flat_state(state: StateDict) -> torch.Tensor:
    """(P,) float64: the floating entries of ``state``, flattened in key order."""
    return torch.cat([v.reshape(-1) for v in state.values() if is_mergeable(v)]).double()


def distances(flat: torch.Tensor, mean: torch.Tensor | None = None) -> list[float]:
    """‖θ_i − θ̄‖ for the rows of ``flat`` (n, P); θ̄ (P,) defaults to the rows' mean (a
    runtime that holds only some rows passes the mean it all-reduced)."""
    centre = flat.mean(0) if mean is None else mean
    return (flat - centre).norm(dim=1).tolist()
