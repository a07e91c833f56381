"""Plots: the one matplotlib setup (Agg, no display needed) and the run plots.

Every figure in fedmerge is drawn through :func:`pyplot` and saved with
:func:`save_png` (atomic), so no other module selects a backend.
"""

from __future__ import annotations

import io
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from fedmerge.atomic import atomic_write_bytes
from fedmerge.report.rows import Row, per_round


def pyplot() -> ModuleType:
    """``matplotlib.pyplot`` on the Agg backend (imported on first use: keeps imports fast)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig: Any, path: str | Path, dpi: int = 110, **kwargs: Any) -> Path:
    """Write ``fig`` as a PNG at ``path`` atomically, close it and return the path."""
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=dpi, **kwargs)
    finally:
        pyplot().close(fig)
    out = Path(path)
    atomic_write_bytes(out, buf.getvalue())
    return out


def plot_run(out: Path, title: str, rows: Sequence[Row]) -> None:
    """accuracy.png (global and local, mean bold, agents faint; global after local training
    dashed) and consensus.png (plain and aligned parameter distance, prediction disagreement)."""
    from matplotlib.ticker import LogFormatterSciNotation, LogLocator, MaxNLocator

    plt = pyplot()
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
    save_png(fig, out / "accuracy.png")
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 3.8))
    values = []
    for key, label in (("consensus", "plain"), ("consensus_aligned", "after alignment")):
        pts = [(r["round"], max(r[key], 1e-12)) for r in rounds if r[key] is not None]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", ms=3, label=label)
            values += [v for _, v in pts]
    log = bool(values) and max(values) > 10 * min(values)  # log only beyond a decade
    ax.set(title=f"{title}: parameter distance (lower: agents agree)", xlabel="round",
           ylabel="mean ‖θ_i − θ̄‖" + (" (log scale)" if log else ""))  # fmt: skip
    if log:
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(LogFormatterSciNotation(labelOnlyBase=False))
    else:
        ax.yaxis.set_major_locator(MaxNLocator(nbins=8))
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
    save_png(fig, out / "consensus.png")
