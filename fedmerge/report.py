"""What every run leaves behind, whatever the runtime: the resolved config, one metrics row
per agent per round, a summary and plots.

``DIR/config.yaml``   the resolved config (loadable by ``fedmerge simulate``)
``DIR/metrics.jsonl`` one JSON object per agent per round (the runtimes' rows)
``DIR/metrics.csv``   the same rows as CSV (columns: the union of the rows' keys)
``DIR/summary.json``  final and best mean accuracy, consensus distance, bytes, wall time
``DIR/accuracy.png``  global and local test accuracy vs round (mean, and each agent faintly),
                      and the global accuracy after local training (before merging)
``DIR/consensus.png`` mean ‖θ_i − θ̄‖ (plain and aligned, log scale) and disagreement vs round

>>> rows = [{"round": r, "agent": a, "active": True, "global_acc": 0.1 * r + a / 100,
...          "local_acc": None, "consensus": 1.0 / r, "bytes_sent": 10, "bytes_received": 10,
...          "rejected": 0, "wall_s": 0.5} for r in (1, 2) for a in (0, 1)]
>>> s = summarize(rows)
>>> round(s["final_global_acc"], 3), round(s["best_global_acc"], 3), s["best_round"]
(0.205, 0.205, 2)
>>> s["bytes_sent"], s["consensus"], s["wall_s"]
(40, 0.5, 1.0)
>>> attacker = {**rows[-1], "agent": 9, "global_acc": 0.0, "byzantine": True}
>>> summarize([*rows, attacker]) == s          # simulated attackers are not averaged in
True
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from fedmerge.atomic import atomic_write_text
from fedmerge.config import SimConfig, dump_config

Row = Mapping[str, Any]


def _mean(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return sum(vals) / len(vals) if vals else None


MEANS = ("global_acc", "acc_trained", "local_acc", "consensus", "consensus_aligned",
         "disagreement")  # fmt: skip
"""Row fields :func:`per_round` averages over the honest agents."""


def per_round(rows: Sequence[Row]) -> list[dict[str, Any]]:
    """One dict per round: mean accuracies and consensus over the honest agents (rows with
    ``byzantine`` set are left out), summed traffic, wall."""
    by_round: dict[int, list[Row]] = defaultdict(list)
    for row in honest(rows):
        by_round[int(row["round"])].append(row)
    out = []
    for r in sorted(by_round):
        group = by_round[r]
        out.append(
            {
                "round": r,
                **{k: _mean(g.get(k) for g in group) for k in MEANS},
                "active": sum(bool(g.get("active", True)) for g in group),
                "bytes_sent": sum(int(g["bytes_sent"]) for g in group),
                "rejected": sum(int(g.get("rejected", 0)) for g in group),
                "wall_s": max(float(g["wall_s"]) for g in group),
            }
        )
    return out


def honest(rows: Sequence[Row]) -> list[Row]:
    """The rows of agents that are not simulated Byzantine attackers."""
    return [r for r in rows if not r.get("byzantine")]


def summarize(rows: Sequence[Row], extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Final and best mean global accuracy (and the round of the best), final local accuracy
    and consensus distance, total bytes sent/received, rejected payloads, summed wall time,
    all over the honest agents."""
    rows = honest(rows)
    rounds = per_round(rows)
    if not rounds:
        raise ValueError("no metrics rows to summarize")
    scored = [r for r in rounds if r["global_acc"] is not None]
    best = max(scored, key=lambda r: r["global_acc"]) if scored else rounds[-1]
    last = rounds[-1]
    return {
        "rounds": last["round"],
        "agents": len({row["agent"] for row in rows}),
        "final_global_acc": last["global_acc"],
        "final_acc_trained": last["acc_trained"],
        "final_local_acc": last["local_acc"],
        "best_global_acc": best["global_acc"],
        "best_round": best["round"],
        "consensus": last["consensus"],
        "consensus_aligned": last["consensus_aligned"],
        "disagreement": last["disagreement"],
        "bytes_sent": sum(int(row["bytes_sent"]) for row in rows),
        "bytes_received": sum(int(row["bytes_received"]) for row in rows),
        "rejected": sum(int(row.get("rejected", 0)) for row in rows),
        "wall_s": sum(r["wall_s"] for r in rounds),
        **(extra or {}),
    }


def write_run(
    out: str | Path, cfg: SimConfig, rows: Sequence[Row], extra: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Write config.yaml, metrics.jsonl/.csv, summary.json and the PNG plots; return the summary."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # the saved config says how many agents ran (``agents: 0`` means "the topology's count")
    cfg = dataclasses.replace(cfg, agents=cfg.agents or len({row["agent"] for row in rows}))
    summary = summarize(rows, {"name": cfg.name, **(extra or {})})
    atomic_write_text(out / "config.yaml", dump_config(cfg))
    atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(dict(r)) + "\n" for r in rows))
    atomic_write_text(out / "metrics.csv", csv_text(rows))
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    plot_run(out, cfg.name, rows)
    return summary


def csv_text(rows: Sequence[Row]) -> str:
    """The rows as CSV text; the columns are the union of their keys, in first-seen order."""
    buf = io.StringIO()
    columns = list(dict.fromkeys(k for r in rows for k in r))
    writer = csv.DictWriter(buf, columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def plot_run(out: Path, title: str, rows: Sequence[Row]) -> None:
    """accuracy.png (global and local, mean bold, agents faint) and consensus.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogFormatterSciNotation, LogLocator, MaxNLocator

    rounds = per_round(rows)
    agents: dict[int, list[Row]] = defaultdict(list)
    for row in rows:
        agents[int(row["agent"])].append(row)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    panels = ((axes[0], "global_acc", "global test"), (axes[1], "local_acc", "local test"))
    for ax, key, label in panels:
        if len(agents) <= 64:
            for i, series in enumerate(agents.values()):
                pts = [(s["round"], s[key]) for s in series if s[key] is not None]
                if pts:
                    ax.plot(*zip(*pts, strict=True), color="tab:blue", alpha=0.15, lw=0.8,
                            label="each agent" if i == 0 else None)  # fmt: skip
        pts = [(r["round"], r[key]) for r in rounds if r[key] is not None]
        if pts:
            ax.plot(*zip(*pts, strict=True), color="tab:blue", lw=2.2, label="mean over agents")
        pts = [(r["round"], r["acc_trained"]) for r in rounds if r["acc_trained"] is not None]
        if key == "global_acc" and pts:
            ax.plot(*zip(*pts, strict=True), "--", color="tab:orange", lw=1.6,
                    label="mean after local training (before merging)")  # fmt: skip
        ax.set(title=f"{title}: {label} accuracy", xlabel="round", ylim=(0, 1))
        ax.xaxis.set_major_locator(MaxNLocator(nbins=10, integer=True))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy")
    axes[0].legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=110)
    plt.close(fig)
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 3.8))
    for key, label in (("consensus", "plain"), ("consensus_aligned", "after alignment")):
        pts = [(r["round"], max(r[key], 1e-12)) for r in rounds if r[key] is not None]
        if pts:
            ax.semilogy(*zip(*pts, strict=True), marker="o", ms=3, label=label)
    ax.set(title=f"{title}: parameter distance (lower: agents agree)", xlabel="round",
           ylabel="mean ‖θ_i − θ̄‖ (log scale)")  # fmt: skip
    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(LogFormatterSciNotation(labelOnlyBase=False))
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    pts = [(r["round"], r["disagreement"]) for r in rounds if r["disagreement"] is not None]
    if pts:
        bx.plot(*zip(*pts, strict=True), marker="o", ms=3, color="tab:red")
    bx.set(title=f"{title}: prediction disagreement", xlabel="round", ylim=(0, 1),
           ylabel="share of test predictions differing")  # fmt: skip
    bx.grid(alpha=0.3)
    for axis in (ax, bx):
        axis.xaxis.set_major_locator(MaxNLocator(nbins=10, integer=True))
    fig.tight_layout()
    fig.savefig(out / "consensus.png", dpi=110)
    plt.close(fig)


def round_table(rows: Sequence[Row], every: int = 1):
    """A rich Table of per-round means (every ``every``-th round, and the last)."""
    from rich.table import Table

    rounds = per_round(rows)
    shown = "all rounds" if every <= 1 else f"every {every} rounds and the last"
    table = Table(
        title=f"per-round means over agents ({shown}, of {len(rounds)})",
        caption="↑ higher is better, ↓ lower is better; disagree: mean ‖θ_i − θ̄‖",
    )
    for col in ("round", "global acc ↑", "local acc ↑", "disagree ↓", "MB sent", "rejected", "s"):
        table.add_column(col, justify="right")
    fmt = lambda v, spec: "–" if v is None else format(v, spec)  # noqa: E731
    for i, r in enumerate(rounds):
        if i % max(every, 1) and i != len(rounds) - 1:
            continue
        table.add_row(
            str(r["round"]), fmt(r["global_acc"], ".3f"), fmt(r["local_acc"], ".3f"),
            fmt(r["consensus"], ".3g"), f"{r['bytes_sent'] / 1e6:.2f}", str(r["rejected"]),
            f"{r['wall_s']:.2f}",
        )  # fmt: skip
    return table


SUMMARY_LABELS = {
    "topology": "topology", "protocol": "protocol", "data": "data", "agents": "agents (honest)",
    "rounds": "rounds", "chance_acc": "chance accuracy (1 / classes)",
    "final_global_acc": "final global acc ↑", "best_global_acc": "best global acc ↑",
    "best_round": "best round", "final_local_acc": "final local acc ↑",
    "consensus": "final disagreement ↓", "bytes_sent": "MB sent (all agents)",
    "bytes_received": "MB received (all agents)", "rejected": "payloads rejected",
    "wall_s": "round time, summed (s)", "elapsed_s": "elapsed (s)",
}  # fmt: skip
"""Summary keys in the order the summary table shows them, with their labels (units,
direction); other keys follow under their own names."""


def summary_table(summary: Mapping[str, Any]):
    """A two-column rich Table of the summary: what ran first, then the results (bytes in MB;
    the run name and values are text, never markup)."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"summary: {escape(str(summary.get('name', 'run')))}", show_header=False)
    table.add_column("metric", style="bold")
    table.add_column("value", justify="right")
    keys = [k for k in SUMMARY_LABELS if k in summary]
    keys += [k for k in summary if k not in SUMMARY_LABELS and k != "name"]
    for key in keys:
        value = summary[key]
        if key.startswith("bytes_"):
            value = value / 1e6
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        table.add_row(SUMMARY_LABELS.get(key, key.replace("_", " ")), escape(text))
    return table
