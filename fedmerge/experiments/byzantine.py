"""Gossip with Byzantine neighbours: plain averaging against the robust rules.

For each topology (ring-16 and torus-4x4 by default) and each number k of Byzantine nodes
(0, 1, 3; placed at random, seeded), every aggregation rule of
:mod:`fedmerge.decentralized.robust` runs
the default gossip simulation (IID digits, one shared init, 2 SGD steps per round) with
the Byzantine nodes sending sign-flipped task vectors scaled by 4 (−4τ: it passes the
norm check). The score is the final global test accuracy averaged over the honest nodes.

    python -m fedmerge.experiments.byzantine                     # the README table (~4 min)
    python -m fedmerge.experiments.byzantine --rounds 10 --byzantine 0,1 --rules mean,median
    python -m fedmerge.experiments.byzantine --topologies ring-16 --byzantine 0,1 \
        --set faults.message_loss=0.2 --out simulations/results/byzantine_loss

Writes ``table.md``, ``table.csv`` and ``accuracy.png`` to ``--out``
(default ``simulations/results/byzantine``) and prints the table.
"""

from __future__ import annotations

import argparse
import csv
import io
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from fedmerge.atomic import atomic_write_bytes, atomic_write_text
from fedmerge.config import default_config
from fedmerge.decentralized.robust import RULES
from fedmerge.runtimes.local.simulator import Simulator

BASE = ["data.partition=iid", "vectorize=never", "faults.byzantine.attack=sign_flip"]


def honest_accuracy(
    topology: str, byzantine: int, rule: str, *, rounds: int, scale: float, seed: int,
    extra: Sequence[str] = (),
) -> tuple[float, float]:  # fmt: skip
    """(mean, min) final global accuracy over the honest nodes of one run; ``extra``: more
    ``a.b=c`` overrides (e.g. faults.message_loss=0.2)."""
    cfg = default_config(
        [*BASE, f"topology={topology}", f"rounds={rounds}", f"seed={seed}",
         f"faults.byzantine.count={byzantine}", f"faults.byzantine.scale={scale}",
         f"protocol.aggregation={rule}", *extra]
    )  # fmt: skip
    rows = Simulator(cfg).run()
    last = [r["global_acc"] for r in rows if r["round"] == rounds and not r["byzantine"]]
    return sum(last) / len(last), min(last)


def run_grid(
    topologies: Sequence[str], counts: Sequence[int], rules: Sequence[str], *, rounds: int,
    scale: float, seed: int, extra: Sequence[str] = (),
) -> list[dict]:  # fmt: skip
    """One row per (topology, k, rule), with a rich progress bar."""
    cells = [(t, k, r) for t in topologies for k in counts for r in rules]
    out = []
    with Progress(transient=True) as bar:
        task = bar.add_task("byzantine grid", total=len(cells))
        for topology, k, rule in cells:
            acc, worst = honest_accuracy(
                topology, k, rule, rounds=rounds, scale=scale, seed=seed, extra=extra
            )
            out.append({"topology": topology, "byzantine": k, "rule": rule,
                        "accuracy": acc, "worst": worst})  # fmt: skip
            bar.advance(task)
    return out


def markdown(rows: list[dict], rules: Sequence[str]) -> str:
    """Topology × k rows, one column per rule: 'mean % (worst honest %)'."""
    lines = ["| topology | Byzantine | " + " | ".join(rules) + " |",
             "| --- | ---: |" + " ---: |" * len(rules)]  # fmt: skip
    for (topology, k), cells in _by_setting(rows).items():
        vals = [f"{100 * cells[r]['accuracy']:.1f} ({100 * cells[r]['worst']:.0f})" for r in rules]
        lines.append(f"| {topology} | {k} | " + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n"


def _by_setting(rows: list[dict]) -> dict[tuple[str, int], dict[str, dict]]:
    grouped: dict[tuple[str, int], dict[str, dict]] = {}
    for row in rows:
        grouped.setdefault((row["topology"], row["byzantine"]), {})[row["rule"]] = row
    return grouped


def plot(rows: list[dict], rules: Sequence[str], path: Path) -> None:
    """One panel per topology: honest accuracy against the number of Byzantine nodes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    topologies = list(dict.fromkeys(r["topology"] for r in rows))
    fig, axes = plt.subplots(1, len(topologies), figsize=(5 * len(topologies), 3.6), squeeze=False)
    for ax, topology in zip(axes[0], topologies, strict=True):
        for rule in rules:
            pts = sorted((r["byzantine"], r["accuracy"]) for r in rows
                         if r["topology"] == topology and r["rule"] == rule)  # fmt: skip
            ax.plot([k for k, _ in pts], [100 * a for _, a in pts], marker="o", label=rule)
        ax.set(title=f"gossip on {topology}", xlabel="Byzantine nodes (sign flip ×4)",
               ylabel="honest global accuracy (%)", ylim=(0, 100))  # fmt: skip
        ax.set_xticks(sorted({r["byzantine"] for r in rows}))
        ax.grid(alpha=0.3)
    axes[0][0].legend(loc="lower left")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def write(rows: list[dict], rules: Sequence[str], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "table.md", markdown(rows, rules))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "table.csv", text.getvalue())
    plot(rows, rules, out / "accuracy.png")


def show(rows: list[dict], rules: Sequence[str]) -> None:
    table = Table(title="honest global accuracy % (worst honest node)")
    for col in ("topology", "Byzantine", *rules):
        table.add_column(col, justify="left" if col == "topology" else "right")
    for (topology, k), cells in _by_setting(rows).items():
        table.add_row(topology, str(k), *[
            f"{100 * cells[r]['accuracy']:.1f} ({100 * cells[r]['worst']:.0f})" for r in rules
        ])  # fmt: skip
    Console().print(table)


def main(argv: Sequence[str] | None = None) -> int:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="python -m fedmerge.experiments.byzantine", description=__doc__, formatter_class=raw
    )
    parser.add_argument("--topologies", default="ring-16,torus-4x4")
    parser.add_argument("--byzantine", default="0,1,3", help="numbers of Byzantine nodes")
    parser.add_argument("--rules", default=",".join(RULES))
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--scale", type=float, default=4.0, help="sign flip: send −scale·τ")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], metavar="K=V",
                        help="extra config override for every run (repeatable)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("simulations/results/byzantine"))
    args = parser.parse_args(argv)
    rules = args.rules.split(",")
    rows = run_grid(
        args.topologies.split(","), [int(k) for k in args.byzantine.split(",")], rules,
        rounds=args.rounds, scale=args.scale, seed=args.seed, extra=args.set,
    )  # fmt: skip
    write(rows, rules, args.out)
    show(rows, rules)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
