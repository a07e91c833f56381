"""The per-agent engine: one :class:`~fedmerge.decentralized.agent.Agent` (and nn.Module) per
node; the reference path every other engine and runtime is checked against."""

from __future__ import annotations

import numpy as np
import torch

from fedmerge.decentralized.adversary import Adversary
from fedmerge.decentralized.agent import make_loss
from fedmerge.decentralized.consensus import flat_state
from fedmerge.decentralized.delivery import deliver
from fedmerge.decentralized.protocols import MergeContext
from fedmerge.decentralized.receive import receive_and_merge
from fedmerge.decentralized.setup import Setup
from fedmerge.decentralized.traffic import Traffic
from fedmerge.statedict import StateDict
from fedmerge.topology import RoundPlan


class AgentEngine:
    """Every node as an Agent in this process; delivery is a list per receiver."""

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
        senders = {s for s, _ in plan.messages}
        payloads = {s: self.agents[s].publish(r) for s in sorted(senders)}
        payloads = self.adversary.corrupt(payloads, r)
        inbox = self.adversary.disturb(deliver(plan, payloads, lost), r)
        t = Traffic.zeros(len(self.agents))
        for s, _ in plan.messages:
            t.sent[s] += payloads[s].nbytes if s in payloads else 0  # a silent Byzantine node
        nodes = len(self.agents) if plan.active is None else len(plan.active)
        ctx = MergeContext(r, self.setup.config, self.shared_calibration, nodes)
        for i in np.flatnonzero(active):
            self_weight = dict(plan.neighbors[i])[i]
            got = receive_and_merge(self.agents[i], inbox.get(i, []), self_weight,
                                    self.setup.protocol, ctx)  # fmt: skip
            t.received[i], t.rejected[i] = got.received, got.rejected
        return t

    def evaluate(self) -> tuple[list[float | None], list[float | None]]:
        fed = self.setup.data
        local = [a.evaluate(a.data.test_x, a.data.test_y) for a in self.agents]
        return local, [a.evaluate(fed.test_x, fed.test_y) for a in self.agents]

    def flat(self) -> torch.Tensor:
        """(n, P) float64: every agent's floating state entries, flattened."""
        return torch.stack([flat_state(a.state()) for a in self.agents])

    def states(self) -> list[StateDict]:
        return [a.state() for a in self.agents]

    @torch.no_grad()
    def predictions(self) -> torch.Tensor:
        """(n, N) int64: every agent's predicted class on the global test set."""
        x = self.setup.data.test_x
        return torch.stack([a.model.eval()(x).argmax(1) for a in self.agents])
