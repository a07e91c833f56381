"""Reporting for continual dissemination: rich tables, metrics JSONL, summary JSON, a PNG.

Accuracies are fractions in the files and percentages in the tables.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from rich.console import Console
from rich.table import Table

from fedmerge.atomic import atomic_write_bytes, atomic_write_text
from fedmerge.experiments.dissemination import node_matrix, summary

if TYPE_CHECKING:
    from fedmerge.experiments.dissemination import Outcome


def _pct(x: float | None) -> str:
    return "–" if x is None or np.isnan(x) else f"{100 * x:.1f}"


def round_table(outcome: Outcome) -> Table:
    """Per round: experts appeared, held (min/mean over nodes), nodes holding all, accuracy."""
    res, n = outcome.result, outcome.topology.n
    known = node_matrix(res, "experts_known")
    acc_known = node_matrix(res, "acc_known")
    acc_seen = node_matrix(res, "acc_appeared")
    table = Table(
        title=f"Continual dissemination ({outcome.config.method}) on {outcome.topology.name}, "
        f"n={n}, diameter {res.diameter}, message loss {outcome.config.message_loss:g}",
        caption="held: experts a node holds; all: nodes holding every expert; acc held: mean "
        "over nodes of the accuracy on the tasks each holds; acc appeared: on every task "
        "that has appeared anywhere (range: min–max over nodes)",
    )
    for col in ("round", "appeared", "held min", "held mean", "all", "acc held %",
                "acc appeared %", "range", "MB sent"):  # fmt: skip
        table.add_column(col, justify="right")
    for t in range(known.shape[0]):
        rows = [r for r in res.rows if r["round"] == t + 1]
        appeared = rows[0]["experts_appeared"]
        sent = sum(r["bytes_sent"] for r in rows) / 1e6
        table.add_row(
            str(t + 1), str(appeared), f"{known[t].min():.0f}", f"{known[t].mean():.1f}",
            f"{int((known[t] == len(res.arrivals)).sum())}/{n}", _pct(np.nanmean(acc_known[t])),
            _pct(np.nanmean(acc_seen[t])),
            f"{_pct(np.nanmin(acc_seen[t]))}–{_pct(np.nanmax(acc_seen[t]))}",
            f"{sent:.2f}",
        )  # fmt: skip
    return table


def expert_table(outcome: Outcome) -> Table:
    """Per expert: where/when it appeared, rounds until every node held it vs eccentricity."""
    res = outcome.result
    spread = res.spread_rounds()
    table = Table(
        title=f"Rounds until every node holds each expert (diameter {res.diameter}; "
        f"all experts everywhere in round {res.complete_round or '–'})"
    )
    for col in ("expert", "node", "round", "rounds to all", "ecc(node)", "expert acc %",
                "pretrained %"):  # fmt: skip
        table.add_column(col, justify="right")
    for a in res.arrivals:
        table.add_row(
            a.expert, str(a.node), str(a.round), str(spread[a.expert] or "never"),
            str(res.eccentricity[a.expert]), _pct(outcome.expert_acc[a.expert]),
            _pct(outcome.base_acc[a.expert]),
        )  # fmt: skip
    return table


def print_tables(outcome: Outcome, console: Console | None = None) -> None:
    console = console or Console(width=max(Console().width, 110))  # pipes default to 80
    console.print(round_table(outcome))
    console.print(expert_table(outcome))
    folds = [n.merger.step for n in outcome.result.nodes]
    dups = sum(n.duplicates for n in outcome.result.nodes)
    console.print(f"folds per node: {folds}; duplicates skipped: {dups}")


def plot_png(outcome: Outcome) -> bytes:
    """Left: experts held vs round, one line per node. Right: accuracy vs round (mean, range)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = outcome.result
    known = node_matrix(res, "experts_known")
    rounds = np.arange(1, known.shape[0] + 1)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i in range(known.shape[1]):
        ax1.step(rounds, known[:, i] + 0.03 * (i - known.shape[1] / 2), where="mid", lw=1,
                 alpha=0.8, label=f"node {i}" if known.shape[1] <= 10 else None)  # fmt: skip
    appeared = [sum(a.round <= r for a in res.arrivals) for r in rounds]
    ax1.plot(rounds, appeared, "k--", lw=1.5, label="appeared")
    ax1.set_xlabel("round")
    ax1.set_ylabel("experts held")
    ax1.set_title(f"{outcome.topology.name}: experts held per node (diameter {res.diameter})")
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=7, ncol=2)
    for key, label in (("acc_known", "tasks held"), ("acc_appeared", "tasks appeared")):
        acc = 100 * node_matrix(res, key)
        valid = ~np.isnan(acc).all(axis=1)
        (line,) = ax2.plot(rounds[valid], np.nanmean(acc[valid], 1), "-o", ms=3,
                           label=f"on {label} (mean over nodes)")  # fmt: skip
        ax2.fill_between(rounds[valid], np.nanmin(acc[valid], 1), np.nanmax(acc[valid], 1),
                         alpha=0.15, color=line.get_color())  # fmt: skip
    ax2.axhline(100 * np.mean(list(outcome.expert_acc.values())), ls="--", c="g", lw=1,
                label="experts on own task")  # fmt: skip
    ax2.axhline(100 * np.mean(list(outcome.base_acc.values())), ls=":", c="r", lw=1,
                label="pretrained body")  # fmt: skip
    ax2.set_xlabel("round")
    ax2.set_ylabel("accuracy (%)")
    ax2.set_title(f"{outcome.config.method}: accuracy (band: min–max over nodes)")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def write_outputs(outcome: Outcome, out_dir: str | Path) -> dict[str, Path]:
    """Write ``metrics.jsonl``, ``summary.json`` and ``dissemination.png``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "metrics": out / "metrics.jsonl",
        "summary": out / "summary.json",
        "plot": out / "dissemination.png",
    }
    lines = "".join(json.dumps(row) + "\n" for row in outcome.result.rows)
    atomic_write_text(paths["metrics"], lines)
    atomic_write_text(paths["summary"], json.dumps(summary(outcome), indent=2) + "\n")
    atomic_write_bytes(paths["plot"], plot_png(outcome))
    return paths
