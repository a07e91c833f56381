"""How many CPU threads torch should use, chosen rather than inherited.

torch starts with one thread per *logical* CPU (or ``OMP_NUM_THREADS``). For
memory-bound work such as merging, hyper-threads add nothing and threads
beyond the cores this process may run on only wait: OpenMP threads spin at
barriers while their core is taken by another process, which made merges on a
busy machine 2× slower in wall time (``OMP_WAIT_POLICY=PASSIVE`` makes them
sleep instead; it must be set before torch is imported).

>>> import torch
>>> with torch_threads(1) as n:
...     n, torch.get_num_threads()
(1, 1)
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from fedmerge.errors import ConfigError


def physical_cores() -> int:
    """Distinct physical cores among the CPUs this process may run on (≥ 1).

    Reads ``/sys/devices/system/cpu/cpuN/topology``; where that is missing,
    counts the allowed logical CPUs.
    """
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    cpus = sorted(allowed) if allowed else list(range(os.cpu_count() or 1))
    cores = set()
    for cpu in cpus:
        topo = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(((topo / "physical_package_id").read_text(), (topo / "core_id").read_text()))
        except OSError:
            cores.add(("cpu", str(cpu)))
    return max(1, len(cores))


@contextmanager
def torch_threads(threads: int | None = None) -> Iterator[int]:
    """Run the block with ``threads`` torch threads (default: :func:`physical_cores`),
    then restore the previous count. Yields the number used."""
    n = physical_cores() if threads is None else threads
    if n < 1:
        raise ConfigError(f"threads must be >= 1, got {n}")
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(before)
