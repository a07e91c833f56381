"""DIMAT vs plain averaging vs local-only on non-IID digits, with the reference loop.

K agents, each starting from its own random init, hold DIMAT's class-sharded split of
sklearn's digits (class c lives on agent c mod K); every round each trains E epochs, then
merges with its ring neighbours (π uniform over the closed neighbourhood). Reported: the
agents' mean accuracy on the global test set after the last round, mean ± std over seeds,
and the share of a round's time spent aligning + merging.

    PYTHONPATH=. python benchmarks/dimat_digits.py --agents 4 --rounds 10 --seeds 3
"""

from __future__ import annotations

import argparse
import statistics

import torch
from rich.console import Console
from rich.table import Table
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from fedmerge.dimat import PROTOCOLS, run_reference
from fedmerge.models import build_model


def digits_shards(agents: int, seed: int):
    """Per-agent (x, y) with class c on agent c mod K, and the global (x, y) test set."""
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    y = torch.tensor(y)
    tr, te = train_test_split(range(len(y)), test_size=0.3, random_state=seed, stratify=y)
    x_tr, y_tr = x[tr], y[tr]
    shards = [(x_tr[y_tr % agents == i], y_tr[y_tr % agents == i]) for i in range(agents)]
    return shards, (x[te], y[te])


def ring_mixing(k: int) -> torch.Tensor:
    """Uniform weights over the closed neighbourhood of a ring (complete graph if k ≤ 3)."""
    w = torch.zeros(k, k)
    for i in range(k):
        for j in {i, (i - 1) % k, (i + 1) % k}:
            w[i, j] = 1.0
    return w / w.sum(1, keepdim=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--agents", type=int, default=4)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--model", default="mlp", choices=["mlp", "cnn"])
    p.add_argument("--protocols", default="dimat,dimat_wm,average,local")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    protocols = args.protocols.split(",")
    results: dict[str, list] = {name: [] for name in protocols}
    for seed in range(args.seeds):
        shards, test = digits_shards(args.agents, seed)
        for name in protocols:
            assert name in PROTOCOLS, name
            models = [
                build_model(args.model, in_shape=(1, 8, 8), num_classes=10, seed=seed * 100 + i)
                for i in range(args.agents)
            ]
            hist = run_reference(
                models, ring_mixing(args.agents), shards, test, rounds=args.rounds,
                epochs=args.epochs, protocol=name, seed=seed,
            )  # fmt: skip
            results[name].append(hist)
    table = Table(
        title=f"{args.agents} agents, ring, non-IID digits shards, {args.model}, different inits, "
        f"{args.rounds} rounds × {args.epochs} epochs, {args.seeds} seeds"
    )
    for col in ("protocol", "global acc (last)", "best round", "merge share of round"):
        table.add_column(col, justify="right")
    for name, runs in results.items():
        last = [h[-1].mean for h in runs]
        best = [max(r.mean for r in h) for h in runs]
        merge = sum(r.merge_s for h in runs for r in h)
        total = merge + sum(r.train_s for h in runs for r in h)
        sd = statistics.stdev(last) if len(last) > 1 else 0.0
        table.add_row(
            name,
            f"{statistics.mean(last):.3f} ± {sd:.3f}",
            f"{statistics.mean(best):.3f}",
            f"{merge / total:.0%}",
        )
    Console().print(table)


if __name__ == "__main__":
    main()
