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
fedmerge.errors.ConfigError: runtime: unknown runtime 'ray'; known: flower, local, torchdist
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from fedmerge.config import SimConfig
from fedmerge.decentralized.engine import OnRound, Row
from fedmerge.decentralized.faults import FAULTS, check_faults
from fedmerge.errors import ConfigError
from fedmerge.registry import Entry, Registry


@dataclass(frozen=True)
class Runtime(Entry):
    """A registered runtime; its ``target`` is the module that has ``run``. ``faults``: the
    fault kinds it runs (:data:`~fedmerge.decentralized.faults.FAULTS`); ``options``: the
    extra keywords its ``run`` takes."""

    faults: tuple[str, ...] = ()
    options: tuple[str, ...] = ()


RUNTIMES: Registry[Runtime] = Registry("runtime", field="runtime", entry=Runtime)

NETWORK_FAULTS = ("dropout", "straggler", "crash", "message_loss")
"""What a runtime moving real messages runs: the seeded fault model. Byzantine senders,
duplication, reordering and persisted rejoins are injected by the in-process runtime."""

# fmt: off
RUNTIMES.add("local", "fedmerge.runtimes.local", faults=FAULTS,
             doc="every agent in this process (per-agent or stacked engine)")
RUNTIMES.add("flower", "fedmerge.runtimes.flower", faults=NETWORK_FAULTS,
             doc="one Flower SuperNode per agent on Flower's simulation engine (Ray)",
             options=("timeout", "num_cpus", "client_cpus", "state_dir", "verbose"))
RUNTIMES.add("torchdist", "fedmerge.runtimes.torchdist", faults=NETWORK_FAULTS,
             doc="agents on torch.distributed ranks (local worker processes)",
             options=("procs", "threads"))
# fmt: on


def get_runtime(name: str) -> Runtime:
    """The registered runtime ``name`` (a ConfigError naming ``runtime`` otherwise)."""
    return RUNTIMES.lookup(name)


def run(
    cfg: SimConfig, *, on_round: OnRound | None = None, **options: Any
) -> tuple[list[Row], dict[str, Any]]:
    """Run ``cfg`` on ``cfg.runtime``: (metrics rows, details for the summary, which name the
    runtime that ran). Options the runtime does not take are errors naming them; so are
    faults it does not run, and the local runtime's own fields (``threads``,
    ``metrics.eval_every``) set elsewhere."""
    rt = get_runtime(cfg.runtime)
    unknown = sorted(set(options) - set(rt.options))
    if unknown:
        raise ConfigError(f"runtime {rt.name!r} takes no option {unknown[0]!r} "
                          f"(options: {', '.join(rt.options) or 'none'})")  # fmt: skip
    check_faults(cfg.faults, rt.name, rt.faults)
    local_only = (("threads", cfg.threads, 1), ("metrics.eval_every", cfg.metrics.eval_every, 1))
    for key, value, default in local_only:
        if rt.name != "local" and value != default:
            raise ConfigError(f"{key}: only the local runtime takes it (runtime {rt.name!r}); "
                              f"leave it at {default}")  # fmt: skip
    details: dict[str, Any] = {"runtime": rt.name}
    rows = importlib.import_module(rt.target).run(cfg, on_round=on_round, details=details,
                                                  **options)  # fmt: skip
    return rows, details
