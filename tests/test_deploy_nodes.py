"""Deployed nodes under torch.distributed: each rank opens only its own node directory
(data, starting checkpoint, public eval set, state dir) and the rounds equal the simulator's
over the same split. Every ``open`` of every worker is audited (a ``sitecustomize`` audit
hook), so a node reading another node's file fails the test even when run as root."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from fedmerge.checkpoint import read_metadata, save_state_dict
from fedmerge.config import load_config
from fedmerge.decentralized.node import load_samples, node_file_for, read_node_file
from fedmerge.decentralized.nodedirs import export_split
from fedmerge.decentralized.setup import build_setup
from fedmerge.errors import CheckpointError, ConfigError
from fedmerge.runtimes import torchdist
from tests.test_torchdist import ROOT, assert_same_rows, simulate_one_thread

RING3 = ["topology={graph: ring, n: 3}", "rounds=2", "vectorize=never", "train.steps=3",
         "distributed.timeout_s=30", "protocol.name=gossip"]  # fmt: skip

AUDIT = """
import os, sys
_dir = os.environ.get("FEDMERGE_TEST_AUDIT")
if _dir and "RANK" in os.environ:
    _log = open(os.path.join(_dir, "opened-" + os.environ["RANK"]), "a", buffering=1)
    def _hook(event, args):
        if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            _log.write(os.path.abspath(os.fsdecode(args[0])) + "\\n")
    sys.addaudithook(_hook)
"""


def audited(tmp_path: Path, monkeypatch) -> Path:
    """Workers started from now on log every path they open to ``opened-<rank>``."""
    hook, log = tmp_path / "hook", tmp_path / "opened"
    hook.mkdir()
    log.mkdir()
    (hook / "sitecustomize.py").write_text(AUDIT)
    monkeypatch.syspath_prepend(str(hook))
    monkeypatch.setenv("FEDMERGE_TEST_AUDIT", str(log))
    return log


@pytest.mark.parametrize("sets", [[], ["model.init=different"]], ids=["delta", "full"])
def test_deployed_nodes_open_only_their_own_files_and_match_simulator(tmp_path, monkeypatch,
                                                                       sets):  # fmt: skip
    cfg = load_config(None, [*RING3, *sets])
    nodes = tmp_path / "nodes"
    export_split(cfg, nodes)
    log = audited(tmp_path, monkeypatch)
    template = str(nodes / "node-{rank}" / "node.yaml")
    rows = torchdist.run(cfg, procs=3, threads=1, node_file=template)
    assert_same_rows(rows, simulate_one_thread(cfg))
    assert all(r["global_acc"] is not None and r["bytes_received"] > 0 for r in rows)
    for k in range(3):
        opened = {Path(p) for p in (log / f"opened-{k}").read_text().splitlines()}
        touched = {p.relative_to(nodes).parts[0] for p in opened if p.is_relative_to(nodes)}
        assert touched == {f"node-{k}"}, (k, touched)
        own = {p.name for p in opened if p.is_relative_to(nodes)}
        assert {"node.yaml", "data.safetensors", "start.safetensors", "eval.safetensors"} <= own
        state = nodes / f"node-{k}" / "state"
        assert sorted(p.name for p in state.iterdir()) == ["round-000001", "round-000002"]
        assert read_metadata(state / "round-000002" / f"agent-{k:04d}.safetensors")["round"] == "2"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_torchrun_with_node_files(tmp_path):
    """``torchrun -m clients.torchdist_agent CONFIG --node-file nodes/node-{local_rank}/node.yaml``:
    the leader's report holds the simulator's rows."""
    config = tmp_path / "run.yaml"
    config.write_text(
        "topology: {graph: ring, n: 3}\nrounds: 2\nvectorize: never\n"
        "train: {steps: 3}\ndistributed: {timeout_s: 60}\nprotocol: {name: gossip}\n"
    )
    cfg = load_config(config)
    export_split(cfg, tmp_path / "nodes")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "3"]
    node = str(tmp_path / "nodes" / "node-{local_rank}" / "node.yaml")
    cmd = [*torchrun, "-m", "clients.torchdist_agent", str(config), "--node-file", node,
           "--out", str(tmp_path / "o")]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()
    assert_same_rows([json.loads(x) for x in lines], simulate_one_thread(cfg))


def test_node_data_holds_only_the_own_split(tmp_path):
    cfg = load_config(None, RING3)
    files = export_split(cfg, tmp_path)
    whole = build_setup(cfg)
    node = read_node_file(files[1])
    mine = build_setup(cfg, node)
    assert [a.samples for a in mine.data.agents] == [0, whole.data.agents[1].samples, 0]
    assert torch.equal(mine.data.agents[1].train_x, whole.data.agents[1].train_x)
    assert torch.equal(mine.data.test_y, whole.data.test_y)
    assert all(torch.equal(mine.reference[k], v) for k, v in whole.reference.items())
    start = mine.model(1).state_dict()
    assert all(torch.equal(start[k], v) for k, v in whole.model(1).state_dict().items())


def test_node_file_device_overrides_the_runs(tmp_path, monkeypatch):
    cfg = load_config(None, RING3)
    path = export_split(cfg, tmp_path)[1]
    with open(path, "a") as f:
        f.write("device: auto\n")
    node = read_node_file(path)
    assert node.device == "auto"
    assert build_setup(cfg, node).device == torch.device("cpu")  # no GPU here: auto is the CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="device: 'cuda:1' asks for CUDA"):
        build_setup(cfg, replace(node, device="cuda:1"))
    path.write_text(path.read_text().replace("device: auto", "device: gpu0"))
    with pytest.raises(ConfigError, match="node.yaml: 'device':"):
        read_node_file(path)


def test_node_file_and_samples_errors(tmp_path):
    (tmp_path / "n.yaml").write_text("node: 0\ndata: d.safetensors\ncolour: red\n")
    with pytest.raises(ConfigError, match=r"n.yaml: unknown field\(s\) \['colour'\]"):
        read_node_file(tmp_path / "n.yaml")
    (tmp_path / "n.yaml").write_text("node: -1\ndata: d.safetensors\n")
    with pytest.raises(ConfigError, match="'node' must be a node id"):
        read_node_file(tmp_path / "n.yaml")
    (tmp_path / "n.yaml").write_text("node: 2\n")
    with pytest.raises(ConfigError, match="'data' .* is required"):
        read_node_file(tmp_path / "n.yaml")
    assert node_file_for("n/{rank}-{local_rank}.yaml", 3, 1) == "n/3-1.yaml"
    with pytest.raises(ConfigError, match="only {rank} and {local_rank}"):
        node_file_for("n/{host}.yaml", 0, 0)
    bad = tmp_path / "d.safetensors"
    save_state_dict({"train_x": torch.zeros(4, 2), "train_y": torch.tensor([0, 1, 2, 5])}, bad,
                    {"num_classes": "3"})  # fmt: skip
    with pytest.raises(CheckpointError, match="train_y has labels outside 0..2"):
        load_samples(bad, "train")
    with pytest.raises(CheckpointError, match="needs tensors test_x and test_y"):
        load_samples(bad, "test")


def test_node_config_conflicts(tmp_path):
    cfg = load_config(None, RING3)
    node = read_node_file(export_split(cfg, tmp_path)[0])
    shared = load_config(None, [*RING3, "protocol.name=dimat", "protocol.calibration=shared"])
    with pytest.raises(ConfigError, match="calibration: 'shared'"):
        build_setup(shared, node)
    wider = load_config(None, [*RING3, "model.options.hidden=[7]"])
    with pytest.raises(CheckpointError, match="start.safetensors: does not fit"):
        build_setup(wider, node).model(0)
