"""Delivery: what a transport hands a receiving agent, and the in-process way to do it.

A :class:`Delivery` is one message of a round's plan as it arrived: from ``source`` (the
*transport's* identity of the sender: the topology node the runtime knows it came from,
not what the payload claims), with mixing weight π_ij, carrying either a decoded
:class:`~fedmerge.decentralized.payload.Payload` or a :class:`Refused` (the transport could
not decode it, or refused it before transfer; it still counts as received and rejected).
Every runtime builds deliveries its own way (a list in memory, a Flower relay, P2P sends)
and gives them to :func:`~fedmerge.decentralized.receive.receive_and_merge`.

>>> import torch
>>> from fedmerge.topology import build_topology
>>> plan = build_topology("ring", n=3).round(0)
>>> sent = {s: Payload.make({"w": torch.ones(1)}, sender=s, round=0, samples=1, kind="delta")
...         for s in range(3)}
>>> inbox = deliver(plan, sent, [False] * len(plan.messages))
>>> sorted((d.source, round(d.weight, 3)) for d in inbox[0])
[(1, 0.333), (2, 0.333)]
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from fedmerge.decentralized.payload import Payload
from fedmerge.topology import RoundPlan


@dataclass(frozen=True)
class Refused:
    """A message the transport could not hand over as a payload: its bytes and why."""

    nbytes: int
    reason: str


@dataclass(frozen=True)
class Delivery:
    """One arrived message: ``source`` (transport identity), π_ij, a payload or a refusal."""

    source: int
    weight: float
    item: Payload | Refused

    @property
    def payload(self) -> Payload | None:
        return self.item if isinstance(self.item, Payload) else None

    @property
    def nbytes(self) -> int:
        return self.item.nbytes


Inbox = dict[int, list[Delivery]]


def deliver(plan: RoundPlan, sent: Mapping[int, Payload | Refused], lost: Sequence[bool]) -> Inbox:
    """Each receiver's deliveries of the plan's messages (in plan order), minus the lost ones
    and those whose sender published nothing."""
    weight = [dict(row) for row in plan.neighbors]
    inbox: Inbox = defaultdict(list)
    for (s, d), gone in zip(plan.messages, lost, strict=True):
        if not gone and s in sent:
            inbox[d].append(Delivery(s, weight[d][s], sent[s]))
    return inbox
