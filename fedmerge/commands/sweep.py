"""Run a sweep: one base config × a grid of overrides × seeds, one table and one plot.

examples:
  fedmerge sweep simulations/protocols_digits.yaml
  fedmerge sweep simulations/faults_digits.yaml --out runs/faults --set rounds=10
  fedmerge sweep simulations/protocols_digits.yaml --seeds 0     # a quick look, one seed

A sweep file has: name, base (a config mapping or a config file), set (overrides for every
cell), grid (dotted field -> list of values; every combination is a cell), cells (explicit
{label, set} cells) and seeds. See fedmerge/sweep.py for an example.

Writes DIR/results.json (every run's summary and per-round curve), table.csv, table.md and
accuracy.png (mean global accuracy vs round per cell). Every finished run is saved at once
under DIR/runs/ (one JSON file per resolved config), so running the same command again after
an interruption skips what finished and runs the rest. Progress: a bar on a terminal,
otherwise one line per finished run on stderr.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from fedmerge.sweep import expand, load_sweep, run_sweep, sweep_table, write_sweep

NAME = "sweep"
HELP = "run a grid of simulations over seeds and tabulate them"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sweep", help="sweep YAML (see simulations/)")
    parser.add_argument("--out", help="output directory (default: runs/<sweep name>; a rerun "
                        "resumes there)")  # fmt: skip
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="K=V",
                        help="override a field in every cell, repeatable")  # fmt: skip
    parser.add_argument("--seeds", help="comma-separated seeds replacing the file's")


def run(args: argparse.Namespace) -> int:
    spec = load_sweep(args.sweep)
    spec["set"] = [*(spec.get("set") or []), *args.sets]
    if args.seeds:
        spec["seeds"] = [int(s) for s in args.seeds.split(",")]
    name = str(spec.get("name") or Path(args.sweep).stem)
    total = len(expand(spec)) * len(spec.get("seeds") or [0])
    out = Path(args.out or Path("runs") / name)
    with _Progress(name, total) as on_run:
        results = run_sweep(spec, on_run, cache=out / "runs")
    rows = write_sweep(out, name, results)
    Console().print(sweep_table(name, rows))
    print(f"wrote {out}/ (results.json, table.csv, table.md, accuracy.png; runs/ per run)")
    return 0


class _Progress:
    """A rich bar on a terminal; elsewhere (a log, a pipe) one line per finished run."""

    def __init__(self, name: str, total: int) -> None:
        self.name, self.total, self.done, self.resumed = name, total, 0, 0
        self.bar = None
        self.start = time.perf_counter()

    def __enter__(self):
        if sys.stderr.isatty():
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(),
                                MofNCompleteColumn(), TimeElapsedColumn(),
                                console=Console(stderr=True), transient=True)  # fmt: skip
            self.bar.start()
            self.task = self.bar.add_task(self.name, total=self.total)
        return self.on_run

    def on_run(self, label: str, seed: int, run: dict[str, Any], resumed: bool) -> None:
        self.done += 1
        self.resumed += resumed
        if self.bar is not None:
            self.bar.update(self.task, advance=1, description=f"{self.name}: {label} seed {seed}")
            return
        acc = run["summary"]["final_global_acc"]
        acc = "–" if acc is None else f"{acc:.3f}"
        how = "resumed from an earlier run" if resumed else f"{run['summary']['wall_s']:.1f} s"
        print(f"[{self.done}/{self.total}] {label} · seed {seed}: final global acc "
              f"{acc} ({how}; {time.perf_counter() - self.start:.0f} s elapsed)",
              file=sys.stderr, flush=True)  # fmt: skip

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()
        if self.resumed:
            print(f"{self.resumed} of {self.total} run(s) resumed from earlier results",
                  file=sys.stderr)  # fmt: skip
