"""The in-process simulator: N agents, R rounds, one seed, faults, metrics.

One round (``Simulator.round``) is DESIGN.md's round as data:

    faults  → who is up, who trains, which messages get lost (seeded per round)
    plan    → topology.round(r, active): W_r renormalized over the nodes present
    train   → local epochs/steps for every node up and not straggling
    publish → payloads;  deliver → along plan.messages minus the lost ones
    receive → validate (bad payloads dropped and counted);  merge → the protocol
    evaluate→ local-test and global-test accuracy, ‖θ_i − θ̄‖, bytes, wall time

Only :func:`deliver_local` is specific to running in one process: the Flower and
torch.distributed runtimes reuse :func:`build_setup`, :class:`FaultModel`, the agents and
the protocols, and move payloads themselves.

Where every agent has the same buffer-free model and the protocol is a W product (gossip,
local, centralized, single global merge), :class:`~fedmerge.stacked.StackedEngine` trains
all agents at once with stacked parameters; :class:`AgentEngine` is the per-agent
reference. Both give the same numbers for the same seed.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import numpy as np
import torch
from torch import nn

from fedmerge.adversary import Adversary, byzantine_nodes
from fedmerge.agent import Agent, Loss, make_loss
from fedmerge.config import FaultsConfig, SimConfig
from fedmerge.consensus import flatten, measures
from fedmerge.data.datasets import load_dataset
from fedmerge.data.partition import FederatedData, federate
from fedmerge.errors import ConfigError
from fedmerge.models import build_model
from fedmerge.payload import Payload
from fedmerge.persist import Recovery
from fedmerge.pretrain import pretrain, pretrains
from fedmerge.protocols import MergeContext, Protocol, get_protocol
from fedmerge.report import metrics_row
from fedmerge.statedict import StateDict, is_mergeable
from fedmerge.topology import RoundPlan, Topology, build_topology

Inbox = dict[int, list[tuple[Payload, float]]]


@dataclass
class Setup:
    """Everything a runtime builds from a config before round 1."""

    config: SimConfig
    protocol: Protocol
    data: FederatedData
    topology: Topology
    reference: StateDict | None  # the shared base payloads are τ against; None: full θ
    pretrained: dict[int, StateDict] = field(default_factory=dict, repr=False)  # a cache

    @property
    def n(self) -> int:
        return self.topology.n

    def model(self, agent: int, pretrained: bool = True) -> nn.Module:
        """Agent ``agent``'s model at round 0 (one shared seed with ``model.init: same``),
        after the ``pretrain`` phase unless ``pretrained`` is False (the bare init)."""
        cfg = self.config
        offset = agent if cfg.model.init == "different" else 0
        model = build_model(
            cfg.model.name, in_shape=self.data.in_shape, num_classes=self.data.num_classes,
            seed=cfg.seed * 10_007 + offset, **cfg.model.options,
        )  # fmt: skip
        if pretrained and pretrains(cfg):
            if agent not in self.pretrained:
                self.pretrained[agent] = pretrain(model, self.data.agents[agent], cfg, agent)
            model.load_state_dict(self.pretrained[agent])
        return model

    def agent(self, i: int, loss: Loss | None = None) -> Agent:
        """Node i's :class:`Agent`: its initial model, its data partition, the shared reference."""
        cfg = self.config
        return Agent(
            i, self.model(i), self.data.agents[i], train=cfg.train, validation=cfg.validation,
            seed=cfg.seed, reference=self.reference, loss=loss or make_loss(cfg.train.loss),
        )  # fmt: skip

    def calibration(self) -> list[torch.Tensor] | None:
        """Shared DIMAT calibration batches (the union of training inputs), if configured."""
        if self.config.protocol.calibration != "shared":
            return None
        x = torch.cat([a.train_x for a in self.data.agents])
        return list(x.split(self.config.protocol.calibration_batch))


def build_setup(cfg: SimConfig) -> Setup:
    """Dataset, partition, topology (with the protocol's schedule) and reference weights."""
    protocol = get_protocol(cfg.protocol.name)
    ds = load_dataset(cfg.data.name, **cfg.data.options)
    overrides = {"schedule.kind": protocol.schedule} if protocol.schedule else None
    try:
        topo = build_topology(
            cfg.topology, n=cfg.agents or None, seed=cfg.seed, overrides=overrides
        )
    except ConfigError as exc:
        raise ConfigError(f"topology: {exc}") from exc
    d = cfg.data
    fed = federate(
        ds, topo.n, d.partition, alpha=d.alpha, test_fraction=d.test_fraction,
        local_test_fraction=d.local_test_fraction, seed=cfg.seed,
    )  # fmt: skip
    if protocol.pool_data:
        fed = FederatedData([fed.union()], fed.test_x, fed.test_y, fed.num_classes, fed.in_shape)
        topo = build_topology(nx.empty_graph(1))
    setup = Setup(cfg, protocol, fed, topo, None)
    if cfg.model.init == "same" and not protocol.full_weights:
        base = setup.model(0, pretrained=False).state_dict()
        setup.reference = {k: v.detach().clone() for k, v in base.items() if is_mergeable(v)}
    return setup


class FaultModel:
    """Seeded per-round faults: dropout, stragglers, crash + rejoin, message loss.

    Each kind draws from its own generator keyed by (seed, round, kind), so adding
    message loss does not change who drops out.
    """

    def __init__(self, cfg: FaultsConfig, n: int, seed: int) -> None:
        self.cfg, self.n, self.seed = cfg, n, seed
        self.down_until = np.zeros(n, dtype=np.int64)  # crashed nodes rejoin at this round

    def _rng(self, r: int, kind: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, r, kind])

    def nodes(self, r: int) -> tuple[np.ndarray, np.ndarray]:
        """(active (n,) bool, trains (n,) bool) for round r (call once per round, in order)."""
        c = self.cfg
        alive = self.down_until <= r
        crash = alive & (self._rng(r, 1).random(self.n) < c.crash)
        self.down_until[crash] = r + c.crash_rounds
        active = alive & ~crash & (self._rng(r, 2).random(self.n) >= c.dropout)
        trains = active & (self._rng(r, 3).random(self.n) >= c.straggler)
        return active, trains

    def lost(self, r: int, messages: int) -> np.ndarray:
        """(messages,) bool: which of the round's messages (in plan order) are lost."""
        return self._rng(r, 4).random(messages) < self.cfg.message_loss


def deliver_local(plan: RoundPlan, payloads: dict[int, Payload], lost: np.ndarray) -> Inbox:
    """The in-process runtime's delivery: each receiver gets (payload, π_ij) per message."""
    weight = [dict(row) for row in plan.neighbors]
    inbox: Inbox = defaultdict(list)
    for (s, d), gone in zip(plan.messages, lost, strict=True):
        if not gone and s in payloads:
            inbox[d].append((payloads[s], weight[d][s]))
    return inbox


@dataclass
class Traffic:
    """Per-agent counts of one round's communication: (n,) int arrays."""

    sent: np.ndarray
    received: np.ndarray
    rejected: np.ndarray


class AgentEngine:
    """The per-agent reference path: one :class:`Agent` (and nn.Module) per node."""

    name = "per-agent"

    def __init__(self, setup: Setup) -> None:
        loss = make_loss(setup.config.train.loss)
        self.setup = setup
        self.agents = [setup.agent(i, loss) for i in range(setup.n)]
        self.shared_calibration = setup.calibration()
        self.adversary = Adversary(setup.config, setup.topology.graph)

    def train(self, trains: np.ndarray) -> None:
        for i in np.flatnonzero(trains):
            self.agents[i].train()

    def communicate(self, r: int, plan: RoundPlan, active: np.ndarray, lost: np.ndarray) -> Traffic:
        n = len(self.agents)
        senders = {s for s, _ in plan.messages}
        payloads = {s: self.agents[s].publish(r) for s in sorted(senders)}
        payloads = self.adversary.corrupt(payloads, r)
        inbox = self.adversary.disturb(deliver_local(plan, payloads, lost), r)
        t = Traffic(np.zeros(n, np.int64), np.zeros(n, np.int64), np.zeros(n, np.int64))
        for s, _ in plan.messages:
            t.sent[s] += payloads[s].nbytes
        nodes = n if plan.active is None else len(plan.active)
        ctx = MergeContext(r, self.setup.config, self.shared_calibration, nodes)
        merge = self.setup.protocol.merge
        for i in np.flatnonzero(active):
            agent, got = self.agents[i], inbox.get(i, [])
            t.received[i] = sum(p.nbytes for p, _ in got)
            before = len(agent.rejected)
            accepted = agent.receive(got)
            t.rejected[i] = len(agent.rejected) - before
            if accepted:
                merge(agent, accepted, dict(plan.neighbors[i])[i], ctx)
        return t

    def evaluate(self) -> tuple[list[float | None], list[float | None]]:
        fed = self.setup.data
        local = [a.evaluate(a.data.test_x, a.data.test_y) for a in self.agents]
        return local, [a.evaluate(fed.test_x, fed.test_y) for a in self.agents]

    def flat(self) -> torch.Tensor:
        """(n, P) float64: every agent's floating state entries, flattened."""
        return torch.stack([flat_state(a) for a in self.agents])

    def states(self) -> list[StateDict]:
        return [a.state() for a in self.agents]

    @torch.no_grad()
    def predictions(self) -> torch.Tensor:
        """(n, N) int64: every agent's predicted class on the global test set."""
        x = self.setup.data.test_x
        return torch.stack([a.model.eval()(x).argmax(1) for a in self.agents])


def flat_state(agent: Agent) -> torch.Tensor:
    """(P,) float64: the agent's floating state entries, flattened (for consensus distance)."""
    return flatten(agent.state())


class Simulator:
    """Runs a config round by round; ``rows`` collects one metrics row per agent per round."""

    def __init__(self, cfg: SimConfig, setup: Setup | None = None) -> None:
        from fedmerge.stacked import StackedEngine, why_not_stacked

        self.config = cfg
        self.setup = setup or build_setup(cfg)
        reason = why_not_stacked(self.setup)
        if cfg.vectorize == "always" and reason:
            raise ConfigError(f"vectorize: 'always' is impossible here: {reason}")
        use_stacked = cfg.vectorize != "never" and reason is None
        self.engine = StackedEngine(self.setup) if use_stacked else AgentEngine(self.setup)
        self.faults = FaultModel(cfg.faults, self.setup.n, cfg.seed)
        self.recovery = Recovery(cfg.faults, self.setup)
        self.byzantine = byzantine_nodes(cfg.faults.byzantine, self.setup.topology.graph, cfg.seed)
        self.rows: list[dict[str, Any]] = []

    @property
    def path(self) -> str:
        return self.engine.name

    def round(self, r: int) -> list[dict[str, Any]]:
        """Run round r (0-based) and return its metrics rows (``round`` is r + 1)."""
        start = time.perf_counter()
        n, cfg = self.setup.n, self.config
        active, trains = self.faults.nodes(r)
        present = None if active.all() else np.flatnonzero(active).tolist()
        plan = self.setup.topology.round(r, active=present, total_rounds=cfg.rounds)
        self.recovery.before_round(r, self.faults.down_until, self.engine)
        self.engine.train(trains)
        zeros = np.zeros(n, np.int64)
        traffic = Traffic(zeros, zeros, zeros)
        trained = None
        if self.setup.protocol.merge is not None:
            trained = self.engine.evaluate()[1]  # after local training, before the merge
            lost = self.faults.lost(r, len(plan.messages))
            traffic = self.engine.communicate(r, plan, active, lost)
        self.recovery.after_round(r, active, self.engine)
        local, glob = self.engine.evaluate()
        trained = glob if trained is None else trained
        cons = measures(self.engine, self.setup.model(0), cfg.model.init, cfg.metrics)
        pick = lambda key, i: None if cons[key] is None else cons[key][i]  # noqa: E731
        wall = time.perf_counter() - start
        rows = [
            metrics_row(
                r + 1,
                i,
                active=bool(active[i]),
                trained=bool(trains[i]),
                local_acc=local[i],
                global_acc=glob[i],
                acc_trained=trained[i],
                consensus=cons["consensus"][i],
                consensus_aligned=pick("consensus_aligned", i),
                disagreement=pick("disagreement", i),
                bytes_sent=int(traffic.sent[i]),
                bytes_received=int(traffic.received[i]),
                rejected=int(traffic.rejected[i]),
                byzantine=i in self.byzantine,
                wall_s=wall,
            )  # fmt: skip
            for i in range(n)
        ]
        self.rows += rows
        return rows

    def run(self, on_round: Callable[[list[dict[str, Any]]], None] | None = None) -> list[dict]:
        for r in range(self.config.rounds):
            rows = self.round(r)
            if on_round:
                on_round(rows)
        return self.rows
