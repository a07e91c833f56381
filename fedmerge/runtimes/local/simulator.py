"""The in-process simulator: N agents, R rounds, one seed, faults, metrics.

One round (``Simulator.round``) is DESIGN.md's round as data:

    faults  → who is up, who trains, which messages get lost (seeded per round)
    plan    → topology.round(r, active): W_r renormalized over the nodes present
    train   → local epochs/steps for every node up and not straggling
    publish → payloads;  deliver → along plan.messages minus the lost ones
    receive → validate (bad payloads dropped and counted);  merge → the protocol
    evaluate→ global-test accuracy after training (before merging) and after merging,
              local-test accuracy, consensus measures (decentralized.consensus), bytes, wall;
              accuracies and disagreement only every ``metrics.eval_every`` rounds and on
              the last (None in the other rounds' rows)

Everything but the loop comes from the round kit (:mod:`fedmerge.decentralized`). Where
every agent has the same buffer-free model and the protocol is a W product (gossip, local,
centralized, single global merge), :class:`~fedmerge.runtimes.local.stacked.StackedEngine`
trains all agents at once with stacked parameters; :class:`~fedmerge.runtimes.local.
per_agent.AgentEngine` is the per-agent reference. Both give the same numbers for a seed.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np

from fedmerge.config import SimConfig
from fedmerge.decentralized.adversary import byzantine_nodes
from fedmerge.decentralized.consensus import measures
from fedmerge.decentralized.engine import Engine, OnRound, Row
from fedmerge.decentralized.faults import FaultModel, Recovery
from fedmerge.decentralized.metrics import metrics_row
from fedmerge.decentralized.setup import Setup, build_setup
from fedmerge.decentralized.traffic import Traffic
from fedmerge.errors import ConfigError
from fedmerge.runtimes.local.per_agent import AgentEngine
from fedmerge.runtimes.local.stacked import StackedEngine, why_not_stacked


class Simulator:
    """Runs a config round by round; ``rows`` collects one metrics row per agent per round."""

    def __init__(self, cfg: SimConfig, setup: Setup | None = None) -> None:
        self.config = cfg
        self.setup = setup or build_setup(cfg)
        reason = why_not_stacked(self.setup)
        if cfg.vectorize == "always" and reason:
            raise ConfigError(f"vectorize: 'always' is impossible here: {reason}")
        use_stacked = cfg.vectorize != "never" and reason is None
        self.engine: Engine = StackedEngine(self.setup) if use_stacked else AgentEngine(self.setup)
        self.faults = FaultModel(cfg.faults, self.setup.n, cfg.seed)
        self.recovery = Recovery(cfg.faults, lambda i: self.setup.model(i).state_dict())
        # the per-agent engine's agents (persistence, rejoin and folded experts need them)
        self.agents = self.engine.agents if isinstance(self.engine, AgentEngine) else []
        self.byzantine = byzantine_nodes(cfg.faults.byzantine, self.setup.topology.graph, cfg.seed)
        self.rows: list[dict[str, Any]] = []
        self.template = self.setup.model(0)  # the architecture (permutation spec), built once
        self._quiet_metrics = dataclasses.replace(cfg.metrics, disagreement=False)  # no eval

    @property
    def path(self) -> str:
        return self.engine.name

    def evaluates(self, r: int) -> bool:
        """Whether round r (0-based) measures accuracy: every ``metrics.eval_every``-th round
        (``round`` = r + 1 a multiple of it) and the last."""
        return (r + 1) % self.config.metrics.eval_every == 0 or r + 1 == self.config.rounds

    def round(self, r: int) -> list[dict[str, Any]]:
        """Run round r (0-based) and return its metrics rows (``round`` is r + 1)."""
        start = time.perf_counter()
        n, cfg = self.setup.n, self.config
        full = self.evaluates(r)
        evaluate = self.engine.evaluate if full else self._unevaluated
        metrics = cfg.metrics if full else self._quiet_metrics
        active, trains = self.faults.nodes(r)
        present = None if active.all() else np.flatnonzero(active).tolist()
        plan = self.setup.topology.round(r, active=present, total_rounds=cfg.rounds)
        self.recovery.before_round(r, self.faults.down_until, self.agents)
        self.engine.train(trains)
        traffic = Traffic.zeros(n)
        trained = None
        if self.setup.protocol.merge is not None:
            trained = evaluate()[1]  # after local training, before the merge
            lost = self.faults.lost(r, len(plan.messages))
            traffic = self.engine.communicate(r, plan, active, lost)
        self.recovery.after_round(r, active, self.agents)
        local, glob = evaluate()
        trained = glob if trained is None else trained
        cons = measures(self.engine, self.template, cfg.model.init, metrics)
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
                experts=self.agents[i].experts if self.agents else None,
                wall_s=wall,
            )  # fmt: skip
            for i in range(n)
        ]
        self.rows += rows
        return rows

    def _unevaluated(self) -> tuple[list[None], list[None]]:
        """The (local, global) accuracies of a round that does not evaluate: None each."""
        return [None] * self.setup.n, [None] * self.setup.n

    def run(self, on_round: OnRound | None = None) -> list[Row]:
        for r in range(self.config.rounds):
            rows = self.round(r)
            if on_round:
                on_round(rows)
        return self.rows
