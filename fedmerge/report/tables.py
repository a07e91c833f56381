"""Tables: rich tables for the terminal and Markdown for the docs, from the same cells.

>>> print(markdown(["a", "b"], [["1", "2"]]), end="")
| a | b |
|---|---|
| 1 | 2 |
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fedmerge.report.rows import Row, per_round


def markdown(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table (with a trailing newline)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join([*lines, *("| " + " | ".join(row) + " |" for row in rows)]) + "\n"


def rich_table(
    title: str, headers: Sequence[str], rows: Sequence[Sequence[str]], *, left: int = 1, **kw: Any
):
    """A rich Table; the first ``left`` columns are left-aligned, the rest right-aligned.
    Title, headers and cells are text (run, task and cell names), never markup."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=escape(title), **kw)
    for i, header in enumerate(headers):
        table.add_column(escape(header), justify="left" if i < left else "right")
    for row in rows:
        table.add_row(*map(escape, row))
    return table


def round_table(rows: Sequence[Row], every: int = 1):
    """A rich Table of per-round means (every ``every``-th round, and the last)."""
    rounds = per_round(rows)
    fmt = lambda v, spec: "–" if v is None else format(v, spec)  # noqa: E731
    cells = [
        [
            str(r["round"]),
            fmt(r["global_acc"], ".3f"),
            fmt(r["local_acc"], ".3f"),
            fmt(r["consensus"], ".3g"),
            f"{r['bytes_sent'] / 1e6:.2f}",
            str(r["rejected"]),
            f"{r['wall_s']:.2f}",
        ]  # fmt: skip
        for i, r in enumerate(rounds)
        if not i % max(every, 1) or i == len(rounds) - 1
    ]
    headers = ("round", "global acc ↑", "local acc ↑", "distance ↓", "MB sent", "rejected", "s")
    shown = "all rounds" if every <= 1 else f"every {every} rounds and the last"
    return rich_table(
        f"per-round means over agents ({shown}, of {len(rounds)})", headers, cells, left=0,
        caption="↑ higher is better, ↓ lower is better; distance: mean ‖θ_i − θ̄‖",
    )  # fmt: skip


SUMMARY_LABELS = {
    "topology": "topology", "protocol": "protocol", "data": "data", "agents": "agents (honest)",
    "rounds": "rounds", "chance_acc": "chance accuracy (1 / classes)",
    "final_global_acc": "final global acc (after merging) ↑",
    "final_acc_trained": "final global acc after local training ↑",
    "best_global_acc": "best global acc ↑",
    "best_round": "best round", "worst_global_acc": "worst agent's final global acc ↑",
    "final_local_acc": "final local acc ↑",
    "consensus": "final parameter distance ↓",
    "consensus_aligned": "final parameter distance, aligned ↓",
    "disagreement": "final prediction disagreement ↓", "bytes_sent": "MB sent (all agents)",
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
