"""From what merge size do the fused numba loops repay numba's start? (``fused.PAYS_FROM``)

For each method and size, two fresh processes merge the same seeded in-memory
bfloat16 tensors (a base and K experts of n parameters, 4 keys), one with the
fused loops forced (``plan.fused = True``: the timing includes importing numba
and loading the loops from its on-disk cache), one with the torch kernels
(``plan.fused = False``). Prints the CPU time of each merge, the ratio, and
whether the engine's default (``fused = None``) picks the fused loops at that
size. A throw-away run per method first fills numba's cache.

    python benchmarks/fused_crossover.py                     # 4 × 3M ... 4 × 100M
    python benchmarks/fused_crossover.py --sizes 1e7,3e7 --methods ties
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def worker(method: str, n: int, k: int, mode: str) -> None:
    """One merge in this process; prints its CPU time (JSON)."""
    import torch

    from fedmerge.merging import StateSource, plan_merge, run_plan

    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    rows = max(1, n // 4 // 4096)
    base = {f"k{i}": torch.randn(rows, 4096, generator=gen).bfloat16() for i in range(4)}
    experts = [{key: (v.float() + 0.01 * torch.randn(v.shape, generator=gen)).bfloat16()
                for key, v in base.items()} for _ in range(k)]  # fmt: skip
    names = [f"input{i}" for i in range(k + 1)]
    src = [StateSource(s, name) for s, name in zip([base, *experts], names, strict=True)]
    params = {"density": 0.2} if "dare" in method or method == "ties" else {}
    plan = plan_merge(method, src[0], src[1:], names, params=params)
    auto = plan.uses_fused
    plan.fused = mode == "fused"
    cpu = time.process_time()
    dict(run_plan(plan))
    print(json.dumps({"cpu": time.process_time() - cpu, "auto": auto, "size": plan.size}))


def run(method: str, n: int, k: int, mode: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", method, str(n), str(k), mode]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="task_arithmetic,ties,dare_ties,dare_linear")
    parser.add_argument("--sizes", default="3e6,1e7,3e7,1e8",
                        help="parameters per model, comma-separated")  # fmt: skip
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        method, n, k, mode = args.worker
        return worker(method, int(n), int(k), mode)
    from rich.console import Console
    from rich.table import Table

    console, load = Console(width=120), os.getloadavg()
    methods, sizes = args.methods.split(","), [int(float(s)) for s in args.sizes.split(",")]
    for method in methods:  # fill numba's cache
        run(method, 1 << 20, args.experts, "fused")
    table = Table(title=f"fused loops vs torch kernels, {args.experts} experts, bf16, 1 thread")
    for col in ("method", "params", "K × elements", "fused CPU s", "torch CPU s",
                "torch / fused", "default"):  # fmt: skip
        table.add_column(col, justify="left" if col == "method" else "right")
    for method in methods:
        for n in sizes:
            fused, torch_ = (run(method, n, args.experts, mode) for mode in ("fused", "torch"))
            table.add_row(method, f"{n / 1e6:g}M", f"{fused['size'] / 1e6:.0f}M",
                          f"{fused['cpu']:.3f}", f"{torch_['cpu']:.3f}",
                          f"{torch_['cpu'] / fused['cpu']:.2f}×",
                          "fused" if fused["auto"] else "torch")  # fmt: skip
    console.print(table)
    after = os.getloadavg()
    loads = [" ".join(f"{x:.2f}" for x in v) for v in (load, after)]
    console.print(f"load average (1/5/15 min) before {loads[0]}, after {loads[1]}")


if __name__ == "__main__":
    main()
