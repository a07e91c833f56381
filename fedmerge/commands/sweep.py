"""Run a sweep: one base config × a grid of overrides × seeds, one table and one plot;
or run a recipe config (a YAML with ``recipe: run.py``) the same way.

examples:
  fedmerge sweep simulations/protocols_digits.yaml
  fedmerge sweep simulations/faults_digits.yaml --out runs/faults --set rounds=10
  fedmerge sweep simulations/protocols_digits.yaml --seeds 0     # a quick look, one seed
  fedmerge sweep simulations/continual/digits.yaml --set orders=2   # a recipe

Every shipped experiment runs this way: the sweeps in simulations/*.yaml and the recipes
in simulations/*/ (continual merging, dissemination). A sweep may name a report script
(report: dimat/compare.py) that runs on its output directory.

A sweep file has: name, base (a config mapping or a config file), set (overrides for every
cell), grid (dotted field -> list of values; every combination is a cell), cells (explicit
{label, set} cells) and seeds. See fedmerge/sweep.py for an example. As in simulate,
pkg.module:function references run code: only modules in FEDMERGE_TRUSTED_MODULES are
imported (docs/reliability.md).

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

from fedmerge.errors import ConfigError
from fedmerge.recipe import recipe_of
from fedmerge.report import Tick, progress
from fedmerge.sweep import expand, load_sweep, run_report, run_sweep, sweep_table, write_sweep

NAME = "sweep"
HELP = "run a grid of simulations over seeds and tabulate them"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sweep", help="sweep YAML or recipe config (see simulations/)")
    parser.add_argument("--out", help="output directory (default: runs/<sweep name>; a rerun "
                        "resumes there)")  # fmt: skip
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="K=V",
                        help="override a field in every cell, repeatable")  # fmt: skip
    parser.add_argument("--seeds", help="comma-separated seeds replacing the file's")


def run(args: argparse.Namespace) -> int:
    recipe = recipe_of(args.sweep)
    if recipe is not None:
        if args.seeds:
            raise ConfigError("a recipe config runs once: use --set seed=N instead of --seeds")
        return recipe.run_file(args.sweep, args.sets, args.out)
    spec = load_sweep(args.sweep)
    spec["set"] = [*(spec.get("set") or []), *args.sets]
    if args.seeds:
        spec["seeds"] = [int(s) for s in args.seeds.split(",")]
    name = str(spec.get("name") or Path(args.sweep).stem)
    total = len(expand(spec)) * len(spec.get("seeds") or [0])
    out = Path(args.out or Path("runs") / name)
    with progress(total, name) as tick:
        log = _RunLog(name, total, tick)
        results = run_sweep(spec, log.on_run, cache=out / "runs")
    log.close()
    rows = write_sweep(out, name, results)
    Console().print(sweep_table(name, rows))
    print(f"wrote {out}/ (results.json, table.csv, table.md, accuracy.png; runs/ per run)")
    for kind, path in run_report(spec, out).items():
        print(f"{kind}: {path}")
    return 0


class _RunLog:
    """Advances the progress bar per finished run; the line a log shows says the run's
    accuracy and whether it was resumed."""

    def __init__(self, name: str, total: int, tick: Tick) -> None:
        self.name, self.total, self.tick, self.resumed = name, total, tick, 0
        self.start = time.perf_counter()

    def on_run(self, label: str, seed: int, run: dict[str, Any], resumed: bool) -> None:
        self.resumed += resumed
        acc = run["summary"]["final_global_acc"]
        acc = "–" if acc is None else f"{acc:.3f}"
        how = "resumed from an earlier run" if resumed else f"{run['summary']['wall_s']:.1f} s"
        line = (f"{label} · seed {seed}: final global acc {acc} ({how}; "
                f"{time.perf_counter() - self.start:.0f} s elapsed)")  # fmt: skip
        self.tick(f"{self.name}: {label} seed {seed}", line=line)

    def close(self) -> None:
        if self.resumed:
            print(f"{self.resumed} of {self.total} run(s) resumed from earlier results",
                  file=sys.stderr)  # fmt: skip
