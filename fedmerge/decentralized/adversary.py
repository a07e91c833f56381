"""Adversaries and unreliable delivery for the simulator, and the receiver's defence
against duplicated and replayed payloads.

- **Byzantine nodes** (``faults.byzantine``): ``count`` nodes chosen by ``placement``
  (``random`` seeded, ``hubs`` = highest degree first, or an explicit ``list``) send, instead
  of their tensors x (τ or θ), a validly hashed payload holding

  ``sign_flip``: −scale·x;  ``noise``: x + ε with ‖ε‖ = scale·‖x‖;  ``constant``: every entry
  = scale;  and two omniscient attacks that see their honest neighbours' payloads of the
  round: ``ipm`` (inner product manipulation, Xie et al. 2020): −scale·mean_j x_j;  ``alie``
  (a little is enough, Baruch et al. 2019): mean_j x_j − scale·std_j x_j per entry
  (population std), both over the attacker's honest neighbours j (its own x if it has
  none);  ``silent``: nothing at all (the node is cut off: what perfect screening
  would leave, the reference for the robust rules).  They train and merge like everyone
  else (their own accuracy is not reported as honest: rows carry ``byzantine``).
- **Duplication** (``faults.duplicate``): a delivered payload arrives twice.
- **Reordering** (``faults.reorder``): a payload is held back one round and arrives after
  that round's fresh payloads.

:func:`freshest` is what :meth:`~fedmerge.decentralized.agent.Agent.receive` applies: at
most one payload per sender per round (the newest), and none older than what was already
accepted from that sender; the rest are rejected as duplicates or stale, and counted.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence

import networkx as nx
import numpy as np
import torch

from fedmerge.config import ByzantineConfig, SimConfig
from fedmerge.decentralized.delivery import Inbox
from fedmerge.decentralized.payload import Payload
from fedmerge.errors import ConfigError


def byzantine_nodes(cfg: ByzantineConfig, graph: nx.Graph, seed: int) -> frozenset[int]:
    """The Byzantine node ids for ``cfg`` on ``graph`` (nodes 0..n-1)."""
    n = graph.number_of_nodes()
    if cfg.placement == "list":
        nodes = list(cfg.nodes)
        if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < n for i in nodes):
            raise ConfigError(f"faults.byzantine.nodes: want ids in 0..{n - 1}, got {nodes}")
        if cfg.count and cfg.count != len(set(nodes)):
            raise ConfigError(f"faults.byzantine.count: {cfg.count} but {len(nodes)} nodes listed")
        return frozenset(nodes)
    if cfg.count > n:
        raise ConfigError(f"faults.byzantine.count: {cfg.count} exceeds the {n} nodes")
    if cfg.placement == "hubs":
        order = sorted(graph.nodes, key=lambda i: (-graph.degree(i), i))
        return frozenset(order[: cfg.count])
    rng = np.random.default_rng([seed, 0xB1])
    return frozenset(rng.choice(n, size=cfg.count, replace=False).tolist())


def attack(
    tensors: Mapping[str, torch.Tensor], cfg: ByzantineConfig, generator: torch.Generator,
    honest: Sequence[Mapping[str, torch.Tensor]] = (),
) -> dict[str, torch.Tensor]:  # fmt: skip
    """What a Byzantine node sends instead of ``tensors`` (same keys, shapes, dtypes);
    ``honest``: its honest neighbours' tensors this round (for ``ipm`` and ``alie``)."""
    if cfg.attack in ("ipm", "alie"):
        peers = list(honest) or [tensors]
        out = {}
        for k, v in tensors.items():
            stack = torch.stack([p[k].double() for p in peers])  # (peers, *shape)
            mean, std = stack.mean(0), stack.std(0, correction=0)
            bad = -cfg.scale * mean if cfg.attack == "ipm" else mean - cfg.scale * std
            out[k] = bad.to(v.dtype)
        return out
    if cfg.attack == "sign_flip":
        return {k: -cfg.scale * v for k, v in tensors.items()}
    if cfg.attack == "constant":
        return {k: torch.full_like(v, cfg.scale) for k, v in tensors.items()}
    noise = {k: torch.randn(v.shape, generator=generator).to(v.dtype) for k, v in tensors.items()}
    norm = lambda d: sum(float(v.double().pow(2).sum()) for v in d.values()) ** 0.5  # noqa: E731
    factor = cfg.scale * norm(tensors) / max(norm(noise), 1e-12)
    return {k: v + factor * noise[k] for k, v in tensors.items()}


class Adversary:
    """The simulator's Byzantine senders and its duplicating / reordering network."""

    def __init__(self, cfg: SimConfig, graph: nx.Graph) -> None:
        self.faults, self.seed, self.graph = cfg.faults, cfg.seed, graph
        self.byzantine = byzantine_nodes(cfg.faults.byzantine, graph, cfg.seed)
        self.delayed: Inbox = {}

    def corrupt(self, payloads: dict[int, Payload], r: int) -> dict[int, Payload]:
        """Replace the Byzantine senders' payloads by their attack (validly hashed); a
        ``silent`` sender's payload is removed."""
        out = dict(payloads)
        for s in sorted(self.byzantine & payloads.keys()):
            if self.faults.byzantine.attack == "silent":
                del out[s]
                continue
            p = payloads[s]
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + r * 7_919 + s)
            honest = [payloads[j].tensors for j in sorted(self.graph.neighbors(s))
                      if j in payloads and j not in self.byzantine]  # fmt: skip
            bad = attack(p.tensors, self.faults.byzantine, g, honest)
            out[s] = Payload.make(bad, sender=s, round=p.round, samples=p.samples, kind=p.kind)
        return out

    def disturb(self, inbox: Inbox, r: int) -> Inbox:
        """Duplicate and hold back messages; last round's held-back ones arrive after the rest."""
        rng = np.random.default_rng([self.seed, r, 0xD0])
        out: Inbox = defaultdict(list)
        held: Inbox = defaultdict(list)
        for d in sorted(inbox):
            for msg in inbox[d]:
                if rng.random() < self.faults.reorder:
                    held[d].append(msg)
                    continue
                out[d] += [msg, msg] if rng.random() < self.faults.duplicate else [msg]
        for d, msgs in self.delayed.items():
            out[d] += msgs
        self.delayed = dict(held)
        return out


def freshest(
    inbox: Sequence[tuple[Payload, float]], last_round: Mapping[int, int]
) -> tuple[list[tuple[Payload, float]], list[str]]:
    """(kept, reasons): one payload per sender, the newest, and only if newer than
    ``last_round[sender]`` (the round last accepted from it); reasons for the others."""
    best: dict[int, int] = {}
    for i, (p, _) in enumerate(inbox):
        if p.sender not in best or p.round > inbox[best[p.sender]][0].round:
            best[p.sender] = i
    kept, reasons = [], []
    for i, (p, w) in enumerate(inbox):
        who = f"payload from agent {p.sender} (round {p.round})"
        if best[p.sender] != i:
            newest = inbox[best[p.sender]][0].round
            why = "duplicate" if newest == p.round else f"stale: round {newest} also arrived"
            reasons.append(f"{who}: {why}")
        elif p.round <= last_round.get(p.sender, -1):
            last = last_round.get(p.sender)
            reasons.append(f"{who}: replayed, round {last} already accepted")
        else:
            kept.append((p, w))
    return kept, reasons
