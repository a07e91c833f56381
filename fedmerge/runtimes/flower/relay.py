"""The relay: what the ServerApp runs. Flower is hub-and-spoke; fedmerge is not.

The ServerApp never merges: it maps Flower node ids to topology nodes, runs the fault model
and the topology schedule, and relays each payload to the payload's receivers. Each
ClientApp (:mod:`~fedmerge.runtimes.flower.client_app`) is an agent that trains, receives
and merges with the round kit, and evaluates.

One message per node per step, pipelined so the order of operations is the simulator's
(train → publish → deliver → receive/merge → evaluate). Step k (0 ≤ k ≤ R) tells node i:

    merge  (k > 0)  the payloads its in-neighbours published in round k−1, with π_ij and π_ii
    evaluate (k > 0) local and global test accuracy after that merge → round k−1's metrics
    train  (k < R)  round k's local training (unless the fault model makes it straggle)
    publish (k < R) its round-k payload (τ_i or θ_i), returned in the reply

The node replies with its payload (one safetensors blob in an ``ArrayRecord``), its flat
merged state in its model's dtype (for the consensus distance ‖θ_i − θ̄‖, computed by the
ServerApp in float64) and its metrics (``MetricRecord``). Agent state between steps lives
on the node's disk.

A node that does not reply within ``timeout`` seconds is skipped: round k's plan is
rebuilt without it, so its neighbours merge without it (weights renormalize) and its row
reports ``active: false`` (and no accuracies when its evaluation is missing). A node that
comes back under a new Flower node id (a restarted SuperNode) is mapped again before the
next step and goes on from its saved state.

The relay builds no data: the topology and protocol come from the config, the model's size
from the nodes' answers to the mapping query (they must agree).
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from logging import INFO, WARNING
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from safetensors import SafetensorError
from safetensors.torch import load as st_load

from fedmerge.config import SimConfig
from fedmerge.decentralized.consensus import distances
from fedmerge.decentralized.engine import OnRound, Row
from fedmerge.decentralized.faults import FaultModel, check_faults
from fedmerge.decentralized.metrics import metrics_row
from fedmerge.decentralized.protocols import Protocol, get_protocol
from fedmerge.decentralized.setup import check_codec, run_topology
from fedmerge.errors import ConfigError, FedmergeError, ValidationError
from fedmerge.runtimes import get_runtime
from fedmerge.runtimes.flower.keep import KeptReplies
from fedmerge.runtimes.flower.records import array_blob
from fedmerge.stheader import parse_header
from fedmerge.topology import RoundPlan, Topology

PARTITION_QUERY = "query.partition"
STEP = "train.step"
POLL_S = 0.1  # seconds between pulls for replies (Flower's send_and_receive waits 3 s); each
# pull is a request the SuperLink serves on the CPU the nodes need


@dataclass
class RelayOptions:
    """``timeout``: seconds to wait for the replies of one step (None: forever);
    ``connect_timeout``: seconds to wait for every node to connect and answer (None: the
    config's ``flower.connect_timeout_s``, which scales with the nodes); ``state_dir``:
    where nodes without a ``state-dir`` node config keep agent state."""

    timeout: float | None = None
    connect_timeout: float | None = None
    state_dir: str = field(default_factory=lambda: str(Path(tempfile.gettempdir()) / "fedmerge"))


class FlowerTimeout(FedmergeError):
    """Flower nodes did not connect or answer in time; the message says what was seen."""


def map_nodes(grid: Grid, n: int, timeout: float, config_json: str) -> tuple[dict[int, int], int]:
    """(topology node (partition id) → Flower node id, flat model length), from a query to
    every node; waits up to ``timeout`` seconds for n nodes to connect, and as long for
    their answers."""
    deadline = time.monotonic() + timeout
    while len(ids := sorted(grid.get_node_ids())) < n:
        if time.monotonic() > deadline:
            raise FlowerTimeout(
                f"Flower connect timeout: after {timeout:g} s, {len(ids)} of the {n} SuperNodes "
                f"the topology needs had connected (Flower node ids {ids[:10]}); start more "
                f"(a local simulation: --federation-config 'num-supernodes={n}') or raise "
                "flower.connect_timeout_s"
            )
        time.sleep(0.5)
    mapping, lengths, errors, answered = query_nodes(grid, ids, config_json, timeout)
    missing = sorted(set(range(n)) - set(mapping))
    silent = sorted(set(ids) - answered)
    if missing and silent:
        raise FlowerTimeout(
            f"Flower connect timeout: Flower nodes {silent[:10]} did not answer the partition "
            f"query within {timeout:g} s; partition-ids seen: {sorted(mapping)[:10]} (need "
            f"0..{n - 1})"
        )
    if missing:
        why = f"; node errors: {'; '.join(errors[:3])}" if errors else ""
        raise ConfigError(
            f"no Flower node has partition-id {missing[:10]} (need 0..{n - 1}; seen: "
            f"{sorted(mapping)[:10]}){why}"
        )
    extra = sorted(set(mapping) - set(range(n)))
    if extra:
        log(WARNING, "nodes with partition-id %s are not in the topology; left idle", extra)
    mapping = {pid: mapping[pid] for pid in range(n)}
    sizes = {lengths[pid] for pid in mapping}
    if len(sizes) != 1:
        raise ConfigError(f"the nodes' models differ in size (parameters per node: "
                          f"{ {pid: lengths[pid] for pid in mapping} })")  # fmt: skip
    for pid, node_id in mapping.items():
        log(INFO, "fedmerge: topology node %d <- Flower node %d", pid, node_id)
    return mapping, sizes.pop()


def query_nodes(
    grid: Grid, ids: Sequence[int], config_json: str, timeout: float
) -> tuple[dict[int, int], dict[int, int], list[str], set[int]]:
    """Ask Flower nodes ``ids`` for their partition id and flat model length: (partition id
    → node id, partition id → length, error reasons, the node ids that answered)."""
    query = RecordDict({"query": ConfigRecord({"config": config_json})})
    queries = [Message(query, node_id, PARTITION_QUERY) for node_id in ids]
    mapping: dict[int, int] = {}
    lengths: dict[int, int] = {}
    errors, answered = [], set()
    for reply in exchange(grid, queries, timeout):
        src = reply.metadata.src_node_id
        answered.add(src)
        if reply.has_error():
            log(WARNING, "node %d: partition query failed: %s", src, reply.error.reason)
            errors.append(f"node {src}: {reply.error.reason[:300]}")
            continue
        rec = reply.content.config_records["partition"]
        pid = int(rec["partition-id"])
        if pid in mapping:
            raise ConfigError(f"two Flower nodes claim partition-id {pid}")
        mapping[pid], lengths[pid] = src, int(rec.get("flat-len", -1))
    return mapping, lengths, errors, answered


def rejoin(
    grid: Grid, mapping: dict[int, int], absent: set[int], seen: set[int], config_json: str,
    flat_len: int, timeout: float,
) -> None:  # fmt: skip
    """Map topology nodes in ``absent`` (no reply at the last step) that came back under a new
    Flower node id (a restarted SuperNode registers anew): query connected nodes not in
    ``seen`` (until they answer) and move the partition ids they claim; a node that replied
    keeps its id."""
    new = sorted(set(grid.get_node_ids()) - seen)
    if not new or not absent:
        return
    found, lengths, _, answered = query_nodes(grid, new, config_json, timeout)
    seen.update(answered)  # a node still starting is asked again at the next step
    for pid, node_id in found.items():
        if pid in absent and lengths[pid] == flat_len:
            log(INFO, "fedmerge: topology node %d rejoined as Flower node %d (was %d)", pid,
                node_id, mapping[pid])  # fmt: skip
            mapping[pid] = node_id
        else:
            log(WARNING, "Flower node %d claims topology node %d, which %s; ignored", node_id,
                pid, "has another model size" if pid in absent else "is not absent")  # fmt: skip


def exchange(grid: Grid, msgs: Sequence[Message], timeout: float | None,
             kept: KeptReplies | None = None) -> list[Message]:  # fmt: skip
    """Push ``msgs`` and pull their replies every :data:`POLL_S` seconds until all are in or
    ``timeout`` seconds passed (None: no limit), then once more: what is whole on the
    SuperLink by then counts, a reply still uploading comes back as an error reply. Logs the
    push and the wait. With ``kept``, the previous replies are confirmed after the push and
    these replies' confirmations are held (their payloads stay on the SuperLink for the next
    push, :mod:`.keep`)."""
    start = time.perf_counter()
    own, kept = kept is None, kept or KeptReplies(grid)
    waiting = set(grid.push_messages(msgs))
    kept.release()
    pushed = time.perf_counter()
    end = None if timeout is None else time.monotonic() + timeout
    replies: list[Message] = []
    while waiting:
        last = end is not None and time.monotonic() >= end
        got = kept.pull(waiting, end)  # a sender that died mid-upload holds it until `end`
        replies += got
        waiting -= {m.metadata.reply_to_message_id for m in got}
        if last or not waiting:
            break
        time.sleep(POLL_S)
    if own:
        kept.release()
    log(INFO, "fedmerge: %d messages pushed in %.2f s, %d replies %.2f s later", len(msgs),
        pushed - start, len(replies), time.perf_counter() - pushed)  # fmt: skip
    return replies


@dataclass
class Round:
    """What the relay keeps of round r between its train step and its merge step."""

    active: np.ndarray  # (n,) bool: up in the fault model and replied with a payload
    trains: np.ndarray  # (n,) bool
    plan: RoundPlan | None = None
    lost: np.ndarray | None = None
    payloads: dict[int, Array] = field(default_factory=dict)  # as received: relayed as is
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
        # the Array the sender's reply brought, not a copy: hashed once for all receivers,
        # and not uploaded at all while the SuperLink still holds it (:mod:`.keep`)
        blobs = {str(s): prev.payloads[s] for s, _ in inbox[i]} if merging else {}
        content = RecordDict({"step": ConfigRecord(instr), "inbox": ArrayRecord(blobs)})
        messages.append(Message(content, node_id, STEP))
    return messages


def shared_setup(cfg: SimConfig) -> tuple[Protocol, Topology]:
    """The part of the setup the relay needs, without data: protocol and topology."""
    protocol = get_protocol(cfg.protocol.name)
    if protocol.pool_data:
        raise ConfigError(f"protocol.name {cfg.protocol.name!r} pools every node's data into "
                          "one model: run it in process (fedmerge simulate)")  # fmt: skip
    topology = run_topology(cfg, protocol)
    check_codec(cfg, protocol, topology)
    return protocol, topology


def relay(grid: Grid, cfg: SimConfig, opts: RelayOptions, on_round: OnRound | None) -> list[Row]:
    """Run ``cfg`` on the connected nodes: R + 1 pipelined steps; the metrics rows."""
    check_faults(cfg.faults, "flower", get_runtime("flower").faults)
    protocol, topology = shared_setup(cfg)
    n, merges = topology.n, protocol.merge is not None
    connect = opts.connect_timeout or cfg.flower.connect_timeout(n)
    config_json = json.dumps(cfg.to_dict())
    mapping, flat_len = map_nodes(grid, n, connect, config_json)
    seen = set(grid.get_node_ids())
    faults = FaultModel(cfg.faults, n, cfg.seed)
    rows: list[Row] = []
    kept = KeptReplies(grid)  # step k's payloads stay on the SuperLink for step k + 1
    prev: Round | None = None
    replies: dict[int, Reply] = {}
    clock = time.perf_counter()
    for k in range(cfg.rounds + 1):
        if k > 0:
            absent = set(range(n)) - set(replies)
            rejoin(grid, mapping, absent, seen, config_json, flat_len, opts.timeout or connect)
        back = {node_id: pid for pid, node_id in mapping.items()}
        cur = Round(*faults.nodes(k)) if k < cfg.rounds else None
        msgs = step_messages(k, config_json, mapping, prev, cur, merges, opts)
        replies = collect(grid, msgs, back, opts, k, flat_len, kept)
        if cur is not None:
            close_round(cur, replies, topology, faults, k, merges, cfg.rounds)
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
    kept.release()
    return rows


def collect(
    grid: Grid, msgs: Sequence[Message], back: Mapping[int, int], opts: RelayOptions, k: int,
    flat_len: int, kept: KeptReplies | None = None,
) -> dict[int, Reply]:  # fmt: skip
    """Send step k and gather replies by topology node; late, failed or malformed replies
    (:func:`check_reply`) are skipped for the step, the node named in the log."""
    replies: dict[int, Reply] = {}
    failed: dict[int, str] = {}
    answered = exchange(grid, msgs, opts.timeout, kept)
    # by the message it answers: an error reply the SuperLink or the grid made carries
    # their node id, not the node's (pushing set each message's id); else by its sender
    sent = {m.metadata.message_id: back[m.metadata.dst_node_id] for m in msgs}
    for reply in answered:
        meta = reply.metadata
        pid = sent.get(meta.reply_to_message_id, back.get(meta.src_node_id))
        got = reply.error.reason if reply.has_error() else check_reply(reply.content, flat_len)
        if pid is None:
            log(WARNING, "fedmerge step %d: reply from node %s to no message of this step "
                "ignored", k, meta.src_node_id)  # fmt: skip
        elif isinstance(got, str):
            failed[pid] = got
            log(WARNING, "fedmerge step %d: node %d failed: %s", k, pid, got)
        else:
            replies[pid] = got
    silent = sorted(set(back.values()) - set(replies) - set(failed))
    if silent:
        log(WARNING, "fedmerge step %d: no reply within %ss from nodes %s; skipping them", k,
            opts.timeout, silent)  # fmt: skip
    if not replies:
        why = "; ".join(f"node {i}: {e}" for i, e in failed.items()) or "timeout"
        raise RuntimeError(f"fedmerge step {k}: no node replied ({why})")
    return replies


def _numbers(v: object) -> bool:
    number = (int, float)
    return isinstance(v, number) or (isinstance(v, list) and all(isinstance(x, number) for x in v))


# a node's flat state comes in its model's dtype (exact in float64, where distances are taken)
FLAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass
class Reply:
    """A node's usable reply: its records and its flat state, decoded once."""

    content: RecordDict
    flat: torch.Tensor | None  # (flat_len,) FLAT_DTYPES, finite; None when it did not evaluate


def check_reply(rec: RecordDict, flat_len: int) -> Reply | str:
    """The reply, or why it cannot be used: records present, the payload a safetensors blob
    with its ``nbytes``, the flat state a safetensors blob of (flat_len,) finite values of a
    :data:`FLAT_DTYPES` dtype, the metrics numbers or lists of numbers (``experts``)."""
    flat = None
    try:
        arrays, metrics = rec.array_records["arrays"], rec.metric_records["metrics"]
        if "payload" in arrays:
            array_blob(arrays["payload"])
            if not isinstance(metrics["nbytes"], int) or metrics["nbytes"] < 0:
                return f"metric nbytes is {metrics['nbytes']!r}"
        if "flat" in arrays:
            blob = array_blob(arrays["flat"])
            parse_header(blob, source="flat state", max_tensors=1)
            flat = st_load(blob)["flat"]
            if flat.dtype not in FLAT_DTYPES:
                return f"flat state of dtype {flat.dtype}, expected one of {FLAT_DTYPES}"
            if flat.shape != (flat_len,) or not bool(torch.isfinite(flat).all()):
                return f"flat state of shape {tuple(flat.shape)}, expected ({flat_len},) finite"
        bad = [k for k, v in metrics.items() if not _numbers(v)]
        if bad:
            return f"metric {bad[0]!r} is not a number or a list of numbers"
    except (KeyError, TypeError, ValidationError, SafetensorError) as exc:
        return f"malformed reply ({type(exc).__name__}: {str(exc)[:120]})"
    return Reply(rec, flat)


def close_round(
    cur: Round, replies: Mapping[int, Reply], topology: Topology, faults: FaultModel,
    r: int, merges: bool, rounds: int,
) -> None:  # fmt: skip
    """Round r after its train step: who is present, its plan, lost messages, payloads."""
    for i in np.flatnonzero(cur.active):
        reply = replies.get(int(i))
        rec = reply.content if reply is not None else None
        if rec is None or (merges and "payload" not in rec.array_records["arrays"]):
            cur.active[i] = False
            continue
        if merges:
            cur.payloads[int(i)] = rec.array_records["arrays"]["payload"]
            cur.nbytes[int(i)] = int(rec.metric_records["metrics"]["nbytes"])
    if not merges:
        return
    present = None if cur.active.all() else np.flatnonzero(cur.active).tolist()
    cur.plan = topology.round(r, active=present, total_rounds=rounds)
    cur.lost = faults.lost(r, len(cur.plan.messages))


def round_rows(r: int, rnd: Round, replies: Mapping[int, Reply], n: int) -> list[Row]:
    """Round r's rows from its plan and the evaluation replies (consensus over who replied)."""
    sent, received = np.zeros(n, np.int64), np.zeros(n, np.int64)
    if rnd.plan is not None:
        for (s, d), gone in zip(rnd.plan.messages, rnd.lost, strict=True):
            sent[s] += rnd.nbytes[s]
            received[d] += 0 if gone else rnd.nbytes[s]
    flats = {i: rep.flat.double() for i, rep in replies.items() if rep.flat is not None}
    dist: dict[int, float] = {}
    if flats:
        stack = torch.stack([flats[i] for i in sorted(flats)])
        dist = dict(zip(sorted(flats), distances(stack), strict=True))
    rows = []
    for i in range(n):
        m = replies[i].content.metric_records["metrics"] if i in replies else {}
        rows.append(metrics_row(
            r + 1, i, active=bool(rnd.active[i]), trained=bool(rnd.trains[i]),
            local_acc=m.get("local_acc"), global_acc=m.get("global_acc"),
            consensus=dist.get(i), bytes_sent=int(sent[i]), bytes_received=int(received[i]),
            rejected=int(m.get("rejected", 0)),
            experts=list(m["experts"]) if "experts" in m else None,
        ))  # fmt: skip
    return rows
