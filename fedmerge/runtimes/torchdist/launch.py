"""Launch: connect a rank to its peers (torchrun's environment), run its rounds, and the
local launcher that starts N worker processes itself (laptops, tests)."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from fedmerge.config import SimConfig, dump_config, load_config
from fedmerge.decentralized.engine import OnRound
from fedmerge.decentralized.faults import check_faults
from fedmerge.decentralized.node import NODE_FILE_ENV, node_file_for, read_node_file
from fedmerge.decentralized.setup import build_setup
from fedmerge.errors import ConfigError, FedmergeError
from fedmerge.runtimes import get_runtime
from fedmerge.runtimes.torchdist.control import Excluded, PeerFailure
from fedmerge.runtimes.torchdist.resume import run_identity
from fedmerge.runtimes.torchdist.round import RankRunner, Rows

PREFIX_ENV = "FEDMERGE_TORCHDIST_PREFIX"
LOOPBACK = "127.0.0.1"
LOOPBACK_IF = "lo" if sys.platform.startswith("linux") else "lo0"  # gloo's interface name


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


def run_rank(
    cfg: SimConfig, on_round: OnRound | None = None, node_file: str | None = None
) -> Rows | None:
    """This process's rank of a run launched by torchrun (or ``run``). The leader returns
    all rows (and calls ``on_round`` after each round); other ranks return None.
    ``node_file`` (``{rank}``/``{local_rank}`` filled in): this rank is a deployed node with
    its own sources (:mod:`~fedmerge.decentralized.node`); None: every rank builds the split.
    A failure is also written to the store as ``error/<rank>`` for the launcher; the process
    group is then left to process exit (tearing it down can wait on a dead peer)."""
    store, rank, world = connect(cfg.distributed.timeout_s)
    try:
        node = None
        if node_file:
            local = int(os.environ.get("LOCAL_RANK", rank))
            node = read_node_file(node_file_for(node_file, rank, local))
        runner = RankRunner(cfg, store, rank, world, node, run_identity(cfg))
        if runner.members.leader:  # the rounds before a resumed run's start
            for r, rows in enumerate(runner.history):
                store.set(f"result/{r}", json.dumps(rows))
        for r in range(runner.start, cfg.rounds):
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
    if not runner.members.leader:
        return None  # the rounds led by an earlier leader are on the store too:
    return [row for r in range(cfg.rounds) for row in json.loads(store.get(f"result/{r}"))]


def run(
    cfg: SimConfig, *, on_round: OnRound | None = None, procs: int = 0, threads: int = 0,
    details: dict[str, Any] | None = None, node_file: str | None = None,
) -> Rows:  # fmt: skip
    """Run ``cfg`` on ``procs`` local worker processes (0: one per agent) over loopback and
    return the simulator's rows (one per agent per round). The parent hosts the rendezvous
    store, so it hears about every rank even when some die.

    ``threads``: per worker (0: CPU cores / procs, at least 1). ``node_file``: a template
    (``nodes/node-{rank}/node.yaml``) giving each worker its own node file (see ``run_rank``).
    """
    check_faults(cfg.faults, "torchdist", get_runtime("torchdist").faults)
    procs = procs or (cfg.agents or build_setup(cfg).n)
    if details is not None:
        details["procs"] = procs
    threads = threads or max(1, (os.cpu_count() or 1) // procs)
    timeout = cfg.distributed.timeout_s
    server = loopback_store(procs, timeout)
    prefix = uuid.uuid4().hex
    store = dist.PrefixStore(f"fedmerge/{prefix}", server)
    with tempfile.TemporaryDirectory(prefix="fedmerge-torchdist-") as tmp:
        config = os.path.join(tmp, "config.yaml")
        with open(config, "w") as f:
            f.write(dump_config(cfg))
        workers = [_spawn(config, k, procs, server.port, prefix, threads, node_file)
                   for k in range(procs)]  # fmt: skip
        try:
            return _collect(cfg, store, workers, on_round)
        finally:
            for w in workers:
                if w.poll() is None:
                    w.kill()
                w.wait()


def loopback_store(world: int, timeout: float) -> dist.TCPStore:
    """The rendezvous store of a local run, listening on 127.0.0.1 only. torch's own server
    binds every interface, whatever host it is given, so the listening socket is made here
    and handed over (``master_listen_fd``); the store owns it from then on."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((LOOPBACK, 0))
        sock.listen(128)
        port = sock.getsockname()[1]
    except OSError:
        sock.close()
        raise
    return dist.TCPStore(
        LOOPBACK, port, world, is_master=True, wait_for_workers=False,
        timeout=timedelta(seconds=timeout), master_listen_fd=sock.detach(),
    )  # fmt: skip


def worker_env(rank: int, world: int, port: int, prefix: str, threads: int,
               node_file: str | None) -> dict[str, str]:  # fmt: skip
    """The environment of local worker ``rank``: torchrun's variables with the store at
    127.0.0.1:``port`` and gloo on the loopback interface (nothing listens elsewhere)."""
    path = [p for p in sys.path if p and os.path.isdir(p)]
    return {
        **({NODE_FILE_ENV: node_file} if node_file else {}),
        **os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
        "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": LOOPBACK, "MASTER_PORT": str(port),
        "GLOO_SOCKET_IFNAME": LOOPBACK_IF, "TORCHELASTIC_USE_AGENT_STORE": "True",
        PREFIX_ENV: prefix, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(threads)),
        "PYTHONPATH": os.pathsep.join(path),
    }  # fmt: skip


def _spawn(config: str, rank: int, world: int, port: int, prefix: str, threads: int,
           node_file: str | None):  # fmt: skip
    env = worker_env(rank, world, port, prefix, threads, node_file)
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
    """One worker spawned by ``run`` (its node file, if any, from ``FEDMERGE_NODE_FILE``):
    exit status 0, 1 (peer failure) or 2 (config error)."""
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    try:
        run_rank(load_config(config), node_file=os.environ.get(NODE_FILE_ENV))
    except FedmergeError as exc:
        print(f"fedmerge torchdist rank {os.environ.get('RANK')}: {exc}", file=sys.stderr)
        exit_now(2 if isinstance(exc, ConfigError) else 1)


def exit_now(code: int) -> None:
    """Leave at once after a failure: a process group with a dead peer can block the normal
    interpreter shutdown (its destructor waits on the failed operations)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
