"""The merge sidecar: three toy external trainers (separate processes) write checkpoints;
three sidecars on a ring (torch.distributed, gloo) gossip them; every merged checkpoint is
W's row applied to the checkpoints the nodes took that round; a sidecar killed with SIGKILL
and restarted with its peers resumes from its saved state and the run completes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fedmerge.checkpoint import load_state_dict, read_metadata, save_state_dict
from fedmerge.config import load_config
from fedmerge.decentralized.handoff import (
    CKPT,
    CheckpointModel,
    merged_file,
    newest_checkpoint,
    read_pointer,
    write_merged,
)
from fedmerge.decentralized.protocols import get_protocol
from fedmerge.decentralized.setup import run_topology
from fedmerge.errors import CheckpointError, ConfigError, ValidationError
from fedmerge.runtimes.torchdist.sidecar import Sidecar, SidecarOptions
from tests.test_torchdist_restart import free_port

ROOT = Path(__file__).resolve().parents[1]
ROUNDS = 6
CONFIG = (f"topology: {{graph: ring, n: 3}}\nrounds: {ROUNDS}\nprotocol: {{name: gossip}}\n"
          "distributed: {timeout_s: 8}\n")  # fmt: skip


def start_sidecars(tmp: Path, prefix: str, n: int = 3) -> list[subprocess.Popen]:
    port, procs = free_port(), []
    for k in range(n):
        env = {**os.environ, "RANK": str(k), "WORLD_SIZE": str(n), "LOCAL_RANK": str(k),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
               "FEDMERGE_TORCHDIST_PREFIX": prefix, "PYTHONPATH": str(ROOT)}  # fmt: skip
        cmd = [sys.executable, "-m", "clients.merge_sidecar", str(tmp / "run.yaml"),
               "--watch", str(tmp / f"node-{k}"), "--state", str(tmp / f"state-{k}"),
               "--period-s", "0.4"]  # fmt: skip
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))  # fmt: skip
    return procs


def wait_for(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sidecars_gossip_trainer_checkpoints_and_survive_a_kill(tmp_path):
    (tmp_path / "run.yaml").write_text(CONFIG)
    dirs = [tmp_path / f"node-{k}" for k in range(3)]
    trainer = [sys.executable, str(ROOT / "tests" / "sidecar_trainer.py")]
    trainers = []
    for k, d in enumerate(dirs):
        d.mkdir()
        trainers.append(subprocess.Popen([*trainer, str(d), str(k), "100000", "0.05"]))
    try:
        first = start_sidecars(tmp_path, "first")
        wait_for(lambda: (read_pointer(dirs[1]) or {}).get("round", 0) >= 2, 150, "round 2")
        first[1].send_signal(signal.SIGKILL)
        codes = [p.wait(timeout=60) for p in first]
        assert codes[1] == -signal.SIGKILL and codes[0] == codes[2] == 1, [
            p.stderr.read()[-800:] for p in first
        ]
        second = start_sidecars(tmp_path, "second")
        outs = [p.communicate(timeout=200) for p in second]
        assert [p.returncode for p in second] == [0, 0, 0], [e[-800:] for _, e in outs]
    finally:
        for t in trainers:
            t.kill()
            t.wait()
    resumed = {int(out.split()[1].rstrip(":")) for out, _ in outs}
    assert len(resumed) == 1 and resumed.pop() >= 2  # all ranks resumed at one saved round
    check_gossip(load_config(tmp_path / "run.yaml"), dirs)
    for d in dirs:
        assert torch.equal(load_state_dict(merged_file(d, ROUNDS))["count"],
                           load_state_dict(d / read_pointer(d)["source"])["count"])  # fmt: skip
    for k, d in enumerate(dirs):
        assert read_pointer(d)["round"] == ROUNDS
        state = tmp_path / f"state-{k}"
        saved = [read_metadata(state / f"round-{r:06d}" / f"agent-{k:04d}.safetensors")
                 for r in (ROUNDS - 1, ROUNDS)]  # fmt: skip
        assert sorted(p.name for p in state.iterdir()) == [f"round-{ROUNDS - 1:06d}",
                                                          f"round-{ROUNDS:06d}"]  # fmt: skip
        assert sorted(int(m["round"]) for m in saved) == [ROUNDS - 1, ROUNDS]


def check_gossip(cfg, dirs: list[Path]) -> None:
    """merged_i^r = Σ_j W_ij θ_j^r on every floating entry, θ_j^r: what node j's merge of
    round r names as its source (a trainer checkpoint, or its own previous merge); the
    other entries are the node's own; the trainers' steps never go back."""
    topo = run_topology(cfg, get_protocol("gossip"))
    steps = {k: [] for k in range(len(dirs))}
    for r in range(1, cfg.rounds + 1):
        source = {j: read_metadata(merged_file(d, r))["source"] for j, d in enumerate(dirs)}
        theta = {j: load_state_dict(dirs[j] / source[j]) for j in source}
        for i, d in enumerate(dirs):
            if m := CKPT.fullmatch(source[i]):
                steps[i].append(int(m[1]))
            w = dict(topo.round(r - 1, total_rounds=cfg.rounds).neighbors[i])
            merged = load_state_dict(merged_file(d, r))
            for key, got in merged.items():
                if not got.is_floating_point():
                    assert torch.equal(got, theta[i][key])
                    continue
                want = sum(w[j] * theta[j][key] for j in w)
                assert torch.allclose(got, want, atol=1e-6, rtol=0), (r, i, key)
    assert all(s == sorted(s) and len(s) >= 2 for s in steps.values()), steps
    first = [load_state_dict(dirs[j] / read_metadata(merged_file(dirs[j], 1))["source"])
             for j in range(len(dirs))]  # fmt: skip
    assert any(not torch.allclose(first[0][k], first[1][k]) for k in first[0]
               if first[0][k].is_floating_point())  # the nodes' models differed  # fmt: skip


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_trainer_callback_with_two_sidecars(tmp_path):
    """Two ``transformers`` Trainers (tiny offline GPT-2, SidecarCallback every 2 steps) and
    two sidecars: the merges are gossip of the Trainers' checkpoints, and each Trainer
    loaded merges back into its model while it trained."""
    pytest.importorskip("transformers")
    rounds = 3
    (tmp_path / "run.yaml").write_text(
        f"topology: {{graph: complete, n: 2}}\nrounds: {rounds}\nprotocol: {{name: gossip}}\n"
        "distributed: {timeout_s: 120}\n"
    )
    dirs = [tmp_path / f"node-{k}" for k in range(2)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    script = str(ROOT / "tests" / "hf_trainer_node.py")
    trainers = [subprocess.Popen([sys.executable, script, str(d), str(k), "400"], env=env,
                                 text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                for k, d in enumerate(dirs)]  # fmt: skip
    try:
        sidecars = start_sidecars(tmp_path, "hf", n=2)
        outs = [p.communicate(timeout=300) for p in sidecars]
        assert [p.returncode for p in sidecars] == [0, 0], [e[-800:] for _, e in outs]
        done = [t.communicate(timeout=300) for t in trainers]
    finally:
        for t in trainers:
            t.kill()
            t.wait()
    assert [t.returncode for t in trainers] == [0, 0], [e[-800:] for _, e in done]
    check_gossip(load_config(tmp_path / "run.yaml"), dirs)
    for out, _ in done:
        loaded = json.loads(out.strip().splitlines()[-1])
        assert loaded and loaded == sorted(set(loaded)) and loaded[-1] == rounds, loaded


def test_file_contract(tmp_path):
    """Newest step above the last one taken; temp names never read; atomic merged + pointer."""
    for name in ("ckpt-3.safetensors", "ckpt-12.safetensors", ".ckpt-40.tmp", "ckpt-x.safetensors"):
        (tmp_path / name).write_bytes(b"")
    assert newest_checkpoint(tmp_path, -1) == (12, tmp_path / "ckpt-12.safetensors")
    assert newest_checkpoint(tmp_path, 12) is None
    write_merged(tmp_path, 4, {"w": torch.ones(2)}, "ckpt-12.safetensors")
    assert read_pointer(tmp_path) == {"round": 4, "file": "merged-4.safetensors",
                                      "source": "ckpt-12.safetensors"}  # fmt: skip
    assert read_metadata(tmp_path / "merged-4.safetensors")["source"] == "ckpt-12.safetensors"
    (tmp_path / "merged.json").write_text('{"round": 5, "file": "../x.safetensors"}')
    with pytest.raises(CheckpointError, match="names '../x.safetensors' for round 5"):
        read_pointer(tmp_path)


def test_checkpoint_model_takes_only_its_own_shapes(tmp_path):
    model = CheckpointModel({"a.b": torch.zeros(2), "n": torch.zeros((), dtype=torch.int64)})
    model.load_state_dict({"a.b": torch.ones(2), "n": torch.tensor(3)})
    assert model.state_dict()["a.b"].tolist() == [1.0, 1.0] and int(model.state_dict()["n"]) == 3
    with pytest.raises(ValidationError, match=r"differs .* \['a.b'\]"):
        model.load_state_dict({"a.b": torch.ones(3), "n": torch.tensor(3)})
    save_state_dict({"z": torch.ones(1)}, tmp_path / "c.safetensors")
    with pytest.raises(ValidationError, match=r"\['a.b', 'n', 'z'\]"):
        model.load_state_dict(load_state_dict(tmp_path / "c.safetensors"))


@pytest.mark.parametrize(
    ("sets", "match"),
    [
        (["protocol.name=dimat"], "gossip-family protocols without a codec, not 'dimat'"),
        (["protocol.codec=topk"], r"codec 'topk'"),
        (["distributed.on_peer_failure=continue"], "on_peer_failure: the sidecar restarts"),
        (["faults.dropout=0.1"], "faults.dropout: not supported by runtime 'torchdist sidecar'"),
    ],
)
def test_sidecar_refuses_what_it_cannot_run(tmp_path, sets, match):
    cfg = load_config(None, ["topology={graph: ring, n: 3}", *sets])
    with pytest.raises(ConfigError, match=match):
        Sidecar(cfg, None, 0, 3, SidecarOptions(tmp_path, tmp_path / "state"))
