"""The metrics row: what every runtime reports per agent per round (one schema)."""

from __future__ import annotations

from typing import Any

ROW_DEFAULTS: dict[str, Any] = {
    "active": False, "trained": False, "local_acc": None, "global_acc": None,
    "acc_trained": None, "consensus": None, "consensus_aligned": None, "disagreement": None,
    "bytes_sent": 0, "bytes_received": 0, "rejected": 0, "byzantine": False, "experts": None,
    "wall_s": 0.0,
}  # fmt: skip
"""The fields of a metrics row after ``round`` and ``agent``, with the values of an agent
that took no part in the round. ``global_acc`` is measured after the round's merge,
``acc_trained`` after its local training (before the merge); ``consensus``,
``consensus_aligned`` and ``disagreement`` are defined in
:mod:`fedmerge.decentralized.consensus`. ``experts``: the origins of the experts the agent
folded, in order (protocols that fold experts, e.g. ``disseminate``; None otherwise)."""

IN_PROCESS_ONLY = ("acc_trained", "consensus_aligned", "disagreement")
"""Row fields only the in-process runtime fills so far (Flower and torch.distributed rows
leave them None)."""


def metrics_row(round: int, agent: int, **fields: Any) -> dict[str, Any]:
    """One metrics row (the schema every runtime writes); unnamed fields take
    :data:`ROW_DEFAULTS`, unknown ones are an error."""
    unknown = set(fields) - set(ROW_DEFAULTS)
    if unknown:
        raise TypeError(f"unknown metrics fields {sorted(unknown)}")
    return {"round": round, "agent": agent, **ROW_DEFAULTS, **fields}
