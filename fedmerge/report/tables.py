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
    """A rich Table; the first ``left`` columns are left-aligned, the rest right-aligned."""
    from rich.table import Table

    table = Table(title=title, **kw)
    for i, header in enumerate(headers):
        table.add_column(header, justify="left" if i < left else "right")
    for row in rows:
        table.add_row(*row)
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
    headers = ("round", "global acc", "local acc", "consensus", "MB sent", "rejected", "s")
    return rich_table("per-round means over agents", headers, cells, left=0)


def summary_table(summary: Mapping[str, Any]):
    """A two-column rich Table of the summary."""
    from rich.table import Table

    table = Table(title=f"summary: {summary.get('name', 'run')}", show_header=False)
    table.add_column("metric", style="bold")
    table.add_column("value", justify="right")
    for key, value in summary.items():
        if key == "name":
            continue
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        table.add_row(key.replace("_", " "), text)
    return table
