"""Byzantine nodes, duplicated / reordered / replayed messages, persistence and rejoin,
and a kill -9 loop on a persisting node."""

import dataclasses
import os
import random
import subprocess
import sys
from pathlib import Path

import networkx as nx
import pytest
import torch

from fedmerge.checkpoint import open_checkpoint
from fedmerge.config import ByzantineConfig, default_config, load_config
from fedmerge.decentralized.adversary import Adversary, attack, byzantine_nodes, freshest
from fedmerge.decentralized.delivery import Delivery
from fedmerge.decentralized.payload import Payload
from fedmerge.decentralized.persist import restore_agent, save_agent, state_file
from fedmerge.errors import CheckpointError, ConfigError
from fedmerge.runtimes.local.simulator import Simulator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from kill_loop_child import make_node, run  # noqa: E402

BASE = ["rounds=4", "topology=ring-8", "model.options.hidden=[16]",
        "data.partition=iid", "vectorize=never"]  # fmt: skip


def test_placement():
    star = nx.star_graph(5)  # node 0 is the hub
    assert byzantine_nodes(ByzantineConfig(count=1, placement="hubs"), star, 0) == {0}
    listed = ByzantineConfig(placement="list", nodes=[2, 4])
    assert byzantine_nodes(listed, star, 0) == {2, 4}
    rnd = [byzantine_nodes(ByzantineConfig(count=3), star, s) for s in (0, 0, 1)]
    assert rnd[0] == rnd[1] and len(rnd[0]) == 3 and all(0 <= i < 6 for i in rnd[2])
    for bad, field in [
        (ByzantineConfig(count=7), "count"),
        (ByzantineConfig(placement="list", nodes=[9]), "nodes"),
        (ByzantineConfig(placement="list", nodes=[1], count=2), "count"),
    ]:
        with pytest.raises(ConfigError, match=f"faults.byzantine.{field}"):
            byzantine_nodes(bad, star, 0)


def test_attacks():
    x = {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([[4.0]])}
    g = torch.Generator().manual_seed(0)
    flip = attack(x, ByzantineConfig(attack="sign_flip", scale=2.0), g)
    assert flip["a"].tolist() == [-6.0, 0.0] and flip["b"].item() == -8.0
    const = attack(x, ByzantineConfig(attack="constant", scale=0.5), g)
    assert const["a"].tolist() == [0.5, 0.5] and const["b"].shape == (1, 1)
    noisy = attack(x, ByzantineConfig(attack="noise", scale=3.0), g)
    diff = torch.cat([(noisy[k] - x[k]).reshape(-1) for k in x])
    assert diff.norm().item() == pytest.approx(3.0 * 5.0, rel=1e-5)  # ‖x‖ = 5


def pl(sender, round, value=0.0):
    return Payload.make({"w": torch.tensor([value])}, sender=sender, round=round, samples=1,
                        kind="delta")  # fmt: skip


def test_freshest_keeps_newest_per_sender_and_refuses_replays():
    a1, a1b, a2, b3 = pl(1, 1), pl(1, 1), pl(1, 2), pl(2, 3)
    kept, why = freshest([(a1, 0.1), (a2, 0.2), (a1b, 0.1), (b3, 0.3)], {})
    assert [(p.sender, p.round, w) for p, w in kept] == [(1, 2, 0.2), (2, 3, 0.3)]
    assert len(why) == 2 and all("stale: round 2 also arrived" in r for r in why)
    kept, why = freshest([(a2, 0.2), (a2, 0.2)], {})
    assert len(kept) == 1 and why == ["payload from agent 1 (round 2): duplicate"]
    kept, why = freshest([(a1, 0.1), (b3, 0.3)], {1: 1, 2: 2})
    assert kept == [(b3, 0.3)] and "replayed, round 1 already accepted" in why[0]


def test_disturb_duplicates_and_delays():
    cfg = load_config(None, ["faults.duplicate=0.5"])
    cfg.faults = dataclasses.replace(cfg.faults, duplicate=1.0)  # every message twice
    adv = Adversary(cfg, nx.path_graph(3))
    inbox = {0: [Delivery(1, 0.5, pl(1, 0))], 2: [Delivery(1, 0.5, pl(1, 0))]}
    out = adv.disturb(inbox, 0)
    assert [len(out[d]) for d in (0, 2)] == [2, 2]
    cfg.faults = dataclasses.replace(cfg.faults, duplicate=0.0, reorder=1.0)  # all held back
    adv = Adversary(cfg, nx.path_graph(3))
    assert sum(map(len, adv.disturb(inbox, 0).values())) == 0
    fresh = {0: [Delivery(1, 0.5, pl(1, 1))]}
    adv.faults = dataclasses.replace(cfg.faults, reorder=0.0)
    late = adv.disturb(fresh, 1)  # round 1's message first, then round 0's delayed ones
    assert [d.payload.round for d in late[0]] == [1, 0]
    assert [d.payload.round for d in late[2]] == [0]


def final_honest(rows, rounds):
    return [r for r in rows if r["round"] == rounds and not r["byzantine"]]


def test_duplicates_are_harmless_and_counted():
    clean = Simulator(default_config([*BASE, "rounds=3"])).run()
    dup = Simulator(default_config([*BASE, "rounds=3", "faults.duplicate=0.5"])).run()
    assert sum(r["rejected"] for r in dup) > 0 and sum(r["rejected"] for r in clean) == 0
    for a, b in zip(clean, dup, strict=True):
        assert (a["global_acc"], a["consensus"]) == (b["global_acc"], b["consensus"])


def test_reordered_messages_arrive_late_and_stale_ones_are_dropped():
    rows = Simulator(default_config([*BASE, "faults.reorder=0.5", "rounds=6"])).run()
    assert sum(r["rejected"] for r in rows) > 0  # a late payload met its sender's newer one
    assert all(0 <= r["global_acc"] <= 1 for r in rows)


def test_byzantine_rows_and_robust_rule_beats_mean():
    byz = ["faults.byzantine.count=1", "faults.byzantine.placement=list",
           "faults.byzantine.nodes=[0]", "faults.byzantine.scale=4", "rounds=8"]  # fmt: skip
    runs = {}
    for agg in ("mean", "median", "clip"):
        sim = Simulator(default_config([*BASE, *byz, f"protocol.aggregation={agg}"]))
        rows = sim.run()
        assert sim.byzantine == {0} and [r["byzantine"] for r in rows[:8]] == [True] + [False] * 7
        honest = final_honest(rows, 8)
        runs[agg] = sum(r["global_acc"] for r in honest) / len(honest)
    assert min(runs["median"], runs["clip"]) > runs["mean"] + 0.1  # measured: .53, .52 vs .32


def test_a_silent_byzantine_node_sends_nothing():
    """``silent``: the reference of docs/robustness.md; the node's payloads are never
    delivered (nothing to reject), it still receives and merges its neighbours'."""
    silent = ["faults.byzantine.attack=silent", "faults.byzantine.placement=list",
              "faults.byzantine.nodes=[0]", "rounds=3"]  # fmt: skip
    sim = Simulator(default_config([*BASE, *silent]))
    rows = sim.run()
    by = {(r["round"], r["agent"]): r for r in rows}
    for r in (1, 2, 3):
        assert by[r, 0]["bytes_sent"] == 0 and by[r, 0]["bytes_received"] == by[r, 4]["bytes_sent"]
        for j in (1, 7):  # node 0's neighbours hear only their other neighbour
            assert by[r, j]["bytes_received"] == by[r, 4]["bytes_received"] // 2 > 0
    assert sum(r["rejected"] for r in rows) == 0 and by[3, 0]["byzantine"]


def test_persistence_and_rejoin(tmp_path):
    crash = [*BASE, "faults.crash=0.3", "rounds=6"]
    memory = Simulator(default_config(crash)).run()
    (tmp_path / "agent-0000.safetensors").write_bytes(b"from an earlier run: never read")
    persisted = Simulator(
        default_config([*crash, "faults.rejoin=persisted", f"faults.state_dir={tmp_path}"])
    ).run()
    initial = Simulator(default_config([*crash, "faults.rejoin=initial"])).run()
    assert not all(r["active"] for r in memory)  # some node did crash
    # saved every round, a crashed node's file is exactly what it had: nothing is lost
    assert [r["global_acc"] for r in memory] == [r["global_acc"] for r in persisted]
    assert [r["consensus"] for r in memory] != [r["consensus"] for r in initial]
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == [f"agent-{i:04d}.safetensors" for i in range(8)]
    with open_checkpoint(tmp_path / files[0]) as ck:
        assert int(ck.metadata["round"]) <= 6 and "__rng__" in ck
    with pytest.raises(ConfigError, match="faults.rejoin"):
        Simulator(default_config([*BASE, "faults.rejoin=persisted"]))


def test_restore_refuses_a_foreign_file(tmp_path):
    node = make_node()
    node.last_round = {2: 3, 5: 1}  # per-sender freshness travels with the state
    save_agent(node, tmp_path, 3)
    node.last_round = {}
    assert restore_agent(node, tmp_path) == 3 and node.last_round == {2: 3, 5: 1}
    os.replace(state_file(tmp_path, 0), state_file(tmp_path, 1))
    node1 = make_node()
    node1.id = 1
    with pytest.raises(CheckpointError, match="not agent 1's state file"):
        restore_agent(node1, tmp_path)


@pytest.mark.slow
def test_kill_9_loop_resumes_with_no_lost_round(tmp_path):
    """Kill the node with SIGKILL at random moments (mid-training or mid-write) and restart
    it until it finishes; it must end exactly where an uninterrupted run ends."""
    rounds, rng = 30, random.Random(0)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "tests" / "kill_loop_child.py"), str(tmp_path), str(rounds)]
    kills, saved = 0, 0  # saved: the last round a child reported as saved
    for _ in range(10):
        child = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
        budget = rng.randrange(1, 5) if kills < 3 else None  # rounds to let it finish
        for line in child.stdout:
            what, k = line.split()
            if what == "start":
                assert int(k) >= saved, f"resumed after round {k}, but {saved} was saved"
                continue
            saved = int(k)
            if budget is not None and (budget := budget - 1) == 0:
                child.kill()
                kills += 1
                break
        child.wait()
        child.stdout.close()
        if child.returncode == 0:
            break
    assert kills == 3 and child.returncode == 0 and saved == rounds
    resumed = make_node()
    assert restore_agent(resumed, tmp_path) == rounds
    straight = run(None, rounds)
    for k, v in straight.state().items():
        assert torch.equal(resumed.state()[k], v), k


def test_default_config_still_vectorized():
    assert Simulator(default_config(["rounds=1"])).path == "vectorized"
