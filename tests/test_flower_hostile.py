"""A hostile peer through the Flower relay, with real Flower processes (issue 19, defects 2–4).

Flower's simulation engine (Ray: the ClientApps run in separate worker processes, the
ServerApp relays) runs gossip on ring-4 where node 1 is hostile
(``tests/flower_faults.py``): in round 1 it sends a valid payload claiming to be node 3 at
round 2, in round 2 it replays its round-0 payload byte for byte, and at step 3 its reply
carries a flat state of the wrong length; in the other rounds it is honest. The run must
finish, every payload node 1's neighbours (0 and 2) drop must be node 1's and be named as
coming from it, node 3's genuine payloads must never be dropped, and node 1's later
honest payloads must be accepted again (an attacker is not banned by a forgery, and
neither is the node it impersonates).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest.importorskip("flwr")
pytest.importorskip("ray")

ROOT = Path(__file__).resolve().parents[1]
SETS = ["topology=ring-4", "data.partition=iid", "rounds=5", "model.options.hidden=[16]",
        "train.steps=2", "vectorize=never",
        "train.loss=tests.flower_faults:hostile_cross_entropy"]  # fmt: skip


@pytest.fixture
def hostile_env(monkeypatch, tmp_path):
    """Environment the Ray workers inherit: node 1 hostile, the fault module trusted and
    importable, a folder for the receivers' rejection logs."""
    logs = tmp_path / "logs"
    logs.mkdir()
    monkeypatch.setenv("FEDMERGE_TRUSTED_MODULES", "tests.flower_faults")
    monkeypatch.setenv("FEDMERGE_TEST_EVIL_NODE", "1")
    monkeypatch.setenv("FEDMERGE_TEST_LOG_DIR", str(logs))
    path = os.environ.get("PYTHONPATH", "")
    monkeypatch.setenv("PYTHONPATH", f"{ROOT}{os.pathsep}{path}" if path else str(ROOT))
    return logs


@pytest.mark.slow
def test_hostile_flower_peer_is_named_counted_and_harmless(hostile_env, tmp_path, caplog):
    from fedmerge.config import load_config
    from fedmerge.runtimes import flower
    from fedmerge.runtimes.local.simulator import Simulator

    cfg = load_config(None, SETS)
    with caplog.at_level("WARNING", logger="flwr"):
        rows = flower.run(cfg, timeout=120, state_dir=str(tmp_path / "state"))
    assert len(rows) == 4 * 5  # the run finished: every node, every round
    by = {(r["round"], r["agent"]): r for r in rows}
    # Row round r+1 reports the merge of round r's payloads. Node 1's neighbours are 0 and
    # 2: they drop its forged round-1 payload and its round-2 replay, nothing else; node 3
    # (impersonated) and node 1 itself drop nothing.
    for node in (0, 2):
        assert [by[r, node]["rejected"] for r in range(1, 6)] == [0, 1, 1, 0, 0], node
    assert all(by[r, n]["rejected"] == 0 for r in range(1, 6) for n in (1, 3))
    # The malformed reply at step 3 (round 2's evaluation, round 3's payload): node 1 is
    # skipped for that step, named in the relay's log; its round-3 payload is never sent,
    # so in round 3 node 0 hears node 3 only, node 3 both of its (honest) neighbours.
    assert by[3, 1]["global_acc"] is None and not by[4, 1]["active"]
    assert by[4, 1]["bytes_received"] == 0
    assert by[4, 0]["bytes_received"] == by[4, 3]["bytes_received"] // 2 > 0
    assert "node 1 failed: flat state of shape (3,)" in caplog.text
    # Node 1 is honest again from round 4: its neighbours take its payload (nothing dropped
    # in row 5). The honest nodes learn as in a clean in-process run (chance: 0.1).
    clean = Simulator(load_config(None, SETS[:-1])).run()[-4:]
    for n in (0, 2, 3):
        assert by[5, n]["global_acc"] == pytest.approx(clean[n]["global_acc"], abs=0.1), n
    dropped = "".join(p.read_text() for p in hostile_env.glob("rejected-*.log")).splitlines()
    assert len(dropped) == 4, dropped
    forged = [
        d for d in dropped if "payload from agent 1 (round 2): its header names sender 3" in d
    ]
    replayed = [d for d in dropped if "payload from agent 1 (round 0): replayed" in d]
    assert len(forged) == 2 and len(replayed) == 2, dropped
    assert {d.split(" dropped")[0] for d in dropped} == {"agent 0", "agent 2"}


def test_screened_clip_runs_on_the_flower_relay_as_in_the_simulator(tmp_path, monkeypatch):
    """The rules reach every runtime through the round kit: the screened clip on the real
    relay and ClientApp (tests/test_flower.py's loopback grid, no Ray) gives the in-process
    simulator's rows."""
    from flwr.supercore.task_identity import TaskIdentity
    from test_flower import assert_same_rows, run_both

    for attr, value in (("_run_id", 7), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value)  # as test_flower's fixture

    sets = ["protocol.aggregation=clip", "protocol.clip_screen=1.5", "protocol.clip_tau=0.5"]
    ref, rows = run_both(sets, tmp_path)
    assert_same_rows(ref, rows)
    plain, _ = run_both(["protocol.aggregation=clip", "protocol.clip_tau=0.5"], tmp_path / "b")
    assert any(a["consensus"] != b["consensus"] for a, b in zip(ref, plain, strict=True))
