"""The declared interfaces a runtime implements around the round kit.

An :class:`Engine` holds all of a process's agents and does one round's work on them:
train, communicate (publish → deliver → receive and merge), evaluate, the consensus
distance (and the flat states it is defined on), states and test predictions for the other
consensus measures. The in-process runtime has two (per-agent and stacked); a runner
(:class:`RoundRunner`) drives rounds: faults, plan, the engine's steps, the metrics rows.
Both are structural (``typing.Protocol``): implement the methods, no base class needed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from fedmerge.decentralized.traffic import Traffic
from fedmerge.statedict import StateDict
from fedmerge.topology import RoundPlan

Row = dict[str, Any]
OnRound = Callable[[list[Row]], None]  # called with each round's rows as they are ready


@runtime_checkable
class Engine(Protocol):
    """One process's agents; ``name`` says which path computes (shown in summaries)."""

    name: str

    def train(self, trains: np.ndarray) -> None:
        """Local training for the agents where ``trains`` (n,) bool is set."""

    def communicate(self, r: int, plan: RoundPlan, active: np.ndarray, lost: np.ndarray) -> Traffic:
        """Round r's exchange along ``plan`` among the ``active`` (n,) agents, minus the
        ``lost`` (messages,) messages; every active agent receives and merges."""

    def evaluate(self) -> tuple[list[float | None], list[float | None]]:
        """(local test accuracy, global test accuracy) per agent; None: nothing to test on."""

    def flat(self) -> torch.Tensor:
        """(n, P) float64: every agent's floating state, flattened (consensus distance)."""

    def distances(self) -> list[float]:
        """‖θ_i − θ̄‖ per agent (the consensus distance,
        :func:`fedmerge.decentralized.consensus.distances` of :meth:`flat`)."""

    def states(self) -> list[StateDict]:
        """Every agent's state (the aligned consensus distance reads them)."""

    def predictions(self) -> torch.Tensor:
        """(n, N) int64: every agent's predicted class on the global test set."""


@runtime_checkable
class RoundRunner(Protocol):
    """Drives rounds; ``round(r)`` returns round r's metrics rows (one per agent), or None
    on a process that does not report (a torch.distributed rank other than the leader)."""

    def round(self, r: int) -> list[Row] | None:
        """Run round r (0-based); rows carry ``round`` r + 1."""
