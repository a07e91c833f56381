"""Seconds per round and peak memory: Flower's simulation engine (Ray) vs the in-process simulator.

    python benchmarks/flower_overhead.py                               # 4 agents, 5 rounds
    python benchmarks/flower_overhead.py --agents 4 10 100 --rounds 20 # the README numbers
    python benchmarks/flower_overhead.py --agents 2 --rounds 2 --hidden 7000 7000  # 198 MB payloads
    python benchmarks/flower_overhead.py --engines per-agent stacked --eval-every 5

Same workload on every engine: gossip on a ring of N agents, digits (IID split), an MLP
64-128-10 (~9.6k parameters), 2 SGD steps per round. Each engine runs in a fresh child
process; its peak memory is the largest summed RSS of the child's process tree (Ray's GCS,
raylet and workers included), sampled every 0.1 s. Flower's seconds per round exclude Ray's
start-up (shown separately). Seconds per round: the median over the rounds of each round's
wall time (the simulator's ``wall_s``; for Flower as the relay measures it), which keeps the
first round's warm-up and the noise of a shared machine out.

Each engine runs ``--repeats`` times (default 3), interleaved (a, b, c, a, b, c, ...) so that
a change in machine load hits every engine alike; the table shows the median of the runs'
seconds per round and their spread (slowest / fastest run). ``--eval-every k`` sets
``metrics.eval_every`` for fedmerge's engines (accuracy measured every k rounds and on the
last); Flower's runtime evaluates every round. fedmerge's engines run through the local
runtime, so with the config's ``threads`` (default: physical cores).

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


def workload(n: int, rounds: int, engine: str, hidden: list[int], eval_every: int):
    from fedmerge.config import default_config

    vectorize = {"per-agent": "never", "stacked": "always"}.get(engine, "never")
    local = [] if engine == "flower" else [f"metrics.eval_every={eval_every}"]
    return default_config([
        f"agents={n}", "topology=ring", f"rounds={rounds}", "data.partition=iid",
        f"model.options.hidden={hidden}", "train.steps=2", f"vectorize={vectorize}", *local,
    ])  # fmt: skip


def child(engine: str, n: int, rounds: int, hidden: list[int], eval_every: int) -> None:
    """Run one engine and print {"per_round", "startup", "acc", "payload_mb"} as JSON."""
    from fedmerge.decentralized.setup import build_setup

    cfg = workload(n, rounds, engine, hidden, eval_every)
    start = time.perf_counter()
    if engine == "flower":
        from fedmerge.runtimes import flower

        rows = flower.run(cfg, num_cpus=2, client_cpus=1)
    else:
        from fedmerge.runtimes import local

        rows = local.run(cfg)
    total = time.perf_counter() - start
    walls = [r["wall_s"] for r in rows if r["agent"] == 0]
    last = [r["global_acc"] for r in rows if r["round"] == rounds]
    model = build_setup(cfg).model(0)
    payload = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    print(json.dumps({"per_round": statistics.median(walls), "startup": total - sum(walls),
                      "acc": sum(last) / len(last), "payload_mb": payload}))  # fmt: skip


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


def measure(engine: str, n: int, args: argparse.Namespace) -> dict:
    """One run of ``engine`` with ``n`` agents in a fresh child process, plus its peak RSS."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    cmd = [sys.executable, __file__, "--child", engine, "--agents", str(n), "--rounds",
           str(args.rounds), "--eval-every", str(args.eval_every),
           "--hidden", *map(str, args.hidden)]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, tree_rss(proc.pid))
        time.sleep(0.1)
    out = proc.stdout.read().decode().strip().splitlines()
    if proc.returncode or not out:
        raise SystemExit(f"{engine} with {n} agents failed (exit {proc.returncode})")
    return {**json.loads(out[-1]), "peak_mb": peak / 2**20}


def repeated(n: int, args: argparse.Namespace) -> dict[str, dict]:
    """Every engine ``args.repeats`` times, interleaved: per engine the median seconds per
    round over the runs, their spread (max / min) and the median run's other fields."""
    runs: dict[str, list[dict]] = {e: [] for e in args.engines}
    for _ in range(args.repeats):
        for e in args.engines:
            runs[e].append(measure(e, n, args))
    out = {}
    for e, rs in runs.items():
        secs = sorted(r["per_round"] for r in rs)
        mid = sorted(rs, key=lambda r: r["per_round"])[len(rs) // 2]
        out[e] = {**mid, "per_round": statistics.median(secs), "spread": secs[-1] / secs[0]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, nargs="+", default=[4])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--hidden", type=int, nargs="+", default=[128], help="MLP hidden sizes")
    parser.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES))
    parser.add_argument("--repeats", type=int, default=3, help="runs per engine, interleaved")
    parser.add_argument("--eval-every", type=int, default=1,
                        help="metrics.eval_every for fedmerge's engines")  # fmt: skip
    parser.add_argument("--child", choices=ENGINES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.repeats < 1 or args.eval_every < 1:
        parser.error("--repeats and --eval-every must be >= 1")
    if args.child:
        child(args.child, args.agents[0], args.rounds, args.hidden, args.eval_every)
        return
    engines = args.engines
    title = (f"gossip on a ring, {args.rounds} rounds, MLP hidden {args.hidden}, eval every "
             f"{args.eval_every}: median seconds per round of {args.repeats} runs (spread "
             "max/min)")  # fmt: skip
    table = Table(title=title)
    ratios = [f"flower / {e}" for e in engines if e != "flower" and "flower" in engines]
    tag = "/".join(e[0] for e in engines)
    for col in ("agents", "payload MB", *engines, *ratios, "Ray start-up s",
                f"peak MB ({tag})", f"final acc ({tag})"):  # fmt: skip
        table.add_column(col, justify="right")
    for n in args.agents:
        res = repeated(n, args)
        sec = {e: res[e]["per_round"] for e in engines}
        table.add_row(
            str(n), f"{res[engines[0]]['payload_mb']:.2f}",
            *(f"{sec[e]:.4f} ({res[e]['spread']:.2f}×)" for e in engines),
            *(f"{sec['flower'] / sec[r.split(' / ')[1]]:.1f}×" for r in ratios),
            f"{res['flower']['startup']:.1f}" if "flower" in res else "-",
            "/".join(f"{res[e]['peak_mb']:.0f}" for e in engines),
            "/".join(f"{res[e]['acc']:.3f}" for e in engines),
        )  # fmt: skip
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
