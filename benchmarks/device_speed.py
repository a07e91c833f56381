"""Agents on a GPU (``device: cuda``) against the CPU, same work, same seed.

    python benchmarks/device_speed.py                          # hidden 2048×2048, 8 agents
    python benchmarks/device_speed.py --hidden 256 --rounds 3  # small, seconds

Workload: a ring of 8 agents on digits, an MLP with two hidden layers of ``--hidden``
units from one shared init, ``--steps`` SGD steps (batch 64) then gossip every round,
accuracies and consensus measured every round. Each device runs in its own process with
``--threads`` torch threads: the per-agent engine on the CPU, the stacked (vectorized)
engine on the CPU (the simulator's fastest CPU path), and the per-agent engine on CUDA
(the stacked engine is CPU-only, so ``vectorize: auto`` picks per-agent there).

Printed: seconds per round (after a first, warm-up round), the ratio to the CPU per-agent
run, and the largest difference of the final global accuracy and consensus distance from
the CPU run (GPU kernels sum in another order, so these are small, not zero). Without a
GPU only the CPU rows are printed.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time

from rich.console import Console
from rich.table import Table


def workload(hidden: int, rounds: int, steps: int, device: str, vectorize: str) -> list[str]:
    return [
        f"rounds={rounds}", f"device={device}", f"vectorize={vectorize}", "topology=ring-8",
        f"model.options.hidden=[{hidden}, {hidden}]", f"train.steps={steps}",
        "train.batch_size=64", "train.lr=0.1", "protocol.name=gossip",
    ]  # fmt: skip


def measure(sets: list[str], threads: int, queue: mp.Queue) -> None:
    """In a fresh process: seconds per round after the first, the last round's rows."""
    import torch

    from fedmerge.config import load_config
    from fedmerge.runtimes.local.simulator import Simulator

    torch.set_num_threads(threads)
    cfg = load_config(None, sets)
    sim = Simulator(cfg)
    sim.round(0)  # warm-up: CUDA context, kernels, allocator
    sync = torch.cuda.synchronize if sim.setup.device.type == "cuda" else lambda: None
    sync()
    t0 = time.perf_counter()
    for r in range(1, cfg.rounds):
        rows = sim.round(r)
    sync()
    per_round = (time.perf_counter() - t0) / max(1, cfg.rounds - 1)
    queue.put({"path": sim.path, "device": str(sim.setup.device), "s": per_round,
               "rows": [{k: v for k, v in r.items() if k != "wall_s"} for r in rows]})  # fmt: skip


def run(sets: list[str], threads: int) -> dict:
    ctx = mp.get_context("spawn")
    queue: mp.Queue = ctx.Queue()
    proc = ctx.Process(target=measure, args=(sets, threads, queue))
    proc.start()
    out = queue.get()
    proc.join()
    return out


def largest_gap(rows: list[dict], base: list[dict], key: str) -> float:
    return max(abs(a[key] - b[key]) for a, b in zip(rows, base, strict=True))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--steps", type=int, default=10, help="SGD steps per agent and round")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per run")
    args = p.parse_args()
    import torch

    runs = [("cpu", "never"), ("cpu", "always")]
    if torch.cuda.is_available():
        runs.append(("cuda", "auto"))
    results = [
        run(workload(args.hidden, args.rounds, args.steps, dev, vec), args.threads)
        for dev, vec in runs
    ]
    base = results[0]
    title = (f"ring-8, MLP 64→{args.hidden}→{args.hidden}→10, {args.steps} SGD steps + gossip "
             f"per round, {args.threads} CPU thread(s)")  # fmt: skip
    table = Table(title=title)
    for col in ("device", "engine", "s / round", "vs CPU per-agent", "max |Δ global acc|",
                "max |Δ consensus|"):  # fmt: skip
        table.add_column(col, justify="right")
    for res in results:
        table.add_row(
            res["device"], res["path"], f"{res['s']:.3f}", f"{base['s'] / res['s']:.2f}×",
            f"{largest_gap(res['rows'], base['rows'], 'global_acc'):.2g}",
            f"{largest_gap(res['rows'], base['rows'], 'consensus'):.2g}",
        )  # fmt: skip
    Console().print(table)
    if not torch.cuda.is_available():
        print("no CUDA GPU here: the cuda row is missing (run on a GPU host)")


if __name__ == "__main__":
    main()
