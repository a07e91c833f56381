"""The report toolkit every runner and recipe uses: rows, files, tables, plots, progress.

- :mod:`.rows`: per-round means and a run's summary of the metrics rows;
- :mod:`.files`: the files a run leaves (:func:`write_run`), the one CSV writer, JSON;
- :mod:`.tables`: rich tables for the terminal, Markdown for the docs;
- :mod:`.plots`: the one matplotlib (Agg) setup, atomic PNGs, the run plots;
- :mod:`.topology`: a topology drawn to PNG;
- :mod:`.progress`: the one progress bar.
"""

from typing import Any

from fedmerge.report.files import csv_text, write_json, write_jsonl, write_run
from fedmerge.report.plots import plot_run, pyplot, save_png
from fedmerge.report.progress import Tick, progress
from fedmerge.report.rows import Row, honest, per_round, summarize
from fedmerge.report.tables import markdown, rich_table, round_table, summary_table

__all__ = [
    "Row",
    "Tick",
    "csv_text",
    "draw_topology",
    "honest",
    "markdown",
    "per_round",
    "plot_run",
    "progress",
    "pyplot",
    "rich_table",
    "round_table",
    "save_png",
    "summarize",
    "summary_table",
    "write_json",
    "write_jsonl",
    "write_run",
]


def __getattr__(name: str) -> Any:
    """``draw_topology`` on first use: it needs networkx, which the CLI's --help must not load."""
    if name != "draw_topology":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from fedmerge.report.topology import draw_topology

    return draw_topology
