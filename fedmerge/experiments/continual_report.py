"""Reporting for the continual-merging experiment: summary, CSV, JSON, Markdown, plot, table.

All numbers come from :class:`~fedmerge.experiments.continual_tasks.ExperimentResult`;
accuracies are fractions in [0, 1] in the files and percentages in the tables.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedmerge.atomic import atomic_write_bytes, atomic_write_text
from fedmerge.experiments.continual_metrics import avg_seen, backward_transfer, mean_std

if TYPE_CHECKING:
    from fedmerge.experiments.continual_tasks import ExperimentResult, Tick


def methods_in(result: ExperimentResult) -> list[str]:
    """Method names in the order they were run (references first)."""
    return list(dict.fromkeys(run.method for run in result.runs))


def summarize(result: ExperimentResult) -> dict[str, dict[str, Any]]:
    """Per method: final average accuracy, BWT and the per-step curve, mean/std over orders."""
    out = {}
    for method in methods_in(result):
        Rs = [run.R for run in result.runs if run.method == method]
        curves = np.stack([avg_seen(R) for R in Rs])  # (orders, T)
        finals = curves[:, -1]
        bwts = [backward_transfer(R) for R in Rs]
        curve_mean, curve_std = mean_std(curves)
        out[method] = {
            "final_avg_acc_mean": float(finals.mean()),
            "final_avg_acc_std": float(mean_std(finals)[1]),
            "final_avg_acc_min": float(finals.min()),
            "final_avg_acc_max": float(finals.max()),
            "bwt_mean": float(np.mean(bwts)),
            "bwt_std": float(mean_std(bwts)[1]),
            "avg_acc_seen_mean": curve_mean.tolist(),  # per step
            "avg_acc_seen_std": curve_std.tolist(),
            "final_avg_acc_per_order": finals.tolist(),
        }
    return out


def step_rows(result: ExperimentResult) -> list[dict[str, Any]]:
    """One CSV row per method × order × step, with the accuracy on every task."""
    rows = []
    for run in result.runs:
        curve = avg_seen(run.R)
        for t, k in enumerate(run.order):
            row = {
                "method": run.method,
                "order": run.order_index,
                "step": t + 1,
                "task_added": result.task_names[k],
                "avg_acc_seen": round(float(curve[t]), 6),
                "avg_acc_all": round(float(run.acc[t].mean()), 6),
            }
            row.update(
                {
                    f"acc_{n}": round(float(a), 6)
                    for n, a in zip(result.task_names, run.acc[t], strict=True)
                }
            )
            rows.append(row)
    return rows


def summary_json(result: ExperimentResult) -> dict[str, Any]:
    return {
        "experiment": "continual merging on digits tasks",
        "config": dataclasses.asdict(result.config),
        "tasks": result.task_names,
        "orders": [[result.task_names[k] for k in order] for order in result.orders],
        "pretrained_acc": dict(zip(result.task_names, result.base_acc.tolist(), strict=True)),
        "expert_acc": dict(zip(result.task_names, result.expert_acc.tolist(), strict=True)),
        "methods": summarize(result),
        "seconds": result.seconds,
    }


def write_outputs(result: ExperimentResult, out_dir: str | Path) -> dict[str, Path]:
    """Write ``steps.csv``, ``summary.json``, ``table.md`` and ``accuracy_vs_step.png``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = step_rows(result)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    paths = {
        "csv": out / "steps.csv",
        "json": out / "summary.json",
        "table": out / "table.md",
        "plot": out / "accuracy_vs_step.png",
    }
    atomic_write_text(paths["csv"], buf.getvalue())
    atomic_write_text(paths["json"], json.dumps(summary_json(result), indent=2) + "\n")
    atomic_write_text(paths["table"], markdown_table(result))
    atomic_write_bytes(paths["plot"], plot_png(result))
    return paths


def _pct(mean: float, std: float) -> str:
    return "–" if math.isnan(mean) else f"{100 * mean:.1f} ± {100 * std:.1f}"


REFERENCE_NOTE = "individual = each expert on its own task (upper); pretrained = base body (lower)"
SUMMARY_HEADERS = ["method", "final avg acc %", "min–max over orders", "BWT %", "mean over steps %"]


def table_rows(result: ExperimentResult) -> list[list[str]]:
    """Per method: final avg accuracy, its range over orders, BWT, mean of the curve (in %)."""
    rows = []
    for method, s in summarize(result).items():
        bwt = "–" if method in ("individual", "pretrained") else _pct(s["bwt_mean"], s["bwt_std"])
        rows.append(
            [
                method,
                _pct(s["final_avg_acc_mean"], s["final_avg_acc_std"]),
                f"{100 * s['final_avg_acc_min']:.1f}–{100 * s['final_avg_acc_max']:.1f}",
                bwt,
                f"{100 * np.mean(s['avg_acc_seen_mean']):.1f}",
            ]
        )
    return rows


def step_table_rows(result: ExperimentResult) -> list[list[str]]:
    """Per method: the average accuracy on the seen tasks after each step (mean ± std, %)."""
    return [
        [method]
        + [
            f"{100 * m:.1f}±{100 * d:.1f}"
            for m, d in zip(s["avg_acc_seen_mean"], s["avg_acc_seen_std"], strict=True)
        ]
        for method, s in summarize(result).items()
    ]


def _steps_headers(result: ExperimentResult) -> list[str]:
    return ["method"] + [f"t={t}" for t in range(1, len(result.task_names) + 1)]


def _markdown(headers: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def markdown_table(result: ExperimentResult) -> str:
    """Both tables as Markdown (what the README shows)."""
    lines = _markdown(SUMMARY_HEADERS, table_rows(result))
    lines += [
        "",
        "Average accuracy (%) on the tasks seen so far after step t, mean ± std over orders:",
        "",
    ]
    lines += _markdown(_steps_headers(result), step_table_rows(result))
    return "\n".join(lines) + "\n"


def print_table(result: ExperimentResult, console: Console | None = None) -> None:
    """The summary table, then the curve (steps as rows, methods as columns), as rich tables."""
    console = console or Console()
    title = (
        f"Continual merging of {len(result.task_names)} digits tasks, {result.config.orders} "
        "task orders (mean ± std over orders)"
    )
    summary = Table(title=title, caption=REFERENCE_NOTE)
    summary.add_column(SUMMARY_HEADERS[0], no_wrap=True)
    for header in SUMMARY_HEADERS[1:]:
        summary.add_column(header, justify="right")
    for row in table_rows(result):
        summary.add_row(*row)
    stats = summarize(result)
    curve = Table(title="Average accuracy (%) on the tasks seen so far, after step t")
    curve.add_column("t", justify="right")
    for method in stats:
        curve.add_column(method, justify="right")
    for t in range(len(result.task_names)):
        cells = [
            f"{100 * s['avg_acc_seen_mean'][t]:.1f} ±{100 * s['avg_acc_seen_std'][t]:.1f}"
            for s in stats.values()
        ]
        curve.add_row(str(t + 1), *cells)
    console.print(summary)
    console.print(curve)


def plot_png(result: ExperimentResult) -> bytes:
    """Average accuracy on the tasks seen so far vs step, mean ± std over orders."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    steps = np.arange(1, len(result.task_names) + 1)
    for method, s in summarize(result).items():
        mean, std = np.array(s["avg_acc_seen_mean"]), np.array(s["avg_acc_seen_std"])
        ref = method in ("individual", "pretrained")
        (line,) = ax.plot(steps, 100 * mean, "--" if ref else "-o", ms=3, label=method)
        ax.fill_between(
            steps, 100 * (mean - std), 100 * (mean + std), alpha=0.15, color=line.get_color()
        )
    ax.set_xlabel("step (experts merged)")
    ax.set_ylabel("avg accuracy on tasks seen so far (%)")
    ax.set_title(f"Continual merging, digits tasks ({result.config.orders} orders, mean ± std)")
    ax.set_xticks(steps)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()


@contextlib.contextmanager
def progress_bar(total: int) -> Iterator[Tick]:
    """A rich progress bar; yields ``tick(label)`` that advances it by one."""
    columns = [
        TextColumn("{task.description:<40}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    ]
    with Progress(*columns, transient=False) as progress:
        bar = progress.add_task("continual merging", total=total)
        yield lambda label: progress.update(bar, advance=1, description=label)
