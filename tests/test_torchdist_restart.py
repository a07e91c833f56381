"""Restart and resume of deployed torch.distributed nodes (real processes, gloo on loopback).

A node is SIGKILLed mid-run (mid-write of its state file, or mid-training); what is on disk
right after is checked (every complete saved round loads, the interrupted one is ignored);
the run is started again (by hand, or by ``torchrun --max-restarts``), every rank resumes
at the newest round all of them saved, and the run's rows equal those of an uninterrupted
in-process run, to 1e-6. The kill comes from ``tests.torchdist_faults:sigkill_cross_entropy``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from fedmerge.config import load_config
from fedmerge.decentralized.agent import make_loss
from fedmerge.decentralized.node import read_node_file
from fedmerge.decentralized.nodedirs import export_split
from fedmerge.decentralized.setup import build_setup
from fedmerge.errors import CheckpointError
from fedmerge.runtimes import torchdist
from fedmerge.runtimes.torchdist.resume import Generations, agree_round, run_identity
from tests.test_torchdist import ROOT, assert_same_rows, simulate_one_thread

KILLING_LOSS = "train.loss=tests.torchdist_faults:sigkill_cross_entropy"
RING3 = ["topology={graph: ring, n: 3}", "rounds=5", "vectorize=never", "train.steps=3",
         "protocol.name=gossip", KILLING_LOSS]  # fmt: skip


def arm_kill(monkeypatch, tmp: Path, rank: int, step: int, in_save: bool) -> Path:
    """Make rank ``rank`` SIGKILL itself once at training step ``step`` (3 steps a round)
    or in the save after it; returns the marker file it writes first."""
    mark = tmp / "killed.json"
    monkeypatch.setenv("FEDMERGE_TRUSTED_MODULES", "tests")
    monkeypatch.setenv("FEDMERGE_TEST_KILL_MARK", str(mark))
    monkeypatch.setenv("FEDMERGE_TEST_KILL_RANK", str(rank))
    monkeypatch.setenv("FEDMERGE_TEST_KILL_STEP", str(step))
    monkeypatch.setenv("FEDMERGE_TEST_KILL_IN_SAVE", "1" if in_save else "0")
    return mark


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def saved(cfg, nodes: Path, k: int) -> Generations:
    """Node k's saved rounds of the run: this config, saved outside torchrun (no run id)
    or by torchrun (whatever run id its marks name, with this config's digest)."""
    state = nodes / f"node-{k}" / "state"
    runs = {json.loads(m.read_text())["run"] for m in state.glob("round-*/round.json")}
    digest = run_identity(cfg).split("/")[1]
    assert all(r.endswith("/" + digest) for r in runs) and len(runs) <= 1, runs
    return Generations(state, runs.pop() if runs else run_identity(cfg))


def check_saved_rounds_load(cfg, nodes: Path, k: int) -> list[int]:
    """Node k's complete saved rounds (newest first), each restored into a fresh agent."""
    gens, node = saved(cfg, nodes, k), read_node_file(nodes / f"node-{k}" / "node.yaml")
    held = gens.held()
    for r in held:
        agent = build_setup(cfg, node).agent(k, make_loss(cfg.train.loss))
        rows = gens.restore({k: agent}, r)
        assert [row["round"] for row in rows] == list(range(1, r + 1))
    return held


def assert_clean(cfg, nodes: Path) -> None:
    """After the run: every node holds the last two rounds, and no temp file is left."""
    for k in range(3):
        assert check_saved_rounds_load(cfg, nodes, k) == [cfg.rounds, cfg.rounds - 1]
    assert not [p for p in nodes.rglob("*") if p.name.endswith(".tmp")]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_node_killed_mid_write_resumes_and_matches_an_uninterrupted_run(tmp_path, monkeypatch):
    """Rank 1 dies while writing its round-3 state (``abort``: the others stop too); on
    disk its round-3 generation is a lone temp file; started again, all resume after
    round 2 and finish with the uninterrupted run's numbers."""
    cfg = load_config(None, [*RING3, "distributed.timeout_s=30"])
    nodes = tmp_path / "nodes"
    export_split(cfg, nodes)
    mark = arm_kill(monkeypatch, tmp_path, rank=1, step=7, in_save=True)
    template = str(nodes / "node-{rank}" / "node.yaml")
    with pytest.raises(torchdist.PeerFailure, match=r"round 3: rank 1 \(node 1\) stopped"):
        torchdist.run(cfg, procs=3, threads=1, node_file=template)
    temp = Path(json.loads(mark.read_text())["temp"])
    assert temp.exists() and temp.parent == saved(cfg, nodes, 1).dir(3)
    assert not (temp.parent / "round.json").exists()
    assert check_saved_rounds_load(cfg, nodes, 1) == [2, 1]
    for k in (0, 2):  # they stopped in round 3, before or after saving it
        assert check_saved_rounds_load(cfg, nodes, k) in ([2, 1], [3, 2])
    rows = torchdist.run(cfg, procs=3, threads=1, node_file=template)
    assert_same_rows(rows, simulate_one_thread(cfg))
    assert_clean(cfg, nodes)


def torchrun(config: Path, nodes: Path, out: Path, hosts: int) -> list[subprocess.Popen]:
    """``torchrun --max-restarts 1`` of 3 ranks: one agent with 3 workers (one host), or
    3 agents with 1 worker each (three hosts: static rendezvous, ``--node-rank``)."""
    per_host = 3 // hosts
    base = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(per_host),
            "--max-restarts", "1"]  # fmt: skip
    if hosts > 1:
        base += ["--nnodes", str(hosts), "--master-addr", "127.0.0.1",
                 "--master-port", str(free_port())]  # fmt: skip
    agent = ["-m", "clients.torchdist_agent", str(config), "--out", str(out),
             "--node-file", str(nodes / "node-{rank}" / "node.yaml")]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    ranks = [["--node-rank", str(k)] if hosts > 1 else [] for k in range(hosts)]
    return [subprocess.Popen([*base, *rank, *agent], cwd=ROOT, env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            for rank in ranks]  # fmt: skip


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize(("hosts", "policy"), [(1, "continue"), (3, "abort")],
                         ids=["one-host-continue", "three-hosts-abort"])  # fmt: skip
def test_torchrun_restarts_a_killed_node_and_the_run_completes(tmp_path, monkeypatch, hosts,
                                                               policy):  # fmt: skip
    """``torchrun --max-restarts 1``: rank 1 is SIGKILLed in round 4's training. One host:
    torchrun stops the other ranks and starts all three again (with ``continue`` the
    survivors may first go on without rank 1). Three hosts (one torchrun each): the others
    lose rank 1 (``abort``) and each torchrun restarts its rank. All resume after round 3,
    the newest round every rank saved, and the report equals the uninterrupted run's."""
    config = tmp_path / "run.yaml"
    config.write_text(
        "topology: {graph: ring, n: 3}\nrounds: 5\nvectorize: never\ntrain: {steps: 3, "
        "loss: 'tests.torchdist_faults:sigkill_cross_entropy'}\nprotocol: {name: gossip}\n"
        f"distributed: {{timeout_s: 60, on_peer_failure: {policy}}}\n"
    )
    mark = arm_kill(monkeypatch, tmp_path, rank=1, step=10, in_save=False)
    cfg = load_config(config, ["runtime=torchdist"])
    export_split(cfg, tmp_path / "nodes")
    procs = torchrun(config, tmp_path / "nodes", tmp_path / "o", hosts)
    outs = [p.communicate(timeout=380) for p in procs]
    errors = "".join(err for _, err in outs)
    assert [p.returncode for p in procs] == [0] * hosts, errors[-3000:]
    assert mark.exists() and errors.count("resumed after round 3") == 3, errors[-3000:]
    lines = (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()
    assert_same_rows([json.loads(x) for x in lines], simulate_one_thread(cfg))
    assert_clean(cfg, tmp_path / "nodes")


# -- the saved rounds and the agreement, in process ------------------------------------------
def agents_of(cfg, ids=(0, 1)) -> dict:
    setup = build_setup(cfg)
    return {i: setup.agent(i, make_loss(cfg.train.loss)) for i in ids}


def test_generations_keep_two_newest_and_newest_full_and_ignore_the_rest(tmp_path):
    cfg = load_config(None, RING3[:-1])
    agents, gens = agents_of(cfg), Generations(tmp_path, "run-a")
    for r, full in [(1, True), (2, True), (3, False), (4, False)]:
        gens.save(agents, r, [{"round": r}], full)
    assert gens.held() == [4, 3, 2]  # 2: the last round saved with every rank alive
    gens.save(agents, 5, [], False)
    assert gens.held() == [5, 4, 2]
    gens.save(agents, 3, [], True)  # resumed after round 2: 3 … 5 are done again
    assert gens.held() == [3, 2] and sorted(p.name for p in tmp_path.iterdir()) == [
        "round-000002", "round-000003"]  # fmt: skip
    (gens.dir(3) / "round.json").unlink()  # killed before the mark: round 3 is not held
    assert gens.held() == [2] and Generations(tmp_path, "run-b").held() == []
    (gens.dir(2) / "round.json").write_text("{not json")
    assert gens.held() == []


def test_generations_restore_the_saved_agents_and_rows(tmp_path):
    cfg = load_config(None, RING3[:-1])
    agents, gens = agents_of(cfg), Generations(tmp_path, "run")
    for a in agents.values():
        a.train()
        a.last_round = {2: 1}
    gens.save(agents, 1, [{"round": 1, "agent": 0}], True)
    fresh = agents_of(cfg)
    assert gens.restore(fresh, 1) == [{"round": 1, "agent": 0}]
    for i, a in agents.items():
        assert all(torch.equal(v, fresh[i].state()[k]) for k, v in a.state().items())
        assert fresh[i].last_round == {2: 1}
        assert torch.equal(fresh[i].generator.get_state(), a.generator.get_state())
    with pytest.raises(CheckpointError, match="no complete saved round 2"):
        gens.restore(fresh, 2)
    other = agents_of(cfg, ids=(2,))
    with pytest.raises(CheckpointError, match="round-000001: agent 2: no state file"):
        Generations(tmp_path, "run").restore(other, 1)


@pytest.mark.parametrize(
    ("held", "want"),
    [([[4, 3], [4, 3], [3, 2]], 3), ([[5, 4, 2], [2, 1], [5, 4, 2]], 2),
     ([[3, 2], [], [3, 2]], 0), ([[6, 5], [2, 1], [6, 5]], 0)],
)  # fmt: skip
def test_agree_round_is_the_newest_round_every_rank_holds(held, want, caplog):
    store = dist.HashStore()
    for k in (1, 2):
        store.set(f"resume/{k}", json.dumps(held[k]))
    assert agree_round(store, 0, 3, held[0]) == want
    far = max((max(h) for h in held if h), default=0) > want + 1
    assert ("the newest every rank holds" in caplog.text) == far


def test_run_identity_is_the_config_and_the_torchrun_run_id(monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    a, b = load_config(None, RING3[:-1]), load_config(None, [*RING3[:-1], "seed=1"])
    assert run_identity(a) == run_identity(load_config(None, RING3[:-1])) != run_identity(b)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-7")
    assert run_identity(a).startswith("job-7/")


def test_agree_round_names_the_timeout_when_a_rank_never_starts():
    store = dist.HashStore()
    store.set_timeout(timedelta(milliseconds=50))
    store.set("resume/1", "[]")
    with pytest.raises(
        torchdist.PeerFailure, match="rank 0: not every rank .* to agree on where to resume"
    ):
        agree_round(store, 0, 3, [2, 1])
