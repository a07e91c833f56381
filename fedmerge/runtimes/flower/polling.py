"""Flower 1.41's fixed waits, shortened in the processes fedmerge runs.

Where a deployment step's time goes (``benchmarks/flower_deploy.py``, docs/deployment.md):
a message travels relay → SuperLink → SuperNode → ClientApp and back, and each receiver
sees a message before its large objects (the payloads) are pushed: Flower then retries each
missing object after 1 s, 2 s, 4 s... (``pull_objects``' backoff; up to 1.7 s a hop,
measured). An idle SuperNode asks its SuperLink for work every 3 s, then waits for its
ClientApp's reply, and for each reply object, in 0.5 s sleeps.

:data:`QUICK_PULLS` retries a missing object after 0.01 s, doubling up to 0.05 s (Flower's
2 h limit still holds): :func:`quick_pulls` sets it on a module that calls ``pull_objects``
without backoff arguments (the ServerApp's grid, the SuperNode loop, the worker's task
input). :func:`cap_sleeps` caps the SuperNode loop's idle poll at ``poll`` seconds and its
other waits (for the local ClientApp's reply) at :data:`WAIT_CAP_S`. Both replace one module
attribute, and refuse (RuntimeError) a Flower whose modules are not the ones they know.
:func:`pulls_until` bounds the ServerApp's pulls by the step's deadline: a reply whose
sender died mid-upload would otherwise hold the relay until Flower's object-push session
expires (180 s), and every other node's reply with it.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import ModuleType

# retries of an object not pushed yet: after 0.01 s, 0.02 s, 0.04 s, then every 0.05 s
# (Flower: 1 s doubling to 10 s); one small request each on loopback or a LAN
QUICK_PULLS = {"initial_backoff": 0.01, "backoff_cap": 0.05, "max_tries_per_object": None}
IDLE_SLEEP_S = 3.0  # the SuperNode loop's sleep when the SuperLink had no message for it
WAIT_CAP_S = 0.01  # its other sleeps (0.5 s): waits on its own ClientApp, in memory


def quick_pulls(module: ModuleType, name: str = "pull_objects") -> None:
    """Make ``module``'s ``name`` (Flower's ``inflatable_utils.pull_objects``, or its
    ``pull_and_inflate_object_from_tree``, imported by that name and called without backoff
    arguments) retry missing objects as :data:`QUICK_PULLS` says; idempotent."""
    from flwr.supercore.inflatable import inflatable_utils

    current, original = getattr(module, name, None), getattr(inflatable_utils, name)
    if isinstance(current, functools.partial) and current.func is original:
        return
    if current is not original:
        raise RuntimeError(f"{module.__name__}.{name} is not Flower 1.41's; not changed")
    setattr(module, name, functools.partial(original, **QUICK_PULLS))


@contextmanager
def pulls_until(
    module: ModuleType, end: float | None, name: str = "pull_objects"
) -> Iterator[None]:
    """Within the block, ``module``'s ``name`` (Flower's ``pull_objects``, quick or not) gives
    up at ``time.monotonic()`` ``end`` (None: unchanged): the message then comes back as an
    error reply (``MESSAGE_UNAVAILABLE``), the caller's to skip."""
    current: Callable = getattr(module, name)
    if end is None:
        yield
        return

    def bounded(*args: object, **kwargs: object) -> object:
        return current(*args, **kwargs, max_time=max(0.0, end - time.monotonic()))

    setattr(module, name, bounded)
    try:
        yield
    finally:
        setattr(module, name, current)


class CappedSleep:
    """The ``time`` module with ``sleep`` capped: the idle poll (:data:`IDLE_SLEEP_S`) at
    ``poll`` seconds, shorter sleeps at ``wait`` seconds."""

    def __init__(self, poll: float, wait: float = WAIT_CAP_S) -> None:
        self.poll, self.wait = poll, wait

    def __getattr__(self, name: str) -> object:
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self.poll if seconds >= IDLE_SLEEP_S else self.wait))


def cap_sleeps(loop: ModuleType, poll: float) -> None:
    """Cap the sleeps of the SuperNode message loop module ``loop`` (:class:`CappedSleep`)
    and make its object pulls quick (:func:`quick_pulls`)."""
    if getattr(loop, "time", None) is not time or not hasattr(loop, "start_client_internal"):
        raise RuntimeError(
            "this Flower's SuperNode loop is not the one fedmerge knows (flwr 1.41); "
            "start flower-supernode itself"
        )
    quick_pulls(loop)
    loop.time = CappedSleep(poll)
