"""One rank's round: train the hosted agents, exchange, receive and merge, agree, report.

Every rank builds the same :class:`~fedmerge.decentralized.setup.Setup` and the same seeded
fault model, so every rank computes the same plan; each hosts a block of nodes
(:mod:`~fedmerge.runtimes.torchdist.layout`). Round r on every rank, as in process:

    faults, plan  the seeded FaultModel and ``topology.round(r, active)``
    train         the hosted agents
    exchange      payloads to and from the other ranks (:mod:`.exchange`)
    receive/merge :func:`~fedmerge.decentralized.receive.receive_and_merge` per hosted agent
    agree         who is alive (:mod:`.control`)
    consensus     Σ_i θ_i by all_reduce (float64), then ‖θ_i − θ̄‖ per hosted agent
    rows          through the store to the leader (the lowest live rank)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from fedmerge.config import SimConfig
from fedmerge.decentralized.agent import Agent, make_loss
from fedmerge.decentralized.consensus import distances, flat_state
from fedmerge.decentralized.delivery import deliver
from fedmerge.decentralized.faults import FaultModel, check_faults
from fedmerge.decentralized.metrics import metrics_row
from fedmerge.decentralized.node import NodeSources
from fedmerge.decentralized.payload import Payload
from fedmerge.decentralized.protocols import MergeContext
from fedmerge.decentralized.receive import Receipt, receive_and_merge
from fedmerge.decentralized.setup import build_setup
from fedmerge.errors import ConfigError
from fedmerge.runtimes import get_runtime
from fedmerge.runtimes.torchdist.control import (
    Control,
    Membership,
    PeerFailure,
    agree_backend,
    short_error,
)
from fedmerge.runtimes.torchdist.exchange import Exchange
from fedmerge.runtimes.torchdist.layout import Layout, make_layout, wire_device
from fedmerge.runtimes.torchdist.resume import Generations, agree_round, share_history

Rows = list[dict[str, Any]]
log = logging.getLogger("fedmerge.torchdist")


def join_group(
    cfg: SimConfig, store: dist.Store, rank: int, world: int, layout: Layout
) -> tuple[torch.device, Membership]:
    """Start this rank's process group (``distributed.backend``, agreed by every rank; NCCL:
    the GPU LOCAL_RANK, where ``device: auto`` also puts the agents) and its view of the
    membership; returns (the device payloads move on, membership)."""
    d = cfg.distributed
    backend = agree_backend(store, rank, world, d.backend)
    device = wire_device(backend)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend, store=dist.PrefixStore("pg", store), rank=rank, world_size=world,
        timeout=timedelta(seconds=d.timeout_s),
    )  # fmt: skip
    control = Control(dist.PrefixStore("ctl", store), rank, world, d.timeout_s)
    return device, Membership(control, layout, d.on_peer_failure, d.timeout_s)


def exchange_and_merge(
    exchange: Exchange, plan, lost, payloads: dict[int, Payload], agents: Mapping[int, Agent],
    protocol, ctx: MergeContext,
) -> tuple[dict[int, Receipt], dict[int, str]]:  # fmt: skip
    """Move ``payloads`` over ``exchange``, deliver them, and merge each of ``agents``' inbox
    (round ``ctx.round``); returns ({node: its receipt}, {peer rank: error} of failed peers)."""
    remote, suspects = exchange.exchange(ctx.round, plan, lost, payloads)
    inbox = deliver(plan, {**payloads, **remote}, lost)
    got = {i: receive_and_merge(a, inbox.get(i, []), dict(plan.neighbors[i])[i], protocol, ctx)
           for i, a in agents.items()}  # fmt: skip
    return got, suspects


class RankRunner:
    """One rank of a run: its agents, its process group, its share of every round. A
    deployed ``node`` hosts that one node from its own sources, and saves its agent state
    to its ``state_dir`` (if any) after every round (:mod:`.resume`). ``start``: the round
    the run resumes at (0: from the start); ``history``: the run's rows before it, per round
    (on every rank); ``run``: the run's identity in the state directories."""

    def __init__(
        self, cfg: SimConfig, store: dist.Store, rank: int, world: int,
        node: NodeSources | None = None, run: str = "",
    ) -> None:  # fmt: skip
        check_faults(cfg.faults, "torchdist", get_runtime("torchdist").faults)
        d = cfg.distributed
        self.cfg, self.rank, self.node = cfg, rank, node
        self.setup = build_setup(cfg, node)
        self.layout = make_layout(self.setup.n, world, d.agents_per_rank)
        if node is not None and self.layout.nodes_of(rank) != [node.node]:
            raise ConfigError(
                f"node file names node {node.node}, but rank {rank} hosts nodes "
                f"{self.layout.nodes_of(rank)} (one node per rank, node i on rank i)"
            )
        self.device, self.members = join_group(cfg, store, rank, world, self.layout)
        self.timeout = self.members.timeout
        loss = make_loss(cfg.train.loss)
        self.agents = {i: self.setup.agent(i, loss) for i in self.layout.nodes_of(rank)}
        self.faults = FaultModel(cfg.faults, self.setup.n, cfg.seed)
        self.exchange = Exchange.for_agents(self.members, self.device, self.agents.values())
        self.calibration = self.setup.calibration()
        self.saved = None
        if node is not None and node.state_dir is not None:
            self.saved = Generations(node.state_dir, run)
        self.start, self.rows, self.history = self.resume(store, world)

    def resume(self, store: dist.Store, world: int) -> tuple[int, Rows, list[Rows]]:
        """(the round every rank resumes at, this rank's rows so far, the run's rows before
        it per round); the hosted agents are loaded from the saved round."""
        held = self.saved.held() if self.saved is not None else []
        start = agree_round(store, self.rank, world, held)
        if not start:
            return 0, [], []
        rows = self.saved.restore(self.agents, start)
        log.warning("rank %d: resumed after round %d (its newest saved round: %d) from %s",
                    self.rank, start, held[0], self.saved.dir(start))  # fmt: skip
        return start, rows, share_history(store, self.rank, world, start, rows, self.setup.n)

    # -- one round -----------------------------------------------------------------------
    def round(self, r: int) -> Rows | None:
        """Run round r; the leader returns every node's rows, the other ranks None."""
        start, cfg, n = time.perf_counter(), self.cfg, self.setup.n
        active, trains = self.faults.nodes(r)
        active, trains = active & self.members.alive, trains & self.members.alive
        present = None if active.all() else np.flatnonzero(active).tolist()
        plan = self.setup.topology.round(r, active=present, total_rounds=cfg.rounds)
        for i, agent in self.agents.items():
            if trains[i]:
                agent.train()
        traffic = {i: [0, 0, 0] for i in self.agents}  # sent, received, rejected
        suspects: dict[int, str] = {}
        if self.setup.protocol.merge is not None:
            lost = self.faults.lost(r, len(plan.messages))
            suspects = self.communicate(r, plan, active, lost, traffic)
        self.members.settle(r, "exchanged", suspects)
        fed = self.setup.data
        rows = []
        for i, a in self.agents.items():
            rows.append(metrics_row(
                r + 1, i, active=bool(active[i]), trained=bool(trains[i]),
                local_acc=a.evaluate(a.data.test_x, a.data.test_y),
                global_acc=a.evaluate(fed.test_x, fed.test_y), bytes_sent=traffic[i][0],
                bytes_received=traffic[i][1], rejected=traffic[i][2], experts=a.experts,
            ))  # fmt: skip
        for row, dist_i in zip(rows, self.consensus(r), strict=True):
            row["consensus"], row["wall_s"] = dist_i, time.perf_counter() - start
        if self.saved is not None:
            self.rows += rows
            self.saved.save(self.agents, r + 1, self.rows, full=bool(self.members.alive.all()))
        ranks, values = self.members.settle(r, "rows", {}, rows)
        if not self.members.leader:
            return None
        got = {row["agent"]: row for k in ranks for row in values[k]["rows"]}
        wall = time.perf_counter() - start
        return [got.get(i) or metrics_row(r + 1, i, wall_s=wall) for i in range(n)]

    def communicate(self, r: int, plan, active, lost, traffic) -> dict[int, str]:
        """Publish, exchange, receive and merge; fills ``traffic``; returns {rank: error}
        for peers whose operations failed."""
        senders = {s for s, _ in plan.messages if s in self.agents}
        payloads = {s: self.agents[s].publish(r) for s in sorted(senders)}
        for s, _ in plan.messages:
            if s in self.agents:
                traffic[s][0] += payloads[s].nbytes
        nodes = self.setup.n if plan.active is None else len(plan.active)
        ctx = MergeContext(r, self.cfg, self.calibration, nodes)
        hosted = {i: a for i, a in self.agents.items() if active[i]}
        got, suspects = exchange_and_merge(self.exchange, plan, lost, payloads, hosted,
                                           self.setup.protocol, ctx)  # fmt: skip
        for i, receipt in got.items():
            traffic[i][1:] = [receipt.received, receipt.rejected]
        return suspects

    def consensus(self, r: int) -> list[float]:
        """‖θ_i − θ̄‖ for the hosted nodes (θ̄ over every live node; float64 all_reduce)."""
        for attempt in range(len(self.members.control.live) + 1):
            # on the wire's device (gloo: the CPU, whatever device the agents train on)
            flats = torch.stack([flat_state(a.state()) for a in self.agents.values()])
            flats = flats.to(self.device)
            total = flats.sum(0)
            try:
                work = dist.all_reduce(total, group=self.members.group, async_op=True)
                work.wait(timeout=self.timeout)
                return distances(flats, total / int(self.members.alive.sum()))
            except RuntimeError as exc:
                self.members.settle(r, f"reduce{attempt}", {-1: short_error(exc)})
        raise PeerFailure(f"round {r + 1}: the consensus all_reduce kept failing")
