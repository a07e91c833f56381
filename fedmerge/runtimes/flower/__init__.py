"""The Flower runtime: one fedmerge agent per SuperNode, a ServerApp that relays payloads.

Laid out as Flower's app templates: :mod:`.client_app` (the ClientApp ``app``) and
:mod:`.server_app` (ServerApps around :mod:`.relay`); ``clients/client_app.py`` and
``clients/server_app.py`` name them for ``flwr run .``. :func:`run` runs a config on
Flower's simulation engine (Ray) in this process (``fedmerge simulate --runtime flower``);
for the same config and seed the rows are the in-process per-agent engine's.
"""

from __future__ import annotations

import logging
import tempfile
from typing import Any

from fedmerge.config import SimConfig
from fedmerge.decentralized.engine import OnRound, Row
from fedmerge.decentralized.setup import build_setup
from fedmerge.errors import FedmergeError
from fedmerge.runtimes.flower.client_app import app as client_app
from fedmerge.runtimes.flower.relay import RelayOptions
from fedmerge.runtimes.flower.server_app import make_server_app


def run(
    cfg: SimConfig,
    *,
    on_round: OnRound | None = None,
    timeout: float | None = None,
    num_cpus: int = 2,
    client_cpus: float = 1,
    state_dir: str | None = None,
    verbose: bool = False,
    details: dict[str, Any] | None = None,
) -> list[Row]:
    """Run ``cfg`` with one Flower SuperNode per agent; one metrics row per agent per round.

    ``timeout``: seconds to wait for a step's replies (None: forever); ``num_cpus``: CPUs
    Ray may use; ``client_cpus``: CPUs per ClientApp (so ``num_cpus / client_cpus`` agents
    run at once); ``state_dir``: node-local agent state (default: a temporary folder);
    ``verbose``: let Flower's and Ray's informational logs through (default: warnings and
    errors only). A fedmerge error in the relay (a timeout, a bad config) is raised here.
    """
    from flwr.simulation import run_simulation

    n = build_setup(cfg).n
    rows: list[Row] = []
    failures: list[FedmergeError] = []
    ray_logs = {} if verbose else {"logging_level": logging.ERROR, "log_to_driver": False}
    backend = {
        "init_args": {"num_cpus": num_cpus, "num_gpus": 0, **ray_logs},
        "client_resources": {"num_cpus": client_cpus, "num_gpus": 0.0},
    }
    flwr_log, quiet = logging.getLogger("flwr"), _Quiet(verbose)
    flwr_log.addFilter(quiet)
    try:
        with tempfile.TemporaryDirectory(prefix="fedmerge-flower-") as tmp:
            opts = RelayOptions(timeout=timeout, state_dir=state_dir or tmp)
            app = make_server_app(cfg, opts, on_round, rows, failures)
            run_simulation(app, client_app, num_supernodes=n, backend_config=backend,
                           verbose_logging=verbose)  # fmt: skip
    finally:
        flwr_log.removeFilter(quiet)
    if failures:
        raise failures[0]
    if len(rows) != n * cfg.rounds:
        raise RuntimeError(f"the Flower run ended early: {len(rows)} of {n * cfg.rounds} rows")
    return rows


class _Quiet(logging.Filter):
    """Keeps Flower's informational chatter out of stderr unless ``verbose`` (warnings and
    errors always pass), and always hides its notice that ``run_simulation`` is deprecated
    in favour of ``flwr run``: we call it on purpose, to get the rows back in this process
    (``flwr run .`` works too)."""

    def __init__(self, verbose: bool) -> None:
        super().__init__()
        self.verbose = verbose

    def filter(self, record: logging.LogRecord) -> bool:
        if "`run_simulation` function is deprecated" in record.getMessage():
            return False
        return self.verbose or record.levelno >= logging.WARNING
