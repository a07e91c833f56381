"""Flower nodes with their own files, deployed for real: ``flower-superlink`` and three
``flower-supernode --isolation process`` on loopback, each beside its long-lived agent worker
and started with ``--node-config "node-file=..."`` (its own data, starting checkpoint, eval
set and state directory). The rounds equal the in-process simulator's over the same split,
and every ``open`` of every node process is audited (the torch.distributed test's hook).
A node killed with SIGKILL mid-run and restarted with the same node config rejoins from its
saved state and the run finishes. Slow: real processes (round times printed, not asserted).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from fedmerge.checkpoint import open_checkpoint, read_metadata
from fedmerge.config import default_config
from fedmerge.decentralized.nodedirs import export_split
from fedmerge.runtimes.flower.loopback import SOURCE, Loopback
from tests.test_deploy_nodes import AUDIT
from tests.test_torchdist import assert_same_rows, simulate_one_thread

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
# model.init: different, so that every node starts from another checkpoint
RING3 = ["topology=ring", "agents=3", "vectorize=never", "train.steps=3", "protocol.name=gossip",
         "model.init=different"]  # fmt: skip


def start_nodes(dep: Loopback, nodes: Path, audit: Path | None = None) -> None:
    for i in range(3):
        env = {"OMP_NUM_THREADS": "1"}
        if audit is not None:  # the hook logs each process's opened paths to opened-<RANK>
            env |= {"PYTHONPATH": f"{audit / 'hook'}{os.pathsep}{SOURCE}", "RANK": str(i),
                    "FEDMERGE_TEST_AUDIT": str(audit / "opened")}  # fmt: skip
        dep.add_node(f"node-{i}", f"node-file='{nodes / f'node-{i}' / 'node.yaml'}'", env=env)


def rows_of(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_flower_nodes_open_only_their_own_files_and_match_simulator(tmp_path):
    sets = [*RING3, "rounds=2"]
    cfg = default_config(sets)
    nodes = tmp_path / "nodes"
    export_split(cfg, nodes)
    audit = tmp_path / "audit"
    (audit / "hook").mkdir(parents=True)
    (audit / "opened").mkdir()
    (audit / "hook" / "sitecustomize.py").write_text(AUDIT)
    out = tmp_path / "out"
    with Loopback(tmp_path / "dep") as dep:
        dep.start()
        start_nodes(dep, nodes, audit)
        start = time.perf_counter()
        done = dep.run(SOURCE, f"overrides='{' '.join(sets)}' out-dir='{out}' timeout=120", 120)
        assert done.wait(timeout=480) == 0 and (out / "metrics.jsonl").exists(), dep.tails()
    rows = rows_of(out)
    assert_same_rows(rows, simulate_one_thread(cfg))
    assert all(r["global_acc"] is not None and r["bytes_received"] > 0 for r in rows)
    for k in range(3):
        opened = {Path(p) for p in (audit / "opened" / f"opened-{k}").read_text().splitlines()}
        touched = {p.relative_to(nodes).parts[0] for p in opened if p.is_relative_to(nodes)}
        assert touched == {f"node-{k}"}, (k, touched)
        own = {p.name for p in opened if p.is_relative_to(nodes)}
        assert {"node.yaml", "data.safetensors", "start.safetensors", "eval.safetensors"} <= own
        (state,) = (nodes / f"node-{k}" / "state").glob("run-*/agent-*.safetensors")
        assert state.name == f"agent-{k:04d}.safetensors" and read_metadata(state)["round"] == "2"
    print(f"\nFlower nodes with own files: {time.perf_counter() - start:.1f} s from `flwr run` "
          f"to report; {[round(r['wall_s'], 2) for r in rows[::3]]} s per round")  # fmt: skip


def test_a_node_killed_mid_run_rejoins_from_its_saved_state(tmp_path):
    """SIGKILL node 1's SuperNode and worker after its step 2, restart both with the same
    node config: the relay skips it for the step it missed, maps its new Flower node id, and
    it goes on from its state file; the run finishes and every state file is whole."""
    sets, rounds = [*RING3, "rounds=5"], 5
    nodes, out = tmp_path / "nodes", tmp_path / "out"
    export_split(default_config(sets), nodes)
    state = nodes / "node-1" / "state"
    with Loopback(tmp_path / "dep") as dep:
        dep.start()
        start_nodes(dep, nodes)
        # 30 s a step: node 1 must be back (SuperNode, worker, imports) within the 3 steps
        # left, up to 90 s on a loaded 2-core machine
        run = dep.run(SOURCE, f"overrides='{' '.join(sets)}' out-dir='{out}' timeout=30", 20)
        deadline = time.monotonic() + 300
        while not saved_round(state) >= 2 and time.monotonic() < deadline and run.poll() is None:
            time.sleep(0.1)
        assert saved_round(state) == 2, dep.tails()
        dep.kill_node("node-1")
        killed_at = time.perf_counter()
        config = f"node-file='{nodes / 'node-1' / 'node.yaml'}'"
        dep.add_node("node-1", config, env={"OMP_NUM_THREADS": "1"})
        assert run.wait(timeout=420) == 0 and (out / "metrics.jsonl").exists(), dep.tails()
        log = dep.tail("run", 100_000)
    assert "topology node 1 rejoined as Flower node" in log
    rows = rows_of(out)
    assert [(r["round"], r["agent"]) for r in rows] == [
        (r, a) for r in range(1, rounds + 1) for a in range(3)
    ]
    node1 = [r for r in rows if r["agent"] == 1]
    assert node1[0]["active"] and not all(r["active"] for r in node1)  # it missed a round
    assert node1[-1]["active"] and node1[-1]["global_acc"] is not None  # and came back
    # the survivors are evaluated in every round: node 1's half-uploaded reply no longer holds
    # the relay past the step deadline (it once did, for Flower's 180 s push session)
    assert all(r["global_acc"] is not None for r in rows if r["agent"] != 1)
    for k in range(3):
        (path,) = (nodes / f"node-{k}" / "state").glob("run-*/agent-*.safetensors")
        with open_checkpoint(path) as ck:  # parses and checks every tensor
            assert ck.load() and ck.metadata["round"] == str(rounds)
    print(f"\nkilled node 1 after its step 2; the run finished "
          f"{time.perf_counter() - killed_at:.1f} s later")  # fmt: skip


def saved_round(state: Path) -> int:
    """The round in node 1's state file (-1: none yet)."""
    files = list(state.glob("run-*/agent-*.safetensors"))
    if not files:
        return -1
    try:
        return int(read_metadata(files[0])["round"])
    except Exception:  # noqa: BLE001 - being replaced right now: look again
        return -1
