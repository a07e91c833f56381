"""Many agents on one laptop: the simulator's vectorized path against its per-agent path.

    python benchmarks/simulator_scale.py                      # 1,000 agents × 50 rounds
    python benchmarks/simulator_scale.py --agents 100 --rounds 20 --baseline-rounds 20
    python benchmarks/simulator_scale.py --threads 2          # torch threads (default 1)

Workload: digits split IID over the agents, a small MLP (hidden 32) per agent from one
shared init, every round 1 local SGD step (batch 32) then gossip with Metropolis-Hastings
weights on a Watts-Strogatz small world (k = 4, p = 0.1); every agent evaluated on its
local split and the global test set every round.

Printed: wall time, agent-rounds per second (per wall second after the build, and per CPU
second of the run, which a busy machine moves less) and peak RSS of the vectorized run, and the
same workload on the per-agent path for --baseline-rounds rounds (each agent its own
nn.Module, payloads built, validated and merged one by one): the ratio is per agent-round.
Each path runs in its own process, so the peak RSS figures are its own, with the config's
``threads`` torch threads (``--threads``; default 1, as the simulator's own default).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import time

from rich.console import Console
from rich.table import Table


def workload(agents: int, rounds: int, vectorize: str, threads: int) -> list[str]:
    return [
        f"rounds={rounds}", f"vectorize={vectorize}", f"threads={threads}", "model.init=same",
        "model.options.hidden=[32]", "data.partition=iid", "data.local_test_fraction=0.0",
        "train.steps=1", "train.lr=0.5", "train.batch_size=32", "protocol.name=gossip",
        f"topology={{graph: watts_strogatz, n: {agents}, k: 4, p: 0.1, seed: 0}}",
    ]  # fmt: skip


def measure(sets: list[str], queue: mp.Queue) -> None:
    """Run in a fresh process: wall time of build + run, CPU seconds of the run (after the
    build), final accuracy, peak RSS (MiB)."""
    from fedmerge.config import load_config
    from fedmerge.report import summarize
    from fedmerge.runtimes.local.simulator import Simulator
    from fedmerge.threads import torch_threads

    cfg = load_config(None, sets)
    with torch_threads(cfg.threads or None):  # as fedmerge.runtimes.local.run
        t0 = time.perf_counter()
        sim = Simulator(cfg)
        built, cpu0 = time.perf_counter() - t0, time.process_time()
        rows = sim.run()
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    s = summarize(rows)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    queue.put({"path": sim.path, "wall": wall, "build": built, "cpu": cpu,
               "acc": s["final_global_acc"], "consensus": s["consensus"], "rss": rss})  # fmt: skip


def run(sets: list[str]) -> dict:
    queue: mp.Queue = mp.get_context("spawn").Queue()
    proc = mp.get_context("spawn").Process(target=measure, args=(sets, queue))
    proc.start()
    out = queue.get()
    proc.join()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--agents", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=50)
    p.add_argument("--baseline-rounds", type=int, default=3, help="per-agent path rounds")
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: physical cores)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON too")
    args = p.parse_args()
    print(f"load average at start: {os.getloadavg()}")
    fast = run(workload(args.agents, args.rounds, "always", args.threads))
    slow = run(workload(args.agents, args.baseline_rounds, "never", args.threads))
    print(f"load average at end: {os.getloadavg()}")
    table = Table(title=f"{args.agents} agents, small world, 1 SGD step + gossip per round, "
                  f"{args.threads or 'all'} thread(s)")  # fmt: skip
    for col in ("path", "rounds", "wall s", "build s", "run CPU s", "agent-rounds/s",
                "per CPU s", "peak RSS MiB", "final global acc"):  # fmt: skip
        table.add_column(col, justify="right")
    rates = []
    for res, rounds in ((fast, args.rounds), (slow, args.baseline_rounds)):
        rate = args.agents * rounds / (res["wall"] - res["build"])
        rates.append(rate)
        per_cpu = args.agents * rounds / res["cpu"]
        table.add_row(res["path"], str(rounds), f"{res['wall']:.1f}", f"{res['build']:.1f}",
                      f"{res['cpu']:.1f}", f"{rate:,.0f}", f"{per_cpu:,.0f}", f"{res['rss']:.0f}",
                      f"{res['acc']:.3f}")  # fmt: skip
    Console(width=120).print(table)
    print(f"vectorized / per-agent, agent-rounds per second: {rates[0] / rates[1]:.1f}x")
    print(f"target: {args.agents} × {args.rounds} in ≤ 60 s wall -> {fast['wall']:.1f} s")
    if args.json:
        print(json.dumps({"vectorized": fast, "per_agent": slow, "ratio": rates[0] / rates[1]}))


if __name__ == "__main__":
    main()
