"""torch.distributed runtime: one round's neighbour exchange vs raw send/recv of the same bytes.

Four gloo ranks on loopback, a ring of 4 agents (one per rank), each with an MLP of about
10M parameters (digits input, hidden 3000 × 3000: 9.23M floats, 36.9 MB per payload).
In the same processes, alternating, ``--repeats`` times each:

  fedmerge  ``Exchange.exchange``: pack the payload into a flat buffer (one copy), header
            → ack → body by ``batch_isend_irecv`` with deadlines, typed views on arrival
  raw       ``dist.isend``/``dist.irecv`` of a preallocated buffer of the same byte count
            to/from both ring neighbours

Each trial starts after a barrier; a trial's time is the slowest rank's. Prints the
medians and their ratio (fedmerge / raw). Validation and merging are not part of the
exchange (the simulator does them too) and are not timed.

    python benchmarks/torchdist_exchange.py --hidden 256 --repeats 3   # small, seconds
    python benchmarks/torchdist_exchange.py                            # ~10M parameters
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fedmerge.config import load_config  # noqa: E402
from fedmerge.decentralized.payload import Payload  # noqa: E402
from fedmerge.runtimes.torchdist import RankRunner, connect  # noqa: E402

WORLD = 4


def config(hidden: int):
    return load_config(None, [
        "topology=ring-4", "rounds=1", "protocol.name=gossip", "distributed.backend=gloo",
        f"model.options.hidden=[{hidden}, {hidden}]", "distributed.timeout_s=300",
    ])  # fmt: skip


def slowest(seconds: float) -> float:
    t = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def worker(hidden: int, repeats: int) -> None:
    store, rank, world = connect(300.0)
    runner = RankRunner(config(hidden), store, rank, world)
    plan = runner.setup.topology.round(0)
    lost = np.zeros(len(plan.messages), dtype=bool)
    payloads = {rank: runner.agents[rank].publish(0)}
    nbytes = payloads[rank].nbytes
    peers = [(rank - 1) % world, (rank + 1) % world]
    out = torch.zeros(nbytes, dtype=torch.uint8)
    inbox = [torch.empty(nbytes, dtype=torch.uint8) for _ in peers]
    ours, raw = [], []
    for _ in range(repeats + 1):  # the first trial of each warms up connections
        dist.barrier()
        start = time.perf_counter()
        received, failed = runner.exchange.exchange(0, plan, lost, payloads)
        ours.append(slowest(time.perf_counter() - start))
        assert len(received) == 2 and not failed
        assert all(isinstance(p, Payload) for p in received.values())
        dist.barrier()
        start = time.perf_counter()
        works = [dist.isend(out, k) for k in peers] + [
            dist.irecv(buf, k) for buf, k in zip(inbox, peers, strict=True)
        ]
        for w in works:
            w.wait()
        raw.append(slowest(time.perf_counter() - start))
    if rank == 0:
        params = nbytes // 4
        print(json.dumps({"params": params, "bytes": nbytes, "ours": ours[1:], "raw": raw[1:]}))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=3000, help="MLP hidden width (2 layers)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.hidden, args.repeats)
        return
    server = dist.TCPStore("127.0.0.1", 0, WORLD, is_master=True, wait_for_workers=False,
                           timeout=timedelta(seconds=300))  # fmt: skip
    cmd = [sys.executable, __file__, "--worker", f"--hidden={args.hidden}",
           f"--repeats={args.repeats}"]  # fmt: skip
    procs = []
    for rank in range(WORLD):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(WORLD),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(server.port),
               "TORCHELASTIC_USE_AGENT_STORE": "True", "OMP_NUM_THREADS": "1"}  # fmt: skip
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True))
    outputs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        sys.exit(f"workers failed: exit codes {[p.returncode for p in procs]}")
    res = json.loads(outputs[0].strip().splitlines()[-1])
    ours, raw = statistics.median(res["ours"]), statistics.median(res["raw"])
    mb = res["bytes"] / 1e6
    print(f"ring-4, gloo, loopback: {res['params'] / 1e6:.2f}M parameters, {mb:.1f} MB/payload, "
          f"2 sends + 2 receives per rank, median of {args.repeats}")  # fmt: skip
    print(f"{'':10}{'median s':>10}{'min s':>10}{'GB/s/rank':>11}")
    for name, ts in (("fedmerge", res["ours"]), ("raw", res["raw"])):
        med = statistics.median(ts)
        print(f"{name:10}{med:10.4f}{min(ts):10.4f}{4 * mb / 1e3 / med:11.2f}")
    print(f"ratio fedmerge / raw: {ours / raw:.2f}  (target ≤ 1.5)")


if __name__ == "__main__":
    main()
