"""The control plane and the failure policy: who is alive, agreed on the rendezvous store.

Every step that can lose a peer ends in :meth:`Membership.settle`: each rank checks in with
the peers it saw fail; the first to see everyone (or to reach the timeout) writes who is
alive, and all ranks adopt that verdict. A loss then stops every rank (``abort``:
:class:`PeerFailure` naming rank and node) or shrinks the process group to the survivors
and drops the lost ranks' nodes from the plan (``continue``).
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Iterable
from datetime import timedelta
from typing import Any

import numpy as np
import torch.distributed as dist

from fedmerge.errors import FedmergeError
from fedmerge.runtimes.torchdist.layout import Layout, pick_backend

log = logging.getLogger("fedmerge.torchdist")
Rows = list[dict[str, Any]]


class PeerFailure(FedmergeError):
    """A rank stopped answering (and ``on_peer_failure`` is ``abort``)."""


class Excluded(PeerFailure):
    """This rank answered too late: its peers declared it gone and went on without it."""


class Control:
    """The control plane on the rendezvous store: check-ins, verdicts, rows, errors.

    Store keys outlive a dead rank (the store lives in torchrun's agent or in ``run``'s
    parent process), so the survivors can always agree on who is gone.
    """

    def __init__(self, store: dist.Store, rank: int, world: int, timeout: float) -> None:
        self.store, self.rank, self.timeout = store, rank, timeout
        self.live = list(range(world))

    def agree(
        self, tag: str, value: dict, suspects: Iterable[int] = ()
    ) -> tuple[list[int], dict[int, dict]]:
        """Check in under ``tag`` with ``value``; wait for the live ranks until the timeout,
        or only until every missing rank is one of ``suspects`` (peers this rank saw fail),
        or until another rank's verdict is out; return (the agreed live ranks, their
        values). Raises :class:`Excluded` if this rank was declared gone by faster peers.

        The wait for a rank nobody here saw fail is two timeouts, not one: a healthy rank
        can spend a whole timeout blocked behind a neighbour that is itself blocked on the
        failed rank, and must not be declared gone for it (suspected ranks end the wait
        at once, so a real failure is not detected later)."""
        suspected = set(suspects)

        def key(name: object) -> str:
            return f"{tag}/{name}"

        try:
            self.store.set(key(self.rank), json.dumps(value))
            deadline, here = time.monotonic() + 2 * self.timeout, [self.rank]
            while not self.store.check([key("verdict")]):
                here = [k for k in self.live if self.store.check([key(k)])]
                missing = set(self.live) - set(here)
                if missing <= suspected or time.monotonic() > deadline:
                    break
                time.sleep(0.002)
            ranks = json.loads(self.store.compare_set(key("verdict"), "", json.dumps(here)))
            if self.rank not in ranks:
                raise Excluded(
                    f"rank {self.rank} answered after its peers' {2 * self.timeout:g} s wait "
                    f"at {tag}; they went on without it"
                )
            return ranks, {k: json.loads(self.store.get(key(k))) for k in ranks}
        except (RuntimeError, dist.DistStoreError) as exc:
            raise PeerFailure(f"rank {self.rank} lost the rendezvous store: {exc}") from exc


class Membership:
    """This rank's view of who is alive: the agreed live ranks, their process group, the
    nodes still in the run; ``policy`` is ``distributed.on_peer_failure``."""

    def __init__(self, control: Control, layout: Layout, policy: str, timeout: float) -> None:
        self.control, self.layout, self.policy = control, layout, policy
        self.timeout = timedelta(seconds=timeout)
        self.group: dist.ProcessGroup | None = None  # None: the default (world) group
        self.alive = np.ones(layout.n, dtype=bool)

    @property
    def leader(self) -> bool:
        return self.control.rank == min(self.control.live)

    def settle(self, r: int, step: str, suspects: dict[int, str], rows: Rows | None = None):
        """Agree on the live ranks after ``step``; abort, or shrink the group, on a loss.
        ``suspects``: {peer rank (−1: unknown): error} seen by this rank. Returns (live
        ranks, their reports). A rank lost while regrouping means one more agreement."""
        report = {"suspects": {str(k): v for k, v in suspects.items()}, "rows": rows or []}
        for attempt in range(len(self.control.live) + 1):
            before = list(self.control.live)
            tag, seen = f"{r}/{step}/{attempt}", [k for k in suspects if k >= 0]
            ranks, values = self.control.agree(tag, report, seen)
            gone = [k for k in before if k not in ranks]
            blamed = {int(k): f"rank {q}: {why}" for q, v in values.items()
                      for k, why in v["suspects"].items()}  # fmt: skip
            if not gone and not blamed:
                return ranks, values
            self.on_failure(r, gone, blamed, ranks)
            try:
                self.group = dist.new_group(
                    ranks, timeout=self.timeout, use_local_synchronization=True
                )
                return ranks, values
            except RuntimeError as exc:
                report["suspects"] = {"-1": f"regrouping failed: {short_error(exc)}"}
        raise PeerFailure(f"round {r + 1}: could not regroup the surviving ranks")

    def on_failure(self, r: int, gone: list[int], blamed: dict[int, str], ranks: list[int]):
        """Raise PeerFailure (``abort``), or log and drop the gone ranks' nodes (``continue``)."""
        named = gone or sorted(k for k in blamed if k >= 0)
        about = [blamed[k] for k in named if k in blamed] or list(blamed.values())
        details = "; ".join(sorted(set(about))) or f"no check-in within {self.control.timeout:g} s"
        who = f"{self.layout.describe(named)} stopped answering" if named else "a collective failed"
        msg = f"round {r + 1}: {who} ({details})"
        if self.policy == "abort":
            raise PeerFailure(msg)
        log.warning("%s; continuing with ranks %s", msg, ranks)
        self.control.live = ranks
        for k in gone:
            self.alive[self.layout.nodes_of(k)] = False


def gather(store: dist.Store, rank: int, world: int, key: str, value: str, what: str) -> list[str]:
    """Publish ``value`` under ``key/rank`` and return every rank's, waiting for them up to
    the store's timeout (then :class:`PeerFailure` saying ``what`` they were to agree on)."""
    store.set(f"{key}/{rank}", value)
    try:
        return [store.get(f"{key}/{k}").decode() for k in range(world)]
    except (RuntimeError, dist.DistStoreError) as exc:
        raise PeerFailure(
            f"rank {rank}: not every rank started within the store's timeout "
            f"(distributed.timeout_s) to agree on {what}: {short_error(exc)}"
        ) from exc


def agree_backend(store: dist.Store, rank: int, world: int, choice: str) -> str:
    """The backend of every rank: ``auto`` is nccl only if every rank picks nccl (a host
    without enough GPUs makes it gloo everywhere: one process group needs one backend)."""
    mine = pick_backend(choice)
    if choice != "auto":
        return mine
    every = set(gather(store, rank, world, "backend", mine, "the backend"))
    return "nccl" if every == {"nccl"} else "gloo"


def short_error(exc: BaseException) -> str:
    """The gist of a backend error: no source location, no boilerplate advice."""
    text = re.sub(r"\[[^\]]*\.(?:cc|cpp|h):\d+\]\s*", "", str(exc).splitlines()[0])
    return text.split(". This is typically")[0].strip()
