"""CUDA and NCCL runs, skipped where torch sees no GPU (CI is CPU-only): agents on
``device: cuda`` give the CPU's rows within float tolerance, hold every tensor on the GPU
and publish from the CPU; two torch.distributed ranks on NCCL (one GPU each) match the
in-process simulator. ``tools/gpu_check.sh`` runs this module and prints the numbers.

Tolerances: GPU kernels sum in other orders than the CPU's, so parameters drift by ~1e-6
relative per round; consensus distances are compared to 1e-3 relative, accuracies to a few
test samples (DIMAT's assignment can flip a near-tie, hence its looser bounds). TF32 is
off during these tests (cuDNN convolutions use it by default on Ampere and later, which
alone moves results by ~1e-3).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedmerge.config import load_config
from fedmerge.decentralized.metrics import IN_PROCESS_ONLY
from fedmerge.runtimes import torchdist
from fedmerge.runtimes.local.simulator import Simulator

ROOT = Path(__file__).resolve().parents[1]
GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
pytestmark = pytest.mark.skipif(GPUS == 0, reason="needs a CUDA GPU")
RING4 = ["topology=ring-4", "rounds=3", "distributed.timeout_s=120"]
CASES = {  # config, tolerance of accuracies (absolute) and distances (relative)
    "gossip": (["protocol.name=gossip"], 0.01, 1e-3),
    "choco": (["protocol.codec=topk", "protocol.consensus_step=0.5"], 0.01, 1e-3),
    "dimat": (["protocol.name=dimat", "model.init=different", "model.name=cnn"], 0.05, 0.05),
    "disseminate": (["protocol.name=disseminate"], 0.01, 1e-3),
}


SHARES = ("local_acc", "global_acc", "acc_trained", "disagreement")  # shares of test samples


@pytest.fixture(autouse=True)
def full_fp32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def assert_close_rows(
    got: list[dict], want: list[dict], acc_tol: float, rel_tol: float = 1e-3, skip=()
) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert a.keys() == b.keys()
        for key in a.keys() - {"wall_s", *skip}:
            x, y = a[key], b[key]
            if isinstance(y, float) and key in SHARES:
                assert x == pytest.approx(y, abs=acc_tol), (key, a, b)
            elif isinstance(y, float):
                assert x == pytest.approx(y, rel=rel_tol, abs=1e-6), (key, a, b)
            else:
                assert x == y, (key, a, b)


@pytest.mark.parametrize("case", list(CASES))
def test_cuda_rows_match_cpu_and_tensors_stay_on_the_gpu(case):
    sets, acc_tol, rel_tol = CASES[case]
    cpu = Simulator(load_config(None, [*RING4, *sets, "device=cpu"])).run()
    sim = Simulator(load_config(None, [*RING4, *sets, "device=cuda"]))
    assert sim.path == "per-agent" and sim.setup.device.type == "cuda"
    assert_close_rows(sim.run(), cpu, acc_tol, rel_tol)
    for agent in sim.agents:
        assert {v.device.type for v in agent.state().values()} == {"cuda"}
        assert {p.device.type for p in agent.model.parameters()} == {"cuda"}
        payload = agent.publish(99)
        assert {t.device.type for t in payload.tensors.values()} == {"cpu"}


@pytest.mark.skipif(GPUS < 2, reason="needs two GPUs (one per NCCL rank)")
def test_two_nccl_ranks_match_the_simulator():
    """Two local worker processes, LOCAL_RANK 0 and 1: NCCL, each rank on its own GPU."""
    cfg = load_config(None, [*RING4, "device=auto", "distributed.backend=nccl",
                             "distributed.agents_per_rank=2", "vectorize=never"])  # fmt: skip
    rows = torchdist.run(cfg, procs=2, threads=1)
    want = Simulator(load_config(None, [*RING4, "device=cpu"])).run()
    assert_close_rows(rows, want, 0.01, skip=IN_PROCESS_ONLY)


@pytest.mark.skipif(GPUS < 2, reason="needs two GPUs (one per NCCL rank)")
@pytest.mark.timeout(300)
def test_torchrun_two_gpus_nccl(tmp_path):
    config = tmp_path / "cfg.yaml"
    nccl = "distributed: {backend: nccl, timeout_s: 120, agents_per_rank: 2}"
    config.write_text(f"name: gpu\nrounds: 2\ntopology: ring-4\ndevice: auto\n{nccl}\n")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    cmd = [*torchrun, "-m", "clients.torchdist_agent", str(config), "--out", str(tmp_path / "o")]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["agents"] == 4
