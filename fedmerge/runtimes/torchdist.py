"""The torch.distributed runtime: agents on ranks, payloads peer to peer along the topology.

Every rank builds the same :class:`~fedmerge.decentralized.setup.Setup` from the config and hosts a
block of nodes (node i on rank i by default; ``distributed.agents_per_rank: k`` puts nodes
k·r … k·r+k−1 on rank r). Round r on every rank, exactly as :meth:`Simulator.round`:

    faults, plan  the seeded FaultModel and ``topology.round(r, active)`` (same on every rank)
    train         the hosted agents
    exchange      per (sender node, receiving rank): header → ack → flat body, each step one
                  ``batch_isend_irecv`` with a deadline (:mod:`fedmerge.runtimes.wire`)
    receive/merge validate as the simulator does, merge with the protocol
    agree         every rank checks in on the rendezvous store; the first to see everyone (or
                  to reach the timeout) writes who is alive, and all ranks adopt that verdict
    consensus     Σ_i θ_i by all_reduce (float64), then ‖θ_i − θ̄‖ per hosted agent
    rows          through the store to the leader (the lowest live rank)

A rank that stops answering is named by rank and node. ``on_peer_failure: abort`` stops
every rank with that message (:class:`PeerFailure`); ``continue`` drops its nodes from the
plan (the topology renormalizes the weights over the nodes present), rebuilds the process
group over the survivors and goes on; its rows then read ``active: false`` with no metrics.

``run(cfg, procs=N)`` starts N local worker processes itself (laptops, tests); under
``torchrun`` each worker calls :func:`run_rank` (see ``clients/torchdist_agent.py``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from fedmerge.config import SimConfig, dump_config, load_config
from fedmerge.decentralized.agent import make_loss
from fedmerge.decentralized.consensus import distances, flat_state
from fedmerge.decentralized.delivery import Refused, deliver
from fedmerge.decentralized.faults import FaultModel, check_faults
from fedmerge.decentralized.metrics import metrics_row
from fedmerge.decentralized.payload import Payload
from fedmerge.decentralized.protocols import MergeContext
from fedmerge.decentralized.receive import receive_and_merge
from fedmerge.decentralized.setup import build_setup
from fedmerge.errors import ConfigError, FedmergeError, ValidationError
from fedmerge.runtimes import get_runtime, wire

log = logging.getLogger("fedmerge.torchdist")
Rows = list[dict[str, Any]]
OnRound = Callable[[Rows], None]
PREFIX_ENV = "FEDMERGE_TORCHDIST_PREFIX"


class PeerFailure(FedmergeError):
    """A rank stopped answering (and ``on_peer_failure`` is ``abort``)."""


class Excluded(PeerFailure):
    """This rank answered too late: its peers declared it gone and went on without it."""


@dataclass(frozen=True)
class Layout:
    """Which rank hosts which node: contiguous blocks of ``per_rank`` nodes."""

    n: int
    per_rank: int

    def rank_of(self, node: int) -> int:
        return node // self.per_rank

    def nodes_of(self, rank: int) -> list[int]:
        return list(range(rank * self.per_rank, min(self.n, (rank + 1) * self.per_rank)))

    def describe(self, ranks: Iterable[int]) -> str:
        """'rank 2 (node 2), rank 3 (nodes 6, 7)'."""
        parts = []
        for k in sorted(ranks):
            nodes = self.nodes_of(k)
            parts.append(f"rank {k} (node{'s' * (len(nodes) > 1)} {', '.join(map(str, nodes))})")
        return ", ".join(parts)


def make_layout(n: int, world: int, agents_per_rank: int) -> Layout:
    """Node blocks for ``world`` ranks; every rank must host at least one node."""
    per = agents_per_rank or math.ceil(n / world)
    need = math.ceil(n / per)
    if need != world:
        raise ConfigError(
            f"distributed.agents_per_rank: {n} agents at {per} per rank need {need} ranks, "
            f"got {world}"
        )
    return Layout(n, per)


def pick_backend(choice: str) -> str:
    """gloo or nccl: ``auto`` takes nccl when CUDA is there, LOCAL_RANK is set and every local
    rank gets its own GPU."""
    cuda = torch.cuda.is_available()
    if choice == "nccl" and not cuda:
        raise ConfigError("distributed.backend: nccl needs CUDA; none is available here")
    if choice != "auto":
        return choice
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    fits = cuda and torch.cuda.device_count() >= local_world
    return "nccl" if fits and "LOCAL_RANK" in os.environ else "gloo"


class Control:
    """The control plane on the rendezvous store: check-ins, verdicts, rows, errors.

    Store keys outlive a dead rank (the store lives in torchrun's agent or in ``run``'s
    parent process), so the survivors can always agree on who is gone.
    """

    def __init__(self, store: dist.Store, rank: int, world: int, timeout: float) -> None:
        self.store, self.rank, self.timeout = store, rank, timeout
        self.live = list(range(world))

    def agree(
        self, tag: str, value: dict, suspects: Iterable[int] = ()
    ) -> tuple[list[int], dict[int, dict]]:
        """Check in under ``tag`` with ``value``; wait for the live ranks until the timeout,
        or only until every missing rank is one of ``suspects`` (peers this rank saw fail),
        or until another rank's verdict is out; return (the agreed live ranks, their
        values). Raises :class:`Excluded` if this rank was declared gone by faster peers."""
        suspected = set(suspects)

        def key(name: object) -> str:
            return f"{tag}/{name}"

        try:
            self.store.set(key(self.rank), json.dumps(value))
            deadline, here = time.monotonic() + self.timeout, [self.rank]
            while not self.store.check([key("verdict")]):
                here = [k for k in self.live if self.store.check([key(k)])]
                missing = set(self.live) - set(here)
                if missing <= suspected or time.monotonic() > deadline:
                    break
                time.sleep(0.002)
            ranks = json.loads(self.store.compare_set(key("verdict"), "", json.dumps(here)))
            if self.rank not in ranks:
                raise Excluded(
                    f"rank {self.rank} answered after the {self.timeout:g} s timeout at {tag}; "
                    f"its peers went on without it"
                )
            return ranks, {k: json.loads(self.store.get(key(k))) for k in ranks}
        except (RuntimeError, dist.DistStoreError) as exc:
            raise PeerFailure(f"rank {self.rank} lost the rendezvous store: {exc}") from exc


class RankRunner:
    """One rank of a run: its agents, its process group, its share of every round."""

    def __init__(self, cfg: SimConfig, store: dist.Store, rank: int, world: int) -> None:
        check_faults(cfg.faults, "torchdist", get_runtime("torchdist").faults)
        d = cfg.distributed
        self.cfg, self.rank = cfg, rank
        self.setup = build_setup(cfg)
        self.layout = make_layout(self.setup.n, world, d.agents_per_rank)
        self.backend = pick_backend(d.backend)
        self.device = torch.device("cpu")
        if self.backend == "nccl":
            self.device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(self.device)
        self.timeout = timedelta(seconds=d.timeout_s)
        dist.init_process_group(
            self.backend, store=dist.PrefixStore("pg", store), rank=rank, world_size=world,
            timeout=self.timeout,
        )  # fmt: skip
        self.group: dist.ProcessGroup | None = None  # None: the default (world) group
        self.control = Control(dist.PrefixStore("ctl", store), rank, world, d.timeout_s)
        loss = make_loss(cfg.train.loss)
        self.agents = {i: self.setup.agent(i, loss) for i in self.layout.nodes_of(rank)}
        self.faults = FaultModel(cfg.faults, self.setup.n, cfg.seed)
        self.alive = np.ones(self.setup.n, dtype=bool)
        own = next(iter(self.agents.values())).tensors()
        own_bytes = sum(t.numel() * t.element_size() for t in own.values())
        self.max_data = cfg.validation.max_bytes or 2 * own_bytes
        self.max_table = 4096 + 1024 * len(own)  # JSON table + 8-byte padding per tensor
        self.calibration = self.setup.calibration()
        self.buffers: dict[tuple[str, int], torch.Tensor] = {}  # warm wire buffers, per sender

    @property
    def leader(self) -> bool:
        return self.rank == min(self.control.live)

    # -- one round -----------------------------------------------------------------------
    def round(self, r: int) -> Rows | None:
        """Run round r; the leader returns every node's rows, the other ranks None."""
        start, cfg, n = time.perf_counter(), self.cfg, self.setup.n
        active, trains = self.faults.nodes(r)
        active, trains = active & self.alive, trains & self.alive
        present = None if active.all() else np.flatnonzero(active).tolist()
        plan = self.setup.topology.round(r, active=present, total_rounds=cfg.rounds)
        for i, agent in self.agents.items():
            if trains[i]:
                agent.train()
        traffic = {i: [0, 0, 0] for i in self.agents}  # sent, received, rejected
        suspects: dict[int, str] = {}
        if self.setup.protocol.merge is not None:
            lost = self.faults.lost(r, len(plan.messages))
            suspects = self.communicate(r, plan, active, lost, traffic)
        self.settle(r, "exchanged", suspects)
        fed = self.setup.data
        rows = []
        for i, a in self.agents.items():
            rows.append(metrics_row(
                r + 1, i, active=bool(active[i]), trained=bool(trains[i]),
                local_acc=a.evaluate(a.data.test_x, a.data.test_y),
                global_acc=a.evaluate(fed.test_x, fed.test_y), bytes_sent=traffic[i][0],
                bytes_received=traffic[i][1], rejected=traffic[i][2],
            ))  # fmt: skip
        for row, dist_i in zip(rows, self.consensus(r), strict=True):
            row["consensus"], row["wall_s"] = dist_i, time.perf_counter() - start
        ranks, values = self.settle(r, "rows", {}, rows)
        if not self.leader:
            return None
        got = {row["agent"]: row for k in ranks for row in values[k]["rows"]}
        wall = time.perf_counter() - start
        return [got.get(i) or metrics_row(r + 1, i, wall_s=wall) for i in range(n)]

    def communicate(self, r: int, plan, active, lost, traffic) -> dict[int, str]:
        """Publish, exchange, receive and merge; fills ``traffic``; returns {rank: error}
        for peers whose operations failed."""
        senders = {s for s, _ in plan.messages if s in self.agents}
        payloads = {s: self.agents[s].publish(r) for s in sorted(senders)}
        for s, _ in plan.messages:
            if s in self.agents:
                traffic[s][0] += payloads[s].nbytes
        remote, suspects = self.exchange(r, plan, lost, payloads)
        inbox = deliver(plan, {**payloads, **remote}, lost)
        ctx = MergeContext(r, self.cfg, self.calibration)
        for i, agent in self.agents.items():
            if active[i]:
                self_weight = dict(plan.neighbors[i])[i]
                got = receive_and_merge(agent, inbox.get(i, []), self_weight,
                                        self.setup.protocol, ctx)  # fmt: skip
                traffic[i][1:] = [got.received, got.rejected]
        return suspects

    # -- the data plane ------------------------------------------------------------------
    def exchange(self, r: int, plan, lost, payloads: dict[int, Payload]):
        """Move payloads to other ranks: header, ack (the receiver refuses what is too big or
        malformed), body. Returns (received {sender: Payload or Refused}, failed {peer rank:
        error})."""
        rank_of, me = self.layout.rank_of, self.rank
        live = [(s, d) for (s, d), gone in zip(plan.messages, lost, strict=True) if not gone]
        out = sorted({(s, rank_of(d)) for s, d in live if s in payloads and rank_of(d) != me})
        inc = sorted({(s, rank_of(s)) for s, d in live if d in self.agents and rank_of(s) != me})
        senders = sorted({s for s, _ in out})
        packed = {s: wire.pack(payloads[s], self.buffers.get(("out", s))) for s in senders}
        self.buffers.update({("out", s): body for s, (_, body) in packed.items()})
        heads = {s: wire.empty_header() for s, _ in inc}
        failed: dict[int, str] = {}
        deadline = time.monotonic() + self.timeout.total_seconds()  # for all three steps
        sends = [(packed[s][0], k, s, True) for s, k in out]
        self.p2p(sends + [(heads[s], k, s, False) for s, k in inc], failed, deadline)
        refused, sizes = {}, {}
        for s, k in inc:
            if k not in failed:
                sizes[s] = self.admit(r, s, heads[s], refused)
        acks = {s: torch.tensor([int(sizes.get(s) is not None)]) for s, _ in inc}
        acked = {(s, k): torch.zeros(1, dtype=torch.int64) for s, k in out}
        sends = [(acks[s], k, s, True) for s, k in inc if k not in failed]
        recvs = [(acked[s, k], k, s, False) for s, k in out if k not in failed]
        self.p2p(sends + recvs, failed, deadline)
        bodies = {s: self.buffer(("in", s), n) for s, n in sizes.items() if n is not None}
        sends = [(packed[s][1], k, s, True) for s, k in out if k not in failed and acked[s, k]]
        recvs = [(bodies[s], k, s, False) for s, k in inc if s in bodies and k not in failed]
        self.p2p(sends + recvs, failed, deadline)
        received = {}
        for s, k in inc:
            if s in bodies and k not in failed:
                try:
                    received[s] = wire.unpack(heads[s], bodies[s])
                except ValidationError as exc:
                    refused[s] = Refused(wire.tensor_bytes(heads[s]), str(exc))
        return {**received, **refused}, failed

    def buffer(self, key: tuple[str, int], size: int) -> torch.Tensor:
        """A (size,) uint8 receive buffer, reused round after round. Payload tensors are views
        of it: valid until the same sender's next exchange (merges use them within the round)."""
        buf = self.buffers.get(key)
        if buf is None or buf.numel() != size:
            buf = self.buffers[key] = torch.empty(size, dtype=torch.uint8)
        return buf

    def admit(self, r: int, s: int, header: torch.Tensor, refused: dict) -> int | None:
        """Body size to receive from sender s, or None: refused before any transfer, with the
        reason :func:`~fedmerge.decentralized.payload.validate_payload` would give."""
        try:
            size = wire.body_size(header, s)
        except ValidationError as exc:
            refused[s] = Refused(0, str(exc))
            return None
        nbytes = wire.tensor_bytes(header)
        who = f"payload from agent {s} (round {int(header[3])})"
        if nbytes > self.max_data:
            refused[s] = Refused(nbytes, f"{who}: {nbytes} bytes exceeds the {self.max_data} limit")
        elif size - nbytes > self.max_table:
            refused[s] = Refused(nbytes, f"{who}: a {size - nbytes}-byte tensor table is too large")
        return None if s in refused else size

    def p2p(self, ops: list[tuple[torch.Tensor, int, int, bool]], failed: dict[int, str],
            deadline: float) -> None:  # fmt: skip
        """Run (tensor, peer rank, tag, is_send) ops as one ``batch_isend_irecv``, waiting until
        ``deadline`` (monotonic); peers whose operations fail or time out go to ``failed``."""
        if not ops:
            return
        dev = [(t.to(self.device), k, tag, send) for t, k, tag, send in ops]
        p2p = [dist.P2POp(dist.isend if send else dist.irecv, t, k, self.group, tag)
               for t, k, tag, send in dev]  # fmt: skip
        peers = [k for _, k, _, _ in ops]
        try:
            works = dist.batch_isend_irecv(p2p)
        except RuntimeError as exc:
            failed.update({k: _short(exc) for k in peers if k not in failed})
            return
        if len(works) != len(ops):  # a coalesced backend answers for the whole batch
            works, peers = works[:1] * len(ops), peers
        for work, k, (t, _, _, send), (d, *_) in zip(works, peers, ops, dev, strict=True):
            try:
                left = max(deadline - time.monotonic(), 0.001)
                work.wait(timeout=timedelta(seconds=left))
                if not send and d is not t:
                    t.copy_(d)
            except RuntimeError as exc:
                failed.setdefault(k, _short(exc))

    def consensus(self, r: int) -> list[float]:
        """‖θ_i − θ̄‖ for the hosted nodes (θ̄ over every live node; float64 all_reduce)."""
        for attempt in range(len(self.control.live) + 1):
            flats = {i: flat_state(a.state()) for i, a in self.agents.items()}
            total = torch.stack(list(flats.values())).sum(0).to(self.device)
            try:
                work = dist.all_reduce(total, group=self.group, async_op=True)
                work.wait(timeout=self.timeout)
                mean = total.cpu() / int(self.alive.sum())
                return distances(torch.stack(list(flats.values())), mean)
            except RuntimeError as exc:
                self.settle(r, f"reduce{attempt}", {-1: _short(exc)})
        raise PeerFailure(f"round {r + 1}: the consensus all_reduce kept failing")

    # -- failures ------------------------------------------------------------------------
    def settle(self, r: int, step: str, suspects: dict[int, str], rows: Rows | None = None):
        """Agree on the live ranks after ``step``; abort, or shrink the group, on a loss.
        ``suspects``: {peer rank (−1: unknown): error} seen by this rank. Returns (live
        ranks, their reports). A rank lost while regrouping means one more agreement."""
        report = {"suspects": {str(k): v for k, v in suspects.items()}, "rows": rows or []}
        for attempt in range(len(self.control.live) + 1):
            before = list(self.control.live)
            tag, seen = f"{r}/{step}/{attempt}", [k for k in suspects if k >= 0]
            ranks, values = self.control.agree(tag, report, seen)
            gone = [k for k in before if k not in ranks]
            blamed = {int(k): f"rank {q}: {why}" for q, v in values.items()
                      for k, why in v["suspects"].items()}  # fmt: skip
            if not gone and not blamed:
                return ranks, values
            self.on_failure(r, gone, blamed, ranks)
            try:
                self.group = dist.new_group(
                    ranks, timeout=self.timeout, use_local_synchronization=True
                )
                return ranks, values
            except RuntimeError as exc:
                report["suspects"] = {"-1": f"regrouping failed: {_short(exc)}"}
        raise PeerFailure(f"round {r + 1}: could not regroup the surviving ranks")

    def on_failure(self, r: int, gone: list[int], blamed: dict[int, str], ranks: list[int]):
        """Raise PeerFailure (``abort``), or log and drop the gone ranks' nodes (``continue``)."""
        named = gone or sorted(k for k in blamed if k >= 0)
        about = [blamed[k] for k in named if k in blamed] or list(blamed.values())
        details = "; ".join(sorted(set(about))) or f"no check-in within {self.control.timeout:g} s"
        who = f"{self.layout.describe(named)} stopped answering" if named else "a collective failed"
        msg = f"round {r + 1}: {who} ({details})"
        if self.cfg.distributed.on_peer_failure == "abort":
            raise PeerFailure(msg)
        log.warning("%s; continuing with ranks %s", msg, ranks)
        self.control.live = ranks
        for k in gone:
            self.alive[self.layout.nodes_of(k)] = False


def _short(exc: BaseException) -> str:
    """The gist of a backend error: no source location, no boilerplate advice."""
    text = re.sub(r"\[[^\]]*\.(?:cc|cpp|h):\d+\]\s*", "", str(exc).splitlines()[0])
    return text.split(". This is typically")[0].strip()


def connect(timeout: float) -> tuple[dist.Store, int, int]:
    """(store, rank, world) from torchrun's (or ``run``'s) environment."""
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    except (KeyError, ValueError) as exc:
        raise ConfigError(
            f"torchdist: {exc} missing or bad; launch with torchrun or fedmerge.runtimes."
            "torchdist.run(cfg, procs=N)"
        ) from exc
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(
        host, port, world, is_master=rank == 0 and not agent_store,
        timeout=timedelta(seconds=timeout), wait_for_workers=False,
    )  # fmt: skip
    elastic = (
        os.environ.get(k, "0") for k in ("TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT")
    )
    run_id = os.environ.get(PREFIX_ENV) or "/".join(elastic)
    return dist.PrefixStore(f"fedmerge/{run_id}", store), rank, world


def run_rank(cfg: SimConfig, on_round: OnRound | None = None) -> Rows | None:
    """This process's rank of a run launched by torchrun (or ``run``). The leader returns
    all rows (and calls ``on_round`` after each round); other ranks return None.
    A failure is also written to the store as ``error/<rank>`` for the launcher; the process
    group is then left to process exit (tearing it down can wait on a dead peer)."""
    store, rank, world = connect(cfg.distributed.timeout_s)
    try:
        runner = RankRunner(cfg, store, rank, world)
        for r in range(cfg.rounds):
            got = runner.round(r)
            if got is not None:
                store.set(f"result/{r}", json.dumps(got))
                if on_round:
                    on_round(got)
    except FedmergeError as exc:
        kind = {ConfigError: "config", Excluded: "excluded"}.get(type(exc), "peer")
        store.set(f"error/{rank}", json.dumps({"kind": kind, "message": str(exc)}))
        raise
    dist.destroy_process_group()
    if not runner.leader:
        return None  # the rounds led by an earlier leader are on the store too:
    return [row for r in range(cfg.rounds) for row in json.loads(store.get(f"result/{r}"))]


# -- local launcher --------------------------------------------------------------------------
def run(
    cfg: SimConfig, *, on_round: OnRound | None = None, procs: int = 0, threads: int = 0,
    details: dict[str, Any] | None = None,
) -> Rows:  # fmt: skip
    """Run ``cfg`` on ``procs`` local worker processes (0: one per agent) over loopback and
    return the simulator's rows (one per agent per round). The parent hosts the rendezvous
    store, so it hears about every rank even when some die.

    ``threads``: per worker (0: CPU cores / procs, at least 1).
    """
    check_faults(cfg.faults, "torchdist", get_runtime("torchdist").faults)
    procs = procs or (cfg.agents or build_setup(cfg).n)
    if details is not None:
        details["procs"] = procs
    threads = threads or max(1, (os.cpu_count() or 1) // procs)
    timeout = cfg.distributed.timeout_s
    server = dist.TCPStore("127.0.0.1", 0, procs, is_master=True, wait_for_workers=False,
                           timeout=timedelta(seconds=timeout))  # fmt: skip
    prefix = uuid.uuid4().hex
    store = dist.PrefixStore(f"fedmerge/{prefix}", server)
    with tempfile.TemporaryDirectory(prefix="fedmerge-torchdist-") as tmp:
        config = os.path.join(tmp, "config.yaml")
        with open(config, "w") as f:
            f.write(dump_config(cfg))
        workers = [_spawn(config, k, procs, server.port, prefix, threads) for k in range(procs)]
        try:
            return _collect(cfg, store, workers, on_round)
        finally:
            for w in workers:
                if w.poll() is None:
                    w.kill()
                w.wait()


def _spawn(config: str, rank: int, world: int, port: int, prefix: str, threads: int):
    path = [p for p in sys.path if p and os.path.isdir(p)]
    env = {
        **os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
        "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
        "TORCHELASTIC_USE_AGENT_STORE": "True", PREFIX_ENV: prefix,
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(threads)),
        "PYTHONPATH": os.pathsep.join(path),
    }  # fmt: skip
    main = "import sys; from fedmerge.runtimes.torchdist import worker_main as m; m(sys.argv[1])"
    cmd = [sys.executable, "-c", main, config]
    return subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL)


def _collect(cfg: SimConfig, store: dist.Store, workers, on_round: OnRound | None) -> Rows:
    """Rows as the leader publishes them; the first error a rank wrote if the run stops
    (every rank that aborts writes the same verdict, so the first one is enough)."""
    rows: Rows = []
    for r in range(cfg.rounds):
        while not store.check([f"result/{r}"]):
            for err in _errors(store, len(workers)):
                raise (ConfigError if err["kind"] == "config" else PeerFailure)(err["message"])
            if all(w.poll() is not None for w in workers):
                codes = [w.poll() for w in workers]
                raise PeerFailure(f"torchdist workers exited before round {r + 1} (codes {codes})")
            time.sleep(0.01)
        got = json.loads(store.get(f"result/{r}"))
        rows += got
        if on_round:
            on_round(got)
    return rows


def _errors(store: dist.Store, world: int) -> list[dict]:
    """The errors the ranks wrote, rank order; a rank that was left behind (``excluded``)
    does not stop the run."""
    keys = [f"error/{k}" for k in range(world)]
    found = [json.loads(store.get(k)) for k in keys if store.check([k])]
    return [e for e in found if e["kind"] != "excluded"]


def worker_main(config: str) -> None:
    """One worker spawned by ``run``: exit status 0, 1 (peer failure) or 2 (config error)."""
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    try:
        run_rank(load_config(config))
    except FedmergeError as exc:
        print(f"fedmerge torchdist rank {os.environ.get('RANK')}: {exc}", file=sys.stderr)
        exit_now(2 if isinstance(exc, ConfigError) else 1)


def exit_now(code: int) -> None:
    """Leave at once after a failure: a process group with a dead peer can block the normal
    interpreter shutdown (its destructor waits on the failed operations)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
