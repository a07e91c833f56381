"""Receive and merge: the one step every runtime runs for each agent that is up.

    refusals → counted   (the transport could not decode them)
    payloads → Agent.receive: validate, check the transport identity, keep the freshest
    accepted → the protocol's merge (π renormalized over what arrived)

It returns the agent's :class:`Receipt` (bytes received, payloads rejected) for the metrics
row. The in-process engine, each Flower node and each torch.distributed rank call it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from fedmerge.decentralized.agent import Agent
from fedmerge.decentralized.delivery import Delivery, Refused
from fedmerge.decentralized.protocols import MergeContext, Protocol

log = logging.getLogger("fedmerge.receive")


@dataclass(frozen=True)
class Receipt:
    """One agent's side of a round: bytes received and payloads rejected."""

    received: int
    rejected: int


def receive_and_merge(
    agent: Agent, deliveries: Sequence[Delivery], self_weight: float, protocol: Protocol,
    ctx: MergeContext,
) -> Receipt:  # fmt: skip
    """Count refusals, validate the payloads, merge the accepted ones with ``protocol``."""
    before = len(agent.rejected)
    for d in deliveries:
        if isinstance(d.item, Refused):
            agent.rejected.append(d.item.reason)
            log.warning("agent %d dropped a payload: %s", agent.id, d.item.reason)
    accepted = agent.receive([d for d in deliveries if d.payload is not None], ctx.round)
    if accepted and protocol.merge is not None:
        protocol.merge(agent, accepted, self_weight, ctx)
    return Receipt(sum(d.nbytes for d in deliveries), len(agent.rejected) - before)
