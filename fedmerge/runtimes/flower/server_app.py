"""ServerApps that relay a fedmerge run (:func:`~fedmerge.runtimes.flower.relay.relay`):
one for an in-process run (the rows come back to the caller), one for ``flwr run`` (config
and options from the run config; ``clients/server_app.py`` names it in pyproject.toml)."""

from __future__ import annotations

import shlex
import time
from collections.abc import Callable, Mapping
from logging import INFO
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from fedmerge.config import SimConfig, default_config, load_config
from fedmerge.decentralized.engine import OnRound, Row
from fedmerge.errors import FedmergeError
from fedmerge.runtimes.flower.polling import quick_pulls
from fedmerge.runtimes.flower.relay import RelayOptions, relay


def make_server_app(
    cfg: SimConfig, opts: RelayOptions, on_round: OnRound | None = None,
    sink: list[Row] | None = None, failures: list[FedmergeError] | None = None,
) -> ServerApp:  # fmt: skip
    """A ServerApp that relays ``cfg``'s run and appends its rows to ``sink``, and the
    fedmerge error that stopped it to ``failures`` (in-process use: Flower only logs it)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            rows = relay(grid, cfg, opts, on_round)
        except FedmergeError as exc:
            if failures is None:
                raise
            failures.append(exc)
            return
        if sink is not None:
            sink.extend(rows)

    return app


def config_from_run(run_config: Mapping[str, Any], app_dir: Path) -> tuple[SimConfig, Path]:
    """The fedmerge config and output folder named by ``flwr run``'s run config.

    ``config``: a YAML path (relative: to the working directory, else to the app folder;
    empty: the embedded default); ``overrides``: ``a.b=c`` items separated by spaces
    (shell quoting allowed); ``out-dir``: where metrics.jsonl/summary.json go.
    """
    overrides = shlex.split(str(run_config.get("overrides", "")))
    source = str(run_config.get("config", ""))
    if not source:
        cfg = default_config(overrides)
    else:
        path = Path(source).expanduser()
        if not path.is_absolute() and not path.exists():
            path = app_dir / path
        cfg = load_config(path, overrides)
    return cfg, Path(str(run_config.get("out-dir", "") or f"runs/{cfg.name}-flower"))


def run_options(run_config: Mapping[str, Any]) -> RelayOptions:
    """``timeout`` (seconds, 0: wait forever) and ``state-dir`` from the run config."""
    opts = RelayOptions(timeout=float(run_config.get("timeout", 0)) or None)
    if run_config.get("state-dir"):
        opts.state_dir = str(run_config["state-dir"])
    return opts


Write = Callable[[Path, SimConfig, list[Row], dict[str, Any]], Mapping[str, Any]]


def run_config_server_app(app_dir: Path, write: Write) -> ServerApp:
    """The ServerApp of ``flwr run .``: config from the run config; ``write(out, cfg, rows,
    extra)`` leaves the report in ``out-dir`` and returns its summary (the report layer's
    ``write_run``, passed in so this runtime does not import the layer above it)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        from flwr.superlink.grid import http_grid

        quick_pulls(http_grid)  # replies' payloads: retried after 0.02 s, not 1 s (.polling)
        cfg, out = config_from_run(context.run_config, app_dir)
        start = time.perf_counter()
        rows = relay(grid, cfg, run_options(context.run_config), None)
        extra = {"runtime": "flower", "elapsed_s": round(time.perf_counter() - start, 3)}
        summary = write(out, cfg, rows, extra)
        log(INFO, "fedmerge: wrote %s (final mean global accuracy %s)", out.resolve(),
            summary["final_global_acc"])  # fmt: skip

    return app
