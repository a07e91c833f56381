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
    """accuracy.png (global and local, mean bold, agents faint) and consensus.png."""
    from matplotlib.ticker import LogFormatterSciNotation, LogLocator, MaxNLocator

    plt = pyplot()
    rounds = per_round(rows)
    xs = [r["round"] for r in rounds]
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
        ax.set(title=f"{title}: {label} accuracy", xlabel="round", ylim=(0, 1))
        ax.xaxis.set_major_locator(MaxNLocator(nbins=10, integer=True))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy")
    axes[0].legend(loc="lower right")
    fig.tight_layout()
    save_png(fig, out / "accuracy.png")
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    cons = [max(r["consensus"] or 0.0, 1e-12) for r in rounds]
    ax.plot(xs, cons, marker="o", ms=3)
    log = max(cons) > 10 * min(cons)  # a log scale only where it spans more than a decade
    ax.set(title=f"{title}: disagreement (lower: agents agree)", xlabel="round",
           ylabel="mean ‖θ_i − θ̄‖" + (" (log scale)" if log else ""))  # fmt: skip
    if log:
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(LogFormatterSciNotation(labelOnlyBase=False))
    else:
        ax.yaxis.set_major_locator(MaxNLocator(nbins=8))
    ax.xaxis.set_major_locator(MaxNLocator(nbins=10, integer=True))
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    save_png(fig, out / "consensus.png")
