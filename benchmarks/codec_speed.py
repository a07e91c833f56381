"""Codec throughput against sending the dense bytes over loopback torch.distributed.

A task vector of ``--params`` float32 entries (default 100M: matrices of width 4096
plus one bias; entries N(0, 0.01²), like a fine-tuning delta) is encoded and decoded by
every codec (encode includes building the safetensors blob; decode includes the
header checks). Then two gloo processes on loopback send, rank 0 → rank 1, a buffer
of the dense size and one of every encoded size (median of ``--repeats``).

Per codec it prints encode/decode throughput in MB/s of dense data, the compression
ratio, and ``total = encode + send(encoded) + decode`` against ``send(dense)``:
compression pays on this link when total / dense < 1, and on any link slower than
the printed break-even speed. Loopback is the
fastest link there is; over a real network send(dense) grows and compression pays
sooner.

    python benchmarks/codec_speed.py --params 5e6 --repeats 3    # quick, seconds
    python benchmarks/codec_speed.py                              # 100M parameters (~8 GB RAM)
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fedmerge.codecs import TensorSpec, decode_blob, encode_state  # noqa: E402

CASES = [
    ("none", {}),
    ("topk", {"density": 0.1}),
    ("topk", {"density": 0.01}),
    ("quantize", {"bits": 8}),
    ("quantize", {"bits": 4}),
    ("ternary", {"density": 0.1}),
    ("lowrank", {"rank": 4}),
]
WIDTH = 4096


def task_vector(params: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    rows, rest = divmod(params, WIDTH)
    out, i = {}, 0
    while rows > 0:  # matrices of at most 4096 rows, like a transformer's projections
        r = min(rows, WIDTH)
        out[f"layer{i}.weight"] = torch.randn(r, WIDTH, generator=g) * 0.01
        rows, i = rows - r, i + 1
    out["bias"] = torch.randn(max(rest, 1), generator=g) * 0.01
    return out


def timed(fn, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def measure_codecs(x: dict[str, torch.Tensor], repeats: int) -> list[dict]:
    specs = {k: TensorSpec.of(v) for k, v in x.items()}
    rows = []
    for codec, params in CASES:
        enc_s, blob = timed(lambda c=codec, p=params: encode_state(x, c, p).to_bytes(), repeats)
        dec_s, _ = timed(lambda b=blob: decode_blob(b, specs), repeats)
        rows.append({"codec": codec, "params": params, "bytes": len(blob), "encode_s": enc_s,
                     "decode_s": dec_s})  # fmt: skip
        del blob
    return rows


def sender(rank: int, port: int, sizes: list[int], repeats: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)  # fmt: skip
    medians = []
    for n in sizes:
        buf = torch.zeros(n, dtype=torch.uint8)
        times = []
        for _ in range(repeats + 2):  # the first sends warm the connection up
            dist.barrier()
            start = time.perf_counter()
            dist.send(buf, 1) if rank == 0 else dist.recv(buf, 0)
            dist.barrier()
            times.append(time.perf_counter() - start)
        medians.append(statistics.median(times[2:]))
    if rank == 0:
        Path(out).write_text(json.dumps(medians))
    dist.destroy_process_group()


def send_times(sizes: list[int], repeats: int) -> list[float]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "times.json")
        mp.spawn(sender, args=(port, sizes, repeats, out), nprocs=2, join=True)
        return json.loads(Path(out).read_text())


def breakeven(dense: int, row: dict) -> float:
    """Link speed (MB/s) below which the codec beats sending the dense bytes."""
    return max(0.0, (dense - row["bytes"]) / 1e6 / (row["encode_s"] + row["decode_s"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, default=100e6, help="task vector entries")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the codecs")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    x = task_vector(int(args.params))
    dense = sum(t.numel() * 4 for t in x.values())
    rows = measure_codecs(x, args.repeats)
    del x
    sends = send_times([dense] + [r["bytes"] for r in rows], args.repeats)
    dense_s = sends[0]
    print(
        f"task vector: {dense / 4 / 1e6:.1f}M float32 = {dense / 1e6:.0f} MB; "
        f"loopback gloo send of the dense bytes: {dense_s:.3f} s "
        f"({dense / 1e6 / dense_s:.0f} MB/s); {args.threads} thread(s), median of {args.repeats}"
    )
    print(f"{'codec':24}{'ratio':>7}{'enc MB/s':>10}{'dec MB/s':>10}{'send s':>9}{'total s':>9}"
          f"{'total/dense':>13}{'pays below MB/s':>17}")  # fmt: skip
    for r, send_s in zip(rows, sends[1:], strict=True):
        total = r["encode_s"] + send_s + r["decode_s"]
        name = r["codec"] + "".join(f" {k}={v}" for k, v in r["params"].items())
        print(f"{name:24}{dense / r['bytes']:7.1f}{dense / 1e6 / r['encode_s']:10.0f}"
              f"{dense / 1e6 / r['decode_s']:10.0f}{send_s:9.3f}{total:9.3f}"
              f"{total / dense_s:13.2f}{breakeven(dense, r):17.0f}")  # fmt: skip
    print("total/dense < 1: the codec pays on this loopback link. 'pays below': the link speed "
          "under which encode + send(encoded) + decode beats send(dense), i.e. (dense − encoded) "
          "MB / (encode + decode) s.")  # fmt: skip


if __name__ == "__main__":
    main()
