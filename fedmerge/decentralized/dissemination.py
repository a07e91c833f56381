"""Continual dissemination: experts appear at nodes over time, spread by flooding, and every
node folds each one into its own continual merge exactly once.

An expert is a fine-tuned checkpoint of a base shared by every node. It *appears* at
one node in one round (:class:`Arrival`); it travels as a
:class:`~fedmerge.decentralized.payload.Payload`
of kind ``delta`` (τ = θ_expert − θ_base) that carries the expert's id and the content hash
of τ. Rounds are numbered 1, 2, …; round r runs:

    appear   experts arriving in round r are folded at their nodes
    send     each node sends its *fresh* experts (first held in round r − 1, or appeared in
             round r; ``forward="always"``: every expert it holds) along the messages of
             ``topology.round(r − 1)``; each (message, expert) is lost with probability
             ``message_loss`` (seeded per round)
    receive  a payload whose hash the node already holds is a duplicate, skipped unread;
             otherwise it is validated (kind, keys, shapes, hash, finiteness, norm) and folded
             into the node's merger (:func:`fedmerge.continual.make_merger`) — once
    evaluate per node: experts held, folds, accuracy on the tasks it holds (``evaluate``)

Without loss on a static connected graph, an expert appearing at node s in round r₀
reaches a node at distance d ≥ 1 in round r₀ + d − 1, so every node holds it after exactly
ecc(s) ≤ diameter rounds, counting round r₀ (within the diameter + 1 that a scheme
forwarding only from the round after appearance would need).

>>> import torch
>>> from fedmerge.topology import build_topology
>>> base = {"w": torch.ones(2, 2)}
>>> experts = {"a": {"w": 1 + torch.eye(2)}, "b": {"w": torch.full((2, 2), 1.5)}}
>>> res = disseminate(build_topology("ring", n=4), base, experts,
...                   [Arrival("a", 0, 1), Arrival("b", 2, 1)], rounds=4)
>>> res.complete_round, [node.order for node in res.nodes][1]
(2, ['a', 'b'])
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedmerge.checkpoint import TensorSpec
from fedmerge.codecs import encode_state, pack_tensors
from fedmerge.continual import ContinualMerger, make_merger
from fedmerge.decentralized.payload import Payload, decode_payload, validate_payload
from fedmerge.errors import ConfigError, ValidationError
from fedmerge.statedict import (
    StateDict,
    add_task_vector,
    global_norm,
    is_mergeable,
    specs_of,
    task_vector,
)
from fedmerge.topology import Topology
from fedmerge.topology.analysis import diameter

FORWARD = ("once", "always")
# Per-task accuracy of a merged state: expert id -> accuracy (ids it cannot score are absent).
Evaluate = Callable[[StateDict], Mapping[str, float]]
# Checks an expert payload and returns the task vector to fold (decoded if compressed).
Check = Callable[[Payload], StateDict]


def encode_expert(
    tau: StateDict, codec: str, params: Mapping[str, Any] | None, seed: int
) -> StateDict:
    """What an expert's τ travels as: τ itself (``codec: none``) or its one-shot encoding,
    packed (:func:`fedmerge.codecs.pack_tensors`). An expert is encoded once, at the node
    it appears at, and forwarded as those bytes, so no sender state is needed (unlike
    CHOCO-Gossip) and every node folds the same decoded τ̂."""
    if codec == "none":
        return tau
    return pack_tensors(encode_state(tau, codec, params, seed=seed))


def expert_tensors(
    p: Payload, *, specs: Mapping[str, TensorSpec], own_norm: float, max_norm_ratio: float,
    max_bytes: int,
) -> StateDict:  # fmt: skip
    """The task vector expert payload ``p`` carries, after every check: a compressed one
    is decoded safely first (:func:`decode_payload`: decoded specs against ``specs`` before
    allocating), then the tensors are validated (:func:`validate_payload`)."""
    decoded = decode_payload(p, specs, max_bytes)
    validate_payload(decoded, kind="delta", specs=specs, own_norm=own_norm,
                     max_norm_ratio=max_norm_ratio, max_bytes=max_bytes)  # fmt: skip
    return decoded.tensors


@dataclass(frozen=True)
class Arrival:
    """Expert ``expert`` appears at node ``node`` at the start of round ``round`` (1-based)."""

    expert: str
    node: int
    round: int


@dataclass
class Node:
    """One node: its continual merger and what it has seen.

    ``order``: expert ids in the order they were folded; ``hashes``: content hashes held
    (duplicates are recognized by these); ``fresh``: payloads to forward next round.
    """

    index: int
    merger: ContinualMerger
    order: list[str] = field(default_factory=list)
    hashes: dict[str, str] = field(default_factory=dict)  # hash -> expert id
    held: dict[str, Payload] = field(default_factory=dict)  # expert id -> payload
    fresh: list[Payload] = field(default_factory=list)
    duplicates: int = 0
    rejected: list[str] = field(default_factory=list)

    def offer(self, payload: Payload, base: StateDict, check: Check) -> str:
        """Take ``payload`` if new: ``"folded"``, ``"duplicate"`` or ``"rejected"``. It is
        held (and forwarded) as it arrived; ``check`` gives the τ folded."""
        if payload.hash in self.hashes:
            self.duplicates += 1
            return "duplicate"
        try:
            tau = check(payload)
            if payload.expert is None or payload.expert in self.held:
                raise ValidationError(
                    f"payload from node {payload.sender}: expert id {payload.expert!r} is "
                    "missing or already held with different content"
                )
            self.merger.add(add_task_vector(base, tau), name=payload.expert)
        except ValidationError as exc:
            self.rejected.append(str(exc))
            return "rejected"
        self.order.append(payload.expert)
        self.hashes[payload.hash] = payload.expert
        self.held[payload.expert] = payload
        self.fresh.append(payload)
        return "folded"


@dataclass
class DisseminationResult:
    """``rows``: one metrics dict per node per round; ``first_held[e][i]``: the round node i
    first held expert e (None: never); ``complete_round``: the first round every node held
    every expert (None: not within the run); ``diameter``: of the topology's graph."""

    rows: list[dict[str, Any]]
    nodes: list[Node]
    arrivals: list[Arrival]
    first_held: dict[str, list[int | None]]
    complete_round: int | None
    diameter: int | None
    eccentricity: dict[str, int | None]  # expert -> eccentricity of the node it appeared at

    def spread_rounds(self) -> dict[str, int | None]:
        """Per expert: rounds from its appearance until every node held it, both counted."""
        start = {a.expert: a.round for a in self.arrivals}
        out = {}
        for e, rounds in self.first_held.items():
            done = None if None in rounds else max(rounds)  # type: ignore[type-var]
            out[e] = None if done is None else done - start[e] + 1
        return out


def check_arrivals(arrivals: Sequence[Arrival], experts: Mapping[str, Any], n: int) -> None:
    """Every expert appears once, at a node 0..n−1, in a round ≥ 1."""
    seen = set()
    for a in arrivals:
        where = f"arrivals.{a.expert}"
        if a.expert not in experts:
            raise ConfigError(f"{where}: no such expert (known: {', '.join(experts)})")
        if a.expert in seen:
            raise ConfigError(f"{where}: the expert appears twice")
        if not 0 <= a.node < n:
            raise ConfigError(f"{where}.node: must be in 0..{n - 1}, got {a.node}")
        if a.round < 1:
            raise ConfigError(f"{where}.round: must be ≥ 1, got {a.round}")
        seen.add(a.expert)


def disseminate(
    topology: Topology,
    base: StateDict,
    experts: Mapping[str, StateDict],
    arrivals: Sequence[Arrival],
    *,
    rounds: int,
    method: str = "opcm",
    params: Mapping[str, Any] | None = None,
    projectable: set[str] | None = None,
    message_loss: float = 0.0,
    forward: str = "once",
    seed: int = 0,
    max_norm_ratio: float = 10.0,
    evaluate: Evaluate | None = None,
    on_round: Callable[[list[dict[str, Any]]], None] | None = None,
    codec: str = "none",
    codec_params: Mapping[str, Any] | None = None,
) -> DisseminationResult:
    """Run ``rounds`` rounds of continual dissemination (see the module docstring).

    ``base`` and every expert: state dicts with the same keys, shapes and dtypes.
    ``method``/``params``/``projectable``: the continual merger every node runs.
    ``evaluate``: scores a node's merged state per expert id (its task); the rows then carry
    ``acc_known`` (mean over the experts the node holds) and ``acc_appeared`` (over every
    expert that has appeared anywhere so far). ``codec``/``codec_params``: each expert
    travels encoded once (:func:`encode_expert`, e.g. ComPEFT ``ternary``); ``bytes_sent``
    counts the encoded bytes.
    """
    if forward not in FORWARD:
        raise ConfigError(f"forward: must be one of {', '.join(FORWARD)}, got {forward!r}")
    if not 0.0 <= message_loss < 1.0:
        raise ConfigError(f"message_loss: must be in [0, 1), got {message_loss}")
    check_arrivals(arrivals, experts, topology.n)
    floats = {k: v for k, v in base.items() if is_mergeable(v)}
    specs, own_norm = specs_of(floats), global_norm(floats)
    payloads = {
        a.expert: _expert_payload(a, base, experts[a.expert], codec, codec_params, seed)
        for a in arrivals
    }
    max_bytes = 2 * sum(s.nbytes for s in specs.values())  # twice a dense τ

    def check(p: Payload) -> StateDict:
        return expert_tensors(p, specs=specs, own_norm=own_norm, max_norm_ratio=max_norm_ratio,
                              max_bytes=max_bytes)  # fmt: skip

    nodes = [
        Node(i, make_merger(method, base, projectable, **dict(params or {})))
        for i in range(topology.n)
    ]
    first: dict[str, list[int | None]] = {a.expert: [None] * topology.n for a in arrivals}
    scores = _Scores(evaluate)
    rows: list[dict[str, Any]] = []
    complete = None
    for r in range(1, rounds + 1):
        appeared = [a for a in arrivals if a.round <= r]
        outgoing = _appear_and_collect(nodes, [a for a in arrivals if a.round == r], payloads,
                                       base, check, forward)  # fmt: skip
        sent, received = _exchange(topology, r, nodes, outgoing, base, check, message_loss, seed)
        for node in nodes:
            for e in node.order:
                first[e][node.index] = first[e][node.index] or r
        round_rows = [
            _row(r, node, sent[node.index], received[node.index], appeared, scores)
            for node in nodes
        ]
        rows += round_rows
        if complete is None and all(None not in held for held in first.values()):
            complete = r
        if on_round:
            on_round(round_rows)
    diam, _ = diameter(topology.graph)
    ecc = {a.expert: _eccentricity(topology, a.node) for a in arrivals}
    return DisseminationResult(rows, nodes, list(arrivals), first, complete, diam, ecc)


def _expert_payload(
    a: Arrival, base: StateDict, expert: StateDict, codec: str,
    params: Mapping[str, Any] | None, seed: int,
) -> Payload:  # fmt: skip
    """The expert as a delta payload (encoded with ``codec``) from the node it appears at."""
    tau = encode_expert(task_vector(expert, base), codec, params, seed * 1_000_003 + a.node)
    return Payload.make(tau, sender=a.node, round=a.round, samples=0, kind="delta",
                        expert=a.expert)  # fmt: skip


def _appear_and_collect(
    nodes: list[Node], arriving: list[Arrival], payloads: Mapping[str, Payload],
    base: StateDict, check: Check, forward: str,
) -> list[list[Payload]]:  # fmt: skip
    """Fold this round's arrivals at their nodes; per node, the payloads it sends this round."""
    for a in arriving:
        nodes[a.node].offer(payloads[a.expert], base, check)
    outgoing = []
    for node in nodes:
        outgoing.append(list(node.held.values()) if forward == "always" else node.fresh)
        node.fresh = []
    return outgoing


def _exchange(
    topology: Topology, r: int, nodes: list[Node], outgoing: list[list[Payload]],
    base: StateDict, check: Check, loss: float, seed: int,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Deliver round r's messages, minus the lost ones; (n,) bytes sent and received."""
    n = len(nodes)
    sent, received = np.zeros(n, np.int64), np.zeros(n, np.int64)
    items = [(s, d, p) for s, d in topology.round(r - 1).messages for p in outgoing[s]]
    lost = np.random.default_rng([seed, r]).random(len(items)) < loss
    for (s, d, p), gone in zip(items, lost, strict=True):
        sent[s] += p.nbytes
        if not gone:
            received[d] += p.nbytes
            nodes[d].offer(p, base, check)
    return sent, received


class _Scores:
    """Per-task accuracies of each node's merge, recomputed only when its merge changed."""

    def __init__(self, evaluate: Evaluate | None) -> None:
        self.evaluate = evaluate
        self.cache: dict[int, tuple[int, Mapping[str, float]]] = {}

    def __call__(self, node: Node) -> Mapping[str, float]:
        if self.evaluate is None:
            return {}
        step, acc = self.cache.get(node.index, (-1, {}))
        if step != node.merger.step:
            acc = self.evaluate(node.merger.merged())
            self.cache[node.index] = (node.merger.step, acc)
        return acc


def _row(
    r: int, node: Node, sent: int, received: int, appeared: list[Arrival], scores: _Scores
) -> dict[str, Any]:
    acc = scores(node)
    return {
        "round": r,
        "node": node.index,
        "experts_known": len(node.order),
        "experts_appeared": len(appeared),
        "folds": node.merger.step,
        "duplicates": node.duplicates,
        "rejected": len(node.rejected),
        "acc_known": _mean(acc, node.order),
        "acc_appeared": _mean(acc, [a.expert for a in appeared]),
        "bytes_sent": int(sent),
        "bytes_received": int(received),
        "known": list(node.order),
    }


def _mean(acc: Mapping[str, float], ids: Sequence[str]) -> float | None:
    vals = [acc[e] for e in ids if e in acc]
    return float(np.mean(vals)) if vals else None


def _eccentricity(topology: Topology, source: int) -> int | None:
    import networkx as nx

    hops = nx.single_source_shortest_path_length(topology.graph, source)
    return max(hops.values()) if len(hops) == topology.n else None


def fold_directly(
    base: StateDict, experts: Mapping[str, StateDict], order: Sequence[str], method: str = "opcm",
    params: Mapping[str, Any] | None = None, projectable: set[str] | None = None,
) -> StateDict:  # fmt: skip
    """The merge of ``experts`` folded in ``order`` by one merger, each as θ_base + τ as it
    travels: what any node that received them in that order must hold (a cross-check)."""
    merger = make_merger(method, base, projectable, **dict(params or {}))
    for e in order:
        merger.add(add_task_vector(base, task_vector(experts[e], base)), name=e)
    return merger.merged()


__all__ = [
    "FORWARD",
    "Arrival",
    "DisseminationResult",
    "Node",
    "check_arrivals",
    "disseminate",
    "encode_expert",
    "expert_tensors",
    "fold_directly",
]
