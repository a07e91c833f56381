"""DIMAT vs plain averaging vs local-only on non-IID digits, with the reference loop.

K agents, each starting from its own random init, hold DIMAT's class-sharded split of
sklearn's digits (class c lives on agent c mod K); every round each trains E epochs, then
merges with its ring neighbours (π uniform over the closed neighbourhood). Reported: the
agents' mean accuracy on the global test set after the last round, mean ± std over seeds,
and the share of a round's time spent aligning + merging.

    PYTHONPATH=. python benchmarks/dimat_digits.py                 # mlp & cnn, K = 4 and 8
    PYTHONPATH=. python benchmarks/dimat_digits.py --models mlp --agents 4 --seeds 1
"""

from __future__ import annotations

import argparse
import itertools
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


def run(model: str, agents: int, protocol: str, args, seed: int):
    shards, test = digits_shards(agents, seed)
    models = [
        build_model(model, in_shape=(1, 8, 8), num_classes=10, seed=seed * 100 + i)
        for i in range(agents)
    ]
    return run_reference(
        models, ring_mixing(agents), shards, test, rounds=args.rounds, epochs=args.epochs,
        lr=args.lr, protocol=protocol, seed=seed,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--agents", default="4,8", help="comma-separated agent counts")
    p.add_argument("--models", default="mlp,cnn", help="comma-separated: mlp, cnn")
    p.add_argument("--protocols", default=",".join(PROTOCOLS), help="of " + ", ".join(PROTOCOLS))
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--epochs", type=int, default=2, help="local epochs per round")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--seeds", type=int, default=3)
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # tiny models: one thread is fastest
    mid = (args.rounds + 1) // 2
    table = Table(title=f"DIMAT on non-IID digits, ring, {args.rounds}×{args.epochs} epochs")
    for col in ("model", "K", "protocol", "round 1", f"round {mid}", f"round {args.rounds}"):
        table.add_column(col, justify="right")
    table.add_column("merge share", justify="right")
    for model, agents in itertools.product(args.models.split(","), args.agents.split(",")):
        for protocol in args.protocols.split(","):
            runs = [run(model, int(agents), protocol, args, seed) for seed in range(args.seeds)]
            cells = [_mean_sd([h[r - 1].mean for h in runs]) for r in (1, mid, args.rounds)]
            merge = sum(r.merge_s for h in runs for r in h)
            share = merge / (merge + sum(r.train_s for h in runs for r in h))
            table.add_row(model, agents, protocol, *cells, f"{share:.0%}")
        table.add_section()
    Console().print(table)
    print(
        f"mean global test accuracy of the K agents after the round's merge, mean±std over "
        f"{args.seeds} seeds; merge share = align + merge time / round time"
    )


def _mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f}±{sd:.3f}"


if __name__ == "__main__":
    main()
