"""The metrics row: what every runtime reports per agent per round (one schema)."""

from __future__ import annotations

from typing import Any

ROW_DEFAULTS: dict[str, Any] = {
    "active": False, "trained": False, "local_acc": None, "global_acc": None,
    "consensus": None, "bytes_sent": 0, "bytes_received": 0, "rejected": 0,
    "byzantine": False, "experts": None, "wall_s": 0.0,
}  # fmt: skip
"""The fields of a metrics row after ``round`` and ``agent``, with the values of an agent
that took no part in the round. ``experts``: the origins of the experts the agent folded,
in order (protocols that fold experts, e.g. ``disseminate``; None otherwise)."""


def metrics_row(round: int, agent: int, **fields: Any) -> dict[str, Any]:
    """One metrics row (the schema every runtime writes); unnamed fields take
    :data:`ROW_DEFAULTS`, unknown ones are an error."""
    unknown = set(fields) - set(ROW_DEFAULTS)
    if unknown:
        raise TypeError(f"unknown metrics fields {sorted(unknown)}")
    return {"round": round, "agent": agent, **ROW_DEFAULTS, **fields}
