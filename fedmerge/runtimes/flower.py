"""Run a config on Flower's simulation engine (Ray): ``fedmerge simulate --runtime flower``.

The agents are Flower ClientApps, the ServerApp only relays payloads along the topology
(see :mod:`fedmerge.runtimes.flower_app`); the rows are the simulator's, and for the same
config and seed the numbers are the in-process per-agent engine's.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from typing import Any

from fedmerge.config import SimConfig
from fedmerge.decentralized.setup import build_setup
from fedmerge.runtimes.flower_app import RelayOptions, client_app, make_server_app


def run(
    cfg: SimConfig,
    *,
    on_round: Callable[[list[dict[str, Any]]], None] | None = None,
    timeout: float | None = None,
    num_cpus: int = 2,
    client_cpus: float = 1,
    state_dir: str | None = None,
    verbose: bool = False,
    details: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Run ``cfg`` with one Flower SuperNode per agent; one metrics row per agent per round.

    ``timeout``: seconds to wait for a step's replies (None: forever); ``num_cpus``: CPUs
    Ray may use; ``client_cpus``: CPUs per ClientApp (so ``num_cpus / client_cpus`` agents
    run at once); ``state_dir``: node-local agent state (default: a temporary folder).
    """
    from flwr.simulation import run_simulation

    n = build_setup(cfg).n
    rows: list[dict[str, Any]] = []
    backend = {
        "init_args": {"num_cpus": num_cpus, "num_gpus": 0},
        "client_resources": {"num_cpus": client_cpus, "num_gpus": 0.0},
    }
    flwr_log, quiet = logging.getLogger("flwr"), _DeprecationFilter()
    flwr_log.addFilter(quiet)
    try:
        with tempfile.TemporaryDirectory(prefix="fedmerge-flower-") as tmp:
            opts = RelayOptions(timeout=timeout, state_dir=state_dir or tmp)
            app = make_server_app(cfg, opts, on_round, rows)
            run_simulation(app, client_app, num_supernodes=n, backend_config=backend,
                           verbose_logging=verbose)  # fmt: skip
    finally:
        flwr_log.removeFilter(quiet)
    if len(rows) != n * cfg.rounds:
        raise RuntimeError(f"the Flower run ended early: {len(rows)} of {n * cfg.rounds} rows")
    return rows


class _DeprecationFilter(logging.Filter):
    """Hides Flower's notice that ``run_simulation`` is deprecated in favour of ``flwr run``:
    we call it on purpose, to get the rows back in this process (``flwr run .`` works too)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "`run_simulation` function is deprecated" not in record.getMessage()
