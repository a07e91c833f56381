"""Flower 1.41's fixed waits, shortened in the processes fedmerge runs.

Where a deployment step's time goes (``benchmarks/flower_deploy.py``, logged per task by
:mod:`.worker` and per step by the relay): not in the ClientApp once it is long-lived, but
in Flower moving the payloads (HTTP, hashing, object store at every hop) and in its waits,
which these shorten where fedmerge runs the process (worker, ServerApp, the optional
SuperNode launcher :mod:`.supernode`). A message travels relay → SuperLink → SuperNode →
ClientApp and back, and each receiver tends to see a message before its large objects
(the payloads) are pushed: Flower then retries each missing object after 1 s, 2 s, 4 s...
(``pull_objects``' backoff). And an idle SuperNode asks its SuperLink for work every 3 s,
then waits for its ClientApp's reply in 0.5 s sleeps. :func:`quick_pulls` retries after
0.02 s (doubling up to 0.5 s); :func:`cap_sleeps` caps the SuperNode loop's sleeps. Both
replace one module attribute, and refuse (RuntimeError) a Flower whose modules are not the
ones they know (flwr 1.41).
"""

from __future__ import annotations

import functools
import time
from types import ModuleType

PULL_BACKOFF_S = 0.02  # first retry of an object not pushed yet (Flower: 1 s)
PULL_BACKOFF_CAP_S = 0.5  # longest retry wait (Flower: 10 s); Flower's 2 h limit still holds


def quick_pulls(module: ModuleType) -> None:
    """Make ``module``'s ``pull_objects`` (imported from Flower's ``inflatable_utils``) retry
    missing objects after :data:`PULL_BACKOFF_S` seconds; idempotent."""
    from flwr.supercore.inflatable import inflatable_utils

    current, original = getattr(module, "pull_objects", None), inflatable_utils.pull_objects
    if isinstance(current, functools.partial) and current.func is getattr(
        inflatable_utils, "_flwr_pull_objects", None
    ):  # fmt: skip
        return
    if current is not original:
        raise RuntimeError(f"{module.__name__}.pull_objects is not Flower 1.41's; not changed")
    inflatable_utils._flwr_pull_objects = original
    module.pull_objects = functools.partial(
        original, initial_backoff=PULL_BACKOFF_S, backoff_cap=PULL_BACKOFF_CAP_S,
        max_tries_per_object=None,
    )  # fmt: skip


class CappedSleep:
    """The ``time`` module with ``sleep`` capped at ``cap`` seconds."""

    def __init__(self, cap: float) -> None:
        self.cap = cap

    def __getattr__(self, name: str) -> object:
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self.cap))


def cap_sleeps(loop: ModuleType, cap: float) -> None:
    """Cap the sleeps of the SuperNode message loop module ``loop`` at ``cap`` seconds."""
    if getattr(loop, "time", None) is not time or not hasattr(loop, "start_client_internal"):
        raise RuntimeError(
            "this Flower's SuperNode loop is not the one fedmerge knows (flwr 1.41); "
            "start flower-supernode itself"
        )
    loop.time = CappedSleep(cap)
