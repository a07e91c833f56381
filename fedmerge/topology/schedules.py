"""Per-round communication schedules and the :class:`RoundPlan` each round yields.

A schedule picks which edges talk in round r; the topology's mixing rule then
weights them over the nodes present (churn: a node outside ``active`` neither
sends nor receives, keeps an identity row, and its neighbours renormalize over
the rest). Random schedules draw from ``numpy.random.default_rng([seed, r])``, so
round r is the same whatever order rounds are asked in.

==================== ===================================================================
kind                 round r
==================== ===================================================================
static               every edge of the graph, every round
random_matching      a random maximal matching of the graph (greedy over shuffled edges;
                     perfect on a complete graph with n even); matched pairs average 1/2
one_peer_exponential n a power of two: i pairs with i XOR 2^k, k = r mod log2 n, i.e.
                     i + 2^k when bit k of i is 0, else i − 2^k: a symmetric pairing, and
                     log2 n consecutive rounds average exactly. Otherwise (Ying et al.
                     2021) i receives from i − 2^k mod n with weight 1/2, k = r mod
                     ⌈log2 n⌉: doubly stochastic, not symmetric. Ignores the graph's edges.
sparse_then_complete each graph edge is active with probability ``p`` (default 0.1); in
                     round m = min(T−1, ⌊fraction·T⌋) every present node averages all
                     present nodes uniformly (one global merge, "A Single Merging
                     Suffices"). ``fraction`` defaults to 1.0: the merge is the last round.
                     Needs the total number of rounds T (``total_rounds``).
==================== ===================================================================
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import scipy.sparse as sp

from fedmerge.errors import ConfigError
from fedmerge.topology.mixing import Edges, mixing_from_edges, pairs_edges


@dataclass(frozen=True)
class RoundPlan:
    """Who mixes with whom in one round.

    ``mixing``: W_r, (n, n) CSR, row-stochastic; row i = the in-weights of node i.
    ``neighbors[i]``: ``((j, W_ij), ...)`` for every j with W_ij > 0, i itself included.
    ``edges``: unordered pairs (i, j), i < j, that communicate (W_ij > 0 or W_ji > 0).
    ``messages``: directed (sender j, receiver i) pairs with W_ij > 0, j ≠ i: what a
    runtime must deliver (both directions of an edge, except for directed schedules).
    ``kind``: what the round is (``static``, ``matching``, ``sparse``, ``complete`` …).

    A plan is immutable all the way down (tuples; W a private copy whose arrays are
    read-only), so :meth:`at` can hand the same W and lists to many rounds
    (:meth:`~fedmerge.topology.build.Topology.round` does for repeating schedules).
    """

    round: int
    mixing: sp.csr_matrix
    kind: str = "static"
    active: frozenset[int] | None = None
    neighbors: tuple[tuple[tuple[int, float], ...], ...] = field(init=False, repr=False)
    edges: tuple[tuple[int, int], ...] = field(init=False, repr=False)
    messages: tuple[tuple[int, int], ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        w = sp.csr_matrix(self.mixing, copy=True)  # never alias (or sort) the caller's W
        w.eliminate_zeros()
        w.sort_indices()
        for a in (w.data, w.indices, w.indptr):
            a.flags.writeable = False
        object.__setattr__(self, "mixing", w)
        ptr, idx, val = w.indptr, w.indices.tolist(), w.data.tolist()
        neighbors = tuple(
            tuple(zip(idx[ptr[i] : ptr[i + 1]], val[ptr[i] : ptr[i + 1]], strict=True))
            for i in range(w.shape[0])
        )
        coo = w.tocoo()
        off = coo.row != coo.col
        receivers, senders = coo.row[off].astype(np.int64), coo.col[off].astype(np.int64)
        order = np.lexsort((receivers, senders))
        messages = tuple(zip(senders[order].tolist(), receivers[order].tolist(), strict=True))
        pairs = np.stack([np.minimum(senders, receivers), np.maximum(senders, receivers)], 1)
        ends = np.unique(pairs, axis=0)
        edges = tuple(zip(ends[:, 0].tolist(), ends[:, 1].tolist(), strict=True))
        object.__setattr__(self, "neighbors", neighbors)
        object.__setattr__(self, "messages", messages)
        object.__setattr__(self, "edges", edges)

    @property
    def n(self) -> int:
        return self.mixing.shape[0]

    def at(self, r: int) -> RoundPlan:
        """This plan as round ``r``'s: the same (immutable) W, neighbours and messages."""
        if r == self.round:
            return self
        plan = copy.copy(self)
        object.__setattr__(plan, "round", r)
        return plan


class Schedule(Protocol):
    """Picks round r's communication: ``mixing(...)`` → (W_r (n, n) CSR, round kind)."""

    kind: str

    def period(self, n: int) -> int | None:
        """p such that round r's W (for the same nodes present) is round (r mod p)'s on
        n nodes; None when rounds are drawn at random (nothing repeats)."""
        ...

    def mixing(
        self, r: int, edges: Edges, rule: str, active: np.ndarray | None, total: int | None
    ) -> tuple[sp.csr_matrix, str]:
        """W_r for the graph ``edges`` under ``rule``; ``active``: (n,) bool or None (all);
        ``total``: the number of rounds in the run when known."""
        ...


def round_rng(seed: int, r: int) -> np.random.Generator:
    """The generator for round r of a schedule seeded with ``seed``."""
    return np.random.default_rng([seed, r])


@dataclass(frozen=True)
class Static:
    """Every edge of the graph, every round."""

    kind = "static"

    def period(self, n: int) -> int | None:
        return 1

    def mixing(
        self, r: int, edges: Edges, rule: str, active: np.ndarray | None, total: int | None
    ) -> tuple[sp.csr_matrix, str]:
        return mixing_from_edges(edges, rule, active), "static"


@dataclass(frozen=True)
class RandomMatching:
    """A fresh random maximal matching of the graph each round (seeded per round)."""

    seed: int = 0
    kind = "random_matching"

    def period(self, n: int) -> int | None:
        return None

    def mixing(
        self, r: int, edges: Edges, rule: str, active: np.ndarray | None, total: int | None
    ) -> tuple[sp.csr_matrix, str]:
        present = edges.restrict(active)
        order = round_rng(self.seed, r).permutation(len(present.u))
        used = np.zeros(edges.n, dtype=bool)
        chosen = []
        ends = zip(present.u[order].tolist(), present.v[order].tolist(), strict=True)
        for e, (a, b) in zip(order.tolist(), ends, strict=True):
            if not used[a] and not used[b]:
                used[a] = used[b] = True
                chosen.append(e)
        matched = present.select(np.asarray(chosen, dtype=np.int64))
        return mixing_from_edges(matched, rule), "matching"


@dataclass(frozen=True)
class OnePeerExponential:
    """One peer per round at distance 2^k, k cycling over log2 n (see module docstring)."""

    kind = "one_peer_exponential"

    def period(self, n: int) -> int | None:
        return math.ceil(math.log2(n)) if n >= 2 else 1

    def mixing(
        self, r: int, edges: Edges, rule: str, active: np.ndarray | None, total: int | None
    ) -> tuple[sp.csr_matrix, str]:
        n = edges.n
        if n < 2:
            return sp.identity(n, format="csr"), "one_peer"
        tau = math.ceil(math.log2(n))
        offset = 2 ** (r % tau)
        nodes = np.arange(n)
        if 2**tau == n:  # symmetric pairing i <-> i XOR 2^k
            low = nodes[(nodes & offset) == 0]
            pairs = np.stack([low, low ^ offset], axis=1)
            return mixing_from_edges(pairs_edges(n, pairs), rule, active), "one_peer"
        src = (nodes - offset) % n  # directed: i receives from i - 2^k
        live = np.ones(n, dtype=bool) if active is None else active[nodes] & active[src]
        self_w = np.where(live, 0.5, 1.0)
        w = sp.coo_matrix(
            (
                np.concatenate([self_w, np.full(live.sum(), 0.5)]),
                (np.concatenate([nodes, nodes[live]]), np.concatenate([nodes, src[live]])),
            ),
            shape=(n, n),
        )
        return w.tocsr(), "one_peer_directed"


@dataclass(frozen=True)
class SparseThenComplete:
    """Sparse random gossip, then one uniform merge over all present nodes."""

    p: float = 0.1
    fraction: float = 1.0
    total_rounds: int | None = None
    seed: int = 0
    kind = "sparse_then_complete"

    def period(self, n: int) -> int | None:
        return None

    def merge_round(self, total: int | None) -> int:
        t = total if total is not None else self.total_rounds
        if t is None:
            raise ConfigError(
                "schedule 'sparse_then_complete' needs the number of rounds: set "
                "'schedule.total_rounds' or pass total_rounds to Topology.round()"
            )
        if not isinstance(t, int) or t < 1:
            raise ConfigError(f"total_rounds must be a positive integer, got {t!r}")
        return min(t - 1, math.floor(self.fraction * t))

    def mixing(
        self, r: int, edges: Edges, rule: str, active: np.ndarray | None, total: int | None
    ) -> tuple[sp.csr_matrix, str]:
        if r == self.merge_round(total):
            return complete_average(edges.n, active), "complete"
        present = edges.restrict(active)
        keep = round_rng(self.seed, r).random(len(present.u)) < self.p
        return mixing_from_edges(present.select(keep), rule), "sparse"


def complete_average(n: int, active: np.ndarray | None) -> sp.csr_matrix:
    """W averaging every active node uniformly (1/|active|); inactive nodes keep themselves."""
    live = np.arange(n) if active is None else np.flatnonzero(active)
    a = len(live)
    rows, cols = np.repeat(live, a), np.tile(live, a)
    idle = np.setdiff1d(np.arange(n), live)
    data = np.concatenate([np.full(a * a, 1.0 / max(a, 1)), np.ones(len(idle))])
    return sp.csr_matrix(
        (data, (np.concatenate([rows, idle]), np.concatenate([cols, idle]))), shape=(n, n)
    )


SCHEDULES = {
    cls.kind: cls for cls in (Static, RandomMatching, OnePeerExponential, SparseThenComplete)
}


def make_schedule(spec: str | dict[str, Any] | None, *, seed: int = 0) -> Schedule:
    """Build a schedule from ``"kind"`` or ``{"kind": ..., **params}`` (None: static)."""
    if spec is None:
        return Static()
    if isinstance(spec, str):
        spec = {"kind": spec}
    if not isinstance(spec, dict):
        raise ConfigError(f"field 'schedule' must be a name or a mapping, got {spec!r}")
    params = dict(spec)
    kind = params.pop("kind", "static")
    if kind not in SCHEDULES:
        raise ConfigError(
            f"unknown schedule {kind!r} (field 'schedule.kind'); choose from {', '.join(SCHEDULES)}"
        )
    cls = SCHEDULES[kind]
    fields = set(cls.__dataclass_fields__)
    unknown = sorted(set(params) - fields)
    if unknown:
        raise ConfigError(
            f"schedule {kind!r} does not take {', '.join(f'schedule.{k}' for k in unknown)}; "
            f"it takes: {', '.join(sorted(fields)) or 'nothing'}"
        )
    if "seed" in fields:
        params.setdefault("seed", seed)
    _check_params(kind, params)
    return cls(**params)


def _check_params(kind: str, params: dict[str, Any]) -> None:
    for name in ("p", "fraction"):
        if name in params:
            v = params[name]
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 <= v <= 1:
                raise ConfigError(f"schedule.{name} must be a number in [0, 1], got {v!r}")
    t = params.get("total_rounds")
    if t is not None and (not isinstance(t, int) or isinstance(t, bool) or t < 1):
        raise ConfigError(f"schedule.total_rounds must be a positive integer, got {t!r}")
    if "seed" in params and not isinstance(params["seed"], int):
        raise ConfigError(f"schedule.seed must be an integer, got {params['seed']!r}")
