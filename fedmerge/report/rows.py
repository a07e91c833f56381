"""Metrics rows: per-round means and a run's summary.

A row is one agent in one round (the schema every runtime writes:
:func:`fedmerge.decentralized.metrics.metrics_row`); :func:`per_round` averages the honest
agents of each round and :func:`summarize` condenses a run.

>>> rows = [{"round": r, "agent": a, "active": True, "global_acc": 0.1 * r + a / 100,
...          "local_acc": None, "consensus": 1.0 / r, "bytes_sent": 10, "bytes_received": 10,
...          "rejected": 0, "wall_s": 0.5} for r in (1, 2) for a in (0, 1)]
>>> s = summarize(rows)
>>> round(s["final_global_acc"], 3), round(s["best_global_acc"], 3), s["best_round"]
(0.205, 0.205, 2)
>>> s["bytes_sent"], s["consensus"], s["wall_s"], s["worst_global_acc"]
(40, 0.5, 1.0, 0.2)
>>> attacker = {**rows[-1], "agent": 9, "global_acc": 0.0, "byzantine": True}
>>> summarize([*rows, attacker]) == s          # simulated attackers are not averaged in
True
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

Row = Mapping[str, Any]


def _mean(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return sum(vals) / len(vals) if vals else None


MEANS = ("global_acc", "acc_trained", "local_acc", "consensus", "consensus_aligned",
         "disagreement")  # fmt: skip
"""Row fields :func:`per_round` averages over the honest agents (``global_acc`` after the
round's merge, ``acc_trained`` after its local training)."""


def per_round(rows: Sequence[Row]) -> list[dict[str, Any]]:
    """One dict per round: mean accuracies and consensus over the honest agents (rows with
    ``byzantine`` set are left out), summed traffic, wall."""
    by_round: dict[int, list[Row]] = defaultdict(list)
    for row in honest(rows):
        by_round[int(row["round"])].append(row)
    out = []
    for r in sorted(by_round):
        group = by_round[r]
        out.append(
            {
                "round": r,
                **{k: _mean(g.get(k) for g in group) for k in MEANS},
                "active": sum(bool(g.get("active", True)) for g in group),
                "bytes_sent": sum(int(g["bytes_sent"]) for g in group),
                "rejected": sum(int(g.get("rejected", 0)) for g in group),
                "wall_s": max(float(g["wall_s"]) for g in group),
            }
        )
    return out


def honest(rows: Sequence[Row]) -> list[Row]:
    """The rows of agents that are not simulated Byzantine attackers."""
    return [r for r in rows if not r.get("byzantine")]


def summarize(rows: Sequence[Row], extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Final and best mean global accuracy (and the round of the best), the worst agent's
    final global accuracy, final local accuracy and consensus distance, total bytes
    sent/received, rejected payloads, summed wall time, all over the honest agents."""
    rows = honest(rows)
    rounds = per_round(rows)
    if not rounds:
        raise ValueError("no metrics rows to summarize")
    scored = [r for r in rounds if r["global_acc"] is not None]
    best = max(scored, key=lambda r: r["global_acc"]) if scored else rounds[-1]
    last = rounds[-1]
    final = [r["global_acc"] for r in rows if r["round"] == last["round"]]
    final = [v for v in final if v is not None and not math.isnan(v)]
    return {
        "rounds": last["round"],
        "agents": len({row["agent"] for row in rows}),
        "final_global_acc": last["global_acc"],
        "final_acc_trained": last["acc_trained"],
        "final_local_acc": last["local_acc"],
        "worst_global_acc": min(final) if final else None,
        "best_global_acc": best["global_acc"],
        "best_round": best["round"],
        "consensus": last["consensus"],
        "consensus_aligned": last["consensus_aligned"],
        "disagreement": last["disagreement"],
        "bytes_sent": sum(int(row["bytes_sent"]) for row in rows),
        "bytes_received": sum(int(row["bytes_received"]) for row in rows),
        "rejected": sum(int(row.get("rejected", 0)) for row in rows),
        "wall_s": sum(r["wall_s"] for r in rounds),
        **(extra or {}),
    }
