"""Fault injection for the Flower tests: a loss that turns one Flower node into a hostile peer.

``train.loss: tests.flower_faults:hostile_cross_entropy`` behaves as cross-entropy. In every
process that trains (Flower's simulation engine runs the ClientApps in Ray worker
processes, several nodes per process) its first call wraps
:meth:`fedmerge.decentralized.agent.Agent.publish` and the ClientApp's
:func:`~fedmerge.runtimes.flower.client_app.node_step`, so that the node whose agent id is
``FEDMERGE_TEST_EVIL_NODE`` runs the attack of :data:`ATTACKS` for its round (the others,
and every node once the variable is unset, are untouched), and it records every payload an
agent of that process drops, with the reason, in ``FEDMERGE_TEST_LOG_DIR/rejected-<pid>.log``
(the honest receivers' side of the story, which Ray does not forward at INFO level).
"""

import importlib
import logging
import os
from pathlib import Path

import torch
from flwr.app import RecordDict
from safetensors.torch import save as st_save
from torch import nn

from fedmerge.decentralized.agent import Agent
from fedmerge.decentralized.payload import Payload
from fedmerge.runtimes.flower.records import blob_array

# the module (the package re-exports its ClientApp object under the same name)
client_app = importlib.import_module("fedmerge.runtimes.flower.client_app")
IMPERSONATED = 3  # whom the attacker claims to be (on ring-4: the other neighbour of 0 and 2)
ATTACKS = {1: "forged_sender_and_round", 2: "replay_round_0", 3: "malformed_reply"}
_honest_publish, _honest_step = Agent.publish, client_app.node_step


def evil() -> int | None:
    node = os.environ.get("FEDMERGE_TEST_EVIL_NODE")
    return int(node) if node is not None else None


def hostile_cross_entropy(logits, target):
    if Agent.publish is _honest_publish:
        Agent.publish = hostile_publish
        client_app.node_step = hostile_step
        handler = _RejectionFile(Path(os.environ["FEDMERGE_TEST_LOG_DIR"]))
        logger = logging.getLogger("fedmerge")
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    return nn.functional.cross_entropy(logits, target)


def hostile_publish(self: Agent, round: int) -> Payload:
    """Round 0: honest, and kept on disk. Round 1: a valid payload claiming to come from
    node :data:`IMPERSONATED` at round 2 (the issue's "node 1 claims to be node 3 with round
    k+1"). Round 2: the round-0 payload again, byte for byte. Later rounds: honest."""
    payload = _honest_publish(self, round)
    if self.id != evil():
        return payload
    kept = Path(os.environ["FEDMERGE_TEST_LOG_DIR"]) / "round-0.payload"
    attack = ATTACKS.get(round)
    if round == 0:
        kept.write_bytes(payload.to_bytes())
    elif attack == "forged_sender_and_round":
        payload = Payload.make(payload.tensors, sender=IMPERSONATED, round=round + 1,
                               samples=payload.samples, kind=payload.kind)  # fmt: skip
    elif attack == "replay_round_0":
        payload = Payload.from_bytes(kept.read_bytes())
    return payload


def hostile_step(msg, partition: int, run_id: int, state_root: str | None,
                 node=None) -> RecordDict:  # fmt: skip
    """The honest step; at the step that publishes round 3 the attacker's reply carries a
    flat state of the wrong length."""
    out = _honest_step(msg, partition, run_id, state_root, node)
    step = int(msg.content.config_records["step"]["step"])
    if partition == evil() and ATTACKS.get(step) == "malformed_reply":
        wrong = torch.zeros(3, dtype=torch.float32)
        out.array_records["arrays"]["flat"] = blob_array(st_save({"flat": wrong}))
    return out


class _RejectionFile(logging.Handler):
    """Appends every 'dropped a payload' record of this process to a file of its own."""

    def __init__(self, folder: Path) -> None:
        super().__init__(logging.INFO)
        self.path = folder / f"rejected-{os.getpid()}.log"

    def emit(self, record: logging.LogRecord) -> None:
        if "dropped a payload" in record.getMessage():
            with self.path.open("a", encoding="utf-8") as f:
                f.write(record.getMessage() + "\n")
