"""The :class:`Topology` object: a checked graph, its mixing matrix and its schedule.

>>> topo = build_topology("ring", n=8)
>>> topo.round(0).neighbors[0]
((0, 0.33333333333333337), (1, 0.3333333333333333), (7, 0.3333333333333333))
>>> topo.round(0, active={0, 1, 2}).neighbors[1]
((0, 0.3333333333333333), (1, 0.33333333333333337), (2, 0.3333333333333333))
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

import networkx as nx
import numpy as np
import scipy.sparse as sp

from fedmerge.errors import ConfigError
from fedmerge.topology import analysis
from fedmerge.topology.graphs import check_graph, make_graph, normalize_labels
from fedmerge.topology.mixing import (
    MIXING_RULES,
    NATURAL_STOCHASTICITY,
    check_stochasticity,
    graph_edges,
    mixing_from_edges,
)
from fedmerge.topology.schedules import RoundPlan, Schedule, Static, make_schedule
from fedmerge.topology.specs import resolve_spec

PLAN_CACHE = 64  # plans of a repeating schedule kept (phase × set of nodes present)


class Topology:
    """A graph on nodes 0..n-1, a mixing rule, and a per-round schedule.

    ``graph``: the networkx graph; ``mixing``: the static W, (n, n) CSR;
    ``labels[i]``: the original label of node i when the graph had to be relabelled
    (None otherwise); ``spec``: the resolved spec it was built from.
    """

    def __init__(
        self,
        graph: nx.Graph,
        *,
        rule: str = "metropolis_hastings",
        stochastic: str | None = None,
        schedule: Schedule | None = None,
        seed: int = 0,
        allow_disconnected: bool = False,
        labels: list[Any] | None = None,
        spec: dict[str, Any] | None = None,
        name: str | None = None,
    ) -> None:
        if rule not in MIXING_RULES:
            raise ConfigError(
                f"unknown mixing rule {rule!r} (field 'mixing'); "
                f"choose from {', '.join(MIXING_RULES)}"
            )
        graph, relabelled = normalize_labels(graph)
        check_graph(graph, allow_disconnected=allow_disconnected, source=f"topology {name!r}")
        self.graph = graph
        self.labels = labels if labels is not None else relabelled
        self.rule = rule
        self.stochastic = stochastic or NATURAL_STOCHASTICITY[rule]
        self.seed = seed
        self.schedule = schedule if schedule is not None else Static()
        self.spec = spec or {}
        self.name = name
        self._edges = graph_edges(graph)
        self._plans: dict[tuple[int, bytes | None], RoundPlan] = {}  # see round()
        self.mixing = mixing_from_edges(self._edges, rule)
        self.properties = check_stochasticity(self.mixing, rule, self.stochastic)

    @property
    def n(self) -> int:
        return self.graph.number_of_nodes()

    def __repr__(self) -> str:
        return (
            f"Topology(name={self.name!r}, n={self.n}, edges={self.graph.number_of_edges()}, "
            f"mixing={self.rule!r}, schedule={self.schedule.kind!r})"
        )

    def round(
        self, r: int, active: Iterable[int] | None = None, total_rounds: int | None = None
    ) -> RoundPlan:
        """The plan of round ``r``: W_r with the schedule applied, restricted to ``active``.

        Nodes outside ``active`` are dropped: their row is the identity row, nobody
        uses them, and the rule's weights are renormalized over the nodes present.

        A schedule that repeats (``schedule.period``: a static graph every round, the
        one-peer exponential graph every ⌈log2 n⌉) gives the same plan for the same
        phase and nodes present; the last :data:`PLAN_CACHE` of those are kept and
        handed out again (:meth:`RoundPlan.at`; a plan is immutable, W read-only).
        """
        if not isinstance(r, (int, np.integer)) or r < 0:
            raise ConfigError(f"round must be a non-negative integer, got {r!r}")
        r, mask = int(r), self._active_mask(active)
        period = self.schedule.period(self.n)
        key = None if period is None else (r % period, None if mask is None else mask.tobytes())
        if key in self._plans:
            return self._plans[key].at(r)
        w, kind = self.schedule.mixing(r, self._edges, self.rule, mask, total_rounds)
        present = None if mask is None else frozenset(np.flatnonzero(mask).tolist())
        plan = RoundPlan(round=r, mixing=sp.csr_matrix(w), kind=kind, active=present)
        if key is not None and PLAN_CACHE:
            if len(self._plans) >= PLAN_CACHE:
                del self._plans[next(iter(self._plans))]  # the oldest
            self._plans[key] = plan
        return plan

    def _active_mask(self, active: Iterable[int] | None) -> np.ndarray | None:
        if active is None:
            return None
        idx = np.fromiter((int(i) for i in active), dtype=np.int64)
        bad = idx[(idx < 0) | (idx >= self.n)]
        if len(bad):
            raise ConfigError(f"active nodes {bad[:5].tolist()} are not in 0..{self.n - 1}")
        mask = np.zeros(self.n, dtype=bool)
        mask[idx] = True
        return mask

    def analyze(self, factor: float = 1e-3, rounds: int = 20) -> dict[str, Any]:
        """Degrees, diameter, stochasticity, spectral gap and predicted gossip rounds.

        For a time-varying schedule also ``measured_contraction``: the per-round shrink
        of the disagreement over its first ``rounds`` rounds (see :meth:`measure_contraction`).
        """
        out = {"name": self.name, **analysis.analyze(self.graph, self.mixing, self.rule, factor)}
        out["schedule"] = self.schedule.kind
        if self.schedule.kind != "static":
            out["measured_contraction"] = self.measure_contraction(rounds)
            out["measured_rounds"] = rounds
        return out

    def measure_contraction(self, rounds: int = 20, seed: int = 0) -> float:
        """Geometric-mean per-round shrink of ‖x − x̄‖ under rounds 0..rounds-1 of the schedule.

        The final merge of ``sparse_then_complete`` is left out (it averages exactly):
        this measures its sparse gossip phase.
        """
        no_merge = 10**12  # total_rounds so large that the merge round is never reached
        mixings = (
            self.schedule.mixing(r, self._edges, self.rule, None, no_merge)[0]
            for r in range(rounds)
        )
        return analysis.measured_contraction(mixings, self.n, seed)


def build_topology(
    spec: str | os.PathLike[str] | Mapping[str, Any] | nx.Graph,
    *,
    n: int | None = None,
    seed: int | None = None,
    overrides: Mapping[str, Any] | Iterable[str] | None = None,
) -> Topology:
    """Build a checked :class:`Topology` from a preset name, generator name, YAML file, graph
    file, spec dict, or a networkx graph.

    ``n`` overrides the node count, ``seed`` the spec's seed (random graphs and
    schedules), ``overrides`` any field (``{"schedule.kind": "random_matching"}`` or
    ``["mixing=uniform"]``).
    """
    if isinstance(spec, nx.Graph):  # a graph in hand: only the mixing fields apply
        cfg = resolve_spec({"graph": "networkx", "name": "graph"}, overrides=overrides)
        if cfg["params"] or (n is not None and n != spec.number_of_nodes()):
            raise ConfigError("a networkx graph is used as given: set no graph parameters or n")
    else:
        cfg = resolve_spec(spec, n=n, overrides=overrides)
    cfg["seed"] = cfg["seed"] if seed is None else seed
    graph = (
        spec
        if isinstance(spec, nx.Graph)
        else make_graph(cfg["graph"], cfg["params"], n=cfg["n"], seed=cfg["seed"])
    )
    return Topology(
        graph,
        rule=cfg["mixing"],
        stochastic=cfg["stochastic"],
        schedule=make_schedule(cfg["schedule"], seed=cfg["seed"]),
        seed=cfg["seed"],
        allow_disconnected=cfg["allow_disconnected"],
        spec=cfg,
        name=cfg["name"] or cfg["graph"],
    )
