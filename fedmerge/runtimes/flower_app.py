"""fedmerge's agents as a Flower App (Message API): a relaying ServerApp and an agent ClientApp.

Flower is hub-and-spoke; fedmerge is not. The ServerApp never merges: it maps Flower node
ids to topology nodes, runs the fault model and the topology schedule, and relays each
payload to the payload's receivers. The ClientApp is an :class:`~fedmerge.decentralized.agent.Agent`
that trains, validates and merges with the protocol's merge function, and evaluates.

One message per node per step, pipelined so the order of operations is the simulator's
(train → publish → deliver → receive/merge → evaluate). Step k (0 ≤ k ≤ R) tells node i:

    merge  (k > 0)  the payloads its in-neighbours published in round k−1, with π_ij and π_ii
    evaluate (k > 0) local and global test accuracy after that merge → round k−1's metrics
    train  (k < R)  round k's local training (unless the fault model makes it straggle)
    publish (k < R) its round-k payload (τ_i or θ_i), returned in the reply

The node replies with its payload (one safetensors blob in an ``ArrayRecord``), its flat
merged state (for the consensus distance ‖θ_i − θ̄‖, computed by the ServerApp) and its
metrics (``MetricRecord``). Agent state between steps lives on the node's disk
(``<state-dir>/run-<run id>/agent-<partition id>.safetensors``, written atomically), never
in module globals or ``Context.state``, which travels with every message.

A node that does not reply within ``timeout`` seconds is skipped: round k's plan is
rebuilt without it, so its neighbours merge without it (weights renormalize) and its row
reports ``active: false`` (and no accuracies when its evaluation is missing).
"""

from __future__ import annotations

import functools
import json
import shlex
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import log
from flwr.serverapp import Grid, ServerApp
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fedmerge.config import SimConfig, default_config, load_config
from fedmerge.decentralized.agent import Agent
from fedmerge.decentralized.consensus import distances, flat_state
from fedmerge.decentralized.delivery import Delivery, Refused
from fedmerge.decentralized.faults import FaultModel, check_faults
from fedmerge.decentralized.metrics import metrics_row
from fedmerge.decentralized.payload import Payload
from fedmerge.decentralized.persist import restore_agent, save_agent
from fedmerge.decentralized.protocols import MergeContext
from fedmerge.decentralized.receive import receive_and_merge
from fedmerge.decentralized.setup import Setup, build_setup
from fedmerge.errors import ConfigError, ValidationError
from fedmerge.report import write_run
from fedmerge.runtimes import get_runtime
from fedmerge.topology import RoundPlan

PARTITION_QUERY = "query.partition"
STEP = "train.step"
Row = dict[str, Any]
OnRound = Callable[[list[Row]], None]


# --------------------------------------------------------------------------- wire format
def blob_array(data: bytes) -> Array:
    """Raw bytes (a safetensors blob) as a Flower ``Array``, which Flower chunks and dedups."""
    return Array(dtype="uint8", shape=(len(data),), stype="safetensors", data=data)


def array_blob(array: Array) -> bytes:
    if array.stype != "safetensors":
        raise ValidationError(f"expected a safetensors blob, got stype {array.stype!r}")
    return bytes(array.data)


@functools.lru_cache(maxsize=2)
def cached_setup(config_json: str) -> Setup:
    """The run's (immutable) setup, built once per process: data, topology, reference."""
    return build_setup(load_config(json.loads(config_json)))


# --------------------------------------------------------------------------- the node
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
    limit = agent.validation.max_bytes or None
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


client_app = ClientApp()


@client_app.query("partition")
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


@client_app.train("step")
def train_step(msg: Message, context: Context) -> Message:
    """One pipelined step of this node's agent (see the module docstring)."""
    node = context.node_config
    root = str(node["state-dir"]) if node.get("state-dir") else None
    content = node_step(msg, int(node["partition-id"]), context.run_id, root)
    return Message(content, reply_to=msg)


# --------------------------------------------------------------------------- the relay
@dataclass
class RelayOptions:
    """``timeout``: seconds to wait for the replies of one step (None: forever);
    ``connect_timeout``: seconds to wait for enough nodes to connect; ``state_dir``: where
    nodes without a ``state-dir`` node config keep agent state."""

    timeout: float | None = None
    connect_timeout: float = 120.0
    state_dir: str = field(default_factory=lambda: str(Path(tempfile.gettempdir()) / "fedmerge"))


def map_nodes(grid: Grid, n: int, opts: RelayOptions) -> dict[int, int]:
    """Topology node (partition id) → Flower node id, from a query to every node."""
    deadline = time.monotonic() + opts.connect_timeout
    while len(ids := list(grid.get_node_ids())) < n:
        if time.monotonic() > deadline:
            raise ConfigError(
                f"only {len(ids)} Flower nodes connected, the topology needs {n} (start more "
                f"SuperNodes; a local simulation: --federation-config 'num-supernodes={n}')"
            )
        time.sleep(0.5)
    queries = [Message(RecordDict(), node_id, PARTITION_QUERY) for node_id in ids]
    mapping: dict[int, int] = {}
    for reply in grid.send_and_receive(queries, timeout=opts.connect_timeout):
        if reply.has_error():
            log(WARNING, "node %d: partition query failed: %s", reply.metadata.src_node_id,
                reply.error.reason)  # fmt: skip
            continue
        pid = int(reply.content.config_records["partition"]["partition-id"])
        if pid in mapping:
            raise ConfigError(f"two Flower nodes claim partition-id {pid}")
        mapping[pid] = reply.metadata.src_node_id
    missing = sorted(set(range(n)) - set(mapping))
    if missing:
        raise ConfigError(f"no Flower node has partition-id {missing[:10]} (need 0..{n - 1})")
    extra = sorted(set(mapping) - set(range(n)))
    if extra:
        log(WARNING, "nodes with partition-id %s are not in the topology; left idle", extra)
    mapping = {pid: mapping[pid] for pid in range(n)}
    for pid, node_id in mapping.items():
        log(INFO, "fedmerge: topology node %d <- Flower node %d", pid, node_id)
    return mapping


@dataclass
class Round:
    """What the relay keeps of round r between its train step and its merge step."""

    active: np.ndarray  # (n,) bool: up in the fault model and replied with a payload
    trains: np.ndarray  # (n,) bool
    plan: RoundPlan | None = None
    lost: np.ndarray | None = None
    payloads: dict[int, bytes] = field(default_factory=dict)
    nbytes: dict[int, int] = field(default_factory=dict)


def step_messages(
    k: int, config_json: str, mapping: Mapping[int, int], prev: Round | None,
    cur: Round | None, merges: bool, opts: RelayOptions,
) -> list[Message]:  # fmt: skip
    """Step k's message to every node: round k−1's inbox and flags, round k's flags."""
    inbox: dict[int, list[tuple[int, float]]] = {i: [] for i in mapping}
    if prev is not None and prev.plan is not None:
        weight = [dict(row) for row in prev.plan.neighbors]
        for (s, d), gone in zip(prev.plan.messages, prev.lost, strict=True):
            if not gone:
                inbox[d].append((s, weight[d][s]))
    messages = []
    for i, node_id in mapping.items():
        merging = prev is not None and prev.plan is not None and bool(prev.active[i])
        instr = {
            "config": config_json, "step": k, "state-dir": opts.state_dir,
            "evaluate": prev is not None, "merge": merging,
            "self-weight": dict(prev.plan.neighbors[i])[i] if merging else 1.0,
            "senders": [s for s, _ in inbox[i]], "weights": [w for _, w in inbox[i]],
            "train": cur is not None and bool(cur.trains[i]),
            "publish": merges and cur is not None and bool(cur.active[i]),
        }  # fmt: skip
        blobs = {str(s): blob_array(prev.payloads[s]) for s, _ in inbox[i]} if merging else {}
        content = RecordDict({"step": ConfigRecord(instr), "inbox": ArrayRecord(blobs)})
        messages.append(Message(content, node_id, STEP))
    return messages


def relay(grid: Grid, cfg: SimConfig, opts: RelayOptions, on_round: OnRound | None) -> list[Row]:
    """Run ``cfg`` on the connected nodes: R + 1 pipelined steps; the metrics rows."""
    check_faults(cfg.faults, "flower", get_runtime("flower").faults)
    setup = build_setup(cfg)
    n, merges = setup.n, setup.protocol.merge is not None
    mapping = map_nodes(grid, n, opts)
    back = {node_id: pid for pid, node_id in mapping.items()}
    config_json = json.dumps(cfg.to_dict())
    faults = FaultModel(cfg.faults, n, cfg.seed)
    rows: list[Row] = []
    prev: Round | None = None
    clock = time.perf_counter()
    for k in range(cfg.rounds + 1):
        cur = Round(*faults.nodes(k)) if k < cfg.rounds else None
        msgs = step_messages(k, config_json, mapping, prev, cur, merges, opts)
        replies = collect(grid, msgs, back, opts, k)
        if cur is not None:
            close_round(cur, replies, setup, faults, k, merges)
        if prev is not None:
            new = round_rows(k - 1, prev, replies, n)
            now = time.perf_counter()
            for row in new:
                row["wall_s"] = now - clock
            clock = now
            rows += new
            if on_round:
                on_round(new)
        prev = cur
    return rows


def collect(
    grid: Grid, msgs: Sequence[Message], back: Mapping[int, int], opts: RelayOptions, k: int
) -> dict[int, RecordDict]:
    """Send step k and gather replies by topology node; late or failed nodes are skipped."""
    replies: dict[int, RecordDict] = {}
    failed: dict[int, str] = {}
    for reply in grid.send_and_receive(msgs, timeout=opts.timeout):
        pid = back[reply.metadata.src_node_id]
        if reply.has_error():
            failed[pid] = reply.error.reason
            log(WARNING, "fedmerge step %d: node %d failed: %s", k, pid, reply.error.reason)
        else:
            replies[pid] = reply.content
    silent = sorted(set(back.values()) - set(replies) - set(failed))
    if silent:
        log(WARNING, "fedmerge step %d: no reply within %ss from nodes %s; skipping them", k,
            opts.timeout, silent)  # fmt: skip
    if not replies:
        why = "; ".join(f"node {i}: {e}" for i, e in failed.items()) or "timeout"
        raise RuntimeError(f"fedmerge step {k}: no node replied ({why})")
    return replies


def close_round(
    cur: Round, replies: Mapping[int, RecordDict], setup: Setup, faults: FaultModel, r: int,
    merges: bool,
) -> None:  # fmt: skip
    """Round r after its train step: who is present, its plan, lost messages, payloads."""
    for i in np.flatnonzero(cur.active):
        rec = replies.get(int(i))
        if rec is None or (merges and "payload" not in rec.array_records["arrays"]):
            cur.active[i] = False
            continue
        if merges:
            cur.payloads[int(i)] = array_blob(rec.array_records["arrays"]["payload"])
            cur.nbytes[int(i)] = int(rec.metric_records["metrics"]["nbytes"])
    if not merges:
        return
    present = None if cur.active.all() else np.flatnonzero(cur.active).tolist()
    cur.plan = setup.topology.round(r, active=present, total_rounds=setup.config.rounds)
    cur.lost = faults.lost(r, len(cur.plan.messages))


def round_rows(r: int, rnd: Round, replies: Mapping[int, RecordDict], n: int) -> list[Row]:
    """Round r's rows from its plan and the evaluation replies (consensus over who replied)."""
    sent, received = np.zeros(n, np.int64), np.zeros(n, np.int64)
    if rnd.plan is not None:
        for (s, d), gone in zip(rnd.plan.messages, rnd.lost, strict=True):
            sent[s] += rnd.nbytes[s]
            received[d] += 0 if gone else rnd.nbytes[s]
    flats = {
        i: st_load(array_blob(rec.array_records["arrays"]["flat"]))["flat"].double()
        for i, rec in replies.items()
    }
    dist: dict[int, float] = {}
    if flats:
        stack = torch.stack([flats[i] for i in sorted(flats)])
        dist = dict(zip(sorted(flats), distances(stack), strict=True))
    rows = []
    for i in range(n):
        m = replies[i].metric_records["metrics"] if i in replies else {}
        rows.append(metrics_row(
            r + 1, i, active=bool(rnd.active[i]), trained=bool(rnd.trains[i]),
            local_acc=m.get("local_acc"), global_acc=m.get("global_acc"),
            consensus=dist.get(i), bytes_sent=int(sent[i]), bytes_received=int(received[i]),
            rejected=int(m.get("rejected", 0)),
        ))  # fmt: skip
    return rows


# --------------------------------------------------------------------------- the ServerApps
def make_server_app(
    cfg: SimConfig, opts: RelayOptions, on_round: OnRound | None = None,
    sink: list[Row] | None = None,
) -> ServerApp:  # fmt: skip
    """A ServerApp that relays ``cfg``'s run and appends its rows to ``sink`` (in-process use)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        rows = relay(grid, cfg, opts, on_round)
        if sink is not None:
            sink.extend(rows)

    return app


def config_from_run(run_config: Mapping[str, Any], app_dir: Path) -> tuple[SimConfig, Path]:
    """The fedmerge config and output folder named by ``flwr run``'s run config.

    ``config``: a YAML path (relative: to the working directory, else to the app folder;
    empty: the embedded default); ``overrides``: ``a.b=c`` items separated by spaces
    (shell quoting allowed); ``out-dir``: where metrics.jsonl/summary.json go.
    """
    overrides = shlex.split(str(run_config.get("overrides", "")))
    source = str(run_config.get("config", ""))
    if not source:
        cfg = default_config(overrides)
    else:
        path = Path(source).expanduser()
        if not path.is_absolute() and not path.exists():
            path = app_dir / path
        cfg = load_config(path, overrides)
    return cfg, Path(str(run_config.get("out-dir", "") or f"runs/{cfg.name}-flower"))


def run_options(run_config: Mapping[str, Any]) -> RelayOptions:
    """``timeout`` (seconds, 0: wait forever) and ``state-dir`` from the run config."""
    opts = RelayOptions(timeout=float(run_config.get("timeout", 0)) or None)
    if run_config.get("state-dir"):
        opts.state_dir = str(run_config["state-dir"])
    return opts


def run_config_server_app(app_dir: Path) -> ServerApp:
    """The ServerApp of ``flwr run .``: config from the run config, report to ``out-dir``."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg, out = config_from_run(context.run_config, app_dir)
        start = time.perf_counter()
        rows = relay(grid, cfg, run_options(context.run_config), None)
        extra = {"runtime": "flower", "elapsed_s": round(time.perf_counter() - start, 3)}
        summary = write_run(out, cfg, rows, extra)
        log(INFO, "fedmerge: wrote %s (final mean global accuracy %s)", out.resolve(),
            summary["final_global_acc"])  # fmt: skip

    return app
