"""DIMAT vs plain averaging vs local-only on non-IID digits, with the reference loop.

K agents, each starting from its own random init, hold DIMAT's class-sharded split of
sklearn's digits (class c lives on agent c mod K); every round each trains E epochs, then
merges with its ring neighbours (π uniform over the closed neighbourhood). Reported: the
agents' mean accuracy on the global test set after the last round, mean ± std over seeds,
and the share of a round's time spent aligning + merging.

    PYTHONPATH=. python benchmarks/dimat_digits.py                 # mlp & cnn, K = 4 and 8
    PYTHONPATH=. python benchmarks/dimat_digits.py --models mlp --agents 4 --seeds 1
    PYTHONPATH=. python benchmarks/dimat_digits.py --one-shot --seeds 6  # two-model merges
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

from fedmerge.dimat import (
    PROTOCOLS,
    accuracy,
    dimat_merge,
    run_reference,
    train_epochs,
    weighted_average,
)
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
    calib = None  # each agent calibrates on its own data
    if args.calibration == "shared":  # one public set for everyone, as the DIMAT code does
        calib = list(torch.cat([x for x, _ in shards]).split(256))
    return run_reference(
        models, ring_mixing(agents), shards, test, rounds=args.rounds, epochs=args.epochs,
        lr=args.lr, momentum=args.momentum, protocol=protocol, calib=calib, seed=seed,
    )  # fmt: skip


def one_shot(seeds: int) -> None:
    """Two MLPs (16-16) trained on all of digits from different inits, merged 50/50."""
    table = Table(title="one-shot merge of two MLPs trained on all of digits")
    for col in ("seed", "endpoints", "naive average", "activation matching", "weight matching"):
        table.add_column(col, justify="right")
    (x, y), test = (lambda s, t: (s[0], t))(*digits_shards(1, 0))
    for seed in range(seeds):
        models = [
            build_model(
                "mlp", in_shape=(1, 8, 8), num_classes=10, seed=10 * seed + i, hidden=(16, 16)
            )
            for i in range(2)
        ]
        for i, m in enumerate(models):
            gen = torch.Generator().manual_seed(i)
            train_epochs(m, x, y, epochs=10, lr=0.05, batch_size=32, generator=gen, momentum=0.9)
        ends = " / ".join(f"{accuracy(m, *test):.3f}" for m in models)
        a, b = ({k: v.clone() for k, v in m.state_dict().items()} for m in models)
        merged = [weighted_average([a, b], [0.5, 0.5])] + [
            dimat_merge(models[0], [(b, 0.5)], 0.5, [x], method=m) for m in ("activation", "weight")
        ]
        accs = []
        for state in merged:
            models[1].load_state_dict(state)
            accs.append(f"{accuracy(models[1], *test):.3f}")
        table.add_row(str(seed), ends, *accs)
    Console().print(table)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--agents", default="4,8", help="comma-separated agent counts")
    p.add_argument("--models", default="mlp,cnn", help="comma-separated: mlp, cnn")
    p.add_argument("--protocols", default=",".join(PROTOCOLS), help="of " + ", ".join(PROTOCOLS))
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--epochs", type=int, default=2, help="local epochs per round")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--momentum", type=float, default=0.0, help="SGD momentum (fresh each round)")
    p.add_argument("--calibration", choices=["local", "shared"], default="local")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--one-shot", action="store_true", help="two-model merge table instead")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # tiny models: one thread is fastest
    if args.one_shot:
        return one_shot(args.seeds)
    mid = (args.rounds + 1) // 2
    table = Table(
        title=f"DIMAT on non-IID digits, ring, {args.rounds}×{args.epochs} epochs, "
        f"{args.calibration} calibration"
    )
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
