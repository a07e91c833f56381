"""The in-process runtime: every agent in this process, on the per-agent engine or, where
it applies, the stacked one (:mod:`~fedmerge.runtimes.local.simulator`)."""

from __future__ import annotations

from typing import Any

from fedmerge.config import SimConfig
from fedmerge.decentralized.engine import OnRound
from fedmerge.runtimes.local.simulator import Simulator
from fedmerge.threads import torch_threads


def run(
    cfg: SimConfig, *, on_round: OnRound | None = None, details: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """Run ``cfg`` in this process with ``cfg.threads`` torch threads (0: the physical cores,
    :func:`~fedmerge.threads.physical_cores`), restored afterwards; ``details["path"]``
    names the engine that computed, ``details["threads"]`` the count, ``details["device"]``
    where the agents computed."""
    with torch_threads(cfg.threads or None) as threads:
        sim = Simulator(cfg)
        if details is not None:
            details.update(path=sim.path, threads=threads, device=str(sim.setup.device))
        return sim.run(on_round)


__all__ = ["Simulator", "run"]
