"""Runtimes: where a config's agents run. Each is a thin transport around the round kit
(:mod:`fedmerge.decentralized`) and none imports another.

Every runtime is registered here by name with the faults it can run, and its module
exposes ``run(cfg, *, on_round=None, details=None, **options) -> list[row]`` (one metrics
row per agent per round; ``details``, a dict it may fill for the run's summary). Modules
are imported only when run, so listing runtimes needs neither Flower nor torch.distributed.
:func:`run` is the one entry point the CLI (``fedmerge simulate``) and sweeps use:

>>> sorted(RUNTIMES)
['flower', 'local', 'torchdist']
>>> get_runtime("ray")
Traceback (most recent call last):
...
fedmerge.errors.ConfigError: runtime: unknown 'ray'; use one of local, flower, torchdist
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from fedmerge.config import SimConfig
from fedmerge.decentralized.engine import OnRound, Row
from fedmerge.decentralized.faults import FAULTS, check_faults
from fedmerge.errors import ConfigError


@dataclass(frozen=True)
class Runtime:
    """A registered runtime: ``module`` has ``run``; ``faults``: the fault kinds it runs
    (:data:`~fedmerge.decentralized.faults.FAULTS`); ``options``: extra ``run`` keywords."""

    name: str
    module: str
    faults: tuple[str, ...]
    doc: str
    options: tuple[str, ...] = ()


RUNTIMES: dict[str, Runtime] = {}


def register_runtime(runtime: Runtime) -> Runtime:
    if runtime.name in RUNTIMES:
        raise ValueError(f"runtime {runtime.name!r} registered twice")
    unknown = set(runtime.faults) - set(FAULTS)
    if unknown:
        raise ValueError(f"runtime {runtime.name!r} declares unknown faults {sorted(unknown)}")
    RUNTIMES[runtime.name] = runtime
    return runtime


NETWORK_FAULTS = ("dropout", "straggler", "crash", "message_loss")
"""What a runtime moving real messages runs: the seeded fault model. Byzantine senders,
duplication, reordering and persisted rejoins are injected by the in-process runtime."""

# fmt: off
register_runtime(Runtime("local", "fedmerge.runtimes.local", FAULTS,
                         "every agent in this process (per-agent or stacked engine)"))
register_runtime(Runtime("flower", "fedmerge.runtimes.flower", NETWORK_FAULTS,
                         "one Flower SuperNode per agent on Flower's simulation engine (Ray)",
                         ("timeout", "num_cpus", "client_cpus", "state_dir", "verbose")))
register_runtime(Runtime("torchdist", "fedmerge.runtimes.torchdist", NETWORK_FAULTS,
                         "agents on torch.distributed ranks (local worker processes)",
                         ("procs", "threads")))
# fmt: on


def get_runtime(name: str) -> Runtime:
    if name not in RUNTIMES:
        raise ConfigError(f"runtime: unknown {name!r}; use one of {', '.join(RUNTIMES)}")
    return RUNTIMES[name]


def run(
    cfg: SimConfig, *, on_round: OnRound | None = None, **options: Any
) -> tuple[list[Row], dict[str, Any]]:
    """Run ``cfg`` on ``cfg.runtime``: (metrics rows, details for the summary, which name the
    runtime that ran). Options the runtime does not take are errors naming them; so are
    faults it does not run."""
    rt = get_runtime(cfg.runtime)
    unknown = sorted(set(options) - set(rt.options))
    if unknown:
        raise ConfigError(f"runtime {rt.name!r} takes no option {unknown[0]!r} "
                          f"(options: {', '.join(rt.options) or 'none'})")  # fmt: skip
    check_faults(cfg.faults, rt.name, rt.faults)
    details: dict[str, Any] = {"runtime": rt.name}
    rows = importlib.import_module(rt.module).run(cfg, on_round=on_round, details=details,
                                                  **options)  # fmt: skip
    return rows, details
