"""The ClientApp: one fedmerge agent per Flower SuperNode.

Each step (see :mod:`~fedmerge.runtimes.flower.relay`) the node rebuilds its agent from the
run's :class:`~fedmerge.decentralized.setup.Setup` and its state file (the round kit's one
agent-state format, :mod:`~fedmerge.decentralized.persist`, under
``<state-dir>/run-<run id>/``, written atomically), merges what the relay brought with
:func:`~fedmerge.decentralized.receive.receive_and_merge`, evaluates, trains and publishes.
Nothing lives in module globals or ``Context.state`` (which travels with every message).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from safetensors.torch import save as st_save

from fedmerge.config import load_config
from fedmerge.decentralized.agent import Agent
from fedmerge.decentralized.consensus import flat_state
from fedmerge.decentralized.delivery import Delivery, Refused
from fedmerge.decentralized.payload import Payload
from fedmerge.decentralized.persist import restore_agent, save_agent
from fedmerge.decentralized.protocols import MergeContext
from fedmerge.decentralized.receive import receive_and_merge
from fedmerge.decentralized.setup import Setup, build_setup
from fedmerge.errors import ConfigError, ValidationError
from fedmerge.runtimes.flower.records import array_blob, blob_array


@functools.lru_cache(maxsize=2)
def cached_setup(config_json: str) -> Setup:
    """The run's (immutable) setup, built once per process: data, topology, reference."""
    return build_setup(load_config(json.loads(config_json)))


def node_state_dir(root: str | Path, run_id: int) -> Path:
    """Where a node keeps its agent's state file (:mod:`fedmerge.decentralized.persist`)."""
    return Path(root) / f"run-{run_id}"


def node_step(msg: Message, partition: int, run_id: int, state_root: str | None) -> RecordDict:
    """One step on node ``partition``: merge + evaluate round k−1, train + publish round k."""
    instr = msg.content.config_records["step"]
    setup = cached_setup(str(instr["config"]))
    k = int(instr["step"])
    state_dir = node_state_dir(state_root or str(instr["state-dir"]), run_id)
    agent = setup.agent(partition)
    if k > 0 and restore_agent(agent, state_dir) is None:
        raise ValidationError(f"agent {partition}: no saved state in {state_dir} (lost run?)")
    metrics: dict[str, Any] = {}
    arrays: dict[str, Array] = {}
    if instr["evaluate"]:
        metrics["rejected"] = merge_inbox(agent, msg, setup, k - 1) if instr["merge"] else 0
        fed = setup.data
        for name, acc in (("local_acc", agent.evaluate(agent.data.test_x, agent.data.test_y)),
                          ("global_acc", agent.evaluate(fed.test_x, fed.test_y))):  # fmt: skip
            if acc is not None:
                metrics[name] = acc
        if agent.experts is not None:
            metrics["experts"] = agent.experts
        arrays["flat"] = blob_array(st_save({"flat": flat_state(agent.state())}))
    if instr["train"]:
        agent.train()
    if instr["publish"]:
        payload = agent.publish(k)
        arrays["payload"] = blob_array(payload.to_bytes())
        metrics["nbytes"] = payload.nbytes
    save_agent(agent, state_dir, k)
    return RecordDict({"arrays": ArrayRecord(arrays), "metrics": MetricRecord(metrics)})


def merge_inbox(agent: Agent, msg: Message, setup: Setup, r: int) -> int:
    """Decode the relayed payloads (the relay names each one's sender) and receive and merge
    them as every runtime does; the rejected count."""
    instr = msg.content.config_records["step"]
    blobs = msg.content.array_records.get("inbox", ArrayRecord())
    limit = agent.byte_limit()
    deliveries = []
    for key, w in zip(instr["senders"], instr["weights"], strict=True):
        try:
            item: Payload | Refused = Payload.from_bytes(array_blob(blobs[str(key)]), limit)
        except ValidationError as exc:  # unreadable on the wire: same fate as an invalid one
            item = Refused(0, f"payload from agent {key}: {exc}")
        deliveries.append(Delivery(int(key), float(w), item))
    ctx = MergeContext(r, setup.config, setup.calibration())
    got = receive_and_merge(agent, deliveries, float(instr["self-weight"]), setup.protocol, ctx)
    return got.rejected


app = ClientApp()


@app.query("partition")
def query_partition(msg: Message, context: Context) -> Message:
    """Answer the ServerApp's mapping query with this node's ``partition-id``."""
    cfg = context.node_config
    if "partition-id" not in cfg:
        raise ConfigError(
            "this SuperNode has no partition-id: start it with "
            "--node-config 'partition-id=I num-partitions=N'"
        )
    rec = {"partition-id": int(cfg["partition-id"])}
    rec["num-partitions"] = int(cfg.get("num-partitions", -1))
    return Message(RecordDict({"partition": ConfigRecord(rec)}), reply_to=msg)


@app.train("step")
def train_step(msg: Message, context: Context) -> Message:
    """One pipelined step of this node's agent (see the module docstring)."""
    node = context.node_config
    root = str(node["state-dir"]) if node.get("state-dir") else None
    content = node_step(msg, int(node["partition-id"]), context.run_id, root)
    return Message(content, reply_to=msg)
