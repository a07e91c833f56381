"""A grid of simulator runs: base config × grid cells × seeds, one table, one plot.

A sweep file names a base :class:`~fedmerge.config.SimConfig` (any of its fields), one or
more grids (dotted field → list of values; a grid's cells are the product of its lists, and
the grids' cells are concatenated) and the seeds every cell runs with::

    name: dimat-vs-gossip
    base: {rounds: 10, agents: 0, train: {epochs: 2, momentum: 0.9}}
    seeds: [0, 1, 2]
    grids:
      - protocol.name: [dimat, gossip]
        model.init: [different, same]
        topology: [ring-8, {graph: torus, rows: 2, cols: 3}]
      - protocol.name: [local, centralized]
    lines: [protocol.name, topology]     # plot: one line per value of these, a panel per rest
    out: runs/dimat_sweep

Each run is :class:`fedmerge.simulator.Simulator` on the resolved config. Per cell the
table shows the mean global test accuracy over agents after the last round ("final") and
its best round ("best"), mean ± std over seeds, the bytes all agents sent per run and the
wall time per run.

    python -m fedmerge.experiments.sweep simulations/dimat_sweep.yaml
    python -m fedmerge.experiments.sweep simulations/dimat_sweep.yaml --set rounds=3 --seeds 0

Outputs in ``--out`` (default: the sweep's ``out``): ``runs.csv`` (one row per cell × seed),
``summary.json`` (per cell: the accuracy curve, mean and std over seeds), ``table.md`` and
``sweep.png``.
"""

from __future__ import annotations

import argparse
import copy
import csv
import io
import itertools
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from fedmerge.atomic import atomic_write_bytes, atomic_write_text
from fedmerge.config import SimConfig, load_config
from fedmerge.errors import ConfigError, FedmergeError
from fedmerge.protocols import get_protocol

SWEEP_FIELDS = ("name", "base", "seeds", "grids", "lines", "out")


@dataclass
class Sweep:
    name: str
    base: dict[str, Any]
    seeds: list[int]
    grids: list[dict[str, list[Any]]]
    lines: list[str] = field(default_factory=lambda: ["protocol.name", "topology"])
    out: str = "runs/sweep"


@dataclass(eq=False)  # cells compare by identity (they hold arrays)
class Cell:
    """One grid cell: ``values`` (dotted field → value) and the runs of every seed."""

    values: dict[str, Any]
    curves: list[np.ndarray] = field(default_factory=list)  # per seed: (rounds,) mean acc
    bytes_sent: list[int] = field(default_factory=list)
    wall: list[float] = field(default_factory=list)

    def label(self, keys: Sequence[str]) -> str:
        return " ".join(show(self.values.get(k, "–")) for k in keys)


def show(value: Any) -> str:
    """A grid value as a short label (a topology mapping as ``torus(rows=2,cols=3)``)."""
    if isinstance(value, dict):
        rest = ",".join(f"{k}={v}" for k, v in value.items() if k != "graph")
        return f"{value.get('graph', 'graph')}({rest})"
    return str(value)


def load_sweep(path: str | Path, overrides: Sequence[str] = (), seeds: str | None = None) -> Sweep:
    """Read a sweep YAML; ``overrides`` (``a.b=c``) apply to its base config."""
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read sweep {path}: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"sweep {path}: must be a mapping with base, seeds, grids")
    unknown = sorted(set(raw) - set(SWEEP_FIELDS))
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown sweep field (known: {', '.join(SWEEP_FIELDS)})")
    grids = raw.get("grids", [{}])
    grids = [grids] if isinstance(grids, dict) else grids
    if not isinstance(grids, list) or not all(isinstance(g, dict) for g in grids):
        raise ConfigError("grids: must be a list of mappings (dotted field -> list of values)")
    for i, grid in enumerate(grids):
        for key, values in grid.items():
            if not isinstance(values, list) or not values:
                raise ConfigError(f"grids[{i}].{key}: must be a non-empty list of values")
    seed_list = [int(s) for s in seeds.split(",")] if seeds else raw.get("seeds", [0])
    if not isinstance(seed_list, list) or not all(isinstance(s, int) for s in seed_list):
        raise ConfigError(f"seeds: must be a list of integers, got {seed_list!r}")
    base = load_config(raw.get("base") or {}, overrides).to_dict()  # validates the base
    sweep = Sweep(str(raw.get("name", Path(path).stem)), base, seed_list, grids,
                  list(raw.get("lines", ["protocol.name", "topology"])),
                  str(raw.get("out", f"runs/{Path(path).stem}")))  # fmt: skip
    for cell in cells(sweep):  # validate every cell before running any
        cell_config(sweep, cell, sweep.seeds[0])
    return sweep


def cells(sweep: Sweep) -> list[Cell]:
    """Every grid's product of values, in order."""
    out = []
    for grid in sweep.grids:
        keys = list(grid)
        for combo in itertools.product(*(grid[k] for k in keys)):
            out.append(Cell(dict(zip(keys, combo, strict=True))))
    return out


def cell_config(sweep: Sweep, cell: Cell, seed: int) -> SimConfig:
    """The base with the cell's values and ``seed`` set."""
    data = copy.deepcopy(sweep.base)
    for key, value in {**cell.values, "seed": seed}.items():
        node, *parents, leaf = [data, *key.split(".")]
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    try:
        cfg = load_config(data)
        get_protocol(cfg.protocol.name)  # fail before any run, not in the middle of the sweep
        return cfg
    except ConfigError as exc:
        raise ConfigError(f"cell {cell.label(list(cell.values))}: {exc}") from exc


def run_cell(cfg: SimConfig) -> tuple[np.ndarray, int, float]:
    """Simulate one config: ((rounds,) mean global accuracy over agents, bytes sent, seconds)."""
    from fedmerge.simulator import Simulator

    start = time.perf_counter()
    rows = Simulator(cfg).run()
    curve = np.full(cfg.rounds, np.nan)
    for r in range(1, cfg.rounds + 1):
        accs = [x["global_acc"] for x in rows if x["round"] == r and x["global_acc"] is not None]
        curve[r - 1] = np.mean(accs) if accs else np.nan
    return curve, int(sum(x["bytes_sent"] for x in rows)), time.perf_counter() - start


def run_sweep(sweep: Sweep, tick: Callable[[str], None] = lambda _: None) -> list[Cell]:
    """Run every cell with every seed (sequentially)."""
    grid = cells(sweep)
    keys = varying_keys(grid)
    for cell in grid:
        for seed in sweep.seeds:
            curve, sent, wall = run_cell(cell_config(sweep, cell, seed))
            cell.curves.append(curve)
            cell.bytes_sent.append(sent)
            cell.wall.append(wall)
            tick(f"{cell.label(keys)} seed {seed}: {curve[-1]:.3f}")
    return grid


def varying_keys(grid: Sequence[Cell]) -> list[str]:
    """The dotted fields some grid sets, in first-seen order."""
    return list(dict.fromkeys(k for cell in grid for k in cell.values))


def stats(cell: Cell) -> dict[str, Any]:
    """Per cell: final and best accuracy (mean, std over seeds), curve, bytes, wall."""
    curves = np.stack(cell.curves)  # (seeds, rounds)
    final, best = curves[:, -1], np.nanmax(curves, axis=1)
    ddof = 1 if len(curves) > 1 else 0
    return {
        "values": cell.values,
        "final_mean": float(final.mean()),
        "final_std": float(final.std(ddof=ddof)),
        "best_mean": float(best.mean()),
        "best_std": float(best.std(ddof=ddof)),
        "curve_mean": curves.mean(0).tolist(),
        "curve_std": curves.std(0, ddof=ddof).tolist(),
        "final_per_seed": final.tolist(),
        "bytes_sent": float(np.mean(cell.bytes_sent)),
        "wall_s": float(np.mean(cell.wall)),
    }


HEADERS = ["final acc", "best acc", "MB sent/run", "wall s/run"]


def table_rows(grid: Sequence[Cell]) -> list[list[str]]:
    keys = varying_keys(grid)
    rows = []
    for cell in grid:
        s = stats(cell)
        rows.append(
            [show(cell.values.get(k, "–")) for k in keys]
            + [f"{s['final_mean']:.3f} ± {s['final_std']:.3f}",
               f"{s['best_mean']:.3f} ± {s['best_std']:.3f}",
               f"{s['bytes_sent'] / 1e6:.1f}", f"{s['wall_s']:.1f}"]
        )  # fmt: skip
    return rows


def markdown(sweep: Sweep, grid: Sequence[Cell]) -> str:
    headers = varying_keys(grid) + HEADERS
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in table_rows(grid)]) + "\n"


def print_table(sweep: Sweep, grid: Sequence[Cell]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"{sweep.name}: mean global test accuracy over agents, mean ± std over seeds "
        f"{sweep.seeds}",
    )
    for key in varying_keys(grid):
        table.add_column(key)
    for header in HEADERS:
        table.add_column(header, justify="right")
    for row in table_rows(grid):
        table.add_row(*row)
    Console(width=max(Console().width, 140)).print(table)


def panels(sweep: Sweep, grid: Sequence[Cell]) -> dict[str, tuple[list[Cell], list[Cell]]]:
    """Panel title -> (cells drawn as lines, reference cells drawn dashed).

    A panel is one combination of the non-line fields. A cell that leaves some of those
    fields unset (e.g. ``local`` with no ``model.init``) is a reference: it is drawn in every
    panel that agrees with it on the fields it does set.
    """
    keys = varying_keys(grid)
    panel_keys = [k for k in keys if k not in sweep.lines]
    full = [c for c in grid if all(k in c.values for k in panel_keys)] or list(grid)
    out: dict[str, tuple[list[Cell], list[Cell]]] = {}
    for cell in full:
        out.setdefault(cell.label(panel_keys) or sweep.name, ([], []))[0].append(cell)
    for ref in (c for c in grid if c not in full):
        for members, refs in out.values():
            head = members[0].values
            if all(head.get(k) == v for k, v in ref.values.items() if k in panel_keys):
                refs.append(ref)
    return out


def plot_png(sweep: Sweep, grid: Sequence[Cell]) -> bytes:
    """A panel per combination of the non-line fields; a line (mean ± std) per line value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = varying_keys(grid)
    line_keys = [k for k in keys if k in sweep.lines]
    groups = panels(sweep, grid)
    cols = min(4, len(groups))
    rows = -(-len(groups) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax, (title, (members, refs)) in zip(axes.flat, groups.items(), strict=False):
        for cell in members + refs:
            s = stats(cell)
            mean, std = np.array(s["curve_mean"]), np.array(s["curve_std"])
            x = np.arange(1, len(mean) + 1)
            style = "--" if cell in refs else "-o"
            label = " ".join(show(cell.values[k]) for k in line_keys if k in cell.values)
            (line,) = ax.plot(x, mean, style, ms=2.5, lw=1.2, label=label)
            ax.fill_between(x, mean - std, mean + std, alpha=0.12, color=line.get_color())
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("round", fontsize=8)
        ax.set_ylabel("global test accuracy", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(groups) :]:
        ax.axis("off")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def write_outputs(sweep: Sweep, grid: Sequence[Cell], out_dir: str | Path) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    keys = varying_keys(grid)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow([*keys, "seed", "final_acc", "best_acc", "bytes_sent", "wall_s"])
    for cell in grid:
        for seed, curve, sent, wall in zip(sweep.seeds, cell.curves, cell.bytes_sent, cell.wall,
                                           strict=True):  # fmt: skip
            writer.writerow([show(cell.values.get(k, "")) for k in keys]
                            + [seed, f"{curve[-1]:.6f}", f"{np.nanmax(curve):.6f}", sent,
                               f"{wall:.3f}"])  # fmt: skip
    paths = {"csv": out / "runs.csv", "json": out / "summary.json", "table": out / "table.md",
             "plot": out / "sweep.png"}  # fmt: skip
    summary = {"name": sweep.name, "base": sweep.base, "seeds": sweep.seeds,
               "cells": [stats(c) for c in grid]}  # fmt: skip
    atomic_write_text(paths["csv"], buf.getvalue())
    atomic_write_text(paths["json"], json.dumps(summary, indent=2) + "\n")
    atomic_write_text(paths["table"], markdown(sweep, grid))
    atomic_write_bytes(paths["plot"], plot_png(sweep, grid))
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    from fedmerge.experiments.continual_report import progress_bar

    parser = argparse.ArgumentParser(
        prog="python -m fedmerge.experiments.sweep",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("sweep", help="sweep YAML (base, seeds, grids)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a base config field, e.g. --set rounds=3")  # fmt: skip
    parser.add_argument("--seeds", help="comma-separated seeds (overrides the sweep's)")
    parser.add_argument("--out", help="output directory (overrides the sweep's 'out')")
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: extra threads only contend for the cores
    try:
        sweep = load_sweep(args.sweep, args.set, args.seeds)
        with progress_bar(len(cells(sweep)) * len(sweep.seeds)) as tick:
            grid = run_sweep(sweep, tick)
        paths = write_outputs(sweep, grid, args.out or sweep.out)
    except FedmergeError as exc:
        print(f"sweep: error: {exc}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(threads)
    print_table(sweep, grid)
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
