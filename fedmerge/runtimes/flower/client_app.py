"""The ClientApp: one fedmerge agent per Flower SuperNode.

A SuperNode is either a node of the run's split (``--node-config "partition-id=I"``: it
builds the split from the config and trains on partition I) or a deployed node with its own
files (``--node-config "node-file=/local/node.yaml"``: its data, starting checkpoint, public
eval set and state directory, :mod:`~fedmerge.decentralized.node`; nothing else is opened).

Each step (see :mod:`~fedmerge.runtimes.flower.relay`) the node takes its agent, merges what
the relay brought with :func:`~fedmerge.decentralized.receive.receive_and_merge`, evaluates,
trains, publishes, and saves the agent (the round kit's one agent-state format,
:mod:`~fedmerge.decentralized.persist`, under ``<state dir>/run-<run id>/``, written
atomically). The file is the agent's state: a process that saved a node's previous step
keeps that agent in memory too (:class:`AgentCache`, equal to the file), so a long-lived
ClientApp (:mod:`.worker`) neither rebuilds nor reloads it; any other process (a fresh
``flwr-clientapp``, a restarted node) restores it from the file. Nothing lives in
``Context.state`` (which travels with every message).
"""

from __future__ import annotations

import functools
import json
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from safetensors.torch import save as st_save

from fedmerge.config import load_config
from fedmerge.decentralized.agent import Agent
from fedmerge.decentralized.consensus import flat_state
from fedmerge.decentralized.delivery import Delivery, Refused
from fedmerge.decentralized.node import NodeSources, read_node_file
from fedmerge.decentralized.payload import Payload
from fedmerge.decentralized.persist import restore_agent, save_agent
from fedmerge.decentralized.protocols import MergeContext
from fedmerge.decentralized.receive import receive_and_merge
from fedmerge.decentralized.setup import Setup, build_setup
from fedmerge.errors import ConfigError, ValidationError
from fedmerge.runtimes.flower.records import array_blob, blob_array


@functools.lru_cache(maxsize=2)
def cached_setup(config_json: str, node: NodeSources | None = None) -> Setup:
    """The run's (immutable) setup, built once per process: data, topology, reference; a
    deployed ``node``'s from its own files."""
    return build_setup(load_config(json.loads(config_json)), node)


def node_sources(node_config: Mapping[str, Any]) -> NodeSources | None:
    """The node file named by the SuperNode's ``node-file`` node config, if any."""
    path = node_config.get("node-file")
    return read_node_file(str(path)) if path else None


def partition_of(node_config: Mapping[str, Any], node: NodeSources | None) -> int:
    """This SuperNode's topology node: its node file's ``node``, else ``partition-id``."""
    if node is not None:
        return node.node
    if "partition-id" not in node_config:
        raise ConfigError(
            "this SuperNode has no partition-id: start it with --node-config "
            "'partition-id=I num-partitions=N' or --node-config 'node-file=PATH'"
        )
    return int(node_config["partition-id"])


def node_state_dir(root: str | Path, run_id: int) -> Path:
    """Where a node keeps its agent's state file (:mod:`fedmerge.decentralized.persist`)."""
    return Path(root) / f"run-{run_id}"


class AgentCache:
    """The agents whose last step this process saved: (state dir, agent id) → (step, agent),
    the ``size`` most recent. An entry equals the agent's state file (it is put back only
    after the file is written), so using it at the next step is restoring without reading."""

    def __init__(self, size: int = 2) -> None:
        self.size, self.items = size, OrderedDict[tuple[Path, int], tuple[int, Agent]]()

    def take(self, setup: Setup, i: int, state_dir: Path, k: int) -> Agent:
        """Agent i as of the end of step k − 1 (or as built, at step 0); taken out of the
        cache until :meth:`put` (a step that fails leaves the file as the only state)."""
        hit = self.items.pop((state_dir, i), None)
        if k > 0 and hit is not None and hit[0] == k - 1:
            return hit[1]
        agent = setup.agent(i)
        if k > 0 and restore_agent(agent, state_dir) is None:
            raise ValidationError(f"agent {i}: no saved state in {state_dir} (lost run?)")
        return agent

    def put(self, agent: Agent, state_dir: Path, k: int) -> None:
        """Save ``agent`` after step k and keep it."""
        save_agent(agent, state_dir, k)
        self.items[(state_dir, agent.id)] = (k, agent)
        while len(self.items) > self.size:
            self.items.popitem(last=False)


AGENTS = AgentCache()


def node_step(msg: Message, partition: int, run_id: int, state_root: str | None,
              node: NodeSources | None = None) -> RecordDict:  # fmt: skip
    """One step on node ``partition``: merge + evaluate round k−1, train + publish round k."""
    instr = msg.content.config_records["step"]
    setup = cached_setup(str(instr["config"]), node)
    k = int(instr["step"])
    state_dir = node_state_dir(state_root or str(instr["state-dir"]), run_id)
    agent = AGENTS.take(setup, partition, state_dir, k)
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
        # in its own dtype: exact, and for a float32 model half the bytes of float64
        arrays["flat"] = blob_array(st_save({"flat": flat_state(agent.state(), None)}))
    if instr["train"]:
        agent.train()
    if instr["publish"]:
        payload = agent.publish(k)
        arrays["payload"] = blob_array(payload.to_bytes())
        metrics["nbytes"] = payload.nbytes
    AGENTS.put(agent, state_dir, k)
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
    """Answer the ServerApp's mapping query: this node's topology node (``partition-id``)
    and, when the query carries the run's config, the length of its flat model state."""
    node = node_sources(context.node_config)
    rec = {"partition-id": partition_of(context.node_config, node)}
    rec["num-partitions"] = int(context.node_config.get("num-partitions", -1))
    query = msg.content.config_records.get("query")
    if query is not None:
        setup = cached_setup(str(query["config"]), node)
        state = setup.model(rec["partition-id"]).state_dict()
        rec["flat-len"] = flat_state(state, None).numel()
    return Message(RecordDict({"partition": ConfigRecord(rec)}), reply_to=msg)


@app.train("step")
def train_step(msg: Message, context: Context) -> Message:
    """One pipelined step of this node's agent (see the module docstring)."""
    cfg = context.node_config
    node = node_sources(cfg)
    root = node.state_dir if node and node.state_dir else cfg.get("state-dir")
    content = node_step(msg, partition_of(cfg, node), context.run_id,
                        str(root) if root else None, node)  # fmt: skip
    return Message(content, reply_to=msg)
