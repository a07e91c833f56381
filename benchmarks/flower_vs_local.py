"""Seconds per round and peak memory: Flower's simulation engine (Ray) vs the in-process simulator.

    python benchmarks/flower_vs_local.py                               # 4 agents, 5 rounds
    python benchmarks/flower_vs_local.py --agents 4 10 100 --rounds 20 # the README numbers

Same workload on every engine: gossip on a ring of N agents, digits (IID split), an MLP
64-128-10 (~9.6k parameters), 2 SGD steps per round. Each engine runs in a fresh child
process; its peak memory is the largest summed RSS of the child's process tree (Ray's GCS,
raylet and workers included), sampled every 0.1 s. Flower's seconds per round exclude Ray's
start-up (shown separately). Seconds per round: the median over the rounds of each round's
wall time (the simulator's ``wall_s``; for Flower as the relay measures it), which keeps the
first round's warm-up and the noise of a shared machine out.

Ratios printed: flower / per-agent (fedmerge's reference engine, same order of operations)
and flower / stacked (the simulator's vectorized path, its default for this workload).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

ENGINES = ("per-agent", "stacked", "flower")


def workload(n: int, rounds: int, engine: str):
    from fedmerge.config import default_config

    vectorize = {"per-agent": "never", "stacked": "always"}.get(engine, "never")
    return default_config([
        f"agents={n}", "topology=ring", f"rounds={rounds}", "data.partition=iid",
        "model.options.hidden=[128]", "train.steps=2", f"vectorize={vectorize}",
    ])  # fmt: skip


def child(engine: str, n: int, rounds: int) -> None:
    """Run one engine and print {"per_round", "startup", "acc"} as JSON."""
    cfg = workload(n, rounds, engine)
    start = time.perf_counter()
    if engine == "flower":
        from fedmerge.runtimes import flower

        rows = flower.run(cfg, num_cpus=2, client_cpus=1)
    else:
        from fedmerge.simulator import Simulator

        rows = Simulator(cfg).run()
    total = time.perf_counter() - start
    walls = [r["wall_s"] for r in rows if r["agent"] == 0]
    last = [r["global_acc"] for r in rows if r["round"] == rounds]
    print(json.dumps({"per_round": statistics.median(walls), "startup": total - sum(walls),
                      "acc": sum(last) / len(last)}))  # fmt: skip


def tree_rss(root: int) -> int:
    """Summed RSS in bytes of ``root`` and all its descendants (from /proc)."""
    parents: dict[int, int] = {}
    rss: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            parents[int(entry.name)] = int(fields[1])
            rss[int(entry.name)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            continue
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        todo += [c for c, p in parents.items() if p == pid]
    return total


def measure(engine: str, n: int, rounds: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    cmd = [sys.executable, __file__, "--child", engine, "--agents", str(n), "--rounds", str(rounds)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, tree_rss(proc.pid))
        time.sleep(0.1)
    out = proc.stdout.read().decode().strip().splitlines()
    if proc.returncode or not out:
        raise SystemExit(f"{engine} with {n} agents failed (exit {proc.returncode})")
    return {**json.loads(out[-1]), "peak_mb": peak / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, nargs="+", default=[4])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--child", choices=ENGINES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.agents[0], args.rounds)
        return
    title = f"gossip on a ring, {args.rounds} rounds, MLP 64-128-10: seconds per round"
    table = Table(title=title)
    cols = ("agents", *ENGINES, "flower / per-agent", "flower / stacked", "Ray start-up s",
            "peak MB (p/s/f)", "final acc (p/s/f)")  # fmt: skip
    for col in cols:
        table.add_column(col, justify="right")
    for n in args.agents:
        res = {e: measure(e, n, args.rounds) for e in ENGINES}
        sec = {e: res[e]["per_round"] for e in ENGINES}
        table.add_row(
            str(n), *(f"{sec[e]:.4f}" for e in ENGINES),
            f"{sec['flower'] / sec['per-agent']:.1f}×", f"{sec['flower'] / sec['stacked']:.1f}×",
            f"{res['flower']['startup']:.1f}",
            "/".join(f"{res[e]['peak_mb']:.0f}" for e in ENGINES),
            "/".join(f"{res[e]['acc']:.3f}" for e in ENGINES),
        )  # fmt: skip
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
