"""Run a sweep: one base config × a grid of overrides × seeds, one table and one plot;
or run a recipe config (a YAML with ``recipe: run.py``) the same way.

examples:
  fedmerge sweep simulations/protocols_digits.yaml
  fedmerge sweep simulations/faults_digits.yaml --out runs/faults --set rounds=10
  fedmerge sweep simulations/protocols_digits.yaml --seeds 0     # a quick look, one seed
  fedmerge sweep simulations/continual/digits.yaml --set orders=2   # a recipe

Every shipped experiment runs this way: the sweeps in simulations/*.yaml and the recipes
in simulations/*/ (continual merging, dissemination). A sweep may name a report script
(``report: dimat/compare.py``) that runs on its output directory.

A sweep file has: name, base (a config mapping or a config file), set (overrides for every
cell), grid (dotted field -> list of values; every combination is a cell), cells (explicit
{label, set} cells) and seeds. See fedmerge/sweep.py for an example.

Writes DIR/results.json (every run's summary and per-round curve), table.csv, table.md and
accuracy.png (mean global accuracy vs round per cell).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from fedmerge.errors import ConfigError
from fedmerge.recipe import recipe_of
from fedmerge.report import progress
from fedmerge.sweep import expand, load_sweep, run_report, run_sweep, sweep_table, write_sweep

NAME = "sweep"
HELP = "run a grid of simulations over seeds and tabulate them"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sweep", help="sweep YAML or recipe config (see simulations/)")
    parser.add_argument("--out", help="output directory (default: runs/<sweep name>)")
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
    with progress(total, name) as tick:
        results = run_sweep(spec, lambda label, seed: tick(f"{name}: {label} seed {seed}"))
    out = Path(args.out or Path("runs") / name)
    rows = write_sweep(out, name, results)
    Console(width=140).print(sweep_table(name, rows))
    print(f"wrote {out}/ (results.json, table.csv, table.md, accuracy.png)")
    for kind, path in run_report(spec, out).items():
        print(f"{kind}: {path}")
    return 0
