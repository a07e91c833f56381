"""Where a DIMAT round's time goes in the simulator: local training vs alignment + merge.

Runs :class:`~fedmerge.runtimes.local.simulator.Simulator` with the ``dimat`` protocol
(per-agent engine) and
times, inside every round, ``Agent.train`` (local epochs) and ``dimat_merge`` (BN resets,
activation collection, Hungarian assignment, permuted weighted average, BN reset) for every
agent; the rest of the round (publish, deliver, validate, evaluate) is "other". Times are
process CPU time (one torch thread), so other work on a shared machine does not skew the
shares.

    PYTHONPATH=. python benchmarks/dimat_round_cost.py                       # mlp, K = 6 ring
    PYTHONPATH=. python benchmarks/dimat_round_cost.py --models mlp,cnn --protocols dimat,dimat_wm
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch
from rich.console import Console
from rich.table import Table

import fedmerge.decentralized.protocols as protocols
from fedmerge.config import load_config
from fedmerge.decentralized.agent import Agent
from fedmerge.runtimes.local.simulator import Simulator


def timed(fn, bucket: dict[str, float], key: str):
    """``fn`` wrapped to add its CPU time to ``bucket[key]``."""

    def wrapper(*args, **kwargs):
        start = time.process_time()
        try:
            return fn(*args, **kwargs)
        finally:
            bucket[key] += time.process_time() - start

    return wrapper


def measure(model: str, protocol: str, args) -> dict[str, float]:
    """Seconds per round spent in train, merge and the rest, averaged over rounds and seeds."""
    total: dict[str, float] = defaultdict(float)
    original_train, original_merge = Agent.train, protocols.dimat_merge
    try:
        Agent.train = timed(original_train, total, "train")
        protocols.dimat_merge = timed(original_merge, total, "merge")
        for seed in range(args.seeds):
            cfg = load_config(None, [
                f"protocol.name={protocol}", f"model.name={model}", "model.init=different",
                f"topology={args.topology}", f"rounds={args.rounds}", f"seed={seed}",
                f"data.partition={args.partition}", f"train.epochs={args.epochs}",
                "train.momentum=0.9", "model.options={}",
            ])  # fmt: skip
            sim = Simulator(cfg)
            for r in range(cfg.rounds):
                start = time.process_time()
                sim.round(r)
                total["round"] += time.process_time() - start
    finally:
        Agent.train, protocols.dimat_merge = original_train, original_merge
    runs = args.seeds * args.rounds
    return {k: v / runs for k, v in total.items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", default="mlp", help="comma-separated: mlp, cnn")
    p.add_argument("--protocols", default="dimat", help="comma-separated: dimat, dimat_wm")
    p.add_argument("--topology", default="{graph: ring, n: 6}", help="topology spec (YAML)")
    p.add_argument("--partition", default="shards", choices=["iid", "shards", "dirichlet"])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=2, help="local epochs per round")
    p.add_argument("--seeds", type=int, default=3)
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # tiny models: one thread is fastest, and the cores are shared
    table = Table(
        title=f"DIMAT round cost in the simulator ({args.topology}, {args.partition}, "
        f"E = {args.epochs}, {args.rounds} rounds × {args.seeds} seeds; "
        "CPU ms per round, all agents)"
    )
    for col in ("model", "protocol", "round", "train", "align + merge", "other",
                "train share", "merge share"):  # fmt: skip
        table.add_column(col, justify="right")
    for model in args.models.split(","):
        for protocol in args.protocols.split(","):
            measure(model, protocol, argparse.Namespace(**{**vars(args), "seeds": 1}))  # warm-up
            t = measure(model, protocol, args)
            other = t["round"] - t["train"] - t["merge"]
            table.add_row(
                model, protocol, f"{1e3 * t['round']:.0f}", f"{1e3 * t['train']:.0f}",
                f"{1e3 * t['merge']:.0f}", f"{1e3 * other:.0f}",
                f"{t['train'] / t['round']:.0%}", f"{t['merge'] / t['round']:.0%}",
            )  # fmt: skip
    Console(width=120).print(table)


if __name__ == "__main__":
    main()
