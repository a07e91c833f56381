"""The in-process runtime: every agent in this process, on the per-agent engine or, where
it applies, the stacked one (:mod:`~fedmerge.runtimes.local.simulator`)."""

from __future__ import annotations

from typing import Any

from fedmerge.config import SimConfig
from fedmerge.decentralized.engine import OnRound
from fedmerge.runtimes.local.simulator import Simulator


def run(
    cfg: SimConfig, *, on_round: OnRound | None = None, details: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """Run ``cfg`` in this process; ``details["path"]`` names the engine that computed."""
    sim = Simulator(cfg)
    if details is not None:
        details["path"] = sim.path
    return sim.run(on_round)


__all__ = ["Simulator", "run"]
